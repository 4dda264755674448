"""Console endpoints shared by several sessions (``Protocol.shared_console``).

A libvirt console stream allows one connection per console: a plugin that
serves several clients on one console (the serial plugin's shared sessions)
needs the broker to open the console once and hand the same
:class:`Endpoint` to every session on it. :class:`SharedEndpoints` counts the
sessions using each endpoint: the first ``acquire`` of a key opens it (later
ones wait for that and get the same object), and the ``release`` that brings
the count to zero closes it. Opening fails for everyone waiting on it alike,
and a failed open leaves nothing behind (the next session waiting tries again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable

import anyio

from broker.service._session import Endpoint


class _Entry:
    def __init__(self) -> None:
        self.users = 0
        self.endpoint: Endpoint | None = None
        self.lock = anyio.Lock()


class SharedEndpoints:
    """Endpoints by key (protocol, domain, console plan), each with its count of users."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._keys: dict[int, Hashable] = {}

    def __len__(self) -> int:
        """Endpoints open (or being opened) now."""
        return len(self._entries)

    def users(self, key: Hashable) -> int:
        entry = self._entries.get(key)
        return entry.users if entry is not None else 0

    async def acquire(self, key: Hashable, open_: Callable[[], Awaitable[Endpoint]]) -> Endpoint:
        """The endpoint for *key*, opened with *open_* if no session holds it yet."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        entry.users += 1
        try:
            async with entry.lock:
                if entry.endpoint is None:
                    entry.endpoint = await open_()
                    self._keys[id(entry.endpoint)] = key
                return entry.endpoint
        except BaseException:
            await self._drop(key, entry)
            raise

    async def release(self, endpoint: Endpoint) -> bool:
        """Let go of a shared *endpoint*; the last user closes it.

        Returns False (and does nothing) when *endpoint* is not a shared one.
        """
        key = self._keys.get(id(endpoint))
        entry = self._entries.get(key) if key is not None else None
        if entry is None or entry.endpoint is not endpoint:
            return False
        assert key is not None
        await self._drop(key, entry)
        return True

    async def _drop(self, key: Hashable, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users > 0:
            return
        del self._entries[key]
        if entry.endpoint is not None:
            del self._keys[id(entry.endpoint)]
            await entry.endpoint.aclose()
