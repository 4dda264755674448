"""The names a console-broker plugin imports: plugins import from this module only.

Configuration: a plugin declares its tables with :class:`ConfigTable` (a frozen attrs
class whose fields are declared with :func:`setting`, checked with :func:`at_least`,
:func:`one_of`, :func:`tcp_port`, :func:`not_empty` or a :data:`Check` of its own)
through the ``console_broker_config_tables`` hook, and reads them back parsed with
:meth:`Config.table`. A plugin's command reads the configuration as the broker's own
commands do with :func:`read_config`.
"""

from __future__ import annotations

from broker.config import (
    Check,
    Config,
    ConfigError,
    ConfigTable,
    at_least,
    not_empty,
    one_of,
    setting,
    tcp_port,
)
from broker.configfile import read_config
from broker.hookspecs import hookimpl

__all__ = [
    "Check",
    "Config",
    "ConfigError",
    "ConfigTable",
    "at_least",
    "hookimpl",
    "not_empty",
    "one_of",
    "read_config",
    "setting",
    "tcp_port",
]
