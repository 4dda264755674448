"""The control channel: a console page's presence panel and its "Take control" button.

``/ws/{protocol}/control?token=T`` is a WebSocket beside a session's own, for the
protocols that declare ``Protocol.presence`` (VNC, SPICE): the RFB and SPICE streams are
binary and their browser clients take every frame for the protocol (noVNC reads a text
frame as bytes, spice-html5 as a broken message), so presence travels on a channel of
its own, in JSON text frames, and the console stream stays the protocol alone. ``T`` is
the token (or handoff handle) that opened the session, used up by it: the channel is
admitted while that session lives on this broker, as a SPICE session's further
channels are, and has its rights (docs/service.md, "The control channel").

The messages (one JSON object per text frame, with a ``type``; unknown fields ignored):

* from the client: ``takeover`` (take the console's input, full rights in ``single``
  mode), ``release`` (give it up), ``ping`` (optional ``data``, answered ``pong``);
* from the broker: ``presence`` first and after every change of the console's sessions
  or of who holds its input (:func:`presence`), ``pong``, ``error`` (a message it could
  not take; the channel goes on).

:func:`parse` and the builders are sans-I/O; :func:`serve_control` is the loop of one
channel, until the client leaves or the session ends; :class:`ControlChannels` admits
the channels and runs them for the broker's listener.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import structlog

from broker.service._presence import PresenceState, Seat, Viewer
from broker.service._pump import ClientClosed
from broker.service._refusals import (
    CLIENT_CLOSED,
    INTERNAL_ERROR,
    INVALID_TOKEN,
    LIMIT_REACHED,
    REPLAYED_TOKEN,
    SHUTDOWN,
    TOKEN_REFUSALS,
    UNKNOWN_PROTOCOL,
    WRONG_PROTOCOL,
    Refusal,
    Refused,
)
from broker.service._session import ClientChannel, WebSocketChannel
from broker.tokens import TokenRefused

if TYPE_CHECKING:
    from broker.hookspecs import Protocol
    from broker.service._connection import BrokerConnection
    from broker.service._sessions import SessionRunner
    from broker.tokens import TokenVerifier

_log = structlog.get_logger("broker.service")

#: The WebSocket subprotocol of the control channel (a client offering none is welcome).
SUBPROTOCOL = "console-broker.control.v1"
#: Largest control message accepted, in characters.
MAX_CONTROL = 4096
#: Control channels open at once on one session (a page reconnecting after a network
#: hiccup may open a second before the first is gone).
MAX_PER_SESSION = 4


class ControlError(Exception):
    """A message the broker cannot take; ``code`` goes into the ``error`` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class Takeover:
    """Make my session the holder of the console's input."""


@attrs.frozen
class Release:
    """My session gives the console's input up."""


@attrs.frozen
class Ping:
    """Answer with a ``pong`` carrying *data*."""

    data: str | None = None


Event = Takeover | Release | Ping


