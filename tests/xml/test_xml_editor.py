"""The editor with the built-in plugins: modes, passwords, metadata, undo."""

from __future__ import annotations

import pytest
from lxml import etree
from xmlhelpers import SAMPLE

from broker.plugins import PluginManager
from broker.xml import (
    NAMESPACE,
    DeviceRef,
    EditError,
    EditOptions,
    disable_xml,
    domain_schema,
    enable_xml,
    parse_document,
    plugin_edits,
    read_consoles,
    schema_errors,
)

ALL = ["vnc", "spice", "serial"]
NO_CONSOLES = b"""<domain type='qemu'>
  <name>bare</name>
  <memory unit='KiB'>131072</memory>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='piix3-uhci'/>
  </devices>
</domain>
"""


def enable(data: bytes, consoles: list[str], manager: PluginManager, **options: object) -> bytes:
    return enable_xml(data, consoles, EditOptions(**options), edits=plugin_edits(manager)).after  # type: ignore[arg-type]


def devices(data: bytes) -> etree._Element:
    found = parse_document(data).root.find("devices")
    assert found is not None
    return found


def graphics(data: bytes, kind: str) -> etree._Element:
    found = [g for g in devices(data).iterfind("graphics") if g.get("type") == kind]
    assert len(found) == 1
    return found[0]


def listens(el: etree._Element) -> list[dict[str, str]]:
    return [{str(k): str(v) for k, v in listen.attrib.items()} for listen in el.iterfind("listen")]


def valid(data: bytes) -> bool:
    schema = domain_schema()
    return schema is None or not schema_errors(parse_document(data).tree, schema)


# -- modes -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vnc", "spice"])
def test_fd_mode_listens_nowhere(manager: PluginManager, kind: str) -> None:
    out = enable(NO_CONSOLES, [kind], manager, mode="fd")
    el = graphics(out, kind)
    assert {str(k): str(v) for k, v in el.attrib.items()} == {"type": kind}
    assert listens(el) == [{"type": "none"}]
    assert valid(out)


@pytest.mark.parametrize("kind", ["vnc", "spice"])
def test_tcp_mode_uses_an_automatic_port_on_loopback(manager: PluginManager, kind: str) -> None:
    out = enable(NO_CONSOLES, [kind], manager, mode="tcp")
    el = graphics(out, kind)
    assert el.get("autoport") == "yes"
    assert el.get("listen") == "127.0.0.1"
    assert el.get("websocket") is None
    assert listens(el) == [{"type": "address", "address": "127.0.0.1"}]
    assert valid(out)


def test_websocket_mode_gives_vnc_a_websocket_port(manager: PluginManager) -> None:
    out = enable(NO_CONSOLES, ["vnc"], manager, mode="websocket")
    el = graphics(out, "vnc")
    assert (el.get("port"), el.get("autoport"), el.get("websocket")) == ("-1", "yes", "-1")
    assert read_consoles(parse_document(out))["vnc"].mode == "websocket"


def test_websocket_mode_provisions_and_records_spice_as_tcp(manager: PluginManager) -> None:
    outcome = enable_xml(
        NO_CONSOLES, ["spice"], EditOptions(mode="websocket"), edits=plugin_edits(manager)
    )
    el = graphics(outcome.after, "spice")
    assert el.get("websocket") is None and el.get("autoport") == "yes"
    assert read_consoles(parse_document(outcome.after))["spice"].mode == "tcp"
    assert any("tcp" in note for note in outcome.notes)


def test_a_listen_address_is_set_where_asked(manager: PluginManager) -> None:
    out = enable(NO_CONSOLES, ["vnc", "spice"], manager, mode="tcp", listen="::1")
    for kind in ("vnc", "spice"):
        el = graphics(out, kind)
        assert el.get("listen") == "::1"
        assert listens(el) == [{"type": "address", "address": "::1"}]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="tcp and websocket"):
        EditOptions(mode="fd", listen="127.0.0.1")
    with pytest.raises(ValueError, match="not an IPv4 or IPv6"):
        EditOptions(mode="tcp", listen="example.org")
    with pytest.raises(ValueError, match="unknown mode"):
        EditOptions(mode="vnc")


def test_the_spice_edits_own_options_are_checked(manager: PluginManager) -> None:
    """spice.tls and spice.usbredir are the SPICE plugin's (XMLOption), not the core's."""
    with pytest.raises(EditError, match=r"spice\.tls: TLS needs a listening port"):
        enable(NO_CONSOLES, ["spice"], manager, mode="fd", params={"spice.tls": "yes"})
    with pytest.raises(EditError, match=r"spice\.usbredir: must be between 0 and 16"):
        enable(NO_CONSOLES, ["spice"], manager, params={"spice.usbredir": "17"})
    with pytest.raises(EditError, match=r"spice\.tls: expected yes or no"):
        enable(NO_CONSOLES, ["spice"], manager, mode="tcp", params={"spice.tls": "maybe"})
    assert {o.name for o in manager.xml_options()} == {"spice.tls", "spice.usbredir"}


