"""Blocking-socket helpers of the real-stack tests: a SPICE test client and a small relay.

The client drives a ``ServerSide`` over a plain socket (to QEMU or to the relay). The
relay is the reference wiring of ``ClientSide`` + ``ServerSide`` for one session: policy
and session binding, the broker's own ticket, forwarding, and the DISPLAY_INIT guard.
It uses threads to stay short; the plugin does the same with anyio tasks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from xml.etree import ElementTree

from broker_spice.protocol import (
    NEED_DATA,
    PAUSED,
    ChannelPolicy,
    ChannelType,
    ClientSide,
    ClientTicket,
    ConnectionClosed,
    Data,
    Event,
    LinkError,
    LinkMessage,
    LinkReply,
    LinkResult,
    MainInit,
    ServerSide,
    Ticket,
    encrypt_ticket,
    ensure_same_framing,
)

SPICE_CAPS = (0b1011,)  # auth selection, SPICE auth, mini header: what spice-html5 sends
FULL_HEADER_CAPS = (0b0011,)
#: How long the guard waits for QEMU to confirm a DISPLAY_INIT before it closes anyway.
GUARD_TIMEOUT = 5.0


def spice_port(dom: object) -> int:
    """The TCP port of the domain's SPICE graphics, from its live XML."""
    root = ElementTree.fromstring(dom.XMLDesc(0))  # type: ignore[attr-defined]
    graphics = root.find("devices/graphics[@type='spice']")
    assert graphics is not None
    return int(graphics.get("port", "-1"))


def next_event(sock: socket.socket, side: ClientSide | ServerSide, timeout: float = 10.0) -> Event:
    """The side's next event, reading from *sock* as needed (EOF included)."""
    deadline = time.monotonic() + timeout
    while True:
        event = side.next_event()
        if event is PAUSED:
            raise AssertionError(f"{type(side).__name__} waits for the broker in {side.state}")
        if event is not NEED_DATA:
            return event
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        side.receive_data(sock.recv(65536))


def wait_for(
    sock: socket.socket,
    side: ClientSide | ServerSide,
    wanted: Callable[[Event], bool],
    timeout: float = 10.0,
) -> Event:
    deadline = time.monotonic() + timeout
    while True:
        event = next_event(sock, side, max(0.01, deadline - time.monotonic()))
        if wanted(event):
            return event
        if isinstance(event, ConnectionClosed):
            raise AssertionError(f"the connection closed before the wanted event ({event})")


