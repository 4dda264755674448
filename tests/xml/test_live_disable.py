"""What libvirt adds when it defines an edited domain: found, recorded, and removed by disable.

The fixtures in ``live_disable/`` are real: the test bed's tiny guest on an i440fx
(``pc``) and a q35 machine, each as ``virsh dumpxml --inactive`` printed it before
the edit (``*-before.xml``), as ``console-broker xml enable --consoles
vnc,spice,serial`` handed it to libvirt (``*-defined.xml``), and as libvirt 9.0
(QEMU 7.2) stored it (``*-stored.xml``). libvirt added a virtio-serial controller
for the SPICE agent channel, and on q35 also a ``pcie-root-port`` for it and a
``pcie-to-pci-bridge`` for the QXL card.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from xmlhelpers import CliRunner

from broker.plugins import PluginManager
from broker.xml import (
    NAMESPACE,
    MetadataError,
    disable_xml,
    parse_document,
    plugin_edits,
    read_consoles,
)
from broker.xml import _libvirt as live
from broker.xml._additions import (
    added_devices,
    disable_recorded,
    identity,
    pairs,
    record_additions,
    references,
    remove_unused,
    uses,
)
from broker.xml._metadata import ADDED_NAMESPACE, find_added, read_added

FIXTURES = Path(__file__).parent / "live_disable"
SPICE_CHANNEL = "com.redhat.spice.0"
#: A channel the operator adds after enable: the guest agent, on the same controller.
GUEST_AGENT = """<channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='2'/>
    </channel>
    """


def fixture(machine: str, stage: str) -> bytes:
    return (FIXTURES / f"{machine}-{stage}.xml").read_bytes()


def root_of(data: bytes) -> etree._Element:
    return parse_document(data).root


def device_list(data: bytes) -> list[etree._Element]:
    devices = root_of(data).find("devices")
    assert devices is not None
    return [el for el in devices if isinstance(el.tag, str)]


def identities(data: bytes) -> Counter[Any]:
    return Counter(identity(el) for el in device_list(data))


def recorded(data: bytes) -> list[str]:
    return [describe_short(el) for el in read_added(find_added(root_of(data)))]


def describe_short(el: etree._Element) -> str:
    model = el.find("model")
    what = el.get("type") or (model.get("type") if model is not None else "")
    index = el.get("index")
    return f"{el.tag}:{what}" + (f":{index}" if index is not None else "")


def added(machine: str) -> list[str]:
    found = added_devices(
        root_of(fixture(machine, "before")),
        root_of(fixture(machine, "defined")),
        root_of(fixture(machine, "stored")),
    )
    return [describe_short(el) for el in found]


def with_record(machine: str) -> bytes:
    updated, _fresh = record_additions(
        fixture(machine, "before"), fixture(machine, "defined"), fixture(machine, "stored")
    )
    assert updated is not None
    return updated


def add_device(data: bytes, xml: str) -> bytes:
    text = data.decode()
    return text.replace("    <memballoon", xml + "<memballoon", 1).encode()


@pytest.fixture(scope="module")
def edits(manager: PluginManager) -> Any:
    return plugin_edits(manager)


# -- finding what libvirt added -------------------------------------------------


def test_libvirt_added_the_virtio_serial_controller_for_the_agent_channel() -> None:
    assert added("pc") == ["controller:virtio-serial:0"]


def test_on_q35_it_also_added_a_root_port_and_a_pci_bridge() -> None:
    assert added("q35") == [
        "controller:virtio-serial:0",
        "controller:pci:3",
        "controller:pci:4",
    ]


def test_a_device_written_without_an_address_is_the_one_libvirt_addressed() -> None:
    defined = etree.fromstring("<redirdev bus='usb' type='spicevmc'/>")
    stored = [
        etree.fromstring(
            "<redirdev bus='usb' type='spicevmc'><address type='usb' bus='0' port='2'/></redirdev>"
        ),
        etree.fromstring("<redirdev bus='usb' type='tcp'/>"),
    ]
    assert pairs([defined], stored) == [(defined, stored[0])]
    # the other way round, the stored one is more than what was written: no pair
    assert pairs([stored[0]], [defined]) == []


def test_addresses_compare_by_value_however_libvirt_writes_the_numbers() -> None:
    hex_bus = etree.fromstring(
        "<video><address type='pci' domain='0x0000' bus='0x0a' slot='0x01' function='0x0'/></video>"
    )
    decimal = etree.fromstring(
        "<video><address type='pci' domain='0' bus='10' slot='1' "
        "function='0' multifunction='on'/></video>"
    )
    assert identity(hex_bus) == identity(decimal)
    assert references(hex_bus) == {("pci", "10")}


def test_the_most_specific_device_pairs_first() -> None:
    loose = etree.fromstring("<input type='mouse'/>")
    exact = etree.fromstring("<input type='mouse' bus='usb'/>")
    stored = [
        etree.fromstring("<input type='mouse' bus='ps2'/>"),
        etree.fromstring("<input type='mouse' bus='usb'/>"),
    ]
    found = dict((id(old), new) for old, new in pairs([loose, exact], stored))
    assert found[id(exact)] is stored[1] and found[id(loose)] is stored[0]


def test_an_addition_a_device_the_domain_had_uses_is_not_recorded() -> None:
    """The domain had a virtio console (no address: it uses any virtio-serial
    controller); the controller libvirt added for it is the domain's own."""
    before = b"""<domain type='qemu'><name>d</name><devices>
    <console type='pty'><target type='virtio' port='0'/></console>
    </devices></domain>"""
    stored = b"""<domain type='qemu'><name>d</name><devices>
    <controller type='virtio-serial' index='0'/>
    <console type='pty'><target type='virtio' port='0'/></console>
    <video><model type='cirrus'/></video>
    </devices></domain>"""
    found = added_devices(root_of(before), root_of(before), root_of(stored))
    assert [describe_short(el) for el in found] == ["video:cirrus"]