# -- what is kept ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fd", "tcp", "websocket"])
def test_a_vnc_password_and_other_settings_survive(manager: PluginManager, mode: str) -> None:
    out = enable(SAMPLE, ["vnc"], manager, mode=mode)
    el = graphics(out, "vnc")
    assert el.get("passwd") == "s3cret"
    assert el.get("keymap") == "de"
    assert el.get("autoport") != "no" and el.get("port") != "5905"
    assert {"type": "address", "address": "0.0.0.0"} not in listens(el)


def test_the_password_is_blanked_in_the_metadata_and_restored(manager: PluginManager) -> None:
    out = enable(SAMPLE, ["vnc"], manager)
    metadata = parse_document(out).root.find("metadata")
    assert metadata is not None
    assert b"s3cret" not in etree.tostring(metadata)
    placed = metadata.find(f".//{{{NAMESPACE}}}placed")
    assert placed is not None and placed.get("secrets") == "passwd"
    assert disable_xml(out, edits=plugin_edits(manager)).after == SAMPLE


def test_a_password_changed_after_enable_is_kept_by_disable(manager: PluginManager) -> None:
    out = enable(SAMPLE, ["vnc"], manager).replace(b"passwd='s3cret'", b"passwd='n3w'")
    assert disable_xml(out, edits=plugin_edits(manager)).after == SAMPLE.replace(b"s3cret", b"n3w")


def test_spice_settings_are_kept_and_tls_toggles_default_mode(manager: PluginManager) -> None:
    data = SAMPLE.replace(
        b"</graphics>",
        b"</graphics>\n    <graphics type='spice' port='5930' tlsPort='5931' autoport='no'"
        b" passwd='sp' defaultMode='secure'>\n      <image compression='off'/>\n"
        b"      <clipboard copypaste='no'/>\n    </graphics>",
    )
    with_tls = enable(data, ["spice"], manager, mode="tcp", params={"spice.tls": "yes"})
    el = graphics(with_tls, "spice")
    assert el.get("defaultMode") == "secure" and el.get("passwd") == "sp"
    assert el.get("tlsPort") is None and el.get("port") is None and el.get("autoport") == "yes"
    assert [child.tag for child in el] == ["listen", "image", "clipboard"]
    without = enable(data, ["spice"], manager, mode="tcp")
    assert graphics(without, "spice").get("defaultMode") is None
    assert read_consoles(parse_document(with_tls))["spice"].settings == {"tls": "yes"}


def test_spice_adds_agent_usbredir_and_video_only_where_missing(manager: PluginManager) -> None:
    out = enable(NO_CONSOLES, ["spice"], manager, params={"spice.usbredir": "3"})
    found = devices(out)
    assert [c.get("name") for c in found.iterfind("channel/target")] == ["com.redhat.spice.0"]
    assert len(found.findall("redirdev")) == 3
    assert [m.get("type") for m in found.iterfind("video/model")] == ["qxl"]
    again = enable(SAMPLE, ["spice"], manager, params={"spice.usbredir": "0"})
    assert [m.get("type") for m in devices(again).iterfind("video/model")] == ["vga"]
    assert devices(again).find("redirdev") is None


def test_usbredir_is_skipped_when_usb_is_disabled(manager: PluginManager) -> None:
    data = NO_CONSOLES.replace(b"model='piix3-uhci'", b"model='none'")
    assert devices(enable(data, ["spice"], manager)).find("redirdev") is None


# -- serial ----------------------------------------------------------------------


def test_serial_adds_a_pty_port_and_its_console(manager: PluginManager) -> None:
    out = enable(NO_CONSOLES, ["serial"], manager)
    found = devices(out)
    assert [(s.get("type"), s.find("target").get("port")) for s in found.iterfind("serial")] == [  # type: ignore[union-attr]
        ("pty", "0")
    ]
    console = found.find("console")
    assert console is not None and console.get("type") == "pty"
    record = read_consoles(parse_document(out))["serial"]
    assert (record.mode, record.device, record.index) == ("stream", DeviceRef("serial", "pty"), 0)


def test_an_existing_pty_serial_is_used_as_it_is(manager: PluginManager) -> None:
    data = NO_CONSOLES.replace(
        b"  </devices>",
        b"  <serial type='pty'><target port='0'/></serial>\n"
        b"    <console type='pty'><target type='serial' port='0'/></console>\n  </devices>",
    )
    out = enable(data, ["serial"], manager)
    assert (
        devices(out).findall("serial") == devices(data).findall("serial")
        or len(devices(out).findall("serial")) == 1
    )
    assert read_consoles(parse_document(out))["serial"].slots == ()
    assert disable_xml(out, edits=plugin_edits(manager)).after == data


def test_non_pty_serial_ports_are_kept_and_a_pty_one_is_added(manager: PluginManager) -> None:
    data = NO_CONSOLES.replace(
        b"  </devices>",
        b"  <serial type='file'>\n      <source path='/var/log/s.log'/>\n"
        b"      <target port='0'/>\n    </serial>\n  </devices>",
    )
    out = enable(data, ["serial"], manager)
    ports = [(s.get("type"), s.find("target").get("port")) for s in devices(out).iterfind("serial")]  # type: ignore[union-attr]
    assert ports == [("file", "0"), ("pty", "1")]
    assert read_consoles(parse_document(out))["serial"].index == 1
    assert disable_xml(out, edits=plugin_edits(manager)).after == data


