"""The ``xml`` commands through ``broker.cli.main``."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path

import pytest
from xmlhelpers import SAMPLE, CliRunner

from broker.cli import build_parser
from broker.xml import parse_document, read_consoles

ENABLE = ("xml", "enable", "--consoles", "vnc,spice,serial")


def test_enable_reads_stdin_and_prints_the_edited_xml(cli: CliRunner) -> None:
    done = cli(*ENABLE, "--mode", "tcp", stdin=SAMPLE)
    assert done.status == 0, done.stderr
    assert set(read_consoles(parse_document(done.stdout))) == {"vnc", "spice", "serial"}
    again = cli(*ENABLE, "--mode", "tcp", "-", stdin=done.stdout)
    assert again.stdout == done.stdout


def test_disable_undoes_enable_exactly(cli: CliRunner) -> None:
    enabled = cli(*ENABLE, stdin=SAMPLE).stdout
    assert cli("xml", "disable", stdin=enabled).stdout == SAMPLE
    partly = cli("xml", "disable", "--consoles", "spice", stdin=enabled).stdout
    assert set(read_consoles(parse_document(partly))) == {"vnc", "serial"}


def test_check_exits_1_when_changes_are_needed_and_0_when_not(cli: CliRunner) -> None:
    needed = cli(*ENABLE, "--check", stdin=SAMPLE)
    assert (needed.status, needed.stdout) == (1, b"")
    assert "needs changes" in needed.stderr
    enabled = cli(*ENABLE, stdin=SAMPLE).stdout
    assert cli(*ENABLE, "--check", stdin=enabled).status == 0
    assert cli(*ENABLE, "--check", "--mode", "tcp", stdin=enabled).status == 1
    assert cli("xml", "disable", "--check", stdin=SAMPLE).status == 0


def test_diff_prints_a_unified_diff(cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "dom.xml"
    path.write_bytes(SAMPLE)
    done = cli(*ENABLE, "--diff", str(path))
    assert done.status == 0
    text = done.stdout.decode()
    assert text.startswith(f"--- {path}\n+++ {path} (edited)\n@@")
    assert (
        "-    <graphics type='vnc' port='5905' autoport='no' passwd='s3cret' keymap='de'>" in text
    )
    assert path.read_bytes() == SAMPLE


def test_in_place_rewrites_atomically_and_keeps_the_mode(cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "dom.xml"
    path.write_bytes(SAMPLE)
    path.chmod(0o640)
    link = tmp_path / "link.xml"
    link.symlink_to(path)
    done = cli(*ENABLE, "--in-place", str(link))
    assert done.status == 0 and done.stdout == b""
    assert "updated" in done.stderr
    assert link.is_symlink()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    enabled = path.read_bytes()
    assert set(read_consoles(parse_document(enabled))) == {"vnc", "spice", "serial"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    unchanged = cli(*ENABLE, "-i", str(path))
    assert "already up to date" in unchanged.stderr
    assert path.stat().st_mtime_ns == before - 10**9
    assert cli("xml", "disable", "-i", str(path)).status == 0
    assert path.read_bytes() == SAMPLE


def test_in_place_needs_a_file_and_excludes_other_outputs(cli: CliRunner) -> None:
    done = cli(*ENABLE, "--in-place", stdin=SAMPLE)
    assert done.status == 2 and "needs a FILE" in done.stderr
    with pytest.raises(SystemExit):
        cli(*ENABLE, "--in-place", "--diff", "x.xml")


def test_a_refused_input_is_one_line_on_stderr_with_status_2(
    cli: CliRunner, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    xxe = f"<!DOCTYPE d [<!ENTITY x SYSTEM 'file://{secret}'>]><domain>&x;</domain>".encode()
    for data, reason in (
        (xxe, "DOCTYPE"),
        (b"<network/>", "root element is <network>"),
        (SAMPLE[:100], "not well-formed"),
    ):
        done = cli(*ENABLE, stdin=data)
        assert done.status == 2
        assert done.stdout == b""
        assert done.stderr.count("\n") == 1 and reason in done.stderr
        assert "TOP-SECRET" not in done.stderr


def test_bad_options_are_usage_errors(cli: CliRunner) -> None:
    done = cli(*ENABLE, "--listen", "127.0.0.1", stdin=SAMPLE)
    assert done.status == 2 and "tcp and websocket" in done.stderr
    done = cli("xml", "enable", "--consoles", "vnc,rdp", stdin=SAMPLE)
    assert done.status == 2 and "serial, spice, vnc)" in done.stderr
    with pytest.raises(SystemExit):
        cli(*ENABLE, "--usbredir", "99")
    with pytest.raises(SystemExit):
        cli("xml", "enable", stdin=SAMPLE)  # --consoles is required


def test_a_plugins_xml_options_by_flag_or_by_name(cli: CliRunner) -> None:
    """--spice-tls and --usbredir are the SPICE plugin's declared options (XMLOption), the
    same as --option spice.tls=yes and --option spice.usbredir=N."""
    by_flag = cli(*ENABLE, "--mode", "tcp", "--spice-tls", "--usbredir", "3", stdin=SAMPLE)
    by_name = cli(*ENABLE, "--mode", "tcp", "--option", "spice.tls=yes",
                  "--option", "spice.usbredir=3", stdin=SAMPLE)
    assert by_flag.status == 0 and by_flag.stdout == by_name.stdout
    assert read_consoles(parse_document(by_name.stdout))["spice"].settings == {"tls": "yes"}
    assert len(parse_document(by_name.stdout).root.findall("devices/redirdev")) == 3
    done = cli(*ENABLE, "--option", "spice.usbredir=many", stdin=SAMPLE)
    assert done.status == 2 and "spice.usbredir: expected a whole number" in done.stderr
    done = cli(*ENABLE, "--spice-tls", stdin=SAMPLE)  # fd mode has no port for TLS
    assert done.status == 2 and "spice.tls: TLS needs a listening port" in done.stderr


def test_a_plugins_flags_come_with_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    enable = ["xml", "enable", "--consoles", "vnc", "--spice-tls", "-"]
    assert build_parser().parse_args(enable).option_spice_tls is True
    monkeypatch.setenv("CONSOLE_BROKER_DISABLE_PLUGINS", "spice")
    with pytest.raises(SystemExit):
        build_parser().parse_args(enable)


def test_a_missing_file_is_reported(cli: CliRunner, tmp_path: Path) -> None:
    done = cli(*ENABLE, str(tmp_path / "nope.xml"))
    assert done.status == 2 and "cannot read" in done.stderr


def test_show_prints_the_records(cli: CliRunner) -> None:
    assert cli("xml", "show", stdin=SAMPLE).stdout == b"no consoles recorded\n"
    enabled = cli(*ENABLE, "--mode", "tcp", stdin=SAMPLE).stdout
    text = cli("xml", "show", stdin=enabled).stdout.decode()
    assert "vnc: mode tcp, device graphics[0] (type vnc); disable restores: graphics\n" in text
    assert "spice: mode tcp, device graphics[1] (type spice), tls=no;" in text
    doc = json.loads(cli("xml", "show", "--json", stdin=enabled).stdout)
    assert doc["serial"]["device"] == {"tag": "serial", "type": "pty", "index": 0}
    assert doc["vnc"]["mode"] == "tcp"


def _parsers(
    parser: argparse.ArgumentParser, path: str
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_command_and_option_of_this_area_has_help() -> None:
    mine = ("xml", "enable", "disable", "libvirt-hook")
    for path, parser in _parsers(build_parser(), "console-broker"):
        words = path.split()
        if len(words) < 2 or words[1] not in mine:
            continue
        assert parser.description, f"{path} has no description"
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{path} {action.dest} has no help"
