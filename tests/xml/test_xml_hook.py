"""``console-broker libvirt-hook``: pass-through for most operations, rewrite for
incoming migrations and restores, never a guest-visible change."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree
from xmlhelpers import SAMPLE, CliRunner

from broker.xml import parse_document, read_consoles

POLICY = """consoles = ["vnc", "spice", "serial"]
mode = "tcp"
listen = "192.0.2.7"
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "hook.toml"
    path.write_text(POLICY)
    return path


@pytest.mark.parametrize(
    "operation", ["prepare", "start", "started", "stopped", "release", "reconnect", "attach"]
)
def test_other_operations_print_nothing(cli: CliRunner, policy: Path, operation: str) -> None:
    done = cli(
        "libvirt-hook", "--policy", str(policy), "dom", operation, "begin", "-", stdin=SAMPLE
    )
    assert (done.status, done.stdout, done.stderr) == (0, b"", "")


def test_without_a_policy_migrate_passes_through(cli: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    done = cli(
        "libvirt-hook", "--policy", str(missing), "dom", "migrate", "begin", "-", stdin=SAMPLE
    )
    assert (done.status, done.stdout) == (0, b"")


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_migrate_and_restore_switch_how_existing_displays_listen(
    cli: CliRunner, policy: Path, operation: str
) -> None:
    done = cli(
        "libvirt-hook", "--policy", str(policy), "dom", operation, "begin", "-", stdin=SAMPLE
    )
    assert done.status == 0, done.stderr
    root = parse_document(done.stdout).root
    graphics = root.findall("devices/graphics")
    assert [(g.get("type"), g.get("listen"), g.get("passwd")) for g in graphics] == [
        ("vnc", "192.0.2.7", "s3cret")
    ]
    # no device the guest sees was added: no SPICE display, channel, serial port
    before = [el.tag for el in parse_document(SAMPLE).root.find("devices")]  # type: ignore[union-attr]
    after = [el.tag for el in root.find("devices")]  # type: ignore[union-attr]
    assert after == before
    records = read_consoles(parse_document(done.stdout))
    assert list(records) == ["vnc"]
    assert records["vnc"].mode == "tcp"


def test_an_already_matching_domain_gives_empty_output(cli: CliRunner, policy: Path) -> None:
    first = cli(
        "libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-", stdin=SAMPLE
    )
    again = cli(
        "libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-", stdin=first.stdout
    )
    assert (again.status, again.stdout) == (0, b"")


def test_a_bad_policy_fails_the_hook_with_a_reason(cli: CliRunner, tmp_path: Path) -> None:
    for text, reason in (
        ('consoles = "vnc"', "non-empty list"),
        ('consoles = ["vnc"]\nmode = "carrier-pigeon"', "unknown mode"),
        ('consoles = ["vnc"]\ncolour = "blue"', "unknown key(s) colour"),
        ('consoles = ["spice"]\nusbredir = "many"', "'usbredir': spice.usbredir: expected a whole"),
        ('consoles = ["spice"]\nspice-tls = "maybe"', "'spice-tls': spice.tls: expected yes or no"),
        ("consoles = [", "cannot read the hook policy"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        done = cli(
            "libvirt-hook", "--policy", str(path), "dom", "migrate", "begin", "-", stdin=SAMPLE
        )
        assert done.status == 2 and reason in done.stderr and done.stdout == b""


def test_the_hook_refuses_hostile_input(cli: CliRunner, policy: Path) -> None:
    hostile = b"<!DOCTYPE domain [<!ENTITY x SYSTEM 'file:///etc/passwd'>]><domain>&x;</domain>"
    done = cli(
        "libvirt-hook", "--policy", str(policy), "dom", "restore", "begin", "-", stdin=hostile
    )
    assert done.status == 2 and "DOCTYPE" in done.stderr and done.stdout == b""


def test_a_domain_that_already_fails_the_schema_is_left_alone(cli: CliRunner, policy: Path) -> None:
    data = SAMPLE.replace(b"<name>sample</name>", b"<name>sample</name><bogus/>")
    done = cli("libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-", stdin=data)
    assert (done.status, done.stdout) == (0, b"")
    assert "left the domain unchanged" in done.stderr


def test_spice_graphics_already_there_are_switched_too(cli: CliRunner, policy: Path) -> None:
    data = SAMPLE.replace(
        b"  </devices>", b"  <graphics type='spice' autoport='yes'/>\n  </devices>"
    )
    done = cli("libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-", stdin=data)
    root = etree.fromstring(done.stdout)
    assert [g.get("listen") for g in root.iterfind("devices/graphics")] == ["192.0.2.7"] * 2
    assert root.find("devices/channel") is None and root.find("devices/redirdev") is None


def test_the_policy_takes_the_plugins_xml_options(cli: CliRunner, tmp_path: Path) -> None:
    """spice-tls and usbredir are the SPICE plugin's options, by their policy keys."""
    path = tmp_path / "hook.toml"
    path.write_text(POLICY + "spice-tls = true\nusbredir = 0\n")
    data = SAMPLE.replace(
        b"  </devices>", b"  <graphics type='spice' autoport='yes'/>\n  </devices>"
    )
    done = cli("libvirt-hook", "--policy", str(path), "dom", "migrate", "begin", "-", stdin=data)
    assert done.status == 0, done.stderr
    spice = [g for g in etree.fromstring(done.stdout).iterfind("devices/graphics")
             if g.get("type") == "spice"]
    assert [g.get("defaultMode") for g in spice] == ["secure"]
    assert read_consoles(parse_document(done.stdout))["spice"].settings == {"tls": "yes"}
