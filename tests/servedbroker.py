"""A real ``console-broker serve`` subprocess for the real-stack tests of every directory.

:class:`ServedBroker` writes a configuration (a temporary state directory, a free port,
JSON logs at debug level, plus the tables a test adds), starts the broker with the
plugins enabled, waits for ``/healthz``, issues tokens with the CLI, connects WebSocket
clients, and stops it. The broker gets SIGTERM if the test process dies first. Its log
goes to a file that must never hold a token.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from console_broker_testbed import Testbed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from broker.plugins import DISABLE_ENV

CLI = [sys.executable, "-m", "broker.cli"]
#: The checkout's browser clients (``scripts/setup-host`` runs ``npm ci`` there). The
#: served broker is pointed at them: an installed broker (``scripts/test`` runs the suite
#: against the built wheel) does not look for a source tree's.
NODE_MODULES = Path(__file__).resolve().parents[1] / "node_modules"
#: A JWT's first part (``{"`` in base64url) followed by its dot.
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (a test timeout ends it at once)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _limited(nofile: int) -> None:
    """In the child: :func:`end_with_parent`, and at most *nofile* open descriptors."""
    end_with_parent()
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


class ServedBroker:
    """A ``console-broker serve`` subprocess (debug logs in a file) and the tokens issued.

    *protocol*: what :meth:`token` asks for unless told otherwise; *extra_config*: more
    TOML after the common tables; *http_config*: more keys in ``[http]``; *connect_port*:
    also listen for HTTP CONNECT on a free port; *subprotocols*: what :meth:`connect`
    offers; *stop_timeout*: how long :meth:`stop` waits (default: the grace plus 10 s);
    *tls*: serve TLS (``[tls]``) with these files of ``certs.make_certificates``
    (``server``, ``server-key``, ``ca``), the CA also in ``tls.ca``; *command*: the
    ``console-broker`` command line that serves and issues tokens (default: this
    interpreter's ``-m broker.cli``); *limits_config*: more keys in ``[limits]``;
    *nofile*: the broker process's limit of open descriptors (RLIMIT_NOFILE);
    *listen_config*: more keys in ``[listen]``; *assets_dir*: ``http.assets_dir`` (None:
    left out, so that the broker finds its browser clients itself).
    """

    def __init__(
        self,
        directory: Path,
        *,
        protocol: str = "",
        extra_config: str = "",
        http_config: str = "",
        grace: float = 3.0,
        connect_port: bool = False,
        subprotocols: Sequence[str] = ("binary",),
        stop_timeout: float | None = None,
        tls: dict[str, Path] | None = None,
        command: Sequence[str] = CLI,
        limits_config: str = "",
        nofile: int | None = None,
        listen_config: str = "",
        assets_dir: Path | None = NODE_MODULES,
    ) -> None:
        self.directory = directory
        self.command = list(command)
        self.protocol = protocol
        self.subprotocols = list(subprotocols)
        self.grace = grace
        self.stop_timeout = grace + 10 if stop_timeout is None else stop_timeout
        self.port = free_port()
        self.connect_port = free_port() if connect_port else None
        listen = f"port = {self.port}\n{listen_config}"
        if self.connect_port is not None:
            listen += f"connect_port = {self.connect_port}\n"
        self.tls = tls
        assets = "" if assets_dir is None else f'assets_dir = "{assets_dir}"\n'
        if tls is not None:
            extra_config += (
                f'[tls]\ncert = "{tls["server"]}"\nkey = "{tls["server-key"]}"\n'
                f'ca = "{tls["ca"]}"\n'
            )
        self.config = directory / "broker.toml"
        self.config.write_text(
            f"""[broker]
node = "testnode"
state_dir = "state"
[listen]
host = "127.0.0.1"
{listen}[http]
allow_missing_origin = true
{assets}{http_config}[limits]
shutdown_grace = {grace}
{limits_config}[logging]
format = "json"
level = "debug"
{extra_config}
"""
        )
        self.log_path = directory / "broker.log"
        self.env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*self.command, "serve", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=end_with_parent if nofile is None else lambda: _limited(nofile),
        )
        self.tokens: list[str] = []
        if not self.healthy(30) or not self._every_worker_listening(30):
            text = self.log_text()
            self.stop()  # the process ended (or is ended) and its log file closed
            raise AssertionError(f"the broker did not come up:\n{text}")

    def _every_worker_listening(self, timeout: float) -> bool:
        """With ``service.workers`` > 1, wait until every worker logged
        ``broker.listening`` (``/healthz`` answers once one does; a worker still starting
        would load its files after the test changed them)."""
        workers = tomllib.loads(self.config.read_text()).get("service", {}).get("workers", 1)
        deadline = time.monotonic() + timeout
        while len(self.events("broker.listening")) < workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def healthy(self, timeout: float) -> bool:
        """Wait until ``/healthz`` answers 200 (True), the process ends or *timeout*
        passes (False)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _ = self.get("/healthz")
            except OSError:
                status = 0
            if status == 200:
                return True
            if self.process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    @property
    def url(self) -> str:
        scheme = "http" if self.tls is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, bytes]:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls["ca"]))
            context.check_hostname = False  # the broker's certificate names no address
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5, context=context) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def cli(self, *args: str) -> str:
        """``console-broker ARGS --config ...``: its standard output."""
        out = subprocess.run(
            [*self.command, *args, "--config", str(self.config)],
            check=True,
            capture_output=True,
            text=True,
            env=self.env,
        )
        return out.stdout

    def token(self, domain: str, *extra: str, protocol: str | None = None) -> dict[str, Any]:
        """``console-broker token DOMAIN --protocol P --json`` (and *extra*)."""
        return self.issue(domain, *extra, protocol=protocol)

    def issue(self, domain: str, *extra: str, protocol: str | None = None) -> dict[str, Any]:
        """:meth:`token`, whatever a subclass makes of it (:meth:`connect` uses this)."""
        protocol = self.protocol if protocol is None else protocol
        doc: dict[str, Any] = json.loads(
            self.cli("token", domain, "--protocol", protocol, "--json", *extra)
        )
        self.tokens.append(doc["token"])
        return doc

    def connect(
        self,
        domain: str,
        *extra: str,
        protocol: str | None = None,
        subprotocols: Sequence[str] | None = None,
        origin: str | None = None,
    ) -> ClientConnection:
        """A WebSocket to a fresh token's URL, offering *subprotocols* (default: the
        broker's), with *origin* as its Origin header if given."""
        url = self.issue(domain, *extra, protocol=protocol)["websocket"]
        offered = self.subprotocols if subprotocols is None else subprotocols
        return connect(
            url,
            subprotocols=[Subprotocol(p) for p in offered],
            origin=None if origin is None else Origin(origin),
            open_timeout=10,
        )

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines whose event is *name*."""
        found = []
        for line in self.log_text().splitlines():
            if f'"{name}"' in line:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == name:
                    found.append(doc)
        return found

    def stop(self) -> float:
        """SIGTERM; the seconds until the process exited."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=self.stop_timeout)
        self._log.close()
        return time.monotonic() - started

    def assert_no_token_logged(
        self, *secrets: str, require_tokens: bool = False, jwt_shape: bool = True
    ) -> None:
        """No issued token (nor its signature), nothing JWT-shaped (with *jwt_shape*) and
        none of *secrets* in the log; with *require_tokens*, some token was issued."""
        text = self.log_text()
        if require_tokens:
            assert self.tokens, "no token was issued"
        for token in self.tokens:
            assert token not in text
            assert token.split(".")[2] not in text  # not even the signature
        if jwt_shape:
            assert not JWT_SHAPE.search(text)
        for secret in secrets:
            assert secret not in text