@pytest.mark.parametrize(
    ("user", "device", "used"),
    [
        (
            "<disk><address type='drive' controller='1' bus='0' unit='0'/></disk>",
            "<controller type='scsi' index='1'/>",
            True,
        ),
        (
            "<disk><address type='drive' controller='1' bus='0' unit='0'/></disk>",
            "<controller type='scsi' index='0'/>",
            False,
        ),
        (
            "<channel><target type='virtio'/><address type='virtio-serial' controller='1'/>"
            "</channel>",
            "<controller type='virtio-serial' index='0'/>",
            False,
        ),
        (
            "<controller type='usb' index='0' model='ich9-uhci1'><master startport='0'/>"
            "</controller>",
            "<controller type='usb' index='0' model='ich9-ehci1'/>",
            True,
        ),
        ("<input type='tablet' bus='usb'/>", "<controller type='usb' index='2'/>", True),
        (
            "<hostdev mode='subsystem' type='pci'><source><address domain='0' bus='4' slot='0' "
            "function='0'/></source></hostdev>",
            "<controller type='pci' index='4'/>",
            False,
        ),
        ("<sound model='ich9'><audio id='2'/></sound>", "<audio id='2' type='none'/>", True),
        ("<video><model type='vga'/></video>", "<input type='mouse' bus='ps2'/>", False),
    ],
)
def test_what_uses_what(user: str, device: str, used: bool) -> None:
    assert uses(etree.fromstring(user), etree.fromstring(device)) is used


# -- the record -----------------------------------------------------------------


def test_the_record_holds_libvirts_devices_in_its_own_namespace() -> None:
    updated = with_record("q35")
    record = find_added(root_of(updated))
    assert record is not None and record.getparent().tag == "metadata"
    assert etree.QName(record).namespace == ADDED_NAMESPACE
    assert recorded(updated) == [
        "controller:virtio-serial:0",
        "controller:pci:3",
        "controller:pci:4",
    ]
    # the copies are libvirt's devices, addresses included
    copy = read_added(record)[0]
    assert copy.find("address").get("bus") == "0x03"
    # the consoles read as before: the record is no console
    assert set(read_consoles(parse_document(updated))) == {"vnc", "spice", "serial"}


def test_recording_again_changes_nothing() -> None:
    updated = with_record("pc")
    again, fresh = record_additions(fixture("pc", "before"), updated, updated)
    assert again is None and fresh == []


