"""Presence: the live sessions of each console, and which of them holds its input.

Theory of operation. Every session the broker runs (a ``multi_connection`` group
counts once: its first connection) takes a :class:`Seat` in the :class:`Room` of its
console, keyed by the domain's UUID and the protocol's console name (``vnc``,
``spice``), so that every session showing one display meets every other, whatever
protocol object serves it. A seat is what the others see of a session (a
:class:`Viewer`: protocol, rights, client address, start, the token's ``name``) and
its right to send input now (:attr:`Seat.may_input`):

* a seat whose protocol does not take part (``Protocol.presence`` false: the serial
  console has its own writer role) has the input right of its token: full rights
  send input, the core cannot say more (its viewer's ``input`` is None);
* in ``shared`` input mode (the default) every full-rights seat sends input, as
  without presence;
* in ``single`` input mode one full-rights seat of the room at a time, the *holder*,
  sends input; the others watch, and their plugin drops their input as it drops a
  view-only session's. The first full-rights seat to join a room nobody holds holds
  it; a full-rights seat takes it over whenever it likes (:meth:`Seat.take`) or
  gives it up (:meth:`Seat.release`); while nobody holds it, the first full-rights
  seat that presses a key or a button claims it (:meth:`Seat.claim`, which the
  plugin calls). A holder that leaves leaves the input to nobody, until someone takes
  or claims it: the serial console's writer role, for displays.

Each change bumps the room's :attr:`Room.version` and wakes whoever waits for one
(:meth:`Seat.changed`); a waiter reads the state afterwards (:meth:`Seat.state`), so
a burst of changes reaches it as one. A plugin reads :attr:`Seat.may_input` as it
filters each message, so a change applies from the next message on. Everything runs
on the event loop's thread and never blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import attrs
import structlog

__all__ = [
    "INPUT_MODES",
    "Presence",
    "PresenceState",
    "Room",
    "Seat",
    "Viewer",
]

#: The input modes a protocol with presence may have (``Protocol.input_mode``).
INPUT_MODES = ("shared", "single")
#: Why the holder of a room's input last changed (:attr:`PresenceState.reason`).
REASONS = ("joined", "taken", "released", "left", "claimed")

_log = structlog.get_logger("broker.service")


@attrs.frozen
class Viewer:
    """A live session of a console as every session of that console sees it."""

    #: The session's id (its first connection's, for a session of several): the id of
    #: its log lines.
    id: str
    #: The protocol serving it (``vnc``, ``spice``, a third party's).
    protocol: str
    #: ``full`` or ``view``: the token's rights.
    rights: str
    #: The client's address, as the broker sees it (behind trusted proxies: theirs).
    address: str
    #: When it opened, in seconds since the epoch.
    since: float
    #: The token's ``name`` claim, or None.
    name: str | None
    #: Whether its input reaches the console now; None for a protocol that does not
    #: take part in presence (the core cannot say).
    input: bool | None


@attrs.frozen
class PresenceState:
    """A room as one of its seats sees it, at one :attr:`version`."""

    #: The id of the seat this state is for.
    you: str
    #: That seat's input mode: ``shared`` or ``single``; None when its protocol does not
    #: take part.
    mode: str | None
    #: The id of the seat holding the input in ``single`` mode, or None (nobody does).
    holder: str | None
    #: Why the holder last changed: ``joined`` (the first full-rights session got it
    #: on joining), ``taken``, ``released``, ``left``, ``claimed``; None before any.
    reason: str | None
    #: Every seat of the room, in the order they joined (this one included).
    viewers: tuple[Viewer, ...]
    version: int


class Seat:
    """One session's place in its console's :class:`Room` (see the module's notes).

    Made by :meth:`Presence.join`; a plugin finds its session's in ``session.seat``.
    """

    def __init__(
        self,
        room: Room,
        *,
        id: str,
        protocol: str,
        full: bool,
        address: str,
        since: float,
        name: str | None,
        mode: str | None,
    ) -> None:
        if mode is not None and mode not in INPUT_MODES:
            raise ValueError(f"input mode {mode!r} is not one of {INPUT_MODES}")
        self.room = room
        self.id = id
        self.protocol = protocol
        #: The token has full rights (else view-only: never input).
        self.full = full
        self.address = address
        self.since = since
        self.name = name
        #: ``shared``, ``single``, or None (its protocol does not take part).
        self.mode = mode
        #: True once the session has ended.
        self.left = False
        #: Control channels open on this seat now (the core bounds them).
        self.controls = 0

    def __repr__(self) -> str:
        return f"<Seat {self.id} {self.protocol} {self.mode} {'full' if self.full else 'view'}>"

    @property
    def single(self) -> bool:
        """One session of the console at a time sends input (``single`` mode)."""
        return self.mode == "single"

    @property
    def holds_input(self) -> bool:
        """This seat holds the console's input (``single`` mode)."""
        return self.room.holder is self

    @property
    def may_input(self) -> bool:
        """Whether this session's input goes to the console now: full rights, and in
        ``single`` mode the holder. Read it as each message is filtered."""
        if self.left or not self.full:
            return False
        return not self.single or self.room.holder is self

    def viewer(self) -> Viewer:
        """This seat as the others see it."""
        return Viewer(
            id=self.id,
            protocol=self.protocol,
            rights="full" if self.full else "view",
            address=self.address,
            since=self.since,
            name=self.name,
            input=None if self.mode is None else self.may_input,
        )

    def peers(self) -> tuple[Viewer, ...]:
        """Every live session of this console, this one included, in the order they
        joined."""
        return self.room.viewers()

    def state(self) -> PresenceState:
        """The room as this seat sees it now."""
        room = self.room
        holder = room.holder
        return PresenceState(
            you=self.id,
            mode=self.mode,
            holder=None if holder is None else holder.id,
            reason=room.reason,
            viewers=room.viewers(),
            version=room.version,
        )

    def take(self) -> bool:
        """Take the input over (``single`` mode, full rights); False when this seat may
        not (view-only, another mode, or it left). The previous holder learns it from
        the room's change."""
        if self.left or not self.full or not self.single:
            return False
        if self.room.holder is not self:
            self.room.set_holder(self, "taken")
        return True

    def release(self) -> bool:
        """Give the input up; False when this seat did not hold it."""
        if self.room.holder is not self:
            return False
        self.room.set_holder(None, "released")
        return True

    def claim(self) -> bool:
        """Take the input if nobody holds it (the plugin calls this when a full-rights
        session presses a key or a button while watching); whether this seat holds it
        now."""
        if self.left or not self.full or not self.single:
            return False
        if self.room.holder is None:
            self.room.set_holder(self, "claimed")
        return self.room.holder is self

    async def changed(self, version: int) -> int:
        """Wait until the room's version is no longer *version* (at once if it is not);
        the version now. Returns once this seat has left, too."""
        return await self.room.wait(version)

    def leave(self) -> None:
        """The session ended: out of the room (its input with it)."""
        if not self.left:
            self.left = True
            self.room.remove(self)


class Room:
    """The seats of one console (domain UUID, console name)."""

    def __init__(
        self, key: tuple[str, str], on_empty: Callable[[Room], None] | None = None
    ) -> None:
        self.key = key
        self.seats: list[Seat] = []
        #: The seat holding the input in ``single`` mode, or None.
        self.holder: Seat | None = None
        #: Why the holder last changed (:data:`REASONS`), or None.
        self.reason: str | None = None
        #: Bumped at every change.
        self.version = 0
        self._event: anyio.Event | None = None
        self._on_empty = on_empty

    def viewers(self) -> tuple[Viewer, ...]:
        return tuple(seat.viewer() for seat in self.seats)

    def _changed(self) -> None:
        self.version += 1
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self, version: int) -> int:
        while self.version == version:
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()
        return self.version

    def add(self, seat: Seat) -> None:
        self.seats.append(seat)
        if seat.single and seat.full and self.holder is None:
            self.set_holder(seat, "joined")  # one change for both
        else:
            self._changed()

    def remove(self, seat: Seat) -> None:
        if seat in self.seats:
            self.seats.remove(seat)
        if self.holder is seat:
            self.set_holder(None, "left")
        else:
            self._changed()
        if not self.seats and self._on_empty is not None:
            self._on_empty(self)

    def set_holder(self, seat: Seat | None, reason: str) -> None:
        previous, self.holder, self.reason = self.holder, seat, reason
        _log.info(
            "input.holder",
            domain=self.key[0],
            console=self.key[1],
            session=None if seat is None else seat.id,
            previous=None if previous is None else previous.id,
            reason=reason,
        )
        self._changed()


class Presence:
    """Every console's seats on this broker (see the module's notes)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.rooms: dict[tuple[str, str], Room] = {}

    def join(
        self,
        *,
        domain: str,
        console: str,
        id: str,
        protocol: str,
        full: bool,
        address: str,
        name: str | None = None,
        mode: str | None = None,
    ) -> Seat:
        """A seat for a session that just opened on *console* of *domain*."""
        key = (domain, console)
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(key, self._forget)
        seat = Seat(room, id=id, protocol=protocol, full=full, address=address,
                    since=self._clock(), name=name, mode=mode)
        room.add(seat)
        return seat

    def viewers(self, domain: str, console: str) -> tuple[Viewer, ...]:
        """The live sessions of *console* of *domain* (none: an empty tuple)."""
        room = self.rooms.get((domain, console))
        return () if room is None else room.viewers()

    def _forget(self, room: Room) -> None:
        if self.rooms.get(room.key) is room:
            del self.rooms[room.key]

    def __len__(self) -> int:
        return sum(len(room.seats) for room in self.rooms.values())
