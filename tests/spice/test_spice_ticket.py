"""The broker's ticket: RSA-OAEP (SHA-1, MGF1-SHA-1) of the NUL-terminated password."""

from __future__ import annotations

import contextlib

import pytest
from broker_spice.protocol import (
    MAX_PASSWORD_BYTES,
    SpiceUsageError,
    decrypt_ticket,
    encrypt_ticket,
    load_ticket_key,
)
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from spicekit import private_key, public_der


def _decrypt_as_spice_server(ticket: bytes) -> bytes:
    """RSA_private_decrypt(..., RSA_PKCS1_OAEP_PADDING): OAEP, SHA-1, MGF1-SHA-1, no label."""
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return private_key().decrypt(ticket, oaep)


def test_empty_password_is_a_single_nul_byte() -> None:
    ticket = encrypt_ticket(public_der())
    assert len(ticket) == 128
    assert _decrypt_as_spice_server(ticket) == b"\0"


@pytest.mark.parametrize("password", ["s3cret", b"s3cret", "pässwörd", "x" * MAX_PASSWORD_BYTES])
def test_password_is_nul_terminated(password: str | bytes) -> None:
    raw = password.encode() if isinstance(password, str) else password
    ticket = encrypt_ticket(public_der(), password)
    assert len(ticket) == 128
    assert _decrypt_as_spice_server(ticket) == raw + b"\0"
    assert decrypt_ticket(private_key(), ticket) == raw + b"\0"


def test_a_loaded_key_works_too() -> None:
    key = load_ticket_key(public_der())
    assert _decrypt_as_spice_server(encrypt_ticket(key, "pw")) == b"pw\0"


def test_ticket_is_oaep_with_sha1_not_another_hash() -> None:
    ticket = encrypt_ticket(public_der(), "pw")
    sha256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    with pytest.raises(ValueError):
        private_key().decrypt(ticket, sha256)
    # PKCS#1 v1.5 decryption rejects implicitly (random output, no exception)
    with contextlib.suppress(ValueError):
        assert private_key().decrypt(ticket, padding.PKCS1v15()) != b"pw\0"


def test_tickets_are_randomised() -> None:
    assert encrypt_ticket(public_der(), "pw") != encrypt_ticket(public_der(), "pw")


@pytest.mark.parametrize("password", ["a\0b", "x" * (MAX_PASSWORD_BYTES + 1)])
def test_passwords_that_cannot_be_carried(password: str) -> None:
    with pytest.raises(SpiceUsageError):
        encrypt_ticket(public_der(), password)


def test_only_1024_bit_rsa_keys() -> None:
    big = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(SpiceUsageError):
        encrypt_ticket(big)
    der = big.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(SpiceUsageError):
        encrypt_ticket(der)
    with pytest.raises(SpiceUsageError):
        encrypt_ticket(bytes(162))
    with pytest.raises(ValueError):
        load_ticket_key(bytes(162))