def test_the_record_is_the_union_of_what_each_define_added() -> None:
    """A record from an earlier enable (a cirrus card for VNC) and what this define
    added (the controller) go together, each once; a recorded device gone since is
    dropped."""
    first = b"""<cbl:libvirt-added xmlns:cbl='%s'>
        <video><model type='cirrus' vram='16384' heads='1' primary='yes'/>
        <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></video>
        <controller type='virtio-serial' index='0'><address type='pci' domain='0x0000'
         bus='0x00' slot='0x03' function='0x0'/></controller>
        <controller type='usb' index='7'/>
      </cbl:libvirt-added>
    </metadata>""" % ADDED_NAMESPACE.encode()
    cirrus = b"""<video>
      <model type='cirrus' vram='16384' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </video>
    """
    stored = add_device(fixture("pc", "stored"), cirrus.decode())
    stored = stored.replace(b"</cb:consoles>\n  </metadata>", b"</cb:consoles>\n" + first, 1)
    defined = add_device(fixture("pc", "defined"), cirrus.decode())
    updated, fresh = record_additions(
        add_device(fixture("pc", "before"), cirrus.decode()), defined, stored
    )
    assert updated is not None
    assert fresh == []  # the controller was recorded already
    assert recorded(updated) == ["controller:virtio-serial:0", "video:cirrus"]


def test_a_device_disable_removed_and_libvirt_added_again_is_recorded_again() -> None:
    """disable --consoles spice on q35 removed the cirrus card libvirt had added for
    VNC and its bridge; VNC still needs a card, so libvirt adds both again. They were
    in the definition before this define, but only as what libvirt had added: they
    are recorded again, or the last disable would leave them."""
    head = (
        f"<domain type='qemu'><name>d</name><metadata><cb:consoles xmlns:cb='{NAMESPACE}'>"
        "<cb:console protocol='vnc' mode='fd'/></cb:consoles></metadata><devices>"
        "<controller type='pci' index='0' model='pcie-root'/>"
        "<controller type='pci' index='2' model='pcie-root-port'>"
        "<address type='pci' bus='0x00' slot='0x01'/></controller>"
        "<graphics type='vnc'><listen type='none'/></graphics>"
    )
    card = (
        "<controller type='pci' index='4' model='pcie-to-pci-bridge'>"
        "<address type='pci' bus='0x02' slot='0x00'/></controller>"
        "<video><model type='cirrus'/><address type='pci' bus='0x04' slot='0x01'/></video>"
    )
    before = (head + card + "</devices></domain>").encode()
    defined = (head + "</devices></domain>").encode()
    updated, fresh = record_additions(before, defined, before)
    assert fresh == [
        "<controller type='pci' model='pcie-to-pci-bridge' index='4'>",
        "<video> (model cirrus)",
    ]
    assert updated is not None and recorded(updated) == ["controller:pci:4", "video:cirrus"]


def test_nothing_is_recorded_on_a_domain_without_consoles() -> None:
    before = fixture("pc", "before")
    stored = add_device(before, "<video><model type='cirrus'/></video>\n    ")
    assert record_additions(before, before, stored) == (None, [])


@pytest.mark.parametrize(
    "record",
    [
        "<cbl:libvirt-added xmlns:cbl='{ns}'><x:video xmlns:x='urn:x'/></cbl:libvirt-added>",
        "<cbl:libvirt-added xmlns:cbl='{ns}'/><cbl:libvirt-added xmlns:cbl='{ns}'/>",
    ],
)
def test_a_malformed_record_is_refused(edits: Any, record: str) -> None:
    data = with_record("pc")
    start = data.index(b"<cbl:libvirt-added")
    end = data.index(b"</cbl:libvirt-added>") + len(b"</cbl:libvirt-added>")
    broken = data[:start] + record.format(ns=ADDED_NAMESPACE).encode() + data[end:]
    with pytest.raises(MetadataError, match="libvirt added"):
        disable_recorded(broken, edits=edits, validate=False)


