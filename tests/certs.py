"""Test certificates: a CA, a server certificate and optionally client certificates,
made with cryptography, in the file names QEMU's TLS directories use."""

from __future__ import annotations

import datetime
import ipaddress
import uuid
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def make_certificates(
    directory: Path,
    *,
    names: tuple[str, ...] = ("127.0.0.1",),
    client: bool = False,
    clients: Mapping[str, str] = {},
) -> dict[str, Path]:
    """A CA and a server certificate for *names* (IP addresses or DNS names), with
    QEMU's file names (ca-cert.pem, server-cert.pem, server-key.pem); with *client*,
    a client certificate too (client-cert.pem, client-key.pem, subject ``CN=client``).

    *clients* makes more client certificates: file stem (``front``: front-cert.pem,
    front-key.pem, keys ``front`` and ``front-key``) to subject, an RFC 4514 string
    (``"CN=front.console.example,O=Example"``).
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {uuid.uuid4()}")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"ca": directory / "ca-cert.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(
        stem: str,
        purpose: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
        subject: x509.Name | None = None,
    ) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if subject is None:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths[stem] = directory / f"{stem}-cert.pem"
        paths[f"{stem}-key"] = directory / f"{stem}-key.pem"
        paths[stem].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{stem}-key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths[f"{stem}-key"].chmod(0o600)

    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    leaf("server", x509.ExtendedKeyUsageOID.SERVER_AUTH, sans)
    if client:
        leaf("client", x509.ExtendedKeyUsageOID.CLIENT_AUTH, [])
    for stem, subject in clients.items():
        leaf(stem, x509.ExtendedKeyUsageOID.CLIENT_AUTH, [],
             x509.Name.from_rfc4514_string(subject))
    return paths
