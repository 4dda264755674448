"""Helpers of the real-stack tests of ``console-broker open`` (tests/vnc, tests/spice):
the command run as a user runs it, a subprocess whose viewer is its child, on an Xvfb
screen of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servedbroker import CLI, ServedBroker
from spicebroker import XScreen


class Open:
    """``console-broker open ARGS`` as a user runs it, its output in a file; *env*: its
    environment (an Xvfb screen's)."""

    def __init__(self, directory: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = directory / f"open-{time.monotonic_ns()}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*CLI, "open", *args], stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert self.alive() and time.monotonic() < deadline, self.text()
            time.sleep(0.1)

    def viewer_pids(self) -> list[int]:
        """The viewer processes the command started (its children)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def end_the_viewer(self, timeout: float = 30.0) -> int:
        """Terminate the viewer, as closing its window ends it; the command's exit status."""
        pids = self.viewer_pids()
        assert pids, self.text()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)


@contextlib.contextmanager
def opened(directory: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Open]:
    """:class:`Open`, ended (with its viewer) at the end if it still runs."""
    command = Open(directory, *args, env=env)
    try:
        yield command
    finally:
        command.close()


@contextlib.contextmanager
def screen(directory: Path) -> Iterator[XScreen]:
    """An Xvfb screen of its own (:class:`spicebroker.XScreen`)."""
    made = XScreen(directory)
    try:
        yield made
    finally:
        made.close()


def events_after(served: ServedBroker, name: str, before: int, timeout: float = 20.0,
                 **match: Any) -> list[dict[str, Any]]:
    """The *name* events after the first *before* that have *match*'s fields, once
    there is one (or *timeout* passed)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in served.events(name)[before:]
                 if all(e.get(k) == v for k, v in match.items())]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)
