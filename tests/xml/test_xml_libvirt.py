"""``console-broker enable/disable DOMAIN`` against libvirt's in-process test driver.

The test driver (``test:///default``) parses and formats domain XML with
libvirt's own code, so these tests also show that an edit of libvirt's output
is recognised as done on the next run. Connections to ``test:///default``
within one process share its state while one stays open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from lxml import etree
from xmlhelpers import SAMPLE, CliRunner

from broker.xml import parse_document, read_consoles

libvirt = pytest.importorskip("libvirt")
URI = "test:///default"
SECURE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


@pytest.fixture
def conn() -> Iterator[Any]:
    connection = libvirt.open(URI)
    yield connection
    connection.close()


@pytest.fixture
def dom(conn: Any) -> Iterator[Any]:
    domain = conn.defineXML(SAMPLE.decode())
    yield domain
    if domain.isActive():
        domain.destroy()
    domain.undefine()


def test_enable_keeps_the_password_and_is_idempotent(cli: CliRunner, dom: Any) -> None:
    done = cli("enable", "sample", "--consoles", "vnc,spice,serial", "--connect", URI)
    assert done.status == 0, done.stderr
    assert b"sample: enabled vnc,spice,serial (fd); the definition was updated" in done.stdout
    xml = dom.XMLDesc(SECURE).encode()
    records = read_consoles(parse_document(xml))
    assert set(records) == {"vnc", "spice", "serial"}
    vnc = etree.fromstring(xml).find("devices/graphics[@type='vnc']")
    assert vnc is not None and vnc.get("passwd") == "s3cret"
    assert [listen.get("type") for listen in vnc.iterfind("listen")] == ["none"]
    # libvirt's own formatting of our edit counts as done
    again = cli("enable", "sample", "--consoles", "vnc,spice,serial", "--connect", URI)
    assert again.stdout == b"sample: nothing to change\n"
    dry = cli("enable", "sample", "--consoles", "vnc", "--mode", "tcp", "-c", URI, "--dry-run")
    assert b"+    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'" in dry.stdout
    assert dom.XMLDesc(SECURE).encode() == xml


def test_the_password_never_reaches_the_non_secure_xml(cli: CliRunner, dom: Any) -> None:
    cli("enable", "sample", "--consoles", "vnc", "--connect", URI)
    assert "s3cret" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def test_disable_restores_the_definition(cli: CliRunner, dom: Any) -> None:
    before = dom.XMLDesc(SECURE)
    cli("enable", "sample", "--consoles", "vnc,serial", "--mode", "tcp", "--connect", URI)
    done = cli("disable", dom.UUIDString(), "--connect", URI)
    assert done.status == 0, done.stderr
    assert dom.XMLDesc(SECURE) == before


def test_a_running_domain_needs_a_restart(cli: CliRunner, dom: Any) -> None:
    dom.create()
    done = cli("enable", "sample", "--consoles", "vnc", "--connect", URI)
    assert b"sample is running: it needs a restart" in done.stdout
    still = cli("enable", "sample", "--consoles", "vnc", "--connect", URI)
    assert b"nothing to change" in still.stdout and b"needs a restart" in still.stdout


def test_unknown_domains_and_unreachable_libvirt_are_clear_errors(
    cli: CliRunner, conn: Any
) -> None:
    done = cli("enable", "no-such-domain", "--consoles", "vnc", "--connect", URI)
    assert done.status == 2
    assert "no domain named 'no-such-domain'" in done.stderr
    done = cli(
        "enable", "x", "--consoles", "vnc", "--connect", "qemu+unix:///system?socket=/nonexistent"
    )
    assert done.status == 2
    assert done.stderr.startswith("console-broker: error: cannot connect to libvirt at qemu+unix")
    assert done.stderr.count("\n") == 1
