"""Dropping whole client messages by type: a view-only session's main channel, and the
inputs channel of a session that watches while another holds the console's input.

The channel policy keeps a view-only session off the channels that send input into the
VM (inputs, record, usbredir, ...), but the main channel, which every session needs,
also carries the client's traffic to the guest agent (spice-vdagent): clipboard, file
transfer, monitor configuration. :class:`MessageFilter` removes whole messages of the
given types from a client-to-server stream, chunk by chunk, without copying a chunk
that keeps all its messages.

A filter may ask, message by message, whether to drop (its *gate*): the inputs channel
of a full-rights session drops keyboard and mouse only while the session does not hold
the console's input (``spice.input = "single"``), which changes while it runs.

It takes the :class:`~broker_spice.protocol.Data` bytes ``ClientSide`` hands out
(already bounded and checked); the bytes it returns are a valid message stream again
and go to ``ServerSide.send(Data(...))``. Under the full 18-byte header the serials of
the messages after a dropped one are renumbered so the stream the server sees still
counts up by one, as a client would send it (whether spice-server checks client
serials was not verified; with the renumbering it does not matter).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

from ._constants import (
    MSGC_INPUTS_KEY_DOWN,
    MSGC_INPUTS_KEY_MODIFIERS,
    MSGC_INPUTS_KEY_SCANCODE,
    MSGC_INPUTS_KEY_UP,
    MSGC_INPUTS_MOUSE_MOTION,
    MSGC_INPUTS_MOUSE_POSITION,
    MSGC_INPUTS_MOUSE_PRESS,
    MSGC_INPUTS_MOUSE_RELEASE,
    MSGC_MAIN_AGENT_DATA,
    MSGC_MAIN_AGENT_START,
    MSGC_MAIN_AGENT_TOKEN,
    MSGC_MAIN_MOUSE_MODE_REQUEST,
)
from ._wire import header_size, parse_header

#: The main-channel client messages a view-only session may not send, each because it
#: changes the guest's or the session's state:
#:
#: - ``AGENT_START`` (106): opens the client's agent stream (grants the server tokens
#:   to send guest agent messages, e.g. the guest's clipboard, to the client);
#: - ``AGENT_DATA`` (107): a message to spice-vdagent in the guest (clipboard grab and
#:   data, file transfer, monitor configuration, display settings);
#: - ``AGENT_TOKEN`` (108): more tokens for the guest agent's messages to the client;
#: - ``MOUSE_MODE_REQUEST`` (105): switches the server's mouse mode (client/server),
#:   which is global to the VM's SPICE server.
#:
#: Forwarded: the common messages (``ACK_SYNC``, ``ACK``, ``PONG``,
#: ``MIGRATE_FLUSH_MARK``, ``MIGRATE_DATA``, ``DISCONNECTING``), ``CLIENT_INFO`` (101,
#: obsolete), ``ATTACH_CHANNELS`` (104, asks for the channel list), the migration
#: replies ``MIGRATE_CONNECTED``, ``MIGRATE_CONNECT_ERROR``, ``MIGRATE_END``,
#: ``MIGRATE_DST_DO_SEAMLESS``, ``MIGRATE_CONNECTED_SEAMLESS`` (102, 103, 109-111:
#: answers to a migration QEMU started) and ``QUALITY_INDICATOR`` (112).
VIEW_ONLY_MAIN_DROPPED: frozenset[int] = frozenset(
    {
        MSGC_MAIN_MOUSE_MODE_REQUEST,
        MSGC_MAIN_AGENT_START,
        MSGC_MAIN_AGENT_DATA,
        MSGC_MAIN_AGENT_TOKEN,
    }
)

#: The inputs channel's client messages a watching session may not send: every keyboard
#: and mouse message. Forwarded: the common ones (``ACK_SYNC``, ``ACK``, ``PONG``, ...).
INPUTS_DROPPED: frozenset[int] = frozenset(
    {
        MSGC_INPUTS_KEY_DOWN,
        MSGC_INPUTS_KEY_UP,
        MSGC_INPUTS_KEY_MODIFIERS,
        MSGC_INPUTS_KEY_SCANCODE,
        MSGC_INPUTS_MOUSE_MOTION,
        MSGC_INPUTS_MOUSE_POSITION,
        MSGC_INPUTS_MOUSE_PRESS,
        MSGC_INPUTS_MOUSE_RELEASE,
    }
)
#: Of those, the presses (a key or a button going down; a scancode message may hold
#: either, taken as one): a watching session pressing one while nobody holds the
#: input claims it.
INPUTS_PRESSES: frozenset[int] = frozenset(
    {MSGC_INPUTS_KEY_DOWN, MSGC_INPUTS_KEY_SCANCODE, MSGC_INPUTS_MOUSE_PRESS}
)
#: Of those, the mouse motions, which the server acknowledges (in bunches).
INPUTS_MOTIONS: frozenset[int] = frozenset({MSGC_INPUTS_MOUSE_MOTION, MSGC_INPUTS_MOUSE_POSITION})

_SERIAL = struct.Struct("<Q")


class MessageFilter:
    """Drop whole messages of *types* from one client-to-server message stream; with a
    *gate*, only those for which ``gate(type)`` answers True when their header passes."""

    def __init__(
        self, types: Iterable[int], *, mini_header: bool,
        gate: Callable[[int], bool] | None = None,
    ) -> None:
        self.types = frozenset(types)
        self.gate = gate
        self.mini_header = mini_header
        self._header_size = header_size(mini_header)
        self._held = bytearray()  # the start of a header split across chunks
        self._remaining = 0  # body bytes of the current message still to come
        self._dropping = False  # whether the current message is dropped
        #: Dropped messages by type.
        self.dropped: dict[int, int] = {}
        self._dropped_total = 0

    def feed(self, chunk: bytes | memoryview) -> bytes | memoryview:
        """The bytes of *chunk* to forward: *chunk* itself when it keeps every message
        (and no serial needs renumbering), else the kept parts joined."""
        n = len(chunk)
        view = memoryview(chunk)
        out: list[bytes | memoryview] = []
        changed = False
        keep = 0  # first byte of chunk not yet placed in out (or dropped)
        pos = 0
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                if self._dropping:
                    if pos > keep:
                        out.append(view[keep:pos])
                    keep = pos + take
                    changed = True
                pos += take
                self._remaining -= take
                continue
            need = self._header_size - len(self._held)
            if n - pos < need:  # a header split across chunks: held until complete
                if pos > keep:
                    out.append(view[keep:pos])
                self._held += view[pos:]
                keep = n
                changed = True
                break
            start = pos
            straddles = bool(self._held)
            header = bytes(self._held) + bytes(view[pos : pos + need])
            self._held.clear()
            pos += need
            msg_type, size, serial, _sub_list = parse_header(header, self.mini_header)
            self._remaining = size
            self._dropping = msg_type in self.types and (
                self.gate is None or self.gate(msg_type)
            )
            if self._dropping:
                self.dropped[msg_type] = self.dropped.get(msg_type, 0) + 1
                self._dropped_total += 1
                if start > keep:
                    out.append(view[keep:start])
                keep = pos
                changed = True
            elif straddles or (serial is not None and self._dropped_total):
                if serial is not None:
                    renumbered = (serial - self._dropped_total) % (1 << 64)
                    header = _SERIAL.pack(renumbered) + header[_SERIAL.size :]
                if start > keep:
                    out.append(view[keep:start])
                out.append(header)
                keep = pos
                changed = True
        if not changed:
            return chunk
        if keep < n:
            out.append(view[keep:n])
        return b"".join(out)
