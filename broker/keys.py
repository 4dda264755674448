"""Signing key files: Ed25519 keys in PEM.

The issuer (the local CLI, or a control plane) holds the private key; every
broker holds only public keys. Files are PEM: PKCS#8 for the private key,
SubjectPublicKeyInfo for a public key, both unencrypted (the private key is
protected by its ``0600`` mode in a ``0700`` state directory, as ssh host keys
are).

A key is named by its *fingerprint*: the unpadded base64url SHA-256 of the raw
32-byte public key. Tokens carry it as their ``kid`` header, and ``keygen``
prints it, so an operator can tell which key signed what.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# The key pair's file names in the state directory (the configuration's, which documents them).
from broker.config import PRIVATE_KEY_NAME as PRIVATE_KEY_NAME
from broker.config import PUBLIC_KEY_NAME as PUBLIC_KEY_NAME

#: Where ``generate_keypair(force=True)`` keeps the public key it replaced.
PREVIOUS_PUBLIC_KEY_NAME = "signing-key.previous.pub.pem"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_STATE_DIR_MODE = 0o700


class KeyFileError(Exception):
    """A key file is missing, unreadable, not an Ed25519 PEM key, or unsafe.

    The message names the file and never holds key material.
    """


@attrs.frozen
class KeyPairFiles:
    """A key pair in a state directory, as :func:`generate_keypair` leaves it."""

    private_key: Path
    public_key: Path
    #: The public key's fingerprint (the tokens' ``kid``).
    fingerprint: str
    #: False when :func:`ensure_keypair` found an existing key.
    created: bool
    #: Where the replaced public key was kept (``force=True`` over an old key).
    previous_public_key: Path | None = None


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """The unpadded base64url SHA-256 of the raw public key (43 characters)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode("ascii")


def private_key_path(state_dir: Path) -> Path:
    return state_dir / PRIVATE_KEY_NAME


def public_key_path(state_dir: Path) -> Path:
    return state_dir / PUBLIC_KEY_NAME


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_state_dir(state_dir: Path) -> None:
    """Create *state_dir* with mode 0700; an existing directory is left as it is."""
    if state_dir.is_dir():
        return
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        state_dir.mkdir(mode=_STATE_DIR_MODE)
    except FileExistsError:  # created meanwhile by a concurrent first start
        return
    os.chmod(state_dir, _STATE_DIR_MODE)  # mkdir's mode is filtered by the umask


def _write_atomically(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write *path* whole or not at all, born with *mode*.

    The data goes to a temporary file (created 0600) in the same directory,
    is synced, and is then moved into place: ``os.replace`` when *replace*,
    else ``os.link``, which fails if *path* exists, so two first starts racing
    cannot overwrite each other's key.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def generate_keypair(state_dir: Path, *, force: bool = False) -> KeyPairFiles:
    """Create a new signing key pair in *state_dir* (made 0700 if it is new).

    The private key is written 0600, the public key 0644, each atomically. An
    existing private key is never overwritten unless *force*; then the public
    key it replaces is kept as :data:`PREVIOUS_PUBLIC_KEY_NAME`, so brokers can
    go on trusting it while its tokens live (see docs/tokens.md, rotation).
    """
    private_path = private_key_path(state_dir)
    public_path = public_key_path(state_dir)
    _make_state_dir(state_dir)
    previous: Path | None = None
    if private_path.exists():
        if not force:
            raise KeyFileError(
                f"{private_path}: a signing key already exists; not overwriting it "
                "(use --force to replace it)"
            )
        try:
            old_public: Ed25519PublicKey | None = load_private_key(private_path).public_key()
        except KeyFileError:  # a damaged key is replaced without keeping anything
            old_public = None
        if old_public is not None:
            previous = state_dir / PREVIOUS_PUBLIC_KEY_NAME
            _write_atomically(previous, _public_pem(old_public), _PUBLIC_MODE, replace=True)
    private_key = Ed25519PrivateKey.generate()
    try:
        _write_atomically(private_path, _private_pem(private_key), _PRIVATE_MODE, replace=force)
    except FileExistsError:
        raise KeyFileError(
            f"{private_path}: a signing key was created meanwhile; not overwriting it"
        ) from None
    public_key = private_key.public_key()
    _write_atomically(public_path, _public_pem(public_key), _PUBLIC_MODE, replace=True)
    return KeyPairFiles(
        private_key=private_path,
        public_key=public_path,
        fingerprint=key_fingerprint(public_key),
        created=True,
        previous_public_key=previous,
    )


def ensure_keypair(state_dir: Path) -> KeyPairFiles:
    """The key pair in *state_dir*, created on first start.

    An existing private key is loaded and kept; its public key file is
    (re)written when it is missing or does not match the private key.
    """
    private_path = private_key_path(state_dir)
    public_path = public_key_path(state_dir)
    if not private_path.exists():
        try:
            return generate_keypair(state_dir)
        except KeyFileError:
            if not private_path.exists():
                raise
            # lost a race with a concurrent first start: use its key
    public_key = load_private_key(private_path).public_key()
    fingerprint = key_fingerprint(public_key)
    try:
        current = key_fingerprint(load_public_key(public_path))
    except KeyFileError:
        current = None
    if current != fingerprint:
        _write_atomically(public_path, _public_pem(public_key), _PUBLIC_MODE, replace=True)
    return KeyPairFiles(
        private_key=private_path, public_key=public_path, fingerprint=fingerprint, created=False
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a {what} file") from None
    except PermissionError:
        raise KeyFileError(f"{path}: permission denied reading the {what}") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PKCS#8 PEM, unencrypted).

    Like ssh, refuse a key file that group or others may read or write.
    """
    data = _read(path, "private key")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: the private key is accessible to others (mode {mode:04o}); "
            f"chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key (only Ed25519 signs tokens)")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key (SubjectPublicKeyInfo PEM)."""
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 key (only Ed25519 signs tokens)")
    return key


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    """Load every public key in *paths*, in order (the trusted list)."""
    return [load_public_key(path) for path in paths]
