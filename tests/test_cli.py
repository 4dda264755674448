"""The command line: --version and an explaining --help on every command, in this process
and through the installed ``console-broker`` script."""

from __future__ import annotations

import argparse
import subprocess
import sysconfig
from pathlib import Path

import pytest

import broker
from broker.cli import build_parser, main


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"console-broker {broker.__version__}"


@pytest.mark.parametrize("command", _commands(build_parser()), ids=" ".join)
def test_every_command_has_help(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: console-broker")
    # A description or at least one documented option beyond --help.
    assert len(out.splitlines()) > 3


@pytest.mark.parametrize("command", _commands(build_parser()), ids=" ".join)
def test_the_installed_script_runs_every_command(command: tuple[str, ...]) -> None:
    """The console script of this environment (scripts/test: the wheel's) imports every
    command's module: ``--help`` builds the whole parser."""
    script = Path(sysconfig.get_path("scripts")) / "console-broker"
    done = subprocess.run(
        [str(script), *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" ".join(("usage: console-broker", *command)))
    assert done.stderr == ""


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err
