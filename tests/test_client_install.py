"""A client-only install: the wheel built from this checkout, installed with its base
dependencies alone into a fresh environment (no libvirt-python, lxml, cryptography, PyJWT
or prometheus-client), as ``pip install console-broker`` does on a workstation.

There ``console-broker --help``, ``open --help`` and ``plugins`` work, the built-in
plugins import, nothing of the server side is imported, ``serve`` says in one line
what to install, and ``open`` bridges a VNC viewer to a stand-in for a broker.

pip fetches setuptools (to build the wheel) and the base dependencies from the package
index: the tests need it (``network`` marker). Without it they are skipped on a
developer's machine, and fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import ServerConnection, serve
from websockets.typing import Subprotocol

from broker.cli import SERVER_MODULES

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
#: The modules of the server side, and those libvirt-python installs besides ``libvirt``.
HEAVY = sorted({*SERVER_MODULES, "libvirtaio", "libvirt_qemu"})
#: What pip prints when it cannot reach the package index.
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution",
           "Network is unreachable", "Could not fetch URL", "(from versions: none)")


def _pip(*args: str, timeout: float = 120) -> None:
    """Run this environment's pip; skip (fail under CI) when the index is out of reach."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--timeout", "20",
         "--retries", "1", *args], capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    if not os.environ.get("CI") and any(sign in output for sign in OFFLINE):
        pytest.skip(f"the package index is out of reach: pip {args[0]} failed")
    pytest.fail(f"pip {' '.join(args)} failed:\n{output}", pytrace=False)


def _source_copy(target: Path) -> Path:
    """The files the wheel is built from, without the checkout's build/ (setuptools would
    put a stale copy there into the wheel) and without writing into the checkout: the
    build hook (setup.py) bundles the browser clients of package.json with npm."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    roots = {package.split(".")[0] for package in setuptools["packages"]}
    ignore = shutil.ignore_patterns("__pycache__", ".*")
    names = ("pyproject.toml", "setup.py", "package.json", "package-lock.json")
    for name in (*names, PYPROJECT["project"]["readme"]):
        shutil.copy2(REPO / name, target / name)
    for root in roots:
        directory = setuptools["package-dir"].get(root, root)
        if not (target / directory).exists():
            shutil.copytree(REPO / directory, target / directory, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin directory of a fresh environment holding console-broker without extras."""
    work = tmp_path_factory.mktemp("client-install")
    source = work / "source"
    source.mkdir()
    _pip("wheel", "--no-deps", "--wheel-dir", str(work / "dist"), str(_source_copy(source)))
    wheel = next((work / "dist").glob("console_broker-*.whl"))
    env = work / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True,
                   timeout=60)
    _pip("--python", str(env / "bin" / "python"), "install", "--no-cache-dir", str(wheel),
         timeout=300)
    yield env / "bin"


def run(client: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(client / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60,
        cwd=client,  # not the checkout: nothing of the source tree on the path
    )


def test_the_environment_has_no_server_module(client: Path) -> None:
    code = "import importlib.util, sys\n"
    code += f"print([m for m in {HEAVY!r} if importlib.util.find_spec(m) is not None])"
    done = run(client, "python", "-c", code)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "[]", "")
    done = run(client, "python", "-c", "import broker; print(broker.__file__)")
    assert Path(done.stdout.strip()).is_relative_to(client.parent)


@pytest.mark.parametrize("argv", [["--help"], ["open", "--help"]], ids=" ".join)
def test_help(client: Path, argv: list[str]) -> None:
    done = run(client, "console-broker", *argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" ".join(["usage: console-broker", *argv[:-1]]))
    assert done.stderr == ""


def test_the_plugins_load(client: Path) -> None:
    done = run(client, "console-broker", "plugins", "--json")
    assert done.returncode == 0, done.stderr
    plugins = {p["name"]: p["protocols"][0]["name"] for p in json.loads(done.stdout)}
    assert plugins == {"vnc": "vnc", "spice": "spice", "serial": "serial"}
    done = run(client, "python", "-c", "import broker_vnc, broker_spice, broker_serial")
    assert (done.returncode, done.stderr) == (0, "")


def test_serve_says_what_to_install(client: Path) -> None:
    done = run(client, "console-broker", "serve")
    assert done.returncode == 1
    assert done.stderr == (
        "console-broker serve needs the server dependencies: "
        "pip install 'console-broker[server]'\n"
    )
    assert done.stdout == ""


def test_the_client_side_imports_no_server_module(client: Path) -> None:
    """The parser, the plugins and open's own modules, in the process that loaded them."""
    code = (
        "import importlib, sys\n"
        "from broker.cli import build_parser\n"
        "from broker.plugins import PluginManager\n"
        "build_parser()\n"
        "PluginManager().plugin_infos()\n"
        "import broker.native, broker_vnc._open, broker_spice._open, broker_serial._terminal\n"
        f"print(sorted({{m.partition('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    done = run(client, "python", "-c", code)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "[]", "")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_open_bridges_a_viewer(client: Path) -> None:
    """``console-broker open`` runs the VNC plugin's native client there: a local port a
    viewer connects to, bridged to the broker's WebSocket (here a stand-in that greets
    like an RFB server and echoes)."""

    def endpoint(websocket: ServerConnection) -> None:
        websocket.send(b"RFB 003.008\n")
        try:
            for message in websocket:
                websocket.send(message)
        except ConnectionClosed:
            pass

    with serve(endpoint, "127.0.0.1", 0, subprotocols=[Subprotocol("binary")]) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws/vnc?token=t"
        opened = subprocess.Popen(
            [str(client / "console-broker"), "open", url, "--no-viewer"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=client,
        )
        lines: queue.Queue[str] = queue.Queue()
        assert opened.stderr is not None
        reader = threading.Thread(target=lambda: [lines.put(line) for line in opened.stderr])
        reader.start()
        try:
            said = []
            while not (found := re.search(r"127\.0\.0\.1:(\d+)", "".join(said))):
                said.append(lines.get(timeout=30))
            with socket.create_connection(("127.0.0.1", int(found[1])), timeout=30) as viewer:
                assert _recv_exactly(viewer, 12) == b"RFB 003.008\n"
                viewer.sendall(b"RFB 003.008\n")
                assert _recv_exactly(viewer, 12) == b"RFB 003.008\n"
        finally:
            opened.terminate()
            opened.wait(timeout=30)
            reader.join(timeout=30)
            opened.stderr.close()
            server.shutdown()
        while not lines.empty():
            said.append(lines.get())
        assert "Traceback" not in "".join(said)
