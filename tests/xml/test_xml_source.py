"""Safe parsing and byte-preserving writing of domain XML."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lxml import etree
from xmlhelpers import SAMPLE, corpus_files, hostile_files

from broker.xml import MAX_BYTES, InputError, UnsafeXmlError, XmlError, parse_document


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_unchanged_documents_are_written_back_byte_for_byte(path: Path) -> None:
    data = path.read_bytes()
    doc = parse_document(data)
    assert doc.source_preserved
    assert doc.to_bytes() == data


@pytest.mark.parametrize("path", hostile_files(), ids=lambda p: p.name)
def test_hostile_corpus_inputs_are_refused_with_one_line(path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(InputError) as refused:
        parse_document(path.read_bytes())
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert message and "\n" not in message


def test_xxe_never_reads_the_local_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    data = (
        f"<!DOCTYPE domain [<!ENTITY xxe SYSTEM 'file://{secret}'>]>"
        "<domain type='qemu'><name>x</name><description>&xxe;</description></domain>"
    ).encode()
    with pytest.raises(UnsafeXmlError, match="DOCTYPE"):
        parse_document(data)


def test_billion_laughs_is_refused_quickly() -> None:
    entities = "".join(f"<!ENTITY l{n} '{('&l' + str(n - 1) + ';') * 10}'>" for n in range(1, 10))
    data = (
        f"<!DOCTYPE domain [<!ENTITY l0 'lol'>{entities}]>"
        "<domain type='qemu'><name>x</name><description>&l9;</description></domain>"
    ).encode()
    started = time.monotonic()
    with pytest.raises(UnsafeXmlError, match="DOCTYPE"):
        parse_document(data)
    assert time.monotonic() - started < 1


def test_a_doctype_after_the_declaration_and_comments_is_refused() -> None:
    data = b"<?xml version='1.0'?>\n<!-- hi -->\n<!DOCTYPE domain>\n<domain type='qemu'/>"
    with pytest.raises(UnsafeXmlError, match="DOCTYPE"):
        parse_document(data)


def test_not_a_domain_is_refused() -> None:
    with pytest.raises(InputError, match=r"root element is <network>"):
        parse_document(b"<network><name>default</name></network>")


def test_truncated_xml_is_refused() -> None:
    with pytest.raises(InputError, match="not well-formed"):
        parse_document(SAMPLE[: len(SAMPLE) // 2])


def test_too_large_input_is_refused_before_parsing() -> None:
    data = SAMPLE.replace(b"<name>", b"<name>" + b"x" * MAX_BYTES)
    with pytest.raises(InputError, match="limit"):
        parse_document(data)


def test_too_deep_input_is_refused() -> None:
    nested = "<a:n xmlns:a='https://example.org/a'>" * 80 + "</a:n>" * 80
    data = SAMPLE.replace(b"<devices>", f"<metadata>{nested}</metadata><devices>".encode())
    with pytest.raises(InputError, match="deeper than"):
        parse_document(data)


def test_xinclude_is_refused() -> None:
    data = SAMPLE.replace(
        b"<name>sample</name>",
        b"<name>sample</name><description><xi:include "
        b"xmlns:xi='http://www.w3.org/2001/XInclude' href='/etc/passwd' parse='text'/>"
        b"</description>",
    )
    with pytest.raises(UnsafeXmlError, match="XInclude"):
        parse_document(data)


def test_empty_and_undecodable_inputs_are_refused() -> None:
    with pytest.raises(InputError, match="empty"):
        parse_document(b"  \n")
    with pytest.raises(InputError, match="not valid UTF-8"):
        parse_document(b"<domain type='qemu'><name>\xff\xfe</name></domain>")
    with pytest.raises(InputError, match="unknown encoding"):
        parse_document(b"<?xml version='1.0' encoding='x-no-such'?><domain/>")


def test_all_errors_are_xml_errors() -> None:
    assert issubclass(InputError, XmlError)
    assert issubclass(UnsafeXmlError, InputError)


def test_changed_nodes_follow_the_documents_style() -> None:
    data = b'<domain type="qemu">\r\n  <name>n</name>\r\n  <devices/>\r\n</domain>\r\n'
    doc = parse_document(data)
    devices = doc.root.find("devices")
    assert devices is not None
    devices.text = "\n    "
    child = etree.SubElement(devices, "graphics", type="vnc")
    child.tail = "\n  "
    assert doc.to_bytes() == (
        b'<domain type="qemu">\r\n  <name>n</name>\r\n  <devices>\r\n'
        b'    <graphics type="vnc"/>\r\n  </devices>\r\n</domain>\r\n'
    )


def test_a_changed_attribute_value_is_patched_into_the_original_tag() -> None:
    data = b"<domain type='qemu'>\n  <graphics\ttype='vnc'  passwd=\"a\" keymap='de'/>\n</domain>"
    doc = parse_document(data)
    graphics = doc.root.find("graphics")
    assert graphics is not None
    graphics.set("passwd", "x'y")
    assert doc.to_bytes() == data.replace(b'"a"', b'"x&apos;y"')
    graphics.set("passwd", "a")
    assert doc.to_bytes() == data


def test_the_encoding_and_declaration_are_kept() -> None:
    data = (
        "<?xml version='1.0' encoding='ISO-8859-1' standalone='yes'?>\n"
        "<domain type='qemu'><name>caf\xe9</name><devices/></domain>\n"
    ).encode("latin-1")
    doc = parse_document(data)
    assert doc.encoding == "ISO-8859-1"
    name = doc.root.find("name")
    assert name is not None
    name.text = "d\xe9j\xe0 \u20ac"  # the euro sign is not Latin-1: written as a reference
    assert doc.to_bytes() == data.replace(b"caf\xe9", b"d\xe9j\xe0 &#8364;")