class TestClient:
    """One SPICE channel connection of a test client."""

    __test__ = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.side = ServerSide()
        self.reply: LinkReply | None = None

    def link(
        self,
        channel_type: ChannelType,
        connection_id: int = 0,
        *,
        caps: tuple[int, ...] = SPICE_CAPS,
        ticket: bytes | None = None,
    ) -> LinkError:
        """Link the channel; return the link reply's error or else the link result.
        *ticket* replaces the real ticket (the relay must not care)."""
        link = LinkMessage(channel_type=channel_type, connection_id=connection_id, common_caps=caps)
        self.sock.sendall(self.side.send(link))
        reply = wait_for(self.sock, self.side, lambda e: isinstance(e, LinkReply))
        assert isinstance(reply, LinkReply)
        self.reply = reply
        if reply.error is not LinkError.OK:
            return reply.error
        encrypted = ticket if ticket is not None else encrypt_ticket(reply.public_key)
        self.sock.sendall(self.side.send(Ticket(encrypted)))
        result = wait_for(self.sock, self.side, lambda e: isinstance(e, LinkResult))
        assert isinstance(result, LinkResult)
        return result.error

    def send(self, data: bytes) -> None:
        self.sock.sendall(self.side.send(Data(data)))

    def wait_for(self, wanted: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        return wait_for(self.sock, self.side, wanted, timeout)

    def close_guarded(self) -> None:
        """Close like the broker does: the guard's bytes, then wait for QEMU's word."""
        close_guarded(self.sock, self.side)

    def close(self) -> None:
        self.sock.close()


def close_guarded(
    sock: socket.socket, side: ServerSide, lock: threading.Lock | None = None
) -> None:
    """The guard: complete DISPLAY_INIT toward QEMU and wait until closing is safe."""
    lock = lock or threading.Lock()
    with lock:
        guard = side.close_guard()
    if guard:
        sock.sendall(guard)
    deadline = time.monotonic() + GUARD_TIMEOUT
    while time.monotonic() < deadline:
        with lock:
            if side.safe_to_close:
                break
            event = side.next_event()
        if event is NEED_DATA:
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            with lock:
                side.receive_data(data)
    sock.close()


class Relay:
    """A broker in miniature for one SPICE session on a TCP port of its own."""

    def __init__(
        self,
        connect_backend: Callable[[], socket.socket],
        policy: ChannelPolicy,
        password: str = "",
    ) -> None:
        self.connect_backend = connect_backend
        self.policy = policy
        self.password = password
        self.session_id: int | None = None
        self.log: list[tuple[ChannelType, str]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._spawn(self._accept)

    def connect(self) -> TestClient:
        return TestClient(socket.create_connection(("127.0.0.1", self.port)))

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):  # shutdown wakes the blocked accept()
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=GUARD_TIMEOUT + 5)

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._spawn(self._channel, conn)

    def _channel(self, conn: socket.socket) -> None:
        client, server = ClientSide(), ServerSide()
        link = next_event(conn, client)
        if not isinstance(link, LinkMessage):
            conn.close()
            return
        answer = self.policy.check(link, session_id=self.session_id)
        if answer is not LinkError.OK:
            self.log.append((link.channel_type, f"refused {answer.name}"))
            conn.sendall(client.send(LinkReply(error=answer)))
            conn.close()
            return
        backend = self.connect_backend()
        backend.sendall(server.send(link))
        reply = next_event(backend, server)
        assert isinstance(reply, LinkReply)
        conn.sendall(client.send(reply))
        if reply.error is not LinkError.OK:
            conn.close()
            backend.close()
            return
        ticket = next_event(conn, client)
        if not isinstance(ticket, ClientTicket):  # the client left during the link
            backend.close()
            conn.close()
            return
        backend.sendall(server.send(Ticket(encrypt_ticket(reply.public_key, self.password))))
        result = next_event(backend, server)
        assert isinstance(result, LinkResult)
        conn.sendall(client.send(result))
        self.log.append((link.channel_type, f"linked {result.error.name}"))
        if result.error is not LinkError.OK:
            conn.close()
            backend.close()
            return
        ensure_same_framing(client, server)
        channel = _Channel(self, conn, backend, client, server)
        upstream = self._spawn(channel.client_to_server)
        channel.server_to_client()
        upstream.join()


class _Channel:
    """The message phase of one relayed channel: a thread per direction, one lock for
    both side objects (socket I/O happens outside it)."""

    def __init__(
        self,
        relay: Relay,
        conn: socket.socket,
        backend: socket.socket,
        client: ClientSide,
        server: ServerSide,
    ) -> None:
        self.relay = relay
        self.conn = conn
        self.backend = backend
        self.client = client
        self.server = server
        self.cond = threading.Condition()
        self.client_gone = False

    def client_to_server(self) -> None:
        try:
            while data := self.conn.recv(65536):
                with self.cond:
                    self.client.receive_data(data)
                    out = [
                        self.server.send(event)
                        for event in self.client.available_events()
                        if isinstance(event, Data)
                    ]
                for chunk in out:
                    self.backend.sendall(chunk)
        except OSError:
            pass
        kind = self.client.channel_type
        self.relay.log.append((kind or ChannelType.MAIN, "client gone"))
        # the guard: complete DISPLAY_INIT toward QEMU, wait for its word, then close
        with self.cond:
            self.client_gone = True
            guard = self.server.close_guard()
        try:
            if guard:
                self.backend.sendall(guard)
                self.relay.log.append((kind or ChannelType.MAIN, "guard sent"))
            with self.cond:
                safe = self.cond.wait_for(lambda: self.server.safe_to_close, GUARD_TIMEOUT)
            self.relay.log.append((kind or ChannelType.MAIN, f"safe to close: {safe}"))
            self.backend.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.backend.close()

    def server_to_client(self) -> None:
        try:
            while data := self.backend.recv(65536):
                with self.cond:
                    self.server.receive_data(data)
                    events = self.server.available_events()
                    self.cond.notify_all()
                # act on what the chunk says before forwarding it (session binding)
                for event in events:
                    if isinstance(event, MainInit):
                        self.relay.session_id = event.session_id
                for event in events:
                    if isinstance(event, Data) and not self.client_gone:
                        try:
                            with self.cond:
                                out = self.client.send(event)
                            self.conn.sendall(out)
                        except OSError:
                            self.client_gone = True
        except OSError:
            pass
        with self.cond:
            self.cond.notify_all()
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()


