"""A graphical console the user can type into, on every architecture.

What is typed or pointed at on a VNC or SPICE page reaches the guest only through an
``<input>`` device. x86 ``pc`` and ``q35`` have PS/2 built in and libvirt gives a ppc64
domain with graphics a USB keyboard and mouse, but the aarch64 ``virt`` machine and
s390x get nothing: there both graphical plugins hold the core's shared input slot
(``broker.api.input_slot``), which adds a virtio keyboard and tablet for what is
missing, records them once, and takes them away only with the last graphical console.
The samples are virt-install's (``arch/README.md``); the real stack's keys typed on the
VNC page of a bare aarch64 domain are in tests/test_aarch64_vm.py.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from lxml import etree
from test_xml_arch import ARCH, SAMPLES, bare, devices, enable, schema_ok
from xmlhelpers import CliRunner

from broker import hookimpl
from broker.api import Platform, input_slot
from broker.hookspecs import XMLEdit
from broker.plugins import PluginManager
from broker.xml import (
    Compare,
    ConsoleEdit,
    DeviceRef,
    EditOptions,
    Slot,
    disable_xml,
    enable_xml,
    parse_document,
    plugin_edits,
    read_consoles,
)

#: The virtio inputs enabling a graphical console adds to each sample.
ADDED: dict[str, list[str]] = {
    "x86_64-q35": [],  # PS/2 built in (and virt-install's USB tablet)
    "aarch64-virt": ["keyboard", "tablet"],  # a qemu-xhci, but no input on it
    "aarch64-virt-vnc-no-usb": ["keyboard", "tablet"],  # virt-install added none
    "s390x-ccw": ["keyboard", "tablet"],
    "s390x-ccw-vnc": [],  # virt-install's virtio tablet and keyboard are there
    "ppc64le-pseries": [],  # virt-install's USB tablet and keyboard
    "ppc64le-pseries-headless": [],  # libvirt adds a USB keyboard and mouse with graphics
}
#: The samples that get inputs.
TYPED = [p for p in SAMPLES if ADDED[p.stem]]


def virtio_inputs(data: bytes) -> list[str]:
    return [str(el.get("type")) for el in devices(data).iterfind("input[@bus='virtio']")]


def slots(data: bytes) -> dict[str, tuple[str, ...]]:
    return {p: r.slots for p, r in read_consoles(parse_document(data)).items()}


def disable(cli: CliRunner, data: bytes, *consoles: str, validate: bool = True) -> bytes:
    args = ("--consoles", ",".join(consoles)) if consoles else ()
    done = cli("xml", "disable", *args, *(() if validate else ("--no-validate",)), "-",
               stdin=data)
    assert done.status == 0, done.stderr
    return done.stdout


def test_every_sample_is_listed() -> None:
    assert {p.stem for p in SAMPLES} == set(ADDED)


@pytest.mark.parametrize("consoles", ["vnc", "spice", "vnc,spice,serial"])
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_a_graphical_console_gets_a_keyboard_and_pointer_where_the_machine_has_none(
    cli: CliRunner, sample: Path, consoles: str
) -> None:
    data = sample.read_bytes()
    done = enable(cli, consoles, data)
    assert done.status == 0, done.stderr
    out = done.stdout
    schema_ok(out)
    before = virtio_inputs(data)
    assert virtio_inputs(out) == before + ADDED[sample.stem]
    # recorded once, by the first graphical console enabled
    holders = [p for p, names in slots(out).items() if "input" in names]
    assert holders == (["vnc" if "vnc" in consoles else "spice"] if ADDED[sample.stem] else [])
    assert enable(cli, consoles, out).stdout == out
    assert disable(cli, out) == data


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_a_serial_console_alone_gets_no_input(cli: CliRunner, sample: Path) -> None:
    data = sample.read_bytes()
    done = enable(cli, "serial", data)
    assert done.status == 0, done.stderr
    assert virtio_inputs(done.stdout) == virtio_inputs(data)


@pytest.mark.parametrize("first", ["vnc", "spice"])
@pytest.mark.parametrize("sample", TYPED, ids=lambda p: p.stem)
def test_disabling_one_graphical_console_keeps_the_inputs_for_the_other(
    cli: CliRunner, sample: Path, first: str
) -> None:
    data = sample.read_bytes()
    out = enable(cli, "vnc,spice,serial", data).stdout
    other = "spice" if first == "vnc" else "vnc"
    kept = disable(cli, out, first)
    assert virtio_inputs(kept) == ["keyboard", "tablet"]
    assert "input" in slots(kept)[other]  # vnc's record handed to spice if vnc went first
    assert enable(cli, f"{other},serial", kept).stdout == kept
    serial_only = disable(cli, kept, other)
    assert virtio_inputs(serial_only) == []
    assert "input" not in slots(serial_only)["serial"]
    assert disable(cli, serial_only) == data


@pytest.mark.parametrize("sample", TYPED, ids=lambda p: p.stem)
def test_a_graphical_console_enabled_later_finds_the_inputs_in_place(
    cli: CliRunner, sample: Path
) -> None:
    data = sample.read_bytes()
    vnc = enable(cli, "vnc", data).stdout
    both = enable(cli, "spice", vnc).stdout
    assert virtio_inputs(both) == ["keyboard", "tablet"]
    assert "input" in slots(both)["vnc"] and "input" not in slots(both)["spice"]
    assert disable(cli, disable(cli, both, "vnc"), "spice") == data
    assert disable(cli, disable(cli, both, "spice"), "vnc") == data


@pytest.mark.parametrize(
    ("extra", "added"),
    [
        ("<controller type='usb' model='qemu-xhci'/><input type='tablet' bus='usb'/>",
         ["keyboard"]),
        ("<controller type='usb' model='qemu-xhci'/><input type='keyboard' bus='usb'/>",
         ["tablet"]),
        ("<input type='mouse' bus='virtio'/>", ["mouse", "keyboard"]),
        ("<input type='keyboard' bus='virtio'/><input type='tablet' bus='virtio'/>",
         ["keyboard", "tablet"]),
    ],
)
def test_only_what_is_missing_is_added(cli: CliRunner, extra: str, added: list[str]) -> None:
    data = bare("aarch64", "virt", extra)
    out = enable(cli, "vnc", data).stdout
    schema_ok(out)
    assert virtio_inputs(out) == added
    assert disable(cli, out) == data


@pytest.mark.parametrize(
    ("data", "added"),
    [
        (bare("x86_64", "pc"), []),  # PS/2 built in
        (bare("x86_64", "pc-q35-7.2"), []),
        (bare("riscv64", "virt"), ["keyboard", "tablet"]),
        (bare("x86_64", "microvm"), []),  # a machine the table does not know: as before
        (b"<domain type='qemu'><name>n</name><memory>1</memory><os><type>hvm</type></os>"
         b"<devices/></domain>", []),  # no arch: the host's, unknown here
    ],
)
def test_x86_and_unknown_machines_get_nothing(
    cli: CliRunner, data: bytes, added: list[str]
) -> None:
    done = enable(cli, "vnc,spice", data)
    assert done.status == 0, done.stderr
    assert virtio_inputs(done.stdout) == added


@pytest.mark.parametrize(
    ("arch", "machine", "buses", "graphics", "plain"),
    [
        ("x86_64", "pc", {"ps2", "usb", "virtio"}, {"keyboard", "pointer"},
         {"keyboard", "pointer"}),
        ("x86_64", "q35", {"ps2", "usb", "virtio"}, {"keyboard", "pointer"},
         {"keyboard", "pointer"}),
        ("aarch64", "virt", {"usb", "virtio"}, set(), set()),
        ("s390x", "s390-ccw-virtio", {"virtio"}, set(), set()),
        ("ppc64le", "pseries", {"usb", "virtio"}, {"keyboard", "pointer"}, set()),
    ],
)
def test_the_platform_knows_the_machines_own_inputs(
    arch: str, machine: str, buses: set[str], graphics: set[str], plain: set[str]
) -> None:
    platform = Platform(arch=arch, machine=machine)
    assert platform.input_buses == buses
    assert platform.implicit_inputs(graphics=True) == graphics
    assert platform.implicit_inputs(graphics=False) == plain


#: An x86 domain without PS/2: ``<features><ps2 state='off'/>`` (a libvirt feature newer
#: than libvirt 9.0's schema, hence ``--no-validate`` below).
NO_PS2 = bare("x86_64", "q35").replace(b"</os>", b"</os><features><ps2 state='off'/></features>")


def test_x86_without_ps2_gets_a_keyboard_and_pointer(cli: CliRunner) -> None:
    platform = Platform.of_domain(parse_document(NO_PS2).root)
    assert platform.ps2 == "off"
    assert platform.implicit_inputs(graphics=True) == frozenset()
    done = enable(cli, "vnc", NO_PS2, "--no-validate")
    assert done.status == 0, done.stderr
    assert virtio_inputs(done.stdout) == ["keyboard", "tablet"]
    assert disable(cli, done.stdout, validate=False) == NO_PS2


def test_an_unknown_platform_knows_no_inputs() -> None:
    assert Platform().implicit_inputs(graphics=True) is None
    assert Platform().input_buses is None


@attrs.frozen
class DbusDisplay(XMLEdit):
    """A third party's graphical console: a D-Bus display and the core's input slot."""

    def xml_edit(self, options: EditOptions) -> ConsoleEdit:
        def graphics(
            current: list[etree._Element], _devices: etree._Element
        ) -> list[etree._Element]:
            return list(current) or [etree.Element("graphics", type="dbus")]

        return ConsoleEdit(
            mode="fd",
            slots=[
                Slot(name="graphics", select="graphics[@type='dbus']", build=graphics,
                     compare=Compare.COVERS),
                input_slot(options.platform),
            ],
            devices=[DeviceRef("graphics", "dbus")],
        )


class DbusPlugin:
    @hookimpl
    def console_broker_xml_edits(self) -> list[XMLEdit]:
        return [DbusDisplay(name="dbus", title="D-Bus display", description="")]


def test_a_third_party_graphical_console_shares_the_inputs() -> None:
    edits = plugin_edits(PluginManager(plugins=[("dbus", DbusPlugin())]))
    data = (ARCH / "aarch64-virt.xml").read_bytes()
    out = enable_xml(data, ["dbus", "vnc"], EditOptions(), edits=edits).after
    assert virtio_inputs(out) == ["keyboard", "tablet"]
    assert "input" in slots(out)["dbus"] and "input" not in slots(out)["vnc"]
    kept = disable_xml(out, ["dbus"], edits=edits).after
    assert virtio_inputs(kept) == ["keyboard", "tablet"] and "input" in slots(kept)["vnc"]
    assert disable_xml(kept, edits=edits).after == data


def test_a_slot_of_the_same_name_that_is_not_shared_takes_no_record() -> None:
    """Another plugin's own slot called "input" is not the shared one: disable of VNC
    takes the inputs away rather than handing its record over."""

    @attrs.frozen
    class OwnInput(XMLEdit):
        def xml_edit(self, options: EditOptions) -> ConsoleEdit:
            return ConsoleEdit(
                mode="fd",
                slots=[Slot(name="input", select="input[@bus='xen']",
                            build=lambda current, _devices: list(current))],
            )

    class Plugin:
        @hookimpl
        def console_broker_xml_edits(self) -> list[XMLEdit]:
            return [OwnInput(name="own", title="own", description="")]

    edits = plugin_edits(PluginManager(plugins=[("own", Plugin())]))
    data = (ARCH / "s390x-ccw.xml").read_bytes()
    out = enable_xml(data, ["vnc", "own"], EditOptions(), edits=edits).after
    gone = disable_xml(out, ["vnc"], edits=edits).after
    assert virtio_inputs(gone) == []
    assert disable_xml(gone, edits=edits).after == data
