"""Serving the clients of a shared serial console: the session handler.

Each session (one WebSocket client) attaches to the :class:`Hub` of its
console stream, the stream the broker shares among the sessions on one
console (``Protocol.shared_console``), and runs three tasks in one group:

* ``read``: takes its turn reading the console and publishing to the hub;
* ``to_client``: sends the client what the hub queued for it;
* ``from_client``: passes the client's input on while it is the writer, and
  its control messages (framed clients) to the hub.

The client leaving, or the console ending once the client has been sent what
was queued, ends the group; the session detaches from the hub in any case
(the last one closes it and its recording). The recordings' retention is the
core's (``[recordings]``), for every plugin's recordings alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs

from broker.api import ClientChannel, ClientClosed, Config, Session

from . import _control as control
from ._config import TABLE
from ._hub import Attached, Hub
from ._recording import Recording

_CONSOLE_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    OSError,
)


@attrs.frozen
class Settings:
    """The ``[serial]`` configuration, as the handler uses it."""

    scrollback: int = 65536
    client_queue: int = 262144
    record: bool = False
    record_domains: frozenset[str] = frozenset()
    record_input: bool = False
    recordings_dir: Path = Path("recordings")
    recording_max_size: int = 10 * 1024 * 1024

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        serial = config.table(TABLE)
        return cls(
            scrollback=serial.scrollback,
            client_queue=serial.client_queue,
            record=serial.record,
            record_domains=frozenset(d.lower() for d in serial.record_domains),
            record_input=serial.record_input,
            recordings_dir=config.recordings_dir,
            recording_max_size=serial.recording_max_size,
        )

    def records(self, domain_name: str, domain_uuid: str) -> bool:
        """Whether the domain's serial console is recorded."""
        return self.record or bool(
            {domain_name.lower(), domain_uuid.lower()} & self.record_domains
        )


async def read_console(hub: Hub, stream: anyio.abc.ByteStream, read_size: int) -> None:
    """Take turns with the hub's other sessions reading *stream*, until it ends; never
    more than the least-behind client has room for (:meth:`Hub.room`)."""
    while True:
        async with hub.read_lock:
            room = await hub.wait_for_room()
            if hub.ended:
                return
            try:
                data = await stream.receive(max(1, min(read_size, room)))
            except _CONSOLE_ERRORS:
                hub.end()
                return
            hub.publish(data)


def _control_message(hub: Hub, client: Attached, text: str, log: Any) -> None:
    try:
        event = control.parse(text)
    except control.ControlError as exc:
        hub.error(client, exc.code, exc.message)
        return
    if isinstance(event, control.Takeover):
        previous = hub.writer
        if hub.takeover(client) and previous is not client:
            log.info("serial.takeover", had_writer=previous is not None)
    elif isinstance(event, control.Release):
        hub.release(client)
    elif isinstance(event, control.Resize):
        hub.resize(client, event.cols, event.rows)
    else:
        hub.pong(client, event.data)


class Hubs:
    """The hubs of one broker, one per shared console stream, and the session handler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._hubs: dict[int, Hub] = {}

    def __len__(self) -> int:
        return len(self._hubs)

    def hub_for(self, session: Session) -> Hub:
        """The hub of the session's console stream, made when its first session comes."""
        key = id(session.console_endpoint.stream)
        hub = self._hubs.get(key)
        if hub is not None:
            return hub
        settings = self.settings
        uuid = session.claims.domain_uuid
        device = session.claims.device
        recorder = None
        if settings.records(session.domain_name, uuid):
            recorder = Recording(
                settings.recordings_dir,
                domain_uuid=uuid,
                domain_name=session.domain_name,
                device=device,
                record_input=settings.record_input,
                max_size=settings.recording_max_size,
            )

        def forget(closed: Hub) -> None:
            if self._hubs.get(key) is closed:
                del self._hubs[key]

        hub = Hub(
            scrollback=settings.scrollback,
            client_queue=settings.client_queue,
            recorder=recorder,
            on_close=forget,
            domain_name=session.domain_name,
            domain_uuid=uuid,
            device=device,
        )
        self._hubs[key] = hub
        return hub

    async def serve(self, session: Session) -> None:
        """The session handler: attach the client, serve it, detach it."""
        hub = self.hub_for(session)
        framed = session.client.subprotocol == control.SUBPROTOCOL
        client = hub.attach(full=not session.view_only, framed=framed, name=session.id)
        log = session.log
        log.info(
            "serial.attached", role=client.role.value, clients=len(hub.clients), framed=framed,
            recording=str(hub.recorder.path) if isinstance(hub.recorder, Recording) else None,
        )
        peer = session.client
        try:
            async with anyio.create_task_group() as group:
                stream = session.console_endpoint.stream
                group.start_soon(read_console, hub, stream, session.read_size)
                group.start_soon(self._to_client, hub, client, peer, session, group.cancel_scope)
                group.start_soon(self._from_client, hub, client, peer, session, group.cancel_scope)
        finally:
            hub.detach(client)
            log.info(
                "serial.detached", clients=len(hub.clients), skipped=client.skipped,
                resyncs=client.resyncs,
            )

    @staticmethod
    async def _to_client(
        hub: Hub, client: Attached, peer: ClientChannel, session: Session,
        scope: anyio.CancelScope,
    ) -> None:
        resyncs = 0
        try:
            while True:
                item = await hub.next_item(client)
                if item is None:
                    break
                if client.resyncs != resyncs:
                    resyncs = client.resyncs
                    session.log.warning(
                        "serial.client_behind", skipped=client.skipped, resyncs=resyncs
                    )
                if isinstance(item, bytes):
                    session.traffic.count_to_client(len(item))
                    await peer.send(item)
                else:
                    await peer.send_text(item)
        except ClientClosed:
            pass
        scope.cancel()

    @staticmethod
    async def _from_client(
        hub: Hub, client: Attached, peer: ClientChannel, session: Session,
        scope: anyio.CancelScope,
    ) -> None:
        stream = session.console_endpoint.stream
        try:
            while True:
                message = await peer.receive_message()
                if isinstance(message, str):
                    if client.framed:
                        _control_message(hub, client, message, session.log)
                        continue
                    message = message.encode()
                if not message or not hub.may_write(client, message):
                    continue
                async with hub.write_lock:
                    if hub.writer is not client:  # taken over while waiting
                        continue
                    session.traffic.count_to_console(len(message))
                    await stream.send(message)
                hub.wrote(client, message)
        except ClientClosed:
            scope.cancel()
        except _CONSOLE_ERRORS:
            hub.end()  # the client is sent what is queued, then the session ends

