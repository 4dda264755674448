"""Sans-I/O: the serial console's control messages (docs/serial.md#control-messages).

A client that offers the WebSocket subprotocol :data:`SUBPROTOCOL` is
*framed*: binary frames carry terminal bytes both ways, text frames carry one
JSON object each, with a ``type``. Any other client is *raw*: every frame it
sends is terminal input, and it is sent terminal bytes only.

Client to broker: ``takeover``, ``release``, ``resize`` (``cols``, ``rows``),
``ping`` (optional ``data``). Broker to client: ``hello``, ``role``,
``clients``, ``skipped``, ``pong``, ``error``. :func:`parse` turns a text
frame into an event or raises :class:`ControlError` (the peer's mistake,
answered with an ``error`` message; the session goes on); the builders return
the text of a message.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

#: The WebSocket subprotocol of framed clients (the console page offers it).
SUBPROTOCOL = "console-broker.serial.v1"
#: Largest control message accepted, in characters.
MAX_CONTROL = 4096
#: Largest terminal size accepted in a ``resize``.
MAX_SIZE = 10_000


class ControlError(Exception):
    """A control message the broker cannot take; ``code`` goes into the ``error`` reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@attrs.frozen
class Takeover:
    """Make me the writer (full tokens only)."""


@attrs.frozen
class Release:
    """I give the writer role up."""


@attrs.frozen
class Resize:
    """My terminal is *cols* x *rows* (recorded from the writer; a serial line has no
    window size to tell the guest)."""

    cols: int
    rows: int


@attrs.frozen
class Ping:
    """Answer with a ``pong`` carrying *data*."""

    data: str | None = None


Event = Takeover | Release | Resize | Ping


def _size(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise ControlError("bad_message", f"resize: {name!r} must be an integer 1-{MAX_SIZE}")
    return value


def parse(text: str) -> Event:
    """The event a text frame holds; :class:`ControlError` if it holds none."""
    if len(text) > MAX_CONTROL:
        raise ControlError("bad_message", f"control messages are at most {MAX_CONTROL} characters")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise ControlError("bad_message", "a text frame must hold a JSON object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise ControlError("bad_message", "a control message is a JSON object with a 'type'")
    kind = doc["type"]
    if kind == "takeover":
        return Takeover()
    if kind == "release":
        return Release()
    if kind == "resize":
        return Resize(_size(doc, "cols"), _size(doc, "rows"))
    if kind == "ping":
        data = doc.get("data")
        if data is not None and not isinstance(data, str):
            raise ControlError("bad_message", "ping: 'data' must be a string")
        return Ping(data)
    raise ControlError("unknown_type", f"unknown control message type {kind[:40]!r}")


def _message(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def hello(
    *,
    domain_name: str,
    domain_uuid: str,
    device: str | None,
    rights: str,
    role: str,
    clients: int,
    scrollback: int,
    recording: bool,
) -> str:
    """The first message: what the client is attached to; *scrollback* bytes follow."""
    return _message(
        "hello",
        version=1,
        domain={"name": domain_name, "uuid": domain_uuid},
        device=device,
        rights=rights,
        role=role,
        clients=clients,
        scrollback=scrollback,
        recording=recording,
    )


def role(role: str, reason: str) -> str:
    """The client's role changed: ``writer`` or ``watcher``, and why."""
    return _message("role", role=role, reason=reason)


def clients(count: int, writer: bool) -> str:
    """Who is attached: *count* clients, and whether one of them is the writer."""
    return _message("clients", count=count, writer=writer)


def skipped(
    size: int, *, role: str, clients: int, writer: bool, scrollback: int
) -> str:
    """The client fell behind: output was dropped (*size* bytes in all so far), and the
    screen (*scrollback* bytes) follows; the current state is repeated."""
    return _message(
        "skipped", bytes=size, role=role, clients=clients, writer=writer, scrollback=scrollback
    )


def pong(data: str | None) -> str:
    return _message("pong", data=data)


def error(code: str, message: str) -> str:
    """A control message was refused or input dropped; the session goes on."""
    return _message("error", error=code, message=message)