# -- disable ----------------------------------------------------------------------


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_disable_gives_back_the_definition_before_enable(machine: str, edits: Any) -> None:
    outcome = disable_recorded(with_record(machine), edits=edits)
    assert outcome.after == fixture(machine, "before")
    assert outcome.notes == ()


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_a_controller_another_channel_uses_stays(machine: str, edits: Any) -> None:
    """The operator added the guest agent's channel after enable: it is on the
    virtio-serial controller libvirt added for SPICE, so the controller stays (and on
    q35 the root port it sits on); the channel stays; console-broker's devices go."""
    data = add_device(with_record(machine), GUEST_AGENT)
    outcome = disable_recorded(data, edits=edits)
    stayed = ["controller:virtio-serial:0"] + (["controller:pci:3"] if machine == "q35" else [])
    assert identities(outcome.after) == identities(fixture(machine, "before")) + Counter(
        [identity(etree.fromstring(GUEST_AGENT))]
        + [identity(el) for el in device_list(data) if describe_short(el) in stayed]
    )
    assert b"pcie-to-pci-bridge" not in outcome.after  # the QXL card's bridge went
    assert ADDED_NAMESPACE.encode() not in outcome.after
    assert b"cb:consoles" not in outcome.after
    assert outcome.notes[0].startswith(
        "kept <controller type='virtio-serial' index='0'>, which libvirt added for the "
        "consoles: <channel type='unix'>"
    )


def test_disabling_spice_alone_removes_its_controller_and_keeps_the_record_of_the_rest(
    edits: Any,
) -> None:
    data = with_record("q35")
    serial_off = disable_recorded(data, ["serial"], edits=edits)
    # serial's disable frees nothing libvirt added: the record stays as it was
    assert recorded(serial_off.after) == recorded(data)
    spice_off = disable_recorded(serial_off.after, ["spice"], edits=edits)
    assert b"virtio-serial" not in spice_off.after
    assert b"pcie-to-pci-bridge" not in spice_off.after
    assert find_added(root_of(spice_off.after)) is None  # nothing recorded left
    assert set(read_consoles(parse_document(spice_off.after))) == {"vnc"}


def test_a_device_used_by_a_remaining_console_stays_recorded(edits: Any) -> None:
    data = with_record("pc")
    vnc_off = disable_recorded(data, ["vnc"], edits=edits)
    assert recorded(vnc_off.after) == ["controller:virtio-serial:0"]
    assert b"<controller type='virtio-serial'" in vnc_off.after


def test_without_a_record_disable_is_what_it_was(edits: Any) -> None:
    """A domain enabled by an older version: nothing recorded, nothing more removed."""
    stored = fixture("pc", "stored")
    assert disable_recorded(stored, edits=edits) == disable_xml(stored, edits=edits)
    assert b"<controller type='virtio-serial'" in disable_recorded(stored, edits=edits).after


def test_disable_with_nothing_to_do_changes_no_byte(edits: Any) -> None:
    data = with_record("pc")
    outcome = disable_recorded(data, ["qga-not-here"], edits=edits)
    assert outcome.after == data and not outcome.changed


def test_removal_goes_on_until_nothing_more_is_free() -> None:
    """A bridge on a root port, a card on the bridge: the card's removal frees the
    bridge, whose removal frees the port."""
    data = b"""<domain type='qemu'><name>d</name><devices>
      <controller type='pci' index='0' model='pcie-root'/>
      <controller type='pci' index='5' model='pcie-root-port'>
        <address type='pci' bus='0x00' slot='0x02'/></controller>
      <controller type='pci' index='6' model='pcie-to-pci-bridge'>
        <address type='pci' bus='0x05' slot='0x00'/></controller>
      <video><address type='pci' bus='0x06' slot='0x01'/></video>
    </devices></domain>"""
    root = root_of(data)
    entries = [etree.fromstring(etree.tostring(el)) for el in root.find("devices")[1:]]
    removed, kept = remove_unused(root, entries)
    assert [describe_short(el) for el in removed] == [
        "video:",
        "controller:pci:6",
        "controller:pci:5",
    ]
    assert kept == []
    assert [el.get("index") for el in root.find("devices")] == ["0"]


# -- through libvirt, at its boundary ---------------------------------------------


class FakeDomain:
    """A defined domain as libvirt's API shows it."""

    def __init__(self, xml: str) -> None:
        self.xml = xml

    def name(self) -> str:
        return "web01"

    def isActive(self) -> bool:
        return False

    def XMLDesc(self, _flags: int) -> str:
        return self.xml


