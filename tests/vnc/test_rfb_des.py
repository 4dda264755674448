"""VNC authentication's DES against a reference written from the standards."""

from __future__ import annotations

import pytest
from broker_vnc.rfb import RFBUsageError, vnc_auth_response
from broker_vnc.rfb._des import vnc_des_key
from hypothesis import given
from hypothesis import strategies as st
from rfb_reference_des import des_ecb_encrypt, des_encrypt_block, reference_vnc_response


@pytest.mark.parametrize(
    ("key", "plain", "cipher"),
    [
        # The worked example of the DES literature, and two classic test vectors.
        ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
        ("0000000000000000", "0000000000000000", "8CA64DE9C1B123A7"),
        ("0123456789ABCDEF", "4E6F772069732074", "3FA40E8A984D4815"),
    ],
)
def test_reference_des_meets_published_vectors(key: str, plain: str, cipher: str) -> None:
    assert des_encrypt_block(bytes.fromhex(key), bytes.fromhex(plain)).hex().upper() == cipher


def test_key_bits_are_reversed_as_the_rfb_spec_says() -> None:
    # vncpasswd's fixed obfuscation key {23, 82, 107, 6, 35, 78, 88, 7} is widely
    # published in its bit-reversed, standard-DES form: e84ad660c4721ae0.
    assert vnc_des_key(bytes([23, 82, 107, 6, 35, 78, 88, 7])).hex() == "e84ad660c4721ae0"
    assert vnc_des_key(b"\x01\x80") == b"\x80\x01" + bytes(6)


def test_short_password_is_nul_padded_and_long_one_truncated() -> None:
    challenge = bytes(range(16))
    assert vnc_auth_response(b"ab", challenge) == vnc_auth_response(b"ab\0\0\0\0\0\0", challenge)
    assert vnc_auth_response(b"12345678", challenge) == vnc_auth_response(b"123456789", challenge)
    assert vnc_auth_response(b"", challenge) == des_ecb_encrypt(bytes(8), challenge)


def test_known_response() -> None:
    # Computed with the reference DES above; QEMU accepts it (tests/vnc/test_rfb_qemu.py).
    response = vnc_auth_response(b"secret", bytes(range(16)))
    assert response == reference_vnc_response(b"secret", bytes(range(16)))
    assert response.hex() == "ee22539f33a5983ec12f9c2edbc995dd"


@given(st.binary(max_size=12), st.binary(min_size=16, max_size=16))
def test_response_matches_the_reference(password: bytes, challenge: bytes) -> None:
    assert vnc_auth_response(password, challenge) == reference_vnc_response(password, challenge)


def test_challenge_must_be_16_bytes() -> None:
    with pytest.raises(RFBUsageError):
        vnc_auth_response(b"x", bytes(15))
