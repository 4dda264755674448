"""The virt-viewer files (``.vv``) the SPICE plugin writes (broker_spice._vv)."""

from __future__ import annotations

import configparser
import datetime
from pathlib import Path

import pytest
from broker_spice._vv import host_subject, vv_file
from certs import make_certificates
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.config import BrokerSection, Config, ListenSection, TLSSection
from broker.plugins import PluginError
from broker.service._connect import PLAIN_PORT, TLS_PORT, token_for_handle

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.AbC-_dEf" * 8


def _section(body: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(body)
    return parser["virt-viewer"]


def test_the_vv_file_names_only_the_broker() -> None:
    assert vv_file(TOKEN, "guest", Config()) is None  # no CONNECT listener configured
    config = Config(listen=ListenSection(connect_port=6081))
    made = vv_file(TOKEN, "guest\r\nproxy=http://evil", config)
    assert made is not None and made.name == "vv" and made.suffix == ".vv"
    section = _section(made.body)
    assert section["type"] == "spice"
    assert section["proxy"] == "http://127.0.0.1:6081"
    assert token_for_handle(section["host"]) == TOKEN
    assert section["port"] == str(PLAIN_PORT) and "tls-port" not in section
    assert section["delete-this-file"] == "1"
    assert section["title"].startswith("guestproxy=")  # no line injection
    assert {"release-cursor", "secure-attention", "toggle-fullscreen"} <= set(section)


def test_a_broker_with_tls_gives_the_tls_port_its_ca_and_its_subject(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, names=("broker.example",))
    config = Config(
        listen=ListenSection(connect_port=6081),
        tls=TLSSection(cert=str(paths["server"]), key=str(paths["server-key"]),
                       ca=str(paths["ca"])),
    )
    made = vv_file(TOKEN, "guest", config)
    assert made is not None
    section = _section(made.body)
    assert section["tls-port"] == str(TLS_PORT) and "port" not in section
    assert section["secure-channels"] == "all"
    assert section["host-subject"] == "CN=server"
    # GLib's key files read \n as a newline: the CA's PEM, whole, on one line
    assert "\n" not in section["ca"]
    assert section["ca"].replace("\\n", "\n") == paths["ca"].read_text().strip() + "\n"
    # without tls.ca the file has no ca: the client's own trust store decides
    bare = Config(
        listen=ListenSection(connect_port=6081),
        tls=TLSSection(cert=str(paths["server"]), key=str(paths["server-key"])),
    )
    made = vv_file(TOKEN, "guest", bare)
    assert made is not None and "ca" not in _section(made.body)


def test_the_proxy_line_names_the_public_connect_url(tmp_path: Path) -> None:
    """Behind a front door the file names the front's port for this node, and with
    client certificates the tunnel's TLS is still the broker's own, as without."""
    paths = make_certificates(tmp_path, names=("hv1.example",), client=True)
    front = "http://console.example:7001"
    config = Config(
        broker=BrokerSection(public_connect_url=front),
        listen=ListenSection(connect_host="10.0.0.5", connect_port=6081),
        tls=TLSSection(cert=str(paths["server"]), key=str(paths["server-key"]),
                       ca=str(paths["ca"]), client_ca=str(paths["ca"])),
    )
    made = vv_file(TOKEN, "guest", config)
    assert made is not None
    section = _section(made.body)
    assert section["proxy"] == front
    assert section["tls-port"] == str(TLS_PORT) and section["host-subject"] == "CN=server"
    # unset: the CONNECT listener's own address; a wildcard gives the public URL's host
    config = Config(listen=ListenSection(connect_host="10.0.0.5", connect_port=6081))
    assert config.connect_proxy_url == "http://10.0.0.5:6081"
    config = Config(
        broker=BrokerSection(public_url="https://consoles.example/hv1"),
        listen=ListenSection(connect_host="::", connect_port=6081),
    )
    assert config.connect_proxy_url == "http://consoles.example:6081"
    config = Config(listen=ListenSection(connect_host="2001:db8::5", connect_port=6081))
    assert config.connect_proxy_url == "http://[2001:db8::5]:6081"
    # no CONNECT listener: no file, whatever the URL
    config = Config(broker=BrokerSection(public_connect_url=front))
    assert config.connect_proxy_url is None and vv_file(TOKEN, "guest", config) is None


def test_host_subject_keeps_the_certificates_order_and_escapes(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "IL"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example, Inc."),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "a\\b"),
        x509.NameAttribute(NameOID.COMMON_NAME, "hv1.example"),
    ])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # spice-gtk builds an X509_NAME from the string in order and compares it whole
    assert host_subject(str(path)) == r"C=IL,O=Example\, Inc.,OU=a\\b,CN=hv1.example"


def test_an_unreadable_certificate_is_a_clear_error(tmp_path: Path) -> None:
    config = Config(
        listen=ListenSection(connect_port=6081),
        tls=TLSSection(cert=str(tmp_path / "missing.pem"), key=str(tmp_path / "key.pem")),
    )
    with pytest.raises(PluginError, match="cannot read the broker's certificate"):
        vv_file(TOKEN, "guest", config)