class FakeConnection:
    """Stores what it is given, completing it as libvirt does: a virtio channel
    without a virtio-serial controller gets one (the stored fixture's)."""

    def __init__(self, xml: bytes) -> None:
        self.domain = FakeDomain(xml.decode())
        self.defined: list[str] = []

    def defineXML(self, xml: str) -> FakeDomain:
        self.defined.append(xml)
        if SPICE_CHANNEL in xml and "type='virtio-serial'" not in xml:
            controller = (
                "<controller type='virtio-serial' index='0'>\n      <address type='pci' "
                "domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n    </controller>\n"
                "    "
            )
            xml = xml.replace("<serial type='pty'>", controller + "<serial type='pty'>", 1)
        self.domain.xml = xml
        return self.domain

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeConnection:
    connection = FakeConnection(fixture("pc", "before"))
    monkeypatch.setattr(live, "open_connection", lambda _uri: connection)
    monkeypatch.setattr(live, "lookup_domain", lambda conn, _domain, _uri: conn.domain)
    return connection


def consoles_and_record(xml: str) -> tuple[Sequence[str], list[str]]:
    data = xml.encode()
    return sorted(read_consoles(parse_document(data))), recorded(data)


def test_enable_records_what_libvirt_added_and_disable_removes_it(
    cli: CliRunner, fake: FakeConnection
) -> None:
    before = fake.domain.xml
    done = cli("enable", "web01", "--consoles", "spice,serial")
    assert done.status == 0, done.stderr
    assert done.stdout.decode().splitlines() == [
        "web01: enabled spice,serial (fd); the definition was updated",
        "web01: recorded what libvirt added for the consoles, which disable removes too: "
        "<controller type='virtio-serial' index='0'>",
    ]
    # defined twice: the edit, then the same with the record
    assert len(fake.defined) == 2
    assert consoles_and_record(fake.domain.xml) == (
        ["serial", "spice"],
        ["controller:virtio-serial:0"],
    )

    again = cli("enable", "web01", "--consoles", "spice,serial")
    assert again.stdout == b"web01: nothing to change\n" and len(fake.defined) == 2

    done = cli("disable", "web01")
    assert done.status == 0, done.stderr
    assert fake.domain.xml == before


def test_a_dry_run_records_nothing(cli: CliRunner, fake: FakeConnection) -> None:
    done = cli("enable", "web01", "--consoles", "spice", "--dry-run")
    assert done.status == 0, done.stderr
    assert fake.defined == [] and b"recorded" not in done.stdout


def test_xml_disable_applies_a_record_it_finds(cli: CliRunner) -> None:
    """`virsh dumpxml --inactive DOMAIN | console-broker xml disable | virsh define`
    restores the definition too."""
    done = cli("xml", "disable", stdin=with_record("q35"))
    assert done.status == 0, done.stderr
    assert done.stdout == fixture("q35", "before")


def test_enable_help_names_the_record(capsys: pytest.CaptureFixture[str]) -> None:
    from broker.cli import main

    for command in (["xml", "enable"], ["enable"], ["disable"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "libvirt add" in text, command


def test_the_libvirt_hook_keeps_a_record_made_on_the_source_host(
    cli: CliRunner, tmp_path: Path
) -> None:
    """An incoming migration switches how the displays listen; the record of what
    libvirt added travels with the domain, unchanged, for a later disable there."""
    policy = tmp_path / "hook.toml"
    policy.write_text('consoles = ["vnc", "spice", "serial"]\nmode = "tcp"\n')
    incoming = with_record("q35")
    done = cli(
        "libvirt-hook", "--policy", str(policy), "web01", "migrate", "begin", "-", stdin=incoming
    )
    assert done.status == 0, done.stderr
    assert done.stdout  # rewritten: the displays now listen on TCP
    assert read_consoles(parse_document(done.stdout))["vnc"].mode == "tcp"
    assert recorded(done.stdout) == recorded(incoming)


def test_xml_show_lists_the_record(cli: CliRunner) -> None:
    shown = cli("xml", "show", "-", stdin=with_record("pc"))
    assert shown.status == 0, shown.stderr
    assert shown.stdout.decode().splitlines()[-1] == (
        "libvirt added for the consoles (disable removes what nothing else uses): "
        "<controller type='virtio-serial' index='0'>"
    )
    plain = cli("xml", "show", "-", stdin=fixture("pc", "stored"))
    assert b"libvirt added" not in plain.stdout
