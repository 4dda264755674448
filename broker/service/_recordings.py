"""``GET /recording?token=T[&part=N]``: a recording, for the page that plays it back.

The token's ``proto`` is ``recording`` (:data:`broker.recordings.RECORDING`) and its
``rec`` claim names the recording; its ``sub`` names the domain. Nothing of the request
names a file: :func:`broker.recordings.find_recording` looks for exactly that
recording's parts in ``{recordings.dir}/{sub}/`` (no symbolic link followed), and a
recording that is not there (never made here, or deleted by retention) is
``no_recording`` (404). Without ``part`` the answer is the recording's index (JSON:
its protocol, domain, start and parts, no path); with it, that part's bytes as the
plugin wrote them. The token is checked (signature, expiry, node) but not used up:
the page fetches the index and then each part with it, within its lifetime.

Files are read in a worker thread, one part at a time: a response holds at most one
part (a plugin's part size bounds it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import anyio.to_thread
import attrs

from broker.recordings import (
    RecordingInfo,
    RecordingKind,
    find_recording,
    read_part_bytes,
    recording_index,
)
from broker.service._refusals import NO_RECORDING, Refused
from broker.tokens import Claims


@attrs.frozen
class RecordingAnswer:
    """What the broker answers: a body, its type and headers, and what to log."""

    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]
    protocol: str
    part: int | None


class RecordingRequests:
    """Answers ``GET /recording`` from *directory*, for the recording *kinds* by protocol."""

    def __init__(self, directory: Path, kinds: Mapping[str, RecordingKind]) -> None:
        self.directory = directory
        self.kinds = dict(kinds)

    def _find(self, claims: Claims) -> tuple[RecordingKind, list[RecordingInfo]]:
        assert claims.recording is not None  # a recording token always has one (Claims)
        parts = find_recording(
            self.directory, list(self.kinds.values()), claims.domain_uuid, claims.recording
        )
        if not parts:
            raise Refused(NO_RECORDING, f"no recording {claims.recording} of the domain")
        kind = self.kinds[parts[0].protocol]
        return kind, [info for info in parts if info.protocol == kind.protocol]

    async def answer(self, claims: Claims, part: int | None) -> RecordingAnswer:
        """The index (*part* None) or a part of the recording *claims* name; Refused."""
        kind, parts = await anyio.to_thread.run_sync(self._find, claims)
        if part is None:
            body = json.dumps(recording_index(parts, kind)).encode() + b"\n"
            return RecordingAnswer(body, "application/json", (), kind.protocol, None)
        found = next((info for info in parts if info.part == part), None)
        if found is None:
            raise Refused(NO_RECORDING, f"recording {claims.recording} has no part {part}")
        try:
            body = await anyio.to_thread.run_sync(read_part_bytes, found)
        except OSError as exc:  # deleted (retention) since it was found
            raise Refused(NO_RECORDING, f"part {part}: {exc.strerror or exc}") from None
        name = f"recording-{claims.recording}-{part:03d}{kind.suffix}"
        disposition = (("Content-Disposition", f'inline; filename="{name}"'),)
        return RecordingAnswer(body, kind.content_type, disposition, kind.protocol, part)
