"""The ``[serial]`` configuration table: its keys, and the hook declaring it.

The serial plugin reads it with ``config.table(TABLE)``; :func:`recordings_directory`
resolves where the recordings go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from broker.api import Config, ConfigTable, at_least, hookimpl, setting


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
        False, "Also record what the writing client typed ('i' events), in recordings."
    )
    recordings_dir: str = setting(
        "",
        "Directory the recordings are written to (created 0700), one subdirectory per "
        "domain UUID. Empty: 'recordings' in broker.state_dir.",
        path=True,
    )
    recording_max_size: int = setting(
        10_485_760,
        "Size in bytes past which a recording is continued in a new file (the next part).",
        at_least(4096),
    )
    recordings_keep_days: int = setting(
        0,
        "Days a recording file is kept after its last write; older files are deleted "
        "(never the part being written). 0: kept forever.",
        at_least(0),
    )
    recordings_max_total: int = setting(
        0,
        "Bytes all files in serial.recordings_dir may take together; past it, the files "
        "written longest ago are deleted first (never a part being written). 0: no limit.",
        at_least(0),
    )
    recordings_prune_interval: float = setting(
        3600.0,
        "Seconds between two retention passes while the broker runs (it also prunes on "
        "start and after a recording moves on to its next part), when "
        "serial.recordings_keep_days or serial.recordings_max_total is set.",
        at_least(1),
    )


#: The ``[serial]`` table: after ``[spice]`` in the documented defaults.
TABLE = ConfigTable(name="serial", schema=SerialSection, order=30)


def recordings_directory(config: Config) -> Path:
    """Where serial console recordings go: ``serial.recordings_dir`` (already resolved
    against the file's directory), else ``recordings`` in ``broker.state_dir``."""
    return Path(config.table(TABLE).recordings_dir or config.state_dir / "recordings")


@hookimpl
def console_broker_config_tables() -> list[ConfigTable[Any]]:
    return [TABLE]
