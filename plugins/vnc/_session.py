"""The VNC session: an RFB security proxy between the browser and QEMU.

Theory of operation. The broker speaks RFB on both sides of a session (the
sans-I/O layer in :mod:`broker_vnc.rfb`; docs/rfb.md and docs/vnc.md):

1. The broker's own ProtocolVersion goes to the browser at once (so the two
   handshakes overlap); the browser's answer waits in the WebSocket's queue.
2. Toward QEMU the broker is the RFB client: it logs in with the domain's VNC
   password (read from the secure XML, never sent to the browser) or VeNCrypt
   (TLS verified against ``vnc.tls_ca``; the I/O here wraps the stream when
   the sans-I/O client says :class:`~broker_vnc.rfb.StartTLS`), sends the
   configured shared flag, and reads ServerInit.
3. Toward the browser the broker is an RFB 3.8 server offering security None
   (the token authenticated the user), and passes QEMU's ServerInit on. If
   step 2 failed, the browser is refused with QEMU's reason instead.
4. Then the hot path: QEMU's bytes go to the browser as read (large reads,
   never parsed); the browser's messages go through
   :meth:`~broker_vnc.rfb.ClientMessageFilter.filter_data`, which frames them,
   drops input in view-only sessions and refuses what it cannot parse. With
   ``vnc.input = "single"`` it also drops the input of a full-rights session that
   does not hold the display's input now (``session.may_input``, read before each
   message), and a press of one while nobody holds it claims it.

With ``vnc.record`` (or the domain in ``vnc.record_domains``) the session's client is
wrapped before step 1 (:class:`~broker_vnc._recording.RecordedClient`): everything the
broker sends the browser, its own ProtocolVersion first, is recorded as it is sent
(:mod:`broker_vnc._recording`; in websocket mode, QEMU's stream as the browser gets it).

Each of these ends the session with a reason of the core's table: QEMU
refusing the login (``console_auth_failed``), QEMU breaking the protocol
(``console_protocol_error``), the browser breaking it (``client_protocol_error``).

In ``websocket`` mode the endpoint is QEMU's own WebSocket port and the bytes
pass through untouched: the browser speaks RFB with QEMU itself, so view-only
cannot be enforced and view-only tokens are refused (``view_only_unsupported``),
as is every session when one session at a time holds the input (``single``).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import attrs
from anyio.streams.tls import TLSStream
from lxml import etree

from broker.api import (
    CLIENT_PROTOCOL_ERROR,
    CONSOLE_AUTH_FAILED,
    CONSOLE_PROTOCOL_ERROR,
    CONSOLE_UNREACHABLE,
    VIEW_ONLY_UNSUPPORTED,
    ClientClosed,
    ConsoleTLS,
    Refused,
    Session,
    pump,
    tls_error,
)

from ._config import VNCSection
from ._recording import RecordedClient, RecordingSettings, recorder_for
from .rfb import (
    NEED_DATA,
    ClientInit,
    ClientMessageFilter,
    HandshakeRejected,
    RFBClient,
    RFBProtocolError,
    RFBSecurityError,
    RFBServer,
    SecuritySucceeded,
    ServerInit,
    StartTLS,
    VersionNegotiated,
)

#: Reads during the handshakes (they are a few dozen bytes).
_HANDSHAKE_READ = 65536
_CONSOLE_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,  # ssl.SSLError included
)

#: Reads the VNC password of a session's domain (None: no password set).
PasswordSource = Callable[[Session], Awaitable[bytes | None]]


@attrs.frozen
class VNCSettings:
    """What the VNC sessions of one broker share (from its ``[vnc]`` table)."""

    #: The ClientInit shared flag sent to QEMU.
    shared: bool = True
    #: TLS toward QEMU (VeNCrypt X509*); None: no TLS.
    tls: ConsoleTLS | None = None
    #: ``vnc.input``: ``single`` when one session at a time holds the display's input.
    input: str = "shared"

    @classmethod
    def from_config(cls, section: VNCSection) -> VNCSettings:
        """Settings from the ``[vnc]`` table; OSError/ssl.SSLError
        when a certificate file cannot be loaded."""
        if not section.tls_ca:
            return cls(shared=section.shared, input=section.input)
        tls = ConsoleTLS.from_files(
            section.tls_ca, section.tls_cert, section.tls_key, section.tls_server_name
        )
        return cls(shared=section.shared, tls=tls, input=section.input)


def graphics_password(xml: str, console: str = "vnc") -> bytes | None:
    """The ``passwd`` of the graphics element the *console* record names, in a
    domain's secure live XML (None when it has none)."""
    from broker.api import read_consoles

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(xml.encode(), parser)
    record = read_consoles(root).get(console)
    if record is None or record.device is None or record.index is None:
        return None
    devices = root.find("devices")
    if devices is None:
        return None
    elements = list(devices.iterchildren(record.device.tag))
    if record.index >= len(elements):
        return None
    password = elements[record.index].get("passwd")
    return password.encode() if password is not None else None


