"""SIGHUP to ``console-broker serve`` (one process, and ``--workers 2``): the certificate
and the token keys are reloaded, a connection made before goes on, a bad file keeps the
old ones, and the broker keeps running. libvirt's test driver stands in for the
hypervisor (no session reaches a console here; tests/serial/test_reload_vm.py keeps a
real console session open across the signal)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from reloadkit import LIBVIRT, TEST_DOMAIN, ReloadingBroker, certificate, install, shown_certificate
from servedbroker import CLI


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ReloadingBroker]:
    broker = ReloadingBroker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()


def test_sighup_reloads_the_certificate_and_an_open_connection_goes_on(
    served: ReloadingBroker,
) -> None:
    assert shown_certificate(served.port) == certificate(served.first["server"])
    # A connection whose TLS handshake was made with the first certificate, its request
    # not sent yet.
    context = ssl.create_default_context(cafile=str(served.first["ca"]))
    context.check_hostname = False
    early = context.wrap_socket(socket.create_connection(("127.0.0.1", served.port), 5))
    install(served.second, served.live)
    served.hup()
    (line,) = served.wait_events("broker.reloaded", 1)
    assert line["changed"] == ["tls.cert", "tls.key"]
    assert line["certificate"]["serial"] == format(
        certificate(served.second["server"]).serial_number, "x"
    )
    assert line["restart_needed"] == []
    assert shown_certificate(served.port) == certificate(served.second["server"])
    served.tls = {**served.tls, "ca": served.second["ca"]}  # get() trusts the new CA
    assert served.reloads() == {"ok": 1.0, "failed": 0.0}
    # The early connection, still on the first certificate, is answered.
    with early:
        early.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := early.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert served.process.poll() is None
    assert not served.events("broker.stopping")


def test_a_bad_file_keeps_the_old_certificate(served: ReloadingBroker) -> None:
    shutil.copyfile(served.second["server"], served.live / "server-cert.pem")
    # the key still the first's: they do not match
    served.hup()
    (line,) = served.wait_events("broker.reload_failed", 1)
    assert line["level"] == "error"
    assert line["file"] == str(served.live / "server-key.pem")
    assert line["problem"] == f"does not match the certificate {served.live / 'server-cert.pem'}"
    assert shown_certificate(served.port) == certificate(served.first["server"])
    assert served.reloads() == {"ok": 0.0, "failed": 1.0}
    # Fixed, and signalled again: the new pair is taken.
    shutil.copyfile(served.second["server-key"], served.live / "server-key.pem")
    served.hup()
    served.wait_events("broker.reloaded", 1)
    assert shown_certificate(served.port) == certificate(served.second["server"])


def test_sighup_reloads_the_trusted_keys(served: ReloadingBroker, tmp_path: Path) -> None:
    # Another issuer: its own key pair, a configuration of its own to sign with.
    issuer = tmp_path / "issuer.toml"
    issuer.write_text(f'[broker]\nnode = "testnode"\nstate_dir = "issuer"\n{LIBVIRT}')
    subprocess.run([*CLI, "keygen", "--config", str(issuer)], check=True, capture_output=True)

    def foreign_token() -> str:
        out = subprocess.run(
            [*CLI, "token", TEST_DOMAIN, "--protocol", "spice", "--config", str(issuer)],
            check=True, capture_output=True, text=True,
        ).stdout
        token = re.search(r"token=([A-Za-z0-9_.-]+)", out)
        assert token is not None, out
        served.tokens.append(token.group(1))
        return token.group(1)

    assert served.file_status(foreign_token()) == 401
    text = served.config.read_text()
    served.config.write_text(text.replace(
        "[tls]", f'[tokens]\npublic_keys = ["{tmp_path / "issuer" / "signing-key.pub.pem"}"]\n'
        "[tls]",
    ))
    served.hup()
    (line,) = served.wait_events("broker.reloaded", 1)
    assert line["changed"] == ["trusted_keys"]
    assert len(line["keys"]) == 2 and len(line["keys_added"]) == 1
    assert served.file_status(foreign_token()) == 404  # verified: console not enabled
    assert served.file_status(served.token(TEST_DOMAIN)["token"]) == 404  # the local key too
    served.assert_no_token_logged()


def test_settings_that_need_a_restart_are_named(served: ReloadingBroker) -> None:
    text = served.config.read_text()
    served.config.write_text(
        text.replace("shutdown_grace = ", "max_sessions = 3\nshutdown_grace = ")
    )
    served.hup()
    (line,) = served.wait_events("broker.reloaded", 1)
    assert line["restart_needed"] == ["limits.max_sessions"]
    assert line["changed"] == []


def test_every_worker_reloads(tmp_path: Path) -> None:
    served = ReloadingBroker(tmp_path, extra_config="[service]\nworkers = 2\n")
    try:
        install(served.second, served.live)
        served.hup()
        lines = served.wait_events("broker.reloaded", 2)
        assert sorted(line["worker"] for line in lines) == [0, 1]
        assert all(line["changed"] == ["tls.cert", "tls.key"] for line in lines), lines
        (signalled,) = served.events("broker.signal")
        assert signalled["signal"] == "SIGHUP" and signalled["workers"] == 2
        # Whichever worker the kernel gives a new connection to shows the new certificate.
        for _ in range(20):
            assert shown_certificate(served.port) == certificate(served.second["server"])
        served.tls = {**served.tls, "ca": served.second["ca"]}
        assert served.reloads() == {"ok": 2.0, "failed": 0.0}
        assert served.process.poll() is None
        assert not served.events("worker.died")
    finally:
        served.stop()
