"""VNC Authentication (RFC 6143 section 7.2.2): DES with a bit-reversed key.

The response is the 16-byte challenge encrypted with DES in ECB mode (two
independent 8-byte blocks). The key is the password's first 8 bytes, padded
with NUL bytes, with one quirk: RFB takes the *lowest* bit of each key byte as
DES's first bit, the reverse of the DES standard's order, so every key byte's
bits are reversed before the key goes to a standard DES (QEMU's
``vnc_munge_des_rfb_key``, the "d3des" code of the original VNC).

DES comes from ``cryptography``: single DES is TripleDES with the key
repeated three times (K1 = K2 = K3 makes EDE collapse to one DES encryption).
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, modes

try:  # cryptography >= 43 keeps the legacy ciphers here
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - cryptography 42
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

from ._errors import RFBUsageError
from ._wire import CHALLENGE_LENGTH

#: Each byte 0..255 with its 8 bits in reverse order.
BIT_REVERSED: Final = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def vnc_des_key(password: bytes) -> bytes:
    """The DES key VNC authentication derives from *password*: its first 8
    bytes, NUL-padded, each byte bit-reversed."""
    return password[:8].ljust(8, b"\0").translate(BIT_REVERSED)


def vnc_auth_response(password: bytes, challenge: bytes) -> bytes:
    """The 16-byte response to a VNC authentication *challenge*."""
    if len(challenge) != CHALLENGE_LENGTH:
        raise RFBUsageError(f"a VNC challenge is {CHALLENGE_LENGTH} bytes, not {len(challenge)}")
    key = vnc_des_key(password)
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # noqa: S305 - RFB mandates DES-ECB
    return encryptor.update(challenge) + encryptor.finalize()