def enabled_guest(testbed: Testbed, *enable_args: str, devices: str = "") -> Any:
    """A booted tiny guest (its serial console closed; *devices*: more XML in its
    ``<devices>``) provisioned with ``console-broker xml enable ENABLE_ARGS``."""
    enabled = subprocess.run(
        [*CLI, "xml", "enable", *enable_args],
        input=testbed.guest_xml(devices=devices),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    dom = testbed.define(enabled)
    testbed.boot(dom, console=False)
    return dom


def read_at_least(ws: ClientConnection, size: int, timeout: float = 30.0) -> bytes:
    """Binary messages from *ws* until at least *size* bytes came (all of them)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        assert isinstance(message, bytes)
        data += message
    return data


def serial_answers(ws: ClientConnection, timeout: float = 60.0) -> None:
    """Type ``echo hello-$((6*7))`` on a raw serial session until the guest's shell answers
    ``hello-42`` (the guest may still be booting)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while b"hello-42" not in seen:
        assert time.monotonic() < deadline, seen[-400:]
        ws.send(b"echo hello-$((6*7))\n")
        end = time.monotonic() + 2
        while time.monotonic() < end and b"hello-42" not in seen:
            with contextlib.suppress(TimeoutError):
                message = ws.recv(timeout=0.5)
                assert isinstance(message, bytes)
                seen += message
