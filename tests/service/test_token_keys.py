"""Signing key files: modes, atomic no-clobber creation, rotation copy, loading errors."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.keys import (
    PREVIOUS_PUBLIC_KEY_NAME,
    PRIVATE_KEY_NAME,
    PUBLIC_KEY_NAME,
    KeyFileError,
    ensure_keypair,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_key,
    load_public_keys,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Modes must not depend on the umask: run with one that would leave files open."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_generate_modes(tmp_path: Path, permissive_umask: None) -> None:
    state = tmp_path / "var" / "state"
    files = generate_keypair(state)
    assert files.created and files.previous_public_key is None
    assert files.private_key == state / PRIVATE_KEY_NAME
    assert files.public_key == state / PUBLIC_KEY_NAME
    assert mode(state) == 0o700
    assert mode(files.private_key) == 0o600
    assert mode(files.public_key) == 0o644
    assert sorted(p.name for p in state.iterdir()) == [
        PRIVATE_KEY_NAME,
        PUBLIC_KEY_NAME,
    ]  # no temp files


def test_files_are_pem_and_match(tmp_path: Path) -> None:
    files = generate_keypair(tmp_path / "s")
    assert files.private_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert files.public_key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private = load_private_key(files.private_key)
    public = load_public_key(files.public_key)
    assert key_fingerprint(private.public_key()) == key_fingerprint(public) == files.fingerprint
    assert len(files.fingerprint) == 43
    assert set(files.fingerprint) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )


def test_existing_state_dir_is_kept(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o750)
    os.chmod(state, 0o750)
    generate_keypair(state)
    assert mode(state) == 0o750  # an operator's directory is not re-moded


def test_never_overwrites(tmp_path: Path) -> None:
    files = generate_keypair(tmp_path / "s")
    before = files.private_key.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path / "s")
    assert files.private_key.read_bytes() == before


def test_force_replaces_and_keeps_previous_public_key(tmp_path: Path) -> None:
    old = generate_keypair(tmp_path / "s")
    new = generate_keypair(tmp_path / "s", force=True)
    assert new.fingerprint != old.fingerprint
    assert new.previous_public_key == tmp_path / "s" / PREVIOUS_PUBLIC_KEY_NAME
    assert key_fingerprint(load_public_key(new.previous_public_key)) == old.fingerprint
    assert key_fingerprint(load_private_key(new.private_key).public_key()) == new.fingerprint
    assert mode(new.private_key) == 0o600


def test_ensure_creates_once(tmp_path: Path) -> None:
    first = ensure_keypair(tmp_path / "s")
    second = ensure_keypair(tmp_path / "s")
    assert first.created and not second.created
    assert first.fingerprint == second.fingerprint


def test_ensure_restores_public_key(tmp_path: Path) -> None:
    files = generate_keypair(tmp_path / "s")
    files.public_key.unlink()
    assert ensure_keypair(tmp_path / "s").fingerprint == files.fingerprint
    assert key_fingerprint(load_public_key(files.public_key)) == files.fingerprint
    other = Ed25519PrivateKey.generate().public_key()  # a stale public key is replaced
    files.public_key.write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    ensure_keypair(tmp_path / "s")
    assert key_fingerprint(load_public_key(files.public_key)) == files.fingerprint


def test_private_key_open_to_others_refused(tmp_path: Path) -> None:
    files = generate_keypair(tmp_path / "s")
    os.chmod(files.private_key, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(files.private_key)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(KeyFileError, match=r"missing\.pem: no such"):
        load_public_key(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"garbage\.pem: not a PEM public key"):
        load_public_key(garbage)
    with pytest.raises(KeyFileError, match=r"garbage\.pem: not an unencrypted PEM private key"):
        load_private_key(garbage)
    with pytest.raises(KeyFileError, match="is a directory"):
        load_public_key(tmp_path)


def test_other_key_types_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / "ec.pem"
    private.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public = tmp_path / "ec.pub.pem"
    public.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_private_key(private)
    with pytest.raises(KeyFileError, match="not an Ed25519 key"):
        load_public_key(public)


def test_load_public_keys_in_order(tmp_path: Path) -> None:
    a = generate_keypair(tmp_path / "a")
    b = generate_keypair(tmp_path / "b")
    keys = load_public_keys([b.public_key, a.public_key])
    assert [key_fingerprint(k) for k in keys] == [b.fingerprint, a.fingerprint]
