"""What a command reports when it fails: :class:`CommandError` and the exit statuses.

A leaf module (it imports nothing of ``broker``), so that every command, the core's
and a plugin's (``console_broker_commands``), can raise :class:`CommandError` without
importing :mod:`broker.cli`, which imports the commands.
"""

from __future__ import annotations

#: Exit status of a command that failed (a :class:`CommandError` without a status).
EXIT_FAILURE = 1
#: Exit status for a usage or input error (as argparse uses).
EXIT_USAGE = 2


class CommandError(Exception):
    """An error to report to the user as one line, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class PluginError(Exception):
    """A plugin could not be loaded or broke the plugin contract (or, raised by a plugin,
    a configuration it cannot use): the command or the broker stops with its message."""
