"""Which channels a session may open, and with which connection id.

The broker checks every client link message before it opens a backend connection and
answers a refused channel itself, with the link reply spice-server would send
(``ClientSide.send(LinkReply(error=...))`` or :func:`build_link_error_reply`).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ._constants import ChannelType, LinkError
from ._events import LinkMessage

#: What a view-only session may open: it sees the screen, the pointer and hears the
#: sound, and sends nothing into the VM (no inputs, record, usbredir, smartcard, webdav,
#: port, tunnel).
VIEW_ONLY_CHANNELS: frozenset[ChannelType] = frozenset(
    {ChannelType.MAIN, ChannelType.DISPLAY, ChannelType.CURSOR, ChannelType.PLAYBACK}
)


def _channel_types(value: Iterable[ChannelType | int]) -> frozenset[ChannelType]:
    return frozenset(ChannelType(item) for item in value)


@attrs.frozen
class ChannelPolicy:
    """The channel policy of one session.

    - *view_only*: allow only :data:`VIEW_ONLY_CHANNELS`.
    - *deny*: channel types the operator refuses in any case.
    """

    view_only: bool = False
    deny: frozenset[ChannelType] = attrs.field(default=frozenset(), converter=_channel_types)

    def allows(self, channel_type: ChannelType) -> bool:
        """Whether a channel of *channel_type* may be opened."""
        if channel_type in self.deny:
            return False
        return not self.view_only or channel_type in VIEW_ONLY_CHANNELS

    def check(self, link: LinkMessage, *, session_id: int | None) -> LinkError:
        """The link error to answer *link* with, ``LinkError.OK`` to let it through.

        *session_id* is the session's ``MAIN_INIT.session_id`` (``None`` before the
        session's main channel got it). The session binding: a main channel must
        start a new session (connection id 0; a non-zero id would ask QEMU to treat
        the client as a migration target); every other channel must carry the
        session's id. A refused channel type gives ``PERMISSION_DENIED``, a wrong
        connection id ``BAD_CONNECTION_ID`` (what QEMU itself answers).
        """
        if not self.allows(link.channel_type):
            return LinkError.PERMISSION_DENIED
        if link.channel_type is ChannelType.MAIN:
            return LinkError.OK if link.connection_id == 0 else LinkError.BAD_CONNECTION_ID
        if session_id is None or link.connection_id != session_id:
            return LinkError.BAD_CONNECTION_ID
        return LinkError.OK
