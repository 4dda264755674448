"""The keyboard and pointer of a graphical console on the real stack: the table's facts
checked against this machine's libvirt.

Each domain of ``arch/`` (as virt-install writes them) enabled with VNC is defined by
libvirtd: what libvirt stores has a keyboard and a pointer on every architecture, the
virtio ones the editor added where the machine has none of its own (aarch64 ``virt``,
s390x), and libvirt's own elsewhere (PS/2 on x86, USB on ppc64 ``pseries``), with no
virtio one added beside them. Live, a partial disable keeps them for the graphical
console that stays, and the last disable gives back ``virsh dumpxml --inactive``
exactly. Keys typed through the virtio keyboard are in tests/test_aarch64_vm.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_live_disable_vm as live
from console_broker_testbed import Testbed
from lxml import etree
from test_xml_arch_vm import INACTIVE, SAMPLES, arch_of, define, named, require_emulator
from test_xml_input import ADDED
from xmlhelpers import CliRunner

pytestmark = pytest.mark.vm

ARCH = Path(__file__).parent / "arch"
#: ``<input type>`` -> what it is to a console.
KINDS = {"keyboard": "keyboard", "mouse": "pointer", "tablet": "pointer"}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_every_defined_graphical_domain_has_a_keyboard_and_pointer(
    cli: CliRunner, testbed: Testbed, sample: Path
) -> None:
    data = sample.read_bytes()
    require_emulator(arch_of(data))
    done = cli("xml", "enable", "--consoles", "vnc", "-", stdin=data)
    assert done.status == 0, done.stderr
    dom = define(testbed, named(done.stdout, testbed.unique_name(f"input-{sample.stem}")))
    try:
        stored = etree.fromstring(dom.XMLDesc(INACTIVE).encode())
        inputs = [(str(i.get("type")), str(i.get("bus"))) for i in stored.iterfind("devices/input")]
        assert {KINDS[kind] for kind, _bus in inputs if kind in KINDS} == {"keyboard", "pointer"}
        before = [
            str(i.get("type"))
            for i in etree.fromstring(data).iterfind("devices/input[@bus='virtio']")
        ]
        virtio = [kind for kind, bus in inputs if bus == "virtio"]
        assert virtio == before + ADDED[sample.stem]
    finally:
        testbed.remove(dom)


def virtio_inputs(xml: str) -> list[str]:
    root = etree.fromstring(xml.encode())
    return [str(i.get("type")) for i in root.iterfind("devices/input[@bus='virtio']")]


@pytest.mark.parametrize("first", ["spice", "vnc"])
@pytest.mark.parametrize(
    "path", [ARCH / "aarch64-virt-vnc-no-usb.xml", ARCH / "s390x-ccw.xml"], ids=lambda p: p.stem
)
def test_live_a_partial_disable_keeps_them_and_the_last_one_takes_them_away(
    testbed: Testbed, path: Path, first: str
) -> None:
    dom = testbed.define(live.sample(testbed, path))
    try:
        before = dom.XMLDesc(INACTIVE)
        live.enable(testbed, dom.name(), "vnc,spice")
        assert virtio_inputs(dom.XMLDesc(INACTIVE)) == ["keyboard", "tablet"]
        live.disable(testbed, dom.name(), first)
        assert virtio_inputs(dom.XMLDesc(INACTIVE)) == ["keyboard", "tablet"]
        live.disable(testbed, dom.name())
        assert dom.XMLDesc(INACTIVE) == before
    finally:
        testbed.remove(dom)