def parse(message: str | bytes) -> Event:
    """The event a frame holds; :class:`ControlError` if it holds none."""
    if isinstance(message, bytes):
        raise ControlError("bad_message", "control messages are JSON text frames")
    if len(message) > MAX_CONTROL:
        raise ControlError(
            "bad_message", f"control messages are at most {MAX_CONTROL} characters"
        )
    try:
        doc = json.loads(message)
    except (ValueError, RecursionError):
        raise ControlError("bad_message", "a text frame must hold a JSON object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise ControlError("bad_message", "a control message is a JSON object with a 'type'")
    kind = doc["type"]
    if kind == "takeover":
        return Takeover()
    if kind == "release":
        return Release()
    if kind == "ping":
        data = doc.get("data")
        if data is not None and not isinstance(data, str):
            raise ControlError("bad_message", "ping: 'data' must be a string")
        return Ping(data)
    raise ControlError("unknown_type", f"unknown control message type {kind[:40]!r}")


def _message(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def _time(seconds: float) -> str:
    moment = datetime.fromtimestamp(int(seconds), UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _viewer(viewer: Viewer, you: str) -> dict[str, Any]:
    return {
        "id": viewer.id,
        "name": viewer.name,
        "address": viewer.address,
        "rights": viewer.rights,
        "protocol": viewer.protocol,
        "since": _time(viewer.since),
        "input": viewer.input,
        "you": viewer.id == you,
    }


def presence(state: PresenceState, *, full: bool, may_input: bool) -> str:
    """The console's sessions as the session *state* is for sees them: its own id,
    rights, input mode and whether its input goes to the console now, who holds the
    input (``single`` mode) and why, and every session's public facts."""
    return _message(
        "presence",
        you=state.you,
        rights="full" if full else "view",
        mode=state.mode,
        input=may_input,
        holder=state.holder,
        reason=state.reason,
        viewers=[_viewer(viewer, state.you) for viewer in state.viewers],
    )


def pong(data: str | None) -> str:
    return _message("pong", data=data)


def error(code: str, message: str) -> str:
    """A message was refused; the channel goes on."""
    return _message("error", error=code, message=message)


def apply(seat: Seat, event: Event) -> str | None:
    """Act on *event* for *seat*; the reply to send at once, if any (a ``takeover`` or
    ``release`` is answered by the ``presence`` its change brings)."""
    if isinstance(event, Ping):
        return pong(event.data)
    if not seat.full:
        return error("view_only", "this session is view-only: it cannot hold the input")
    if not seat.single:
        return error(
            "shared_input", "every full-rights session of this console sends input: "
            "there is nothing to take or release"
        )
    if isinstance(event, Takeover):
        seat.take()
    else:
        seat.release()
    return None


async def serve_control(client: ClientChannel, seat: Seat) -> None:
    """One control channel of *seat*'s session: the ``presence`` at once and after
    every change, the client's messages acted on, until the client leaves or the
    session ends (the caller closes the channel)."""
    lock = anyio.Lock()

    async def send(text: str) -> None:
        async with lock:
            await client.send_text(text)

    async def push(scope: anyio.CancelScope) -> None:
        try:
            while not seat.left:
                state = seat.state()
                await send(presence(state, full=seat.full, may_input=seat.may_input))
                await seat.changed(state.version)
        except ClientClosed:
            pass
        scope.cancel()

    async def read(scope: anyio.CancelScope) -> None:
        try:
            while not seat.left:
                message = await client.receive_message()
                try:
                    reply = apply(seat, parse(message))
                except ControlError as exc:
                    reply = error(exc.code, exc.message)
                if reply is not None:
                    await send(reply)
        except ClientClosed:
            pass
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(push, group.cancel_scope)
        group.start_soon(read, group.cancel_scope)


# --- the I/O: admitting and running control channels (for the broker's listener) ----------

#: How a control channel ends when its session has ended (1000, as a console's end).
SESSION_ENDED = Refusal("session_ended", 0, 1000, "the session ended")


@attrs.frozen
class PendingControl:
    """A checked control-channel request waiting for its upgrade."""

    seat: Seat
    protocol: str
    client: str


class ControlChannels:
    """The control channels of a broker's sessions: admitted by the token of a live
    session (a token's signature, protocol and node, or a handle's hash; not its
    lifetime nor its single use: its session used it), served until the client leaves
    or the session ends."""

    def __init__(self, runner: SessionRunner, verifier: TokenVerifier, node: str) -> None:
        self._runner = runner
        self._verifier = verifier
        self._node = node

    def admit(self, protocol: Protocol, token: str, client: str) -> PendingControl:
        """The seat of the session *token* opened; Refused if there is none to join."""
        if not protocol.presence:
            raise Refused(UNKNOWN_PROTOCOL, f"{protocol.name!r} sessions have no control channel")
        try:
            jti = self._verifier.session_jti(token, protocol=protocol.name, node=self._node)
        except TokenRefused as exc:
            raise Refused(TOKEN_REFUSALS.get(exc.reason, INVALID_TOKEN), exc.detail) from None
        seat = self._runner.seats.get(jti)
        if seat is None or seat.left:
            if self._verifier.used(jti):
                raise Refused(REPLAYED_TOKEN, "the token's session has ended")
            raise Refused(INVALID_TOKEN, "no session of this token is open on this broker")
        if seat.protocol != protocol.name:  # a handle names no protocol of its own
            raise Refused(
                WRONG_PROTOCOL, f"the session is {seat.protocol!r}, not {protocol.name!r}"
            )
        if seat.controls >= MAX_PER_SESSION:
            raise Refused(LIMIT_REACHED, f"{MAX_PER_SESSION} control channels of this session "
                          "are open already")
        return PendingControl(seat, protocol.name, client)

    async def serve(self, connection: BrokerConnection, pending: PendingControl) -> None:
        """Run one upgraded control channel, then close it with why it ended."""
        seat = pending.seat
        log = _log.bind(session=seat.id, protocol=pending.protocol, client=pending.client)
        if seat.left or seat.controls >= MAX_PER_SESSION:  # meanwhile
            await self._runner.close(connection, SESSION_ENDED if seat.left else LIMIT_REACHED)
            return
        seat.controls += 1
        log.info("control.opened", rights="full" if seat.full else "view", mode=seat.mode)
        failed = False
        try:
            await serve_control(WebSocketChannel(connection), seat)
        except Exception:
            log.exception("control.failed")
            failed = True
        finally:
            seat.controls -= 1
        ending = _ending(failed=failed, closing=self._runner.closing, ended=seat.left)
        await self._runner.close(connection, ending)
        log.info("control.closed", reason=ending.reason, code=ending.close_code)


def _ending(*, failed: bool, closing: bool, ended: bool) -> Refusal:
    """Why a control channel ended: an error, the broker shutting down, its session's
    end, else its client's."""
    if failed:
        return INTERNAL_ERROR
    if closing:
        return SHUTDOWN
    return SESSION_ENDED if ended else CLIENT_CLOSED