def test_a_virtio_pty_console_is_enough(manager: PluginManager) -> None:
    data = NO_CONSOLES.replace(
        b"  </devices>", b"  <console type='pty'><target type='virtio'/></console>\n  </devices>"
    )
    out = enable(data, ["serial"], manager)
    assert devices(out).find("serial") is None
    record = read_consoles(parse_document(out))["serial"]
    assert (record.device, record.index) == (DeviceRef("console", "pty"), 0)


# -- idempotence and undo -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["fd", "tcp", "websocket"])
def test_a_second_run_changes_nothing(manager: PluginManager, mode: str) -> None:
    once = enable(SAMPLE, ALL, manager, mode=mode)
    assert once != SAMPLE
    assert enable(once, ALL, manager, mode=mode) == once
    assert valid(once)


@pytest.mark.parametrize("mode", ["fd", "tcp", "websocket"])
def test_disable_restores_the_input_byte_for_byte(manager: PluginManager, mode: str) -> None:
    for data in (SAMPLE, NO_CONSOLES):
        out = enable(data, ALL, manager, mode=mode)
        assert disable_xml(out, edits=plugin_edits(manager)).after == data


def test_reenabling_in_another_mode_keeps_the_first_originals(manager: PluginManager) -> None:
    fd = enable(SAMPLE, ALL, manager, mode="fd")
    tcp = enable(fd, ALL, manager, mode="tcp", listen="192.0.2.1")
    assert graphics(tcp, "vnc").get("listen") == "192.0.2.1"
    assert read_consoles(parse_document(tcp))["vnc"].mode == "tcp"
    assert disable_xml(tcp, edits=plugin_edits(manager)).after == SAMPLE
    back = enable(tcp, ALL, manager, mode="fd")
    assert back == fd


def test_enabling_protocols_one_by_one_then_disabling_in_any_order(
    manager: PluginManager,
) -> None:
    step = SAMPLE
    for protocol in ("serial", "vnc", "spice"):
        step = enable(step, [protocol], manager, mode="tcp")
    assert set(read_consoles(parse_document(step))) == {"serial", "vnc", "spice"}
    for protocol in ("vnc", "serial"):
        step = disable_xml(step, [protocol], edits=plugin_edits(manager)).after
        assert protocol not in read_consoles(parse_document(step))
        assert valid(step)
    assert disable_xml(step, ["spice"], edits=plugin_edits(manager)).after == SAMPLE


def test_disable_of_what_is_not_enabled_is_a_no_op_with_a_note(manager: PluginManager) -> None:
    outcome = disable_xml(SAMPLE, ["vnc"], edits=plugin_edits(manager))
    assert outcome.after == SAMPLE
    assert outcome.notes == ("vnc: not enabled in this domain",)


def test_an_unknown_protocol_lists_the_known_ones(manager: PluginManager) -> None:
    with pytest.raises(
        EditError, match=r"unknown console protocol 'rdp' \(known: (.*, )?serial, spice, vnc\)"
    ):
        enable(SAMPLE, ["rdp"], manager)


def test_disable_refuses_when_the_devices_changed_underneath(manager: PluginManager) -> None:
    out = enable(NO_CONSOLES, ["spice"], manager)
    tampered = out.replace(b"<redirdev bus='usb' type='spicevmc'/>", b"", 1)
    with pytest.raises(EditError, match="changed since console-broker edited it"):
        disable_xml(tampered, edits=plugin_edits(manager))


# -- the metadata ---------------------------------------------------------------------


def test_the_metadata_records_protocol_mode_and_device(manager: PluginManager) -> None:
    out = enable(SAMPLE, ALL, manager, mode="tcp")
    records = read_consoles(parse_document(out))
    assert list(records) == ALL
    assert records["vnc"].mode == "tcp"
    assert (records["vnc"].device, records["vnc"].index) == (DeviceRef("graphics", "vnc"), 0)
    assert (records["spice"].device, records["spice"].index) == (DeviceRef("graphics", "spice"), 1)
    assert records["vnc"].slots == ("graphics",)
    assert records["spice"].to_json()["device"] == {"tag": "graphics", "type": "spice", "index": 1}


def test_libvirt_keeps_one_metadata_element_per_namespace(manager: PluginManager) -> None:
    out = enable(SAMPLE, ALL, manager)
    metadata = parse_document(out).root.find("metadata")
    assert metadata is not None
    namespaces = [etree.QName(child).namespace for child in metadata if isinstance(child.tag, str)]
    assert namespaces == [NAMESPACE]


def test_read_consoles_accepts_an_lxml_tree_of_live_xml(manager: PluginManager) -> None:
    out = enable(SAMPLE, ["vnc"], manager)
    live = etree.fromstring(out).getroottree()
    assert read_consoles(live)["vnc"].index == 0
    assert read_consoles(live.getroot())["vnc"].mode == "fd"
    assert read_consoles(parse_document(SAMPLE)) == {}
