"""The client side runs without the server dependencies: ``console-broker --help``, every
command's ``--help``, ``plugins`` and ``open`` import none of them, and a command that
needs them says in one line what to install instead of failing with a traceback.

Here the server modules are installed (the test environment has every extra) and made
unimportable in a subprocess (``sys.modules[name] = None``); tests/test_client_install.py
installs the wheel without them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import broker.cli
from broker.cli import SERVER_INSTALL, SERVER_MODULES, build_parser, main

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

#: Every command that needs the server side, with arguments it parses with.
SERVER_COMMANDS: dict[tuple[str, ...], list[str]] = {
    ("serve",): [],
    ("doctor",): [],
    ("xml", "enable"): ["--consoles", "vnc"],
    ("xml", "disable"): [],
    ("xml", "show"): [],
    ("enable",): ["domain", "--consoles", "vnc"],
    ("disable",): ["domain"],
    ("libvirt-hook",): ["domain", "migrate"],
    ("keygen",): [],
    ("config",): ["--defaults"],
    ("token",): ["domain", "--protocol", "vnc"],
    ("screenshot",): ["domain", "-o", "shot.png"],
    ("install-service",): ["--dry-run"],
    ("sessions", "list"): [],
    ("sessions", "end"): ["3f2a9c0d11b2"],
}

#: The modules the client side loads: the command line, ``open``, the plugins and their
#: native clients (which ``open_client`` imports when it runs).
CLIENT_MODULES = [
    "broker.cli", "broker.native", "broker_vnc", "broker_spice", "broker_serial",
    "broker_vnc._open", "broker_spice._open", "broker_serial._terminal",
]

LINE = "console-broker {} needs the server dependencies: pip install 'console-broker[server]'"


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement (PEP 503)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def without_server(code: str, *missing: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in a Python where the server modules (or *missing*) cannot be imported."""
    blocked = list(missing or [*SERVER_MODULES, "libvirtaio", "libvirt_qemu"])
    prelude = f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60
    )


def run_main(argv: list[str], *missing: str) -> subprocess.CompletedProcess[str]:
    return without_server(
        f"from broker.cli import main\nsys.exit(main({argv!r}))\n", *missing
    )


def _leaves(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = (), server: bool = False
) -> dict[tuple[str, ...], bool]:
    """Every command that runs a handler, and whether it needs the server side."""
    server = server or bool(parser._defaults.get("needs_server"))
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return {prefix: server}
    found: dict[tuple[str, ...], bool] = {}
    for action in subparsers:
        for name, sub in action.choices.items():
            found.update(_leaves(sub, (*prefix, name), server))
    return found


def test_the_server_modules_are_the_server_extra() -> None:
    """All but uvloop: serve runs without it, on asyncio's loop (service.event_loop)."""
    extra = {_name(r) for r in PROJECT["optional-dependencies"]["server"]}
    assert extra == {_name(d) for d in SERVER_MODULES.values()} | {"uvloop"}
    base = {_name(r) for r in PROJECT["dependencies"]}
    assert base == {"pluggy", "anyio", "websockets", "attrs", "structlog"}
    assert SERVER_INSTALL == "pip install 'console-broker[server]'"


def test_the_client_side_imports_no_server_module() -> None:
    """Run where every server module is installed: building the parser, loading the
    plugins and importing the client's modules import none of them."""
    code = (
        "import importlib, sys\n"
        "from broker.cli import build_parser\n"
        "from broker.plugins import PluginManager\n"
        "build_parser()\n"
        "PluginManager().plugin_infos()\n"
        f"for name in {CLIENT_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"heavy = {sorted({*SERVER_MODULES, 'libvirtaio', 'libvirt_qemu'})!r}\n"
        "print(sorted({m.partition('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_every_help_and_plugins_without_the_server_side() -> None:
    commands = [list(c) for c in _leaves(build_parser())]
    code = (
        "import contextlib, io\n"
        "from broker.cli import main\n"
        "failed = []\n"
        f"for command in [[]] + {commands!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main([*command, '--help'])\n"
        "        except SystemExit as exc:\n"
        "            if exc.code != 0 or not out.getvalue().startswith('usage: '):\n"
        "                failed.append(command)\n"
        "print(failed)\n"
        "sys.exit(main(['plugins', '--json']))\n"
    )
    done = without_server(code)
    assert done.returncode == 0, done.stderr
    failed, _, plugins = done.stdout.partition("\n")
    assert failed == "[]"
    assert {p["name"] for p in json.loads(plugins)} >= {"vnc", "spice", "serial"}
    assert done.stderr == ""


def test_the_commands_that_need_the_server_side_are_marked() -> None:
    """A command added without the mark would fail with a traceback on a workstation, or
    start its work before meeting the missing module."""
    marked = {command for command, server in _leaves(build_parser()).items() if server}
    assert marked == set(SERVER_COMMANDS)


@pytest.mark.parametrize("command", sorted(SERVER_COMMANDS), ids=" ".join)
def test_a_server_command_says_what_to_install(command: tuple[str, ...], tmp_path: Path) -> None:
    env_args = [*command, *SERVER_COMMANDS[command]]
    if command == ("keygen",):
        env_args += ["--state-dir", str(tmp_path / "state")]
    done = run_main(env_args)
    assert done.returncode == 1
    assert done.stderr == LINE.format(command[0]) + "\n"
    assert done.stdout == ""
    assert not (tmp_path / "state").exists()  # stopped before the handler ran


def test_the_line_names_what_is_missing_when_some_are_there() -> None:
    done = run_main(["serve"], "lxml", "jwt")
    assert done.returncode == 1
    assert done.stderr == LINE.format("serve") + " (missing: lxml, PyJWT)\n"


def test_a_server_module_met_by_a_command_gives_the_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command without the mark (a plugin's) that meets a missing server module."""

    def needs_libvirt(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'libvirt'", name="libvirt")

    monkeypatch.setattr(broker.cli, "_plugins_command", needs_libvirt)
    assert main(["plugins"]) == 1
    assert capsys.readouterr().err == LINE.format("plugins") + " (missing: libvirt-python)\n"


def test_another_missing_module_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'nothere'", name="nothere")

    monkeypatch.setattr(broker.cli, "_plugins_command", broken)
    with pytest.raises(ModuleNotFoundError, match="nothere"):
        main(["plugins"])
