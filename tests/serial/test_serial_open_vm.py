"""``console-broker open`` for the serial console on the real stack: a real
``console-broker serve``, the tiny guest's serial port, and the command running in real
terminals (tmux panes) with keys typed by ``tmux send-keys`` and the screen read back
with ``tmux capture-pane``; ``--listen`` with a TCP client.

Each pane runs a shell, and the command in it (``python -m broker.cli open URL; echo
exit=$?``), so that detaching returns to that shell, whose ``stty -a`` shows the terminal
as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from serialkit import Served, serial_guest
from servedbroker import CLI, free_port

pytestmark = pytest.mark.vm

WATCHING = "you are watching: another client is typing (--take to take the keyboard)"
NOT_SENT = "another client has the keyboard: your keys are not sent"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    broker = Served(tmp_path_factory.mktemp("serial-open"), "record = true\n")
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged()


@pytest.fixture
def guest(testbed: Testbed) -> Iterator[Any]:
    dom = serial_guest(testbed)
    try:
        yield dom
    finally:
        testbed.remove(dom)


class Tmux:
    """A tmux server of its own (a unique socket name), 120x40 windows each running a
    plain shell in *directory*; killed by :meth:`kill`."""

    def __init__(self, directory: Path) -> None:
        self.socket = f"cb-open-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.directory = directory
        self.windows = 0
        self.env = {**os.environ, "HISTFILE": "/dev/null"}

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args],
            check=True, capture_output=True, text=True, env=self.env, timeout=10,
        ).stdout

    def window(self) -> str:
        """A new window (the first one starts the server) with a shell at its prompt."""
        name = f"w{self.windows}"
        shell = "bash --norc --noprofile"
        if self.windows == 0:
            self.tmux("new-session", "-d", "-x", "120", "-y", "40", "-s", "main", "-n", name,
                      "-c", str(self.directory), shell)
        else:
            self.tmux("new-window", "-d", "-t", "main", "-n", name, "-c", str(self.directory),
                      shell)
        self.windows += 1
        target = f"main:{name}"
        self.type(target, "PS1='shell''$ '")  # (bash sets its own PS1 over the environment's)
        self.wait_for(target, "\nshell$ ")
        return target

    def type(self, target: str, text: str, enter: bool = True) -> None:
        self.tmux("send-keys", "-t", target, "-l", text)
        if enter:
            self.tmux("send-keys", "-t", target, "Enter")

    def key(self, target: str, key: str) -> None:
        self.tmux("send-keys", "-t", target, key)

    def screen(self, target: str) -> str:
        """The pane's whole history and screen, wrapped lines joined."""
        return self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", target)

    def wait_for(self, target: str, text: str, timeout: float = 30, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(target)
            if screen.count(text) >= count:
                return screen
            assert time.monotonic() < deadline, f"{text!r} not on {target}:\n{screen}"
            time.sleep(0.1)

    def shell_ready(self, target: str, timeout: float = 90) -> None:
        """Press Enter in an attached pane until the guest's prompt answers."""
        deadline = time.monotonic() + timeout
        before = self.screen(target).count("guest# ")
        while self.screen(target).count("guest# ") <= before:
            assert time.monotonic() < deadline, self.screen(target)
            self.key(target, "Enter")
            end = time.monotonic() + 1
            while time.monotonic() < end and self.screen(target).count("guest# ") <= before:
                time.sleep(0.1)

    def kill(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.tmux("kill-server")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    server = Tmux(tmp_path)
    try:
        yield server
    finally:
        server.kill()


def open_command(url: str, *extra: str) -> str:
    """The shell line running ``console-broker open`` and printing its exit status."""
    args = " ".join([*CLI, "open", f"'{url}'", *extra])
    return f"{args}; echo exit=$?"


def attach(tmux: Tmux, served: Served, domain: str, *token_args: str, take: bool = False,
           url: str = "page") -> str:
    """A new window attached to *domain*'s console with a fresh token."""
    target = tmux.window()
    token = served.token(domain, *token_args)
    tmux.type(target, open_command(token[url], *(["--take"] if take else [])))
    tmux.wait_for(target, f"[console-broker] connected to {domain}")
    return target


def echoed(screen: str, word: str) -> bool:
    """Whether *word* is on the screen as the shell's answer (a line of its own), not
    only in the command line typed."""
    return re.search(rf"^{re.escape(word)}\s*$", screen, re.MULTILINE) is not None


def test_type_read_detach_and_the_terminal_is_as_it_was(
    served: Served, guest: Any, tmux: Tmux
) -> None:
    name = guest.name()
    pane = tmux.window()
    tmux.type(pane, "stty -a > before.txt; echo saved-$((1+1))")
    tmux.wait_for(pane, "\nsaved-2")
    token = served.token(name)
    tmux.type(pane, open_command(token["page"]))
    screen = tmux.wait_for(pane, "Ctrl+] detaches")
    assert f"[console-broker] connected to {name}, recorded; Ctrl+] detaches" in screen
    tmux.wait_for(pane, "[console-broker] you have the keyboard")
    tmux.shell_ready(pane)
    tmux.type(pane, "echo hello-$((6*7))")
    tmux.wait_for(pane, "\nhello-42")
    assert echoed(tmux.screen(pane), "hello-42")
    # Ctrl+C is the guest's: it interrupts the guest's command, not this one (pressed
    # until the prompt is back: one that came before the guest ran sleep did nothing).
    prompts = tmux.screen(pane).count("guest# ")
    tmux.type(pane, "sleep 30")
    deadline = time.monotonic() + 20
    while tmux.screen(pane).count("guest# ") <= prompts:
        assert time.monotonic() < deadline, tmux.screen(pane)
        time.sleep(0.5)
        tmux.key(pane, "C-c")
    tmux.type(pane, "echo after-$((2+2))")
    tmux.wait_for(pane, "\nafter-4")
    # The window's size goes to the broker (the recording has it), and its changes.
    tmux.tmux("resize-window", "-t", pane, "-x", "100", "-y", "30")
    time.sleep(0.5)
    tmux.type(pane, "echo resized-$((3+3))")
    tmux.wait_for(pane, "\nresized-6")
    tmux.tmux("resize-window", "-t", pane, "-x", "120", "-y", "40")  # as stty -a saw it
    tmux.type(pane, "echo back-$((4+5))")  # the size went out before these keys
    tmux.wait_for(pane, "\nback-9")
    # Ctrl+] detaches: exit status 0, back in the shell with the terminal as it was.
    tmux.key(pane, "C-]")
    tmux.wait_for(pane, "[console-broker] detached")
    tmux.wait_for(pane, "exit=0")
    tmux.type(pane, "stty -a > after.txt; echo saved-$((2+2))")
    tmux.wait_for(pane, "\nsaved-4")
    before = (tmux.directory / "before.txt").read_text()
    after = (tmux.directory / "after.txt").read_text()
    assert before == after and "icanon" in before and "-icanon" not in before
    # The recording holds the sizes, 120x40 first (the header stays 80x24).
    deadline = time.monotonic() + 10
    while not (listed := json.loads(served.cli("recordings", "--domain", name, "--json"))):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    lines = Path(listed[-1]["path"]).read_text().splitlines()
    sizes = [data for _, kind, data in map(json.loads, lines[1:]) if kind == "r"]
    assert sizes[:3] == ["120x40", "100x30", "120x40"], sizes
    output = "".join(data for _, kind, data in map(json.loads, lines[1:]) if kind == "o")
    assert "\r\nhello-42\r\n" in output


def test_a_second_terminal_watches_and_take_takes_the_keyboard(
    served: Served, guest: Any, tmux: Tmux
) -> None:
    name = guest.name()
    first = attach(tmux, served, name)
    tmux.wait_for(first, "[console-broker] you have the keyboard")
    tmux.shell_ready(first)
    # A second attachment, another token and pane: it watches.
    second = attach(tmux, served, name, url="websocket")
    tmux.wait_for(second, f"[console-broker] {WATCHING}")
    tmux.type(second, "echo watcher-$((2+3))")
    tmux.wait_for(second, f"[console-broker] {NOT_SENT}")
    tmux.type(first, "echo shared-$((40+2))")
    for pane in (first, second):
        tmux.wait_for(pane, "\nshared-42")
    for pane in (first, second):
        assert not echoed(tmux.screen(pane), "watcher-5")
    # A third, with --take: it has the keyboard, and the first is told.
    third = attach(tmux, served, name, take=True)
    tmux.wait_for(third, "[console-broker] you have the keyboard")
    assert WATCHING not in tmux.screen(third)
    tmux.wait_for(first, "[console-broker] another client took the keyboard over")
    tmux.type(first, "echo old-writer-$((4+4))")
    tmux.wait_for(first, f"[console-broker] {NOT_SENT}")
    tmux.type(third, "echo took-$((3+4))")
    for pane in (first, second, third):
        tmux.wait_for(pane, "\ntook-7")
    for pane in (first, second, third):
        screen = tmux.screen(pane)
        assert not echoed(screen, "old-writer-8") and not echoed(screen, "watcher-5")
    for pane in (first, second, third):
        tmux.key(pane, "C-]")
        tmux.wait_for(pane, "exit=0")


def test_a_view_only_token_types_nothing(served: Served, guest: Any, tmux: Tmux) -> None:
    name = guest.name()
    writer = attach(tmux, served, name)
    tmux.shell_ready(writer)
    viewer = attach(tmux, served, name, "--view-only", take=True)
    screen = tmux.wait_for(viewer, "[console-broker] view only: your keys are not sent")
    assert "[console-broker] view only: this token cannot take the keyboard" in screen
    tmux.type(viewer, "echo viewer-$((5+5))")
    # The writer's command comes after the viewer's keys: had they reached the guest, its
    # answer would be there first.
    tmux.type(writer, "echo marker-$((6+6))")
    for pane in (writer, viewer):
        tmux.wait_for(pane, "\nmarker-12")
        assert not echoed(tmux.screen(pane), "viewer-10")
    tmux.key(viewer, "C-]")
    tmux.wait_for(viewer, "exit=0")
    # Its writer leaves: the view-only client does not get the keyboard.
    tmux.key(writer, "C-]")
    tmux.wait_for(writer, "exit=0")


def test_a_used_token_is_one_line_and_exit_status_1(served: Served, guest: Any) -> None:
    token = served.token(guest.name())
    first = subprocess.run([*CLI, "open", token["websocket"]], input=b"", capture_output=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr  # stdin at its end: detached once quiet
    again = subprocess.run([*CLI, "open", token["websocket"]], input=b"", capture_output=True,
                           timeout=60)
    assert again.returncode == 1
    assert again.stdout == b""
    assert again.stderr.decode() == (
        "console-broker: error: the broker refused the token: token already used (401)\n"
    )


def test_the_vm_stopping_ends_the_attachment_with_its_reason(
    served: Served, testbed: Testbed, tmux: Tmux
) -> None:
    dom = serial_guest(testbed)
    try:
        pane = tmux.window()
        tmux.type(pane, "stty -a > before.txt; echo saved-$((1+1))")
        tmux.wait_for(pane, "\nsaved-2")
        tmux.type(pane, open_command(served.token(dom.name())["page"]))
        tmux.wait_for(pane, "[console-broker] you have the keyboard")
        tmux.shell_ready(pane)
        dom.destroy()
        screen = tmux.wait_for(pane, "exit=1")
        assert "[console-broker] the console closed: vm_stopped (4100): VM stopped" in screen
        assert "Traceback" not in screen
        tmux.type(pane, "stty -a > after.txt; echo saved-$((2+2))")
        tmux.wait_for(pane, "\nsaved-4")
        assert (tmux.directory / "before.txt").read_text() == (
            tmux.directory / "after.txt"
        ).read_text()
    finally:
        testbed.remove(dom)


def test_listen_gives_the_console_to_a_tcp_client(served: Served, guest: Any) -> None:
    port = free_port()
    token = served.token(guest.name())
    command = subprocess.Popen(
        [*CLI, "open", token["page"], "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert command.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        with client:
            seen = b""
            deadline = time.monotonic() + 90
            while b"hello-42" not in seen:
                assert time.monotonic() < deadline, seen[-400:]
                client.sendall(b"echo hello-$((6*7))\n")
                end = time.monotonic() + 2
                while time.monotonic() < end and b"hello-42" not in seen:
                    with contextlib.suppress(TimeoutError):
                        client.settimeout(0.5)
                        seen += client.recv(65536)
            # One client at a time: another is told and closed.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as other:
                other.settimeout(5)
                busy = b""
                while chunk := other.recv(1024):
                    busy += chunk
                assert busy == b"[console-broker: another client is connected to this port]\r\n"
        # The session outlives its TCP client: the next one types on.
        again, seen = connect_when_free(port)
        with again:
            again.sendall(b"echo again-$((7*7))\n")
            again.settimeout(10)
            while b"again-49\r\n" not in seen.replace(b"again-$((7*7))", b""):
                chunk = again.recv(65536)
                assert chunk, seen
                seen += chunk
        command.send_signal(signal.SIGINT)
        _, errors = command.communicate(timeout=15)
        assert command.returncode == 130
        text = errors.decode()
        assert f"console-broker: the console is on 127.0.0.1:{port}: raw bytes" in text
        assert "Traceback" not in text
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


def connect_when_free(port: int, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """A connection to ``--listen``'s *port* once the previous client is gone (until the
    command has seen it leave, a new one is told the port is busy); what it was sent."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.settimeout(0.5)
        try:
            first = sock.recv(65536)
        except TimeoutError:
            return sock, b""
        if not first.startswith(b"[console-broker: another client"):
            return sock, first
        sock.close()
        assert time.monotonic() < deadline
        time.sleep(0.1)
