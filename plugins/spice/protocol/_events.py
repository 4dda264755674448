"""Events: what a side object reports it received, and what the broker tells it to send.

Every event is a frozen attrs class: compare them, put them in sets, rewrite one with
``attrs.evolve``. Values are checked on construction (a bad value raises
:class:`SpiceUsageError`), so an event that exists can always be put on the wire.

Capability lists are tuples of u32 words; bit *n* of the list is bit ``n % 32`` of
word ``n // 32`` (spice-protocol's ``SPICE_COMMON_CAP_*`` numbers for the common list,
the channel's own ``SPICE_<CHANNEL>_CAP_*`` numbers for the channel list).
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

from ._constants import (
    MAX_CAPS,
    PUBKEY_SIZE,
    TICKET_SIZE,
    AuthMechanism,
    ChannelType,
    LinkError,
)
from ._errors import SpiceUsageError

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ClientTicket",
    "ConnectionClosed",
    "Data",
    "DisplayInit",
    "Event",
    "LinkMessage",
    "LinkReply",
    "LinkResult",
    "MainInit",
    "Message",
    "Ticket",
    "Wait",
    "caps_with",
    "has_cap",
]


class Wait(enum.Enum):
    """What :meth:`next_event` returns when it has no event."""

    #: Feed more bytes with ``receive_data``.
    NEED_DATA = "NEED_DATA"
    #: The protocol waits for the broker: ``send`` the answer the state asks for first.
    PAUSED = "PAUSED"


NEED_DATA: Final = Wait.NEED_DATA
PAUSED: Final = Wait.PAUSED


# --- value checks ---------------------------------------------------------------


def _check_uint(bits: int) -> Any:
    top = 1 << bits

    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or not 0 <= value < top:
            raise SpiceUsageError(f"{type(instance).__name__}.{attribute.name} must be a u{bits}")

    return check


def _check_int(bits: int) -> Any:
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)

    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or not low <= value < high:
            raise SpiceUsageError(f"{type(instance).__name__}.{attribute.name} must be an i{bits}")

    return check


def _check_caps(instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: Any) -> None:
    if not isinstance(value, tuple) or len(value) > MAX_CAPS:
        raise SpiceUsageError(f"{attribute.name} must be a tuple of at most {MAX_CAPS} words")
    for word in value:
        if not isinstance(word, int) or not 0 <= word <= 0xFFFFFFFF:
            raise SpiceUsageError(f"{attribute.name} holds a value that is not a u32: {word!r}")


def _caps(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _channel_type(value: Any) -> ChannelType:
    try:
        return ChannelType(value)
    except ValueError:
        raise SpiceUsageError(f"{value!r} is not a SPICE channel type") from None


def _link_error(value: Any) -> LinkError:
    try:
        return LinkError(value)
    except ValueError:
        raise SpiceUsageError(f"{value!r} is not a SPICE link error") from None


def _auth_mechanism(value: Any) -> AuthMechanism | None:
    if value is None:
        return None
    try:
        return AuthMechanism(value)
    except ValueError:
        raise SpiceUsageError(f"{value!r} is not a SPICE auth mechanism") from None


def has_cap(words: tuple[int, ...], bit: int) -> bool:
    """Whether capability *bit* is set in the capability list *words*."""
    index, shift = divmod(bit, 32)
    return index < len(words) and bool(words[index] >> shift & 1)


def caps_with(words: tuple[int, ...], bit: int, present: bool = True) -> tuple[int, ...]:
    """*words* with capability *bit* set (or cleared when *present* is false)."""
    index, shift = divmod(bit, 32)
    if not present and index >= len(words):
        return words
    out = list(words) + [0] * (index + 1 - len(words))
    out[index] = out[index] | (1 << shift) if present else out[index] & ~(1 << shift)
    return tuple(out)


# --- link phase ---------------------------------------------------------------------


@attrs.frozen
class LinkMessage:
    """A client's ``SpiceLinkHeader`` + ``SpiceLinkMess``: which channel it opens.

    Received by ``ClientSide`` from the client; sent by the broker through
    ``ServerSide`` to QEMU (as received, or rewritten with ``attrs.evolve``).

    - *channel_type*, *channel_id*: the channel (display 0, display 1, ...).
    - *connection_id*: 0 for a main channel (a new session); for every other channel,
      the session id the server announced in the main channel's ``MAIN_INIT``.
    - *common_caps*, *channel_caps*: the client's capability words.
    - *minor_version*: the header's minor version as received (always sent as 2).
    """

    channel_type: ChannelType = attrs.field(converter=_channel_type)
    channel_id: int = attrs.field(default=0, validator=_check_uint(8))
    connection_id: int = attrs.field(default=0, validator=_check_uint(32))
    common_caps: tuple[int, ...] = attrs.field(default=(), converter=_caps, validator=_check_caps)
    channel_caps: tuple[int, ...] = attrs.field(default=(), converter=_caps, validator=_check_caps)
    minor_version: int = attrs.field(default=2, validator=_check_uint(32))

    def has_common_cap(self, bit: int) -> bool:
        return has_cap(self.common_caps, bit)

    def has_channel_cap(self, bit: int) -> bool:
        return has_cap(self.channel_caps, bit)


def _check_pubkey(instance: object, attribute: attrs.Attribute[bytes], value: Any) -> None:
    if not isinstance(value, bytes) or len(value) not in (0, PUBKEY_SIZE):
        raise SpiceUsageError(f"public_key must be empty or {PUBKEY_SIZE} bytes of DER")


@attrs.frozen
class LinkReply:
    """A server's ``SpiceLinkHeader`` + ``SpiceLinkReply``.

    Received by ``ServerSide`` from QEMU; sent by the broker through ``ClientSide``
    to the client (forwarded, or built: ``LinkReply(error=LinkError.PERMISSION_DENIED)``
    refuses a channel the way spice-server does).

    - *error*: ``LinkError.OK`` or why the server refuses the channel.
    - *public_key*: with OK, the server's 1024-bit RSA key (DER SubjectPublicKeyInfo,
      162 bytes) for the ticket; empty (sent as zeros) in a refusal.
    - *common_caps*, *channel_caps*: the server's capability words.
    """

    error: LinkError = attrs.field(default=LinkError.OK, converter=_link_error)
    public_key: bytes = attrs.field(default=b"", validator=_check_pubkey, repr=False)
    common_caps: tuple[int, ...] = attrs.field(default=(), converter=_caps, validator=_check_caps)
    channel_caps: tuple[int, ...] = attrs.field(default=(), converter=_caps, validator=_check_caps)

    def has_common_cap(self, bit: int) -> bool:
        return has_cap(self.common_caps, bit)

    def has_channel_cap(self, bit: int) -> bool:
        return has_cap(self.channel_caps, bit)


@attrs.frozen
class ClientTicket:
    """The client sent its ``SpiceLinkAuthMechanism`` (under auth selection) and its
    128-byte encrypted ticket. The ticket itself is read and dropped: the broker
    authenticates to QEMU with its own :class:`Ticket`.

    - *auth_mechanism*: ``AuthMechanism.SPICE``, or ``None`` when the client did not
      use auth selection.
    """

    auth_mechanism: AuthMechanism | None = attrs.field(default=None, converter=_auth_mechanism)


def _check_ticket(instance: object, attribute: attrs.Attribute[bytes], value: Any) -> None:
    if not isinstance(value, bytes) or len(value) != TICKET_SIZE:
        raise SpiceUsageError(f"a ticket is exactly {TICKET_SIZE} bytes (see encrypt_ticket)")


@attrs.frozen
class Ticket:
    """The broker's ticket for QEMU, sent through ``ServerSide``: *encrypted* is the
    128-byte RSA-OAEP ciphertext from :func:`encrypt_ticket`. ``ServerSide`` puts the
    auth mechanism word in front when its link message asked for auth selection."""

    encrypted: bytes = attrs.field(validator=_check_ticket, repr=False)


@attrs.frozen
class LinkResult:
    """The server's u32 link result after the ticket (received by ``ServerSide``);
    the broker forwards it to the client through ``ClientSide``."""

    error: LinkError = attrs.field(default=LinkError.OK, converter=_link_error)


# --- message phase ---------------------------------------------------------------


@attrs.frozen
class Data:
    """Bytes of the message stream to forward verbatim to the other peer.

    *data* is the caller's own chunk or a ``memoryview`` slice of it (no copy). A
    ``Data`` never ends inside a message header, and never holds a header that broke
    a bound: what a side reports as ``Data`` has been checked.
    """

    data: bytes | memoryview = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class Message:
    """One whole SPICE message passed: reported after the ``Data`` that carried its
    last byte.

    - *type*: the message type (``SPICE_MSG_*`` from the server, ``SPICE_MSGC_*`` from
      the client; the numbers depend on the channel).
    - *size*: the body size in bytes.
    - *serial*: the header's serial; ``None`` under the mini header, which has none.
    """

    type: int
    size: int
    serial: int | None = None


@attrs.frozen
class MainInit:
    """The main channel's ``SPICE_MSG_MAIN_INIT`` (reported by ``ServerSide`` right after
    its :class:`Message`). *session_id* is the connection id every other channel of the
    session must send in its link message."""

    session_id: int = attrs.field(validator=_check_uint(32))
    display_channels_hint: int = attrs.field(default=1, validator=_check_uint(32))
    supported_mouse_modes: int = attrs.field(default=3, validator=_check_uint(32))
    current_mouse_mode: int = attrs.field(default=1, validator=_check_uint(32))
    agent_connected: int = attrs.field(default=0, validator=_check_uint(32))
    agent_tokens: int = attrs.field(default=0, validator=_check_uint(32))
    multi_media_time: int = attrs.field(default=0, validator=_check_uint(32))
    ram_hint: int = attrs.field(default=0, validator=_check_uint(32))


@attrs.frozen
class DisplayInit:
    """A display channel's ``SPICE_MSGC_DISPLAY_INIT`` (reported by ``ClientSide`` right
    after its :class:`Message`; also the body the guard sends). The defaults are
    spice-html5's: pixmap cache 1 of 10 Mi pixels, no GLZ dictionary."""

    pixmap_cache_id: int = attrs.field(default=1, validator=_check_uint(8))
    pixmap_cache_size: int = attrs.field(default=10 * 1024 * 1024, validator=_check_int(64))
    glz_dictionary_id: int = attrs.field(default=0, validator=_check_uint(8))
    glz_dictionary_window_size: int = attrs.field(default=0, validator=_check_int(32))


@attrs.frozen
class ConnectionClosed:
    """The peer closed its end (``receive_data(b"")``). *clean* is false when it closed
    in the middle of a link step or of a message."""

    clean: bool = True


#: Every event a side object returns from ``next_event``.
Event = (
    LinkMessage
    | LinkReply
    | ClientTicket
    | LinkResult
    | Data
    | Message
    | MainInit
    | DisplayInit
    | ConnectionClosed
)
