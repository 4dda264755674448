"""Numbers and fixed layouts of the RFB protocol (RFC 6143 and the community
specification "rfbproto" for the extensions). All integers are big-endian."""

from __future__ import annotations

import enum
import struct
from typing import Final


class SecurityType(enum.IntEnum):
    """Security types (RFC 6143 section 7.1.2); only those the broker handles."""

    INVALID = 0
    NONE = 1
    VNC_AUTH = 2
    VENCRYPT = 19


class VeNCryptSubtype(enum.IntEnum):
    """VeNCrypt subtypes (rfbproto, "VeNCrypt")."""

    PLAIN = 256
    TLS_NONE = 257
    TLS_VNC = 258
    TLS_PLAIN = 259
    X509_NONE = 260
    X509_VNC = 261
    X509_PLAIN = 262
    TLS_SASL = 263
    X509_SASL = 264


#: The subtypes the broker can complete: TLS (done by the I/O layer), then nothing
#: or VNC authentication.
SUPPORTED_SUBTYPES: Final = frozenset(
    {
        VeNCryptSubtype.TLS_NONE,
        VeNCryptSubtype.TLS_VNC,
        VeNCryptSubtype.X509_NONE,
        VeNCryptSubtype.X509_VNC,
    }
)
#: Subtypes whose TLS is anonymous (no server certificate to verify).
ANONYMOUS_SUBTYPES: Final = frozenset({VeNCryptSubtype.TLS_NONE, VeNCryptSubtype.TLS_VNC})
#: Subtypes followed by VNC authentication inside TLS.
VNC_AUTH_SUBTYPES: Final = frozenset({VeNCryptSubtype.TLS_VNC, VeNCryptSubtype.X509_VNC})


class ClientMessageType(enum.IntEnum):
    """Client-to-server message types the filter understands (RFC 6143 7.5,
    rfbproto "Client to Server Messages")."""

    SET_PIXEL_FORMAT = 0
    SET_ENCODINGS = 2
    FRAMEBUFFER_UPDATE_REQUEST = 3
    KEY_EVENT = 4
    POINTER_EVENT = 5
    CLIENT_CUT_TEXT = 6
    ENABLE_CONTINUOUS_UPDATES = 150
    CLIENT_FENCE = 248
    XVP = 250
    SET_DESKTOP_SIZE = 251
    QEMU = 255


class QEMUSubmessage(enum.IntEnum):
    EXTENDED_KEY_EVENT = 0
    AUDIO = 1


class QEMUAudioOperation(enum.IntEnum):
    ENABLE = 0
    DISABLE = 1
    SET_FORMAT = 2


class Encoding(enum.IntEnum):
    """Pseudo-encodings the filter treats specially in SetEncodings."""

    #: Lets the client send 7-byte PointerEvents once the server confirms it in
    #: the (unparsed) server-to-client stream: stripped, see ClientMessageFilter.
    EXTENDED_MOUSE_BUTTONS = -316
    #: Enables gii client messages (253), which the filter does not parse: stripped.
    GII = -305
    EXTENDED_CLIPBOARD = -1063131698  # 0xC0A1E5CE


#: Pseudo-encodings removed from SetEncodings by default (see docs/rfb.md).
STRIPPED_ENCODINGS: Final = frozenset({Encoding.EXTENDED_MOUSE_BUTTONS, Encoding.GII})

# Extended clipboard flags (rfbproto, "Extended Clipboard Pseudo-Encoding").
CLIPBOARD_CAPS: Final = 1 << 24
CLIPBOARD_REQUEST: Final = 1 << 25
CLIPBOARD_PEEK: Final = 1 << 26
CLIPBOARD_NOTIFY: Final = 1 << 27
CLIPBOARD_PROVIDE: Final = 1 << 28
CLIPBOARD_ACTIONS: Final = 0xFF000000

U8: Final = struct.Struct(">B")
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
S32: Final = struct.Struct(">i")
#: bits-per-pixel, depth, big-endian, true-colour, red/green/blue max, shifts, 3 padding.
PIXEL_FORMAT: Final = struct.Struct(">BBBBHHHBBB3x")
#: width, height, pixel format (16 bytes), name length.
SERVER_INIT_HEADER: Final = struct.Struct(">HH16sI")

#: The ProtocolVersion message is exactly this long (RFC 6143 7.1.1).
VERSION_LENGTH: Final = 12
#: A VNC authentication challenge and its response (RFC 6143 7.2.2).
CHALLENGE_LENGTH: Final = 16


def version_message(version: tuple[int, int]) -> bytes:
    """The ProtocolVersion message for *version*, e.g. ``b"RFB 003.008\\n"``."""
    return b"RFB %03d.%03d\n" % version


def parse_version(data: bytes) -> tuple[int, int] | None:
    """The version in a 12-byte ProtocolVersion message, or None if malformed."""
    if (
        len(data) != VERSION_LENGTH
        or data[:4] != b"RFB "
        or data[7:8] != b"."
        or data[11:] != b"\n"
        or not data[4:7].isdigit()
        or not data[8:11].isdigit()
    ):
        return None
    return int(data[4:7]), int(data[8:11])
