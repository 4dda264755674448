"""The SPICE ticket: the password, RSA-OAEP encrypted with the server's link-reply key.

spice-server decrypts the 128-byte ``SpiceLinkEncryptedTicket`` with
``RSA_PKCS1_OAEP_PADDING`` (OAEP with SHA-1 and MGF1-SHA-1, no label) and compares the
NUL-terminated result with its password. It decrypts before it looks at whether
ticketing is enabled at all, so even a QEMU without a password needs a real ticket:
measured on this project's test bed, 128 zero bytes get link result 7
(PERMISSION_DENIED); the encryption of a single NUL byte is accepted.
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ._constants import PUBKEY_SIZE, TICKET_KEY_BITS, TICKET_SIZE
from ._errors import SpiceUsageError

#: The longest password OAEP-SHA-1 can carry in one 1024-bit block, without its NUL:
#: 128 - 2 * 20 - 2 = 86 bytes of plaintext. (spice-server compares at most
#: ``SPICE_MAX_PASSWORD_LENGTH`` = 60 bytes.)
MAX_PASSWORD_BYTES = TICKET_SIZE - 2 * 20 - 2 - 1


def load_ticket_key(der: bytes) -> rsa.RSAPublicKey:
    """The server's ticket key from its 162-byte DER SubjectPublicKeyInfo.

    Raises ValueError when *der* is not a 1024-bit RSA public key.
    """
    if len(der) != PUBKEY_SIZE:
        raise ValueError(f"the ticket key is {PUBKEY_SIZE} bytes of DER, not {len(der)}")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"the ticket key is not a DER public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size != TICKET_KEY_BITS:
        raise ValueError(f"the ticket key is not a {TICKET_KEY_BITS}-bit RSA key")
    return key


def _oaep() -> padding.OAEP:
    # SHA-1 is SPICE's fixed choice for the ticket, not ours.
    sha1 = hashes.SHA1()  # noqa: S303
    return padding.OAEP(mgf=padding.MGF1(algorithm=sha1), algorithm=sha1, label=None)


def encrypt_ticket(public_key: bytes | rsa.RSAPublicKey, password: str | bytes = b"") -> bytes:
    """The 128-byte ticket for *password* under the server's *public_key*.

    *public_key* is ``LinkReply.public_key`` (DER) or a loaded key; *password* is
    ``str`` (UTF-8) or ``bytes``, without NUL bytes; empty when QEMU has no password
    (the ticket then carries a single NUL byte). Raises :class:`SpiceUsageError` for a
    key that is not a 1024-bit RSA key or a password that cannot be carried.
    """
    if isinstance(public_key, bytes):
        try:
            key = load_ticket_key(public_key)
        except ValueError as exc:
            raise SpiceUsageError(str(exc)) from None
    else:
        key = public_key
        if key.key_size != TICKET_KEY_BITS:
            raise SpiceUsageError(f"the ticket key is not a {TICKET_KEY_BITS}-bit RSA key")
    secret = password.encode() if isinstance(password, str) else bytes(password)
    if b"\0" in secret:
        raise SpiceUsageError("a SPICE password cannot contain a NUL byte")
    if len(secret) > MAX_PASSWORD_BYTES:
        raise SpiceUsageError(f"a SPICE password is at most {MAX_PASSWORD_BYTES} bytes")
    return key.encrypt(secret + b"\0", _oaep())


def decrypt_ticket(private_key: rsa.RSAPrivateKey, ticket: bytes) -> bytes:
    """The NUL-terminated plaintext of *ticket*, as the server decrypts it (for tests and
    for a broker that plays the SPICE server itself)."""
    return private_key.decrypt(ticket, _oaep())
