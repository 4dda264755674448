"""Domain XML edits chosen per guest architecture and machine type (issue 18).

The samples in ``arch/`` are domains as ``virt-install --print-xml`` writes them for
x86_64 (q35), aarch64 (virt), s390x (s390-ccw-virtio) and ppc64le (pseries); the
``arch/domcaps`` files are libvirt 9.0's domain capabilities for those machines with
QEMU 7.2 (see ``arch/README.md``). These tests need no libvirt daemon; the real stack's
``virsh define`` of every output is in test_xml_arch_vm.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lxml import etree
from xmlhelpers import CliRunner, Run

from broker.api import DomainCapabilities, EditOptions, Platform
from broker.xml import (
    domain_schema,
    parse_document,
    read_consoles,
    schema_errors,
)

ARCH = Path(__file__).parent / "arch"
DOMCAPS = ARCH / "domcaps"
SAMPLES = sorted(ARCH.glob("*.xml"))
MODES = ("fd", "tcp", "websocket")
ALL = "vnc,spice,serial"

#: What each sample has after enabling every console: the video models, the number of
#: USB redirection channels, and the target type of the serial port the broker opens
#: (None: it opens a console that is no serial port).
EXPECTED: dict[str, tuple[list[str], int, str | None]] = {
    "x86_64-q35": (["virtio"], 2, None),  # virt-install's SPICE domain: all there already
    "aarch64-virt": (["virtio"], 2, None),  # no QXL on virt; qemu-xhci is there
    "aarch64-virt-vnc-no-usb": (["virtio"], 0, None),  # USB model='none': no redirection
    "s390x-ccw": (["virtio"], 0, None),  # no USB at all; the console is SCLP
    "s390x-ccw-vnc": (["virtio"], 0, None),
    "ppc64le-pseries": (["vga"], 2, None),  # virt-install's VGA is kept
    "ppc64le-pseries-headless": (["virtio"], 2, None),  # no QXL on pseries
}


def enable(cli: CliRunner, consoles: str, data: bytes, *args: str) -> Run:
    """``console-broker xml enable --consoles CONSOLES ARGS -`` on *data*."""
    return cli("xml", "enable", "--consoles", consoles, *args, "-", stdin=data)


def schema_ok(data: bytes) -> None:
    schema = domain_schema()
    if schema is None:
        if os.environ.get("CI"):
            pytest.fail("libvirt's domain schema is required when CI is set")
        return
    assert schema_errors(parse_document(data).tree, schema) == []


def devices(data: bytes) -> etree._Element:
    found = parse_document(data).root.find("devices")
    assert found is not None
    return found


def video_models(data: bytes) -> list[str]:
    return [str(v.find("model").get("type")) for v in devices(data).iterfind("video")]  # type: ignore[union-attr]


def test_the_samples_are_the_four_architectures() -> None:
    arches = {parse_document(p.read_bytes()).root.find("os/type").get("arch") for p in SAMPLES}  # type: ignore[union-attr]
    assert arches == {"x86_64", "aarch64", "s390x", "ppc64le"}
    assert {p.stem for p in SAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_filter_enables_every_console_validly(cli: CliRunner, sample: Path, mode: str) -> None:
    data = sample.read_bytes()
    done = enable(cli, ALL, data, "--mode", mode)
    assert done.status == 0, done.stderr
    out = done.stdout
    schema_ok(out)
    videos, usbredir, _ = EXPECTED[sample.stem]
    assert video_models(out) == videos
    assert len(devices(out).findall("redirdev")) == usbredir
    assert set(read_consoles(parse_document(out))) == {"vnc", "spice", "serial"}
    # a second run changes nothing, and disable gives back the input byte for byte
    again = enable(cli, ALL, out, "--mode", mode)
    assert again.stdout == out
    undone = cli("xml", "disable", "-", stdin=out)
    assert undone.status == 0, undone.stderr
    assert undone.stdout == data


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_no_qxl_where_the_machine_has_none(cli: CliRunner, sample: Path) -> None:
    plain = parse_document(sample.read_bytes()).root
    for video in plain.findall("devices/video"):  # drop the video: the edit must choose
        video.getparent().remove(video)  # type: ignore[union-attr]
    done = enable(cli, "spice", etree.tostring(plain))
    assert done.status == 0, done.stderr
    schema_ok(done.stdout)
    arch = plain.find("os/type").get("arch")  # type: ignore[union-attr]
    assert video_models(done.stdout) == (["qxl"] if arch == "x86_64" else ["virtio"])


def test_s390x_has_no_usb_redirection_and_says_so(cli: CliRunner) -> None:
    data = (ARCH / "s390x-ccw.xml").read_bytes()
    done = enable(cli, "spice", data)
    assert done.status == 0, done.stderr
    assert "s390x (s390-ccw-virtio) has no USB, so no USB redirection" in done.stderr
    assert devices(done.stdout).find("redirdev") is None
    # asked for explicitly, the note says so (a refusal would stop a hook policy's
    # migration of the domain); asking for none notes nothing
    asked = enable(cli, "spice", data, "--usbredir", "3")
    assert asked.status == 0, asked.stderr
    assert "no USB redirection (spice.usbredir=3 asked for)" in asked.stderr
    assert devices(asked.stdout).find("redirdev") is None
    none = enable(cli, "spice", data, "--usbredir", "0")
    assert none.status == 0 and "USB" not in none.stderr


def test_a_hook_policy_asking_for_usbredir_lets_s390x_through(
    cli: CliRunner, tmp_path: Path
) -> None:
    policy = tmp_path / "hook.toml"
    policy.write_text('consoles = ["vnc", "spice"]\nmode = "tcp"\nusbredir = 4\n')
    data = (ARCH / "s390x-ccw-vnc.xml").read_bytes()
    done = cli("libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-", stdin=data)
    assert done.status == 0, done.stderr
    graphics = devices(done.stdout).find("graphics")
    assert graphics is not None and graphics.get("listen") == "127.0.0.1"


def test_aarch64_virt_without_a_usb_controller_gets_no_redirection(cli: CliRunner) -> None:
    root = parse_document((ARCH / "aarch64-virt.xml").read_bytes()).root
    for controller in root.findall("devices/controller[@type='usb']"):
        controller.getparent().remove(controller)  # type: ignore[union-attr]
    done = enable(cli, "spice", etree.tostring(root))
    assert done.status == 0, done.stderr
    assert devices(done.stdout).find("redirdev") is None  # virt has no default USB
    # ppc64 pseries does have one by default: redirection goes on it
    root = parse_document((ARCH / "ppc64le-pseries.xml").read_bytes()).root
    for controller in root.findall("devices/controller[@type='usb']"):
        controller.getparent().remove(controller)  # type: ignore[union-attr]
    done = enable(cli, "spice", etree.tostring(root))
    assert len(devices(done.stdout).findall("redirdev")) == 2


def bare(arch: str, machine: str, extra: str = "") -> bytes:
    return (
        f"<domain type='qemu'><name>bare</name><memory>131072</memory>"
        f"<os><type arch='{arch}' machine='{machine}'>hvm</type></os>"
        f"<devices>{extra}</devices></domain>"
    ).encode()


@pytest.mark.parametrize(
    ("arch", "machine", "target"),
    [
        ("x86_64", "q35", None),  # x86 keeps the template: libvirt's default is isa-serial
        ("aarch64", "virt", "system-serial"),
        ("s390x", "s390-ccw-virtio", "sclp-serial"),
        ("ppc64le", "pseries", "spapr-vio-serial"),
    ],
)
def test_a_new_serial_port_names_the_machines_target_type(
    cli: CliRunner, arch: str, machine: str, target: str | None
) -> None:
    done = enable(cli, "serial", bare(arch, machine))
    assert done.status == 0, done.stderr
    schema_ok(done.stdout)
    serial = devices(done.stdout).find("serial")
    assert serial is not None and serial.get("type") == "pty"
    assert serial.find("target").get("type") == target  # type: ignore[union-attr]
    console = devices(done.stdout).find("console/target")
    assert console is not None and console.get("type") == "serial"  # the mirror of port 0


def test_s390x_port_1_is_the_line_mode_console(cli: CliRunner) -> None:
    taken = "<serial type='file'><source path='/var/log/x'/><target port='0'/></serial>"
    done = enable(cli, "serial", bare("s390x", "s390-ccw-virtio", taken))
    assert done.status == 0, done.stderr
    schema_ok(done.stdout)
    serial = devices(done.stdout).findall("serial")[1]
    assert serial.find("target").get("port") == "1"  # type: ignore[union-attr]
    assert serial.find("target/model").get("name") == "sclplmconsole"  # type: ignore[union-attr]


def test_aarch64_virt_with_its_one_uart_taken_gets_a_virtio_console(cli: CliRunner) -> None:
    taken = "<serial type='file'><source path='/var/log/x'/><target port='0'/></serial>"
    data = bare("aarch64", "virt", taken)
    done = enable(cli, "serial", data)
    assert done.status == 0, done.stderr
    schema_ok(done.stdout)
    assert len(devices(done.stdout).findall("serial")) == 1
    consoles = devices(done.stdout).findall("console")
    targets = [(c.get("type"), c.find("target").get("type")) for c in consoles]  # type: ignore[union-attr]
    assert targets == [("pty", "virtio")]
    record = read_consoles(parse_document(done.stdout))["serial"]
    assert (record.device and record.device.tag, record.index) == ("console", 0)
    assert cli("xml", "disable", "-", stdin=done.stdout).stdout == data


def caps(arch: str) -> DomainCapabilities:
    return DomainCapabilities.from_xml((DOMCAPS / f"{arch}.xml").read_bytes())


def test_domain_capabilities_are_read() -> None:
    aarch64 = caps("aarch64")
    assert (aarch64.arch, aarch64.machine) == ("aarch64", "virt-7.2")
    assert aarch64.emulator == "/usr/bin/qemu-system-aarch64"
    assert aarch64.video_models is not None and "qxl" not in aarch64.video_models
    assert "virtio" in aarch64.video_models
    assert aarch64.graphics_types is not None and {"vnc", "spice"} <= aarch64.graphics_types
    assert caps("s390x").redirdev_buses == frozenset()  # supported='no'
    assert caps("s390x").video_models == frozenset({"virtio", "none"})
    x86_64 = caps("x86_64").video_models
    assert x86_64 is not None and "qxl" in x86_64


def test_domain_capabilities_refuse_other_xml() -> None:
    from broker.xml import InputError

    with pytest.raises(InputError, match="expected <domainCapabilities>"):
        DomainCapabilities.from_xml(bare("x86_64", "q35"))
    with pytest.raises(InputError, match="not libvirt domain capabilities"):
        DomainCapabilities.from_xml(b"<domainCapabilities>")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64", "s390x", "ppc64le"])
def test_the_table_agrees_with_libvirts_capabilities(arch: str) -> None:
    """The offline table says what this libvirt and QEMU report for the machine."""
    reported = caps(arch)
    offline = Platform(arch=arch, machine=reported.machine)
    assert offline.known
    assert offline.video_models == reported.video_models
    assert offline.redirdev_buses == reported.redirdev_buses
    assert offline.graphics_types == reported.graphics_types


def test_an_unknown_platform_answers_nothing() -> None:
    unknown = (
        Platform(),
        Platform(arch="mips", machine="malta"),
        Platform(arch="aarch64", machine="raspi3b"),
    )
    for platform in unknown:
        assert not platform.known
        assert platform.video_models is None
        assert platform.supports_video("qxl") is None
        assert platform.usb_by_default is None
        assert platform.serial_target_type is None
    assert EditOptions().platform == Platform()


def test_platform_of_a_domain() -> None:
    root = parse_document((ARCH / "aarch64-virt.xml").read_bytes()).root
    platform = Platform.of_domain(root)
    assert (platform.arch, platform.machine, platform.virt_type, platform.emulator) == (
        "aarch64", "virt", "qemu", "/usr/bin/qemu-system-aarch64"
    )
    assert platform.family == "arm" and platform.describe() == "aarch64 (virt)"
    assert platform.default_video_model == "virtio"
    assert Platform(arch="x86_64", machine="pc-q35-7.2").usb_by_default is True
    assert Platform(arch="ppc64le", machine="pseries-7.2").usb_by_default is True
    assert Platform(arch="aarch64", machine="virt-7.2").usb_by_default is False
    assert Platform(arch="s390x", machine="s390-ccw-virtio").usb_by_default is False


def without_value(arch: str, device: str, value: str, tmp_path: Path, *more: str) -> Path:
    """The captured capabilities of *arch* with listed values taken out, as a QEMU
    built without them reports them (RHEL 9's QEMU has no SPICE, for one)."""
    tree = etree.parse(str(DOMCAPS / f"{arch}.xml"))
    for el in tree.getroot().findall(f"devices/{device}/enum/value"):
        if el.text in (value, *more):
            el.getparent().remove(el)  # type: ignore[union-attr]
    path = tmp_path / f"{arch}-no-{'-'.join((value, *more))}.xml"
    tree.write(str(path))
    return path


def test_domcaps_without_spice_refuse_spice_naming_the_architecture(
    cli: CliRunner, tmp_path: Path
) -> None:
    domcaps = without_value("aarch64", "graphics", "spice", tmp_path)
    data = (ARCH / "aarch64-virt.xml").read_bytes()
    done = enable(cli, "vnc,spice", data, "--domcaps", str(domcaps))
    assert done.status == 2
    assert done.stdout == b""
    assert "spice:" in done.stderr and "aarch64 (virt)" in done.stderr
    assert "no SPICE display" in done.stderr
    # VNC alone is fine there
    ok = enable(cli, "vnc", data, "--domcaps", str(domcaps))
    assert ok.status == 0, ok.stderr


def test_domcaps_without_any_video_refuse_a_display(cli: CliRunner, tmp_path: Path) -> None:
    domcaps = without_value("s390x", "video", "virtio", tmp_path)
    data = (ARCH / "s390x-ccw.xml").read_bytes()
    for console in ("vnc", "spice"):
        done = enable(cli, console, data, "--domcaps", str(domcaps))
        assert done.status == 2
        assert f"{console}: s390x (s390-ccw-virtio) has no video device" in done.stderr
    serial = enable(cli, "serial", data, "--domcaps", str(domcaps))
    assert serial.status == 0, serial.stderr


def test_domcaps_pick_the_video_model(cli: CliRunner, tmp_path: Path) -> None:
    """Where capabilities list no virtio-gpu, the machine's default model is chosen."""
    domcaps = without_value("ppc64le", "video", "virtio", tmp_path)
    data = (ARCH / "ppc64le-pseries-headless.xml").read_bytes()
    done = enable(cli, "spice", data, "--domcaps", str(domcaps))
    assert done.status == 0, done.stderr
    assert video_models(done.stdout) == ["vga"]
    # and else one the capabilities list
    domcaps = without_value("ppc64le", "video", "virtio", tmp_path, "vga", "cirrus", "vmvga")
    done = enable(cli, "spice", data, "--domcaps", str(domcaps))
    assert done.status == 0, done.stderr
    assert video_models(done.stdout) == ["bochs"]


def test_a_bad_domcaps_file_is_a_clear_error(cli: CliRunner, tmp_path: Path) -> None:
    data = (ARCH / "aarch64-virt.xml").read_bytes()
    missing = enable(cli, "vnc", data, "--domcaps", str(tmp_path / "none.xml"))
    assert missing.status == 2 and "--domcaps" in missing.stderr
    wrong = tmp_path / "wrong.xml"
    wrong.write_bytes(data)
    done = enable(cli, "vnc", data, "--domcaps", str(wrong))
    assert done.status == 2 and "not libvirt domain capabilities" in done.stderr


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_the_hook_switches_displays_and_adds_no_hardware(
    cli: CliRunner, sample: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "hook.toml"
    policy.write_text('consoles = ["vnc", "spice", "serial"]\nmode = "tcp"\n')
    data = sample.read_bytes()
    done = cli("libvirt-hook", "--policy", str(policy), "dom", "migrate", "begin", "-", stdin=data)
    assert done.status == 0, done.stderr
    out = done.stdout or data  # empty output: unchanged
    schema_ok(out)
    assert [el.tag for el in devices(out)] == [el.tag for el in devices(data)]
    for graphics in devices(out).iterfind("graphics"):
        assert graphics.get("listen") == "127.0.0.1"


def test_a_libvirt_without_domain_capabilities_gives_none_quietly(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """libvirt's test driver has no domain capabilities: the edit goes on with the table,
    and libvirt's error is not printed."""
    pytest.importorskip("libvirt")
    from broker.xml import connection_capabilities

    platform = Platform(arch="x86_64", machine="pc")
    assert connection_capabilities("test:///default")(platform) is None
    assert capfd.readouterr().err == ""
