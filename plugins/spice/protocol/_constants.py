"""SPICE wire constants: the numbers of spice-protocol's ``spice/protocol.h`` and ``enums.h``.

Only what the broker needs: channel types, link errors, common capabilities,
the handful of message types it looks at, and the sizes of the fixed structs.
Everything on the SPICE wire is little-endian.
"""

from __future__ import annotations

import enum
from typing import Final

#: ``SPICE_MAGIC``: the four bytes every link header starts with.
MAGIC: Final = b"REDQ"
#: ``SPICE_VERSION_MAJOR`` / ``SPICE_VERSION_MINOR`` as sent by QEMU and every current client.
VERSION_MAJOR: Final = 2
VERSION_MINOR: Final = 2

#: ``SpiceLinkHeader``: magic, major u32, minor u32, size u32.
LINK_HEADER_SIZE: Final = 16
#: ``SpiceLinkMess`` without caps: connection_id u32, channel_type u8, channel_id u8,
#: num_common_caps u32, num_channel_caps u32, caps_offset u32.
LINK_MESS_SIZE: Final = 18
#: ``SPICE_TICKET_PUBKEY_BYTES``: a 1024-bit RSA SubjectPublicKeyInfo in DER.
PUBKEY_SIZE: Final = 162
#: ``SpiceLinkReply`` without caps: error u32, pub_key, num_common_caps, num_channel_caps,
#: caps_offset.
LINK_REPLY_SIZE: Final = 4 + PUBKEY_SIZE + 12
#: ``SpiceLinkEncryptedTicket``: RSA-OAEP output of a 1024-bit key.
TICKET_SIZE: Final = 128
#: ``SpiceLinkAuthMechanism``: one u32, sent before the ticket under auth selection.
AUTH_MECHANISM_SIZE: Final = 4
#: The u32 link result the server sends after the ticket.
LINK_RESULT_SIZE: Final = 4
#: RSA key size of the ticket key, in bits.
TICKET_KEY_BITS: Final = 1024

#: ``SpiceDataHeader``: serial u64, type u16, size u32, sub_list u32.
FULL_HEADER_SIZE: Final = 18
#: ``SpiceMiniDataHeader`` (with ``SPICE_COMMON_CAP_MINI_HEADER``): type u16, size u32.
MINI_HEADER_SIZE: Final = 6

#: spice-server refuses link messages larger than this (reds.cpp, "to avoid clients to
#: cause arbitrary big memory allocations"); the broker uses the same bound.
MAX_LINK_SIZE: Final = 4096
#: spice-server refuses more capability words than this per list (reds.cpp, "Prevent DoS").
MAX_CAPS: Final = 1024

#: ``SpiceMsgMainInit``: eight u32 fields, session_id first.
MAIN_INIT_SIZE: Final = 32
#: ``SpiceMsgcDisplayInit``: u8, i64, u8, i32.
DISPLAY_INIT_SIZE: Final = 14


class ChannelType(enum.IntEnum):
    """``SPICE_CHANNEL_*``: the kind of a SPICE channel connection."""

    MAIN = 1
    DISPLAY = 2
    INPUTS = 3
    CURSOR = 4
    PLAYBACK = 5
    RECORD = 6
    TUNNEL = 7
    SMARTCARD = 8
    USBREDIR = 9
    PORT = 10
    WEBDAV = 11


class LinkError(enum.IntEnum):
    """``SPICE_LINK_ERR_*``: the error of a link reply and the link result."""

    OK = 0
    ERROR = 1
    INVALID_MAGIC = 2
    INVALID_DATA = 3
    VERSION_MISMATCH = 4
    NEED_SECURED = 5
    NEED_UNSECURED = 6
    PERMISSION_DENIED = 7
    BAD_CONNECTION_ID = 8
    CHANNEL_NOT_AVAILABLE = 9


class CommonCap(enum.IntEnum):
    """``SPICE_COMMON_CAP_*``: bit numbers in the common capability words."""

    PROTOCOL_AUTH_SELECTION = 0
    AUTH_SPICE = 1
    AUTH_SASL = 2
    MINI_HEADER = 3


class AuthMechanism(enum.IntEnum):
    """The ``SpiceLinkAuthMechanism`` values: the number of the chosen auth capability."""

    SPICE = CommonCap.AUTH_SPICE
    SASL = CommonCap.AUTH_SASL


#: ``SPICE_MSG_MAIN_INIT``: the main channel's first server message.
MSG_MAIN_INIT: Final = 103
#: ``SPICE_MSGC_DISPLAY_INIT``: the display channel's first client message.
MSGC_DISPLAY_INIT: Final = 101
#: ``SPICE_MSG_SET_ACK`` / ``SPICE_MSGC_ACK_SYNC`` / ``SPICE_MSGC_ACK``: flow control.
MSG_SET_ACK: Final = 3
MSGC_ACK_SYNC: Final = 1
MSGC_ACK: Final = 2
#: ``SPICE_MSG_PING`` / ``SPICE_MSGC_PONG``.
MSG_PING: Final = 4
MSGC_PONG: Final = 3
#: The main channel's client messages (``SPICE_MSGC_MAIN_*`` of enums.h).
MSGC_MAIN_CLIENT_INFO: Final = 101
MSGC_MAIN_MIGRATE_CONNECTED: Final = 102
MSGC_MAIN_MIGRATE_CONNECT_ERROR: Final = 103
MSGC_MAIN_ATTACH_CHANNELS: Final = 104
MSGC_MAIN_MOUSE_MODE_REQUEST: Final = 105
MSGC_MAIN_AGENT_START: Final = 106
MSGC_MAIN_AGENT_DATA: Final = 107
MSGC_MAIN_AGENT_TOKEN: Final = 108
MSGC_MAIN_MIGRATE_END: Final = 109
MSGC_MAIN_MIGRATE_DST_DO_SEAMLESS: Final = 110
MSGC_MAIN_MIGRATE_CONNECTED_SEAMLESS: Final = 111
MSGC_MAIN_QUALITY_INDICATOR: Final = 112
#: The inputs channel's client messages (``SPICE_MSGC_INPUTS_*``): keyboard and mouse.
MSGC_INPUTS_KEY_DOWN: Final = 101
MSGC_INPUTS_KEY_UP: Final = 102
MSGC_INPUTS_KEY_MODIFIERS: Final = 103
MSGC_INPUTS_KEY_SCANCODE: Final = 104
MSGC_INPUTS_MOUSE_MOTION: Final = 111
MSGC_INPUTS_MOUSE_POSITION: Final = 112
MSGC_INPUTS_MOUSE_PRESS: Final = 113
MSGC_INPUTS_MOUSE_RELEASE: Final = 114
#: ``SPICE_MSG_INPUTS_MOUSE_MOTION_ACK``: the server acknowledges every
#: :data:`INPUT_MOTION_ACK_BUNCH` mouse motions; clients stop sending motions while
#: twice as many are unacknowledged.
MSG_INPUTS_MOUSE_MOTION_ACK: Final = 111
INPUT_MOTION_ACK_BUNCH: Final = 4
