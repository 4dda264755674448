"""``console-broker open`` for SPICE on the real stack: a ``console-broker serve``
subprocess refusing with HTTP statuses (the default ``http.refusals``), CLI tokens, the
tiny guest with SPICE in fd mode, and the ``open`` command run as a user runs it.

* remote-viewer on an Xvfb screen of its own shows the guest's VGA text console, through
  the generated ``.vv`` file (mode 0600 in a directory of mode 0700, removed at the
  end); the broker linked the main, display, inputs, cursor, playback, record and
  usbredir channels as WebSockets of one session (the channels after main in its
  group); closing the viewer ends the command (0);
* a used token: the broker's HTTP answer in one line, exit status 1.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_broker_testbed import Testbed
from openkit import events_after, opened, screen
from servedbroker import ServedBroker, enabled_guest, free_port
from spicebroker import link_main, ws_client

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedBroker]:
    broker = ServedBroker(tmp_path_factory.mktemp("spice-open"), protocol="spice", grace=2.0)
    try:
        yield broker
    finally:
        broker.stop()
    broker.assert_no_token_logged(jwt_shape=False)


#: A sound card: SPICE's playback and record channels (libvirt gives it SPICE's audio).
SOUND = "<sound model='ich6'/>\n"


@pytest.fixture(scope="module")
def guest(testbed: Testbed) -> Iterator[Any]:
    """The tiny guest with SPICE in fd mode (and its USB redirection) and a sound card."""
    dom = enabled_guest(testbed, "--consoles", "spice", "--mode", "fd", devices=SOUND)
    try:
        yield dom
    finally:
        testbed.remove(dom)


def vv_files() -> set[Path]:
    return set(Path("/tmp").glob("console-broker-spice-*/console.vv"))


@pytest.mark.usefixtures("remote_viewer")
def test_remote_viewer_shows_the_guest_with_its_channels_in_one_session(
    served: ServedBroker, guest: Any, tmp_path: Path
) -> None:
    uuid = guest.UUIDString()
    before = {name: len(served.events(name)) for name in ("spice.channel_linked",
                                                          "session.opened")}
    earlier = vv_files()
    websocket = served.token(guest.name())["websocket"]
    with screen(tmp_path) as x, opened(tmp_path, websocket, env=x.env) as command:
        x.wait_for_the_guests_screen(command.alive, command.text)
        ours = vv_files() - earlier
        assert len(ours) == 1, ours
        vv = ours.pop()
        assert vv.stat().st_mode & 0o777 == 0o600
        assert vv.parent.stat().st_mode & 0o777 == 0o700
        assert "type=spice\nhost=127.0.0.1\n" in vv.read_text()
        assert command.end_the_viewer() == 0, command.text()
    said = command.text()  # whichever the command saw first: the exit or the channel's end
    assert "the viewer exited" in said or "the viewer closed the session" in said, said
    assert not vv.parent.exists()
    linked = events_after(served, "spice.channel_linked", before["spice.channel_linked"],
                          domain=uuid)
    channels = {e["channel"] for e in linked}
    assert {"main", "display", "inputs", "cursor", "playback", "record", "usbredir"} <= (
        channels
    ), linked
    groups = {e.get("group") for e in linked if e["channel"] != "main"}
    assert len(groups) == 1 and None not in groups, linked  # one session's group
    sessions = events_after(served, "session.opened", before["session.opened"], domain=uuid)
    assert len(sessions) == len(linked)  # a WebSocket per channel
    assert all(e.get("subprotocol") == "binary" for e in sessions), sessions


def test_a_used_token_is_the_brokers_answer_in_one_line(
    served: ServedBroker, guest: Any, tmp_path: Path
) -> None:
    """The token is used by the main channel's WebSocket, when a client links it: here
    the test's, through ``--no-viewer --listen``."""
    issued = served.token(guest.name())
    main = ws_client(issued["websocket"])
    try:
        link_main(main)  # the session opened: the token is used
    finally:
        main.close()
    port = free_port()
    with opened(tmp_path, issued["page"], "--no-viewer", "--listen", str(port)) as command:
        command.wait_for("waiting for a SPICE client")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            # SpiceLinkHeader (REDQ, 2.2, size) and the start of a main channel's link
            sock.sendall(b"REDQ" + struct.pack("<III", 2, 2, 18) + struct.pack("<IB", 0, 1))
            assert command.process.wait(timeout=30) == 1, command.text()
            assert sock.recv(100) == b""  # the channel closed
    assert command.text().endswith(
        "console-broker: error: the broker refused the token: token already used (401)\n"
    ), command.text()
