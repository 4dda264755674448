"""What the reload tests share: a served broker with TLS from files the tests replace,
the certificate a new connection is shown, SIGHUP and waiting for its log lines."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from certs import make_certificates
from cryptography import x509
from servedbroker import ServedBroker

LIBVIRT = '[libvirt]\nuri = "test:///default"\n'
#: The domain libvirt's test driver always has (running, no console enabled).
TEST_DOMAIN = "test"
RELOADS = re.compile(r'^console_broker_reloads_total\{(?:worker="\d+",)?result="(\w+)"\} (\S+)$',
                     re.MULTILINE)


def install(source: dict[str, Path], live: Path) -> None:
    """Put *source*'s certificate, key and CA where the configuration points."""
    for name in ("server", "server-key", "ca"):
        shutil.copyfile(source[name], live / source[name].name)


def shown_certificate(port: int) -> x509.Certificate:
    """The certificate a new TLS connection to *port* is shown."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


class ReloadingBroker(ServedBroker):
    """A served broker with TLS from files in ``live/`` (the first of two certificate
    sets), which the tests replace before SIGHUP; *libvirt*: its ``[libvirt]`` table
    (libvirt's test driver unless told otherwise)."""

    def __init__(
        self, directory: Path, *, extra_config: str = "", protocol: str = "spice",
        libvirt: str = LIBVIRT,
    ) -> None:
        self.first = make_certificates(directory / "first")
        self.second = make_certificates(directory / "second")
        self.live = directory / "live"
        self.live.mkdir()
        install(self.first, self.live)
        live = {name: self.live / self.first[name].name for name in ("server", "server-key", "ca")}
        super().__init__(directory, protocol=protocol, tls=live,
                         extra_config=libvirt + extra_config)

    def hup(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def wait_events(self, name: str, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while len(found := self.events(name)) < count:
            assert time.monotonic() < deadline, self.log_text()[-3000:]
            assert self.process.poll() is None, self.log_text()[-3000:]
            time.sleep(0.05)
        return found

    def reloads(self) -> dict[str, float]:
        """``console_broker_reloads_total`` by result (summed over the workers)."""
        status, body = self.get("/metrics")
        assert status == 200
        found: dict[str, float] = {}
        for result, value in RELOADS.findall(body.decode()):
            found[result] = found.get(result, 0.0) + float(value)
        return found

    def file_status(self, token: str) -> int:
        """The status ``/file/spice`` answers *token* with: 401 for a token whose key is
        not trusted, 404 (console not enabled on the test domain) for one that verified."""
        status, _ = self.get(f"/file/spice?token={token}")
        return status


