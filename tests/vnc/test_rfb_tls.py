"""StartTLS with real TLS: RFBClient over a socket wrapped by Python's ssl
when told to, against a scripted VeNCrypt server (X509Vnc) whose certificate
is verified against its CA. (QEMU's own VeNCrypt needs vnc_tls in the global
qemu.conf, which the shared test bed does not switch on.)"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from broker_vnc.rfb import (
    NEED_DATA,
    RFBClient,
    SecuritySucceeded,
    ServerInit,
    StartTLS,
)
from certs import make_certificates
from rfb_reference_des import reference_vnc_response
from rfb_transcripts import CHALLENGE, V38, server_init, u8, u32


def _recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more
        data += more
    return data


def _vencrypt_server(sock: socket.socket, context: ssl.SSLContext, seen: dict[str, bytes]) -> None:
    """QEMU's side of a VeNCrypt X509Vnc handshake (ui/vnc-auth-vencrypt.c)."""
    with sock:
        sock.sendall(V38)
        seen["version"] = _recv(sock, 12)
        sock.sendall(u8(1) + u8(19))
        seen["security"] = _recv(sock, 1)
        sock.sendall(u8(0) + u8(2))
        seen["vencrypt"] = _recv(sock, 2)
        sock.sendall(u8(0) + u8(1) + u32(261))
        seen["subtype"] = _recv(sock, 4)
        sock.sendall(u8(1))
        try:
            tls = context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # the client refused our certificate
            seen["tls_error"] = repr(exc).encode()
            return
        with tls:
            tls.sendall(CHALLENGE)
            seen["response"] = _recv(tls, 16)
            tls.sendall(u32(0))
            seen["client_init"] = _recv(tls, 1)
            tls.sendall(server_init(name=b"QEMU (tls)"))
            tls.recv(1)  # until the client closes


def test_vencrypt_x509vnc_with_real_tls(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path)
    ca, cert, key = paths["ca"], paths["server"], paths["server-key"]
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca))

    ours, theirs = socket.socketpair()
    seen: dict[str, bytes] = {}
    thread = threading.Thread(target=_vencrypt_server, args=(theirs, server_context, seen))
    thread.start()
    sock: socket.socket = ours
    events = []
    client = RFBClient(password=b"secret", tls=True)
    try:
        sock.settimeout(30)
        while True:
            event = client.next_event()
            sock.sendall(client.data_to_send())
            if event is NEED_DATA:
                client.receive_data(sock.recv(65536) or None)
                continue
            events.append(event)
            if isinstance(event, StartTLS):
                assert not event.anonymous
                sock = client_context.wrap_socket(sock, server_hostname="127.0.0.1")
                client.tls_established()
            if isinstance(event, ServerInit):
                break
    finally:
        sock.close()
        thread.join(timeout=30)
    assert events[2:] == [
        StartTLS(261, False),
        SecuritySucceeded(19, 261),
        ServerInit(720, 400, events[-1].pixel_format, b"QEMU (tls)"),  # type: ignore[attr-defined]
    ]
    assert seen == {
        "version": V38,
        "security": u8(19),
        "vencrypt": u8(0) + u8(2),
        "subtype": u32(261),
        "response": reference_vnc_response(b"secret", CHALLENGE),
        "client_init": u8(1),
    }


def test_tls_layer_refuses_an_unverifiable_server(tmp_path: Path) -> None:
    """The point of X509*: the I/O layer verifies the certificate (here against
    a CA that did not sign it), and the session never gets past StartTLS."""
    paths = make_certificates(tmp_path)
    cert, key = paths["server"], paths["server-key"]
    (tmp_path / "other").mkdir()
    wrong_ca = make_certificates(tmp_path / "other")["ca"]  # a fresh, unrelated CA
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    ours, theirs = socket.socketpair()
    seen: dict[str, bytes] = {}
    thread = threading.Thread(target=_vencrypt_server, args=(theirs, server_context, seen))
    thread.start()
    client = RFBClient(password=b"secret", tls=True)
    with ours, pytest.raises(ssl.SSLCertVerificationError):
        ours.settimeout(30)
        while True:
            event = client.next_event()
            ours.sendall(client.data_to_send())
            if event is NEED_DATA:
                client.receive_data(ours.recv(65536) or None)
            elif isinstance(event, StartTLS):
                context = ssl.create_default_context(cafile=str(wrong_ca))
                context.wrap_socket(ours, server_hostname="127.0.0.1")
    thread.join(timeout=30)
    assert "tls_error" in seen