async def libvirt_password(session: Session) -> bytes | None:
    """The domain's VNC password, from ``virDomainGetXMLDesc(VIR_DOMAIN_XML_SECURE)``
    (read per session, so a password changed at run time is the one used)."""
    import libvirt

    dom = session.domain_handle
    if not isinstance(dom, libvirt.virDomain):
        return None
    try:
        xml = await anyio.to_thread.run_sync(dom.XMLDesc, libvirt.VIR_DOMAIN_XML_SECURE)
    except libvirt.libvirtError as exc:
        raise Refused(
            CONSOLE_UNREACHABLE, f"reading the domain's VNC password: {exc.get_error_message()}"
        ) from None
    return graphics_password(xml, session.console)


class _ConsoleGone(Exception):
    """QEMU closed the connection during the handshake (a stopping VM, say)."""


@attrs.frozen
class _Login:
    """Toward QEMU, after ServerInit."""

    stream: anyio.abc.ByteStream
    init: ServerInit
    trailing: bytes
    version: tuple[int, int]
    security_type: int
    subtype: int | None


class VNCSessionHandler:
    """The VNC plugin's session handler: ``await handler(session)``.

    With *recording* settings that record the session's domain, the session runs with
    its client wrapped in a :class:`~broker_vnc._recording.RecordedClient`: everything
    sent to the client, from the first byte, is recorded (:mod:`broker_vnc._recording`).
    """

    def __init__(
        self,
        settings: VNCSettings,
        *,
        password_source: PasswordSource = libvirt_password,
        recording: RecordingSettings | None = None,
    ) -> None:
        self.settings = settings
        self._password = password_source
        self.recording = recording

    async def __call__(self, session: Session) -> None:
        recorder = recorder_for(self.recording, session) if self.recording else None
        if recorder is None:
            await self._serve(session)
            return
        async with recorder.running():
            await self._serve(
                attrs.evolve(session, client=RecordedClient(session.client, recorder))
            )

    async def _serve(self, session: Session) -> None:
        if session.console_endpoint.kind == "websocket":
            await self._pass_through(session)
        else:
            await self._proxy(session)

    # --- websocket mode -------------------------------------------------------------------

    async def _pass_through(self, session: Session) -> None:
        if session.view_only:
            raise Refused(
                VIEW_ONLY_UNSUPPORTED,
                "websocket mode passes RFB through unparsed: view-only cannot be enforced",
            )
        if self.settings.input == "single":
            raise Refused(
                VIEW_ONLY_UNSUPPORTED,
                "websocket mode passes RFB through unparsed: with vnc.input = single a "
                "session that does not hold the input could not be made to watch",
            )
        end = await pump(
            session.client,
            session.console_endpoint.stream,
            traffic=session.traffic,
            read_size=session.read_size,
        )
        session.log.debug("vnc.pass_through_ended", side=end.value)

    # --- the security proxy ---------------------------------------------------------------

    async def _proxy(self, session: Session) -> None:
        started = time.monotonic()
        downstream = RFBServer()
        try:
            await self._to_client(session, downstream.data_to_send())
            password = await self._password(session)
            try:
                with anyio.fail_after(session.handshake_timeout):
                    login = await self._login(session, password)
            except TimeoutError:
                raise Refused(
                    CONSOLE_UNREACHABLE,
                    f"no RFB handshake from the VNC server within {session.handshake_timeout} s",
                ) from None
            except _ConsoleGone:
                session.log.info("vnc.console_closed_in_handshake")
                return
            except RFBSecurityError as exc:
                await self._refuse_client(session, downstream, exc.reason)
                raise Refused(CONSOLE_AUTH_FAILED, exc.reason) from None
            except ssl.SSLError as exc:
                why = f"TLS with the VNC server failed: {tls_error(exc)}"
                await self._refuse_client(session, downstream, why)
                raise Refused(CONSOLE_AUTH_FAILED, why) from None
            except RFBProtocolError as exc:
                raise Refused(CONSOLE_PROTOCOL_ERROR, exc.detail) from None
            client_init = await self._greet(session, downstream, login)
        except ClientClosed:
            return
        session.log.info(
            "vnc.connected",
            rfb_version=f"{login.version[0]}.{login.version[1]}",
            security_type=login.security_type,
            vencrypt_subtype=login.subtype,
            tls=isinstance(login.stream, TLSStream),
            shared=self.settings.shared,
            client_shared=client_init.shared,
            client_version=_version_text(downstream.version),
            width=login.init.width,
            height=login.init.height,
            view_only=session.view_only,
            handshake_ms=round((time.monotonic() - started) * 1000, 2),
        )
        seat = session.seat
        flt = ClientMessageFilter(
            view_only=not session.may_input,
            claim=seat.claim if seat is not None and seat.single else None,
        )
        await self._relay(session, login.stream, flt, downstream.take_trailing_data())

    async def _to_client(self, session: Session, data: bytes) -> None:
        if data:
            session.traffic.count_to_client(len(data))
            await session.client.send(data)

    async def _login(self, session: Session, password: bytes | None) -> _Login:
        """The RFB client handshake with QEMU, up to ServerInit."""
        settings = self.settings
        client = RFBClient(password=password, shared=settings.shared, tls=settings.tls is not None)
        stream: anyio.abc.ByteStream = session.console_endpoint.stream
        eof = False
        version = (0, 0)
        security: SecuritySucceeded | None = None
        while True:
            try:
                event = client.next_event()
            except RFBProtocolError as exc:
                if eof and not isinstance(exc, RFBSecurityError):
                    raise _ConsoleGone from None
                raise
            out = client.data_to_send()
            if out:
                session.traffic.count_to_console(len(out))
                try:
                    await stream.send(out)
                except _CONSOLE_ERRORS:
                    raise _ConsoleGone from None
            if event is NEED_DATA:
                try:
                    data: bytes | None = await stream.receive(_HANDSHAKE_READ)
                except _CONSOLE_ERRORS:
                    data, eof = None, True
                client.receive_data(data)
            elif isinstance(event, VersionNegotiated):
                version = event.version
            elif isinstance(event, StartTLS):
                stream = await self._start_tls(session, stream)
                client.tls_established()
            elif isinstance(event, SecuritySucceeded):
                security = event
            elif isinstance(event, ServerInit):
                assert security is not None
                return _Login(
                    stream, event, client.take_trailing_data(), version,
                    security.security_type, security.subtype,
                )

    async def _start_tls(
        self, session: Session, stream: anyio.abc.ByteStream
    ) -> anyio.abc.ByteStream:
        tls = self.settings.tls
        assert tls is not None  # RFBClient(tls=True) only with TLS configured
        address = None
        if session.console_endpoint.kind == "tcp":
            remote = stream.extra(anyio.abc.SocketAttribute.remote_address, None)  # noqa: S610
            if isinstance(remote, tuple):
                address = str(remote[0])
        context, name = tls.for_address(address)
        try:
            return await TLSStream.wrap(
                stream,
                server_side=False,
                hostname=name,
                ssl_context=context,
                standard_compatible=False,
            )
        except ssl.SSLError:
            raise
        except _CONSOLE_ERRORS:
            raise _ConsoleGone from None

    async def _refuse_client(self, session: Session, downstream: RFBServer, reason: str) -> None:
        """Tell the browser why, in RFB (noVNC shows it), before the close code."""
        downstream.reject(reason)
        try:
            with anyio.move_on_after(session.handshake_timeout):
                while True:
                    event = downstream.next_event()
                    await self._to_client(session, downstream.data_to_send())
                    if isinstance(event, HandshakeRejected):
                        return
                    if event is NEED_DATA:
                        downstream.receive_data(await session.client.receive())
        except (ClientClosed, RFBProtocolError):
            pass

    async def _greet(self, session: Session, downstream: RFBServer, login: _Login) -> ClientInit:
        """The RFB server handshake with the browser: None, then QEMU's ServerInit."""
        try:
            with anyio.fail_after(session.handshake_timeout):
                while True:
                    event = downstream.next_event()
                    await self._to_client(session, downstream.data_to_send())
                    if event is NEED_DATA:
                        downstream.receive_data(await session.client.receive())
                    elif isinstance(event, ClientInit):
                        downstream.send_server_init(login.init)
                        await self._to_client(session, downstream.data_to_send() + login.trailing)
                        return event
        except TimeoutError:
            raise Refused(
                CLIENT_PROTOCOL_ERROR,
                f"no RFB handshake from the client within {session.handshake_timeout} s",
            ) from None
        except RFBProtocolError as exc:
            raise Refused(CLIENT_PROTOCOL_ERROR, exc.detail) from None

    async def _relay(
        self,
        session: Session,
        upstream: anyio.abc.ByteStream,
        flt: ClientMessageFilter,
        first: bytes,
    ) -> None:
        """The hot path, until either side ends: QEMU -> browser raw, browser -> QEMU
        filtered (the core's pump with the filter as its ``to_console``: spliced in the
        read callbacks when nothing wraps the client)."""

        def to_console(data: bytes) -> bytes:
            flt.view_only = not session.may_input  # the holder may have changed meanwhile
            return flt.filter_data(data)

        try:
            forward = to_console(first)
            if forward:
                session.traffic.count_to_console(len(forward))
                await upstream.send(forward)
            elif first:  # dropped input (view-only) is still the user at work: not idle
                session.traffic.touch()
            await pump(
                session.client,
                upstream,
                traffic=session.traffic,
                read_size=session.read_size,
                to_console=to_console,
            )
        except RFBProtocolError as exc:
            raise Refused(CLIENT_PROTOCOL_ERROR, exc.detail) from None
        except (ClientClosed, *_CONSOLE_ERRORS):
            pass


def _version_text(version: tuple[int, int] | None) -> str | None:
    return f"{version[0]}.{version[1]}" if version is not None else None
