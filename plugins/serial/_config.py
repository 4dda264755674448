"""The ``[serial]`` configuration table: its keys, and the hook declaring it.

The serial plugin reads it with ``config.table(TABLE)``; where the recordings go is
the core's ``config.recordings_dir``.
"""

from __future__ import annotations

from typing import Any

import attrs

from broker.api import ConfigTable, at_least, hookimpl, setting


@attrs.frozen
class SerialSection:
    """The serial plugin: shared sessions, scrollback and recordings (see docs/serial.md)."""

    scrollback: int = setting(
        65_536,
        "Bytes of a console's latest output kept and replayed to each client that "
        "attaches, so it sees the current screen at once; 0: none.",
        at_least(0),
    )
    client_queue: int = setting(
        262_144,
        "Bytes of output queued for one client: a client further behind skips to the "
        "scrollback (it is sent the screen again) instead of slowing the others.",
        at_least(4096),
    )
    record: bool = setting(
        False, "Record every serial console's output as asciicast v2 files."
    )
    record_domains: tuple[str, ...] = setting(
        (), "Domains (names or UUIDs) whose serial consoles are recorded even when "
        "serial.record is false.",
    )
    record_input: bool = setting(
        False,
        "Also record what the writing client typed ('i' events), in recordings: "
        "passwords typed at a login prompt included.",
    )
    recording_max_size: int = setting(
        10_485_760,
        "Size in bytes past which a recording is continued in a new file (the next part).",
        at_least(4096),
    )


#: The ``[serial]`` table: after ``[spice]`` in the documented defaults. Where recordings
#: go and how long they are kept is every plugin's: the core's ``[recordings]`` table.
TABLE = ConfigTable(
    name="serial",
    schema=SerialSection,
    order=30,
    moved={
        "recordings_dir": "recordings.dir",
        "recordings_keep_days": "recordings.keep_days",
        "recordings_max_total": "recordings.max_total",
        "recordings_prune_interval": "recordings.prune_interval",
    },
)


@hookimpl
def console_broker_config_tables() -> list[ConfigTable[Any]]:
    return [TABLE]
