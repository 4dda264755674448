"""Reading domain XML safely, and writing it back byte for byte where nothing changed.

Theory of operation. lxml parses the input with every dangerous feature off
(no DTD, no entities, no network, no huge trees) after a size check and a
DOCTYPE refusal. lxml cannot write a tree back the way it was written (it
re-quotes attributes, drops whitespace outside the root, normalises empty
elements), so the input text is also cut into tokens (tags, text, comments,
processing instructions) and each token is tied to the lxml node it produced.
When the document is written, every node whose content is still what was
parsed is written from its original text; only changed or new nodes are
serialised, in the document's own quoting and line-ending style. The XML
declaration, the encoding and everything outside the root element are kept
verbatim. If the tokens ever fail to line up with the tree (they should not),
the document falls back to lxml's own serialisation: correct, not byte-exact.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator

import attrs
from lxml import etree

from broker.xml._errors import InputError, UnsafeXmlError

#: Inputs larger than this are refused before parsing (libvirt's own limit on
#: a domain definition is 10 MiB; real ones are a few KiB).
MAX_BYTES = 4 * 1024 * 1024
#: Deeper element nesting is refused (libvirt's deepest paths are ~8 levels).
MAX_DEPTH = 64
#: More nodes than this are refused.
MAX_NODES = 200_000

_XINCLUDE = frozenset({"http://www.w3.org/2001/XInclude", "http://www.w3.org/2003/XInclude"})
_XML_NS = "http://www.w3.org/XML/1998/namespace"

_DECLARED_ENCODING = re.compile(
    rb"<\?xml\s[^>]*?encoding\s*=\s*(?:\"([A-Za-z][A-Za-z0-9._-]*)\"|'([A-Za-z][A-Za-z0-9._-]*)')"
)
_TOKEN = re.compile(
    r"""
      (?P<comment><!--.*?-->)
    | (?P<cdata><!\[CDATA\[.*?\]\]>)
    | (?P<pi><\?.*?\?>)
    | (?P<doctype><!DOCTYPE)
    | (?P<end></[^>]*>)
    | (?P<start><[^!?/](?:[^>"']|"[^"]*"|'[^']*')*>)
    | (?P<text>[^<]+)
    """,
    re.S | re.X,
)
_TAG_NAME = re.compile(r"<([^\s/>]+)")
_ATTRIBUTE = re.compile(r"""(\s+)([^\s=/>]+)(\s*=\s*)(?:"([^"]*)"|'([^']*)')""")
_FIRST_QUOTE = re.compile(r"""=\s*(['"])""")


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        attribute_defaults=False,
        huge_tree=False,
        remove_blank_text=False,
        remove_comments=False,
        remove_pis=False,
        strip_cdata=False,
        collect_ids=False,
    )


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _detect_encoding(data: bytes) -> tuple[str, str, bytes]:
    """(declared or detected name, Python codec, byte-order mark) of *data*."""
    for bom, codec, name in (
        (codecs.BOM_UTF8, "utf-8", "UTF-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
        (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
    ):
        if data.startswith(bom):
            return name, codec, bom
    match = _DECLARED_ENCODING.match(data, 0, 300) if data.startswith(b"<?xml") else None
    if match is None:
        return "UTF-8", "utf-8", b""
    name = (match.group(1) or match.group(2)).decode("ascii")
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise InputError(f"the XML declaration names an unknown encoding {name!r}") from None
    if codec.startswith("utf-16") or codec.startswith("utf-32"):
        raise InputError(f"encoding {name!r} without a byte-order mark is not supported")
    return name, codec, b""


def _tokens(text: str, start: int = 0) -> Iterator[tuple[str, int, int]]:
    """(kind, start, end) of each markup token of *text*, from *start*."""
    pos = start
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.lastgroup is None:
            raise _Misaligned(f"no token at offset {pos}")
        yield match.lastgroup, pos, match.end()
        pos = match.end()


def _refuse_doctype(text: str) -> None:
    """Refuse a DOCTYPE before lxml sees it (libvirt XML never has one)."""
    try:
        for kind, start, end in _tokens(text):
            if kind == "doctype":
                raise UnsafeXmlError(
                    "refusing a document with a DOCTYPE: libvirt domain XML has none, and DTDs "
                    "can declare entities (XXE, entity expansion)"
                )
            if kind == "start" or (kind == "text" and text[start:end].strip()):
                return
    except _Misaligned:
        return  # lxml reports the syntax error


class _Misaligned(Exception):
    """The tokens do not line up with the parsed tree."""


@attrs.define
class _Raw:
    """The original text of one element, and what lxml parsed from it."""

    start: str
    empty: bool
    end: str | None
    tag: str
    attrib: tuple[tuple[str, str], ...]
    nsdecl: tuple[tuple[str | None, str], ...]
    text: tuple[str, str | None] | None


def _local_namespaces(el: etree._Element) -> tuple[tuple[str | None, str], ...]:
    parent = el.getparent()
    inherited = parent.nsmap if parent is not None else {}
    return tuple(
        sorted(
            ((p, u) for p, u in el.nsmap.items() if inherited.get(p) != u),
            key=lambda item: item[0] or "",
        )
    )


def _attributes(el: etree._Element) -> tuple[tuple[str, str], ...]:
    """The attributes of *el* in document order (lxml gives str for parsed text)."""
    return tuple((str(k), str(v)) for k, v in el.attrib.items())


def _qname(el: etree._Element) -> str:
    local = etree.QName(el).localname
    return f"{el.prefix}:{local}" if el.prefix else local


def _escape_text(value: str) -> str:
    return (
        value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    )


def _escape_attribute(value: str) -> str:
    return (
        _escape_text(value)
        .replace('"', "&quot;")
        .replace("'", "&apos;")
        .replace("\n", "&#10;")
        .replace("\t", "&#9;")
    )


class Document:
    """A parsed domain XML that remembers how it was written.

    ``tree``/``root`` are ordinary lxml objects to edit. :meth:`to_bytes`
    writes the document back; unchanged nodes come out exactly as they came in.
    """

    def __init__(self, tree: etree._ElementTree, text: str, encoding: tuple[str, str, bytes]):
        self.tree = tree
        self.root: etree._Element = tree.getroot()
        self.encoding, self._codec, self._bom = encoding
        self._elements: dict[etree._Element, _Raw] = {}
        self._nodes: dict[etree._Element, tuple[str, object]] = {}
        self._tails: dict[etree._Element, tuple[str, str | None]] = {}
        self._self_closing: set[etree._Element] = set()
        self._prolog = ""
        self._epilog = ""
        self.newline = "\r\n" if "\r\n" in text else "\n"
        self.quote = "'"
        try:
            self._map(text)
            self.source_preserved = True
        except _Misaligned:
            self._elements.clear()
            self._nodes.clear()
            self._tails.clear()
            self.source_preserved = False

    # -- reading -----------------------------------------------------------

    def _map(self, text: str) -> None:
        tokens = list(_tokens(text))
        quotes = [
            m.group(1)
            for k, s, e in tokens
            if k == "start" and (m := _FIRST_QUOTE.search(text, s, e))
        ]
        if quotes.count('"') > quotes.count("'"):
            self.quote = '"'
        first = next((n for n, tok in enumerate(tokens) if tok[0] == "start"), None)
        if first is None:
            raise _Misaligned("no root element")
        self._prolog = text[: tokens[first][1]]
        after = self._map_element(self.root, tokens, first, text)
        self._epilog = text[tokens[after - 1][2] :]

    def _take_text(self, tokens: list[tuple[str, int, int]], i: int, text: str) -> tuple[str, int]:
        start = tokens[i][1] if i < len(tokens) else len(text)
        while i < len(tokens) and tokens[i][0] in ("text", "cdata"):
            i += 1
        end = tokens[i][1] if i < len(tokens) else len(text)
        return text[start:end], i

    def _map_element(
        self, el: etree._Element, tokens: list[tuple[str, int, int]], i: int, text: str
    ) -> int:
        kind, start, end = tokens[i]
        raw = text[start:end]
        name = _TAG_NAME.match(raw)
        if kind != "start" or name is None or name.group(1) != _qname(el):
            raise _Misaligned(f"expected <{_qname(el)}> at offset {start}")
        info = _Raw(
            start=raw,
            empty=raw.endswith("/>"),
            end=None,
            tag=el.tag,
            attrib=_attributes(el),
            nsdecl=_local_namespaces(el),
            text=None,
        )
        i += 1
        if not info.empty:
            raw_text, i = self._take_text(tokens, i, text)
            info.text = (raw_text, el.text)
            for child in el:
                i = self._map_node(child, tokens, i, text)
                raw_tail, i = self._take_text(tokens, i, text)
                self._tails[child] = (raw_tail, child.tail)
            if i >= len(tokens) or tokens[i][0] != "end":
                raise _Misaligned(f"expected </{_qname(el)}>")
            info.end = text[tokens[i][1] : tokens[i][2]]
            i += 1
        self._elements[el] = info
        return i

    def _map_node(
        self, node: etree._Element, tokens: list[tuple[str, int, int]], i: int, text: str
    ) -> int:
        if isinstance(node, etree._Comment):
            kind, start, end = tokens[i]
            if kind != "comment":
                raise _Misaligned(f"expected a comment at offset {start}")
            self._nodes[node] = (text[start:end], node.text)
            return i + 1
        if isinstance(node, etree._ProcessingInstruction):
            kind, start, end = tokens[i]
            if kind != "pi":
                raise _Misaligned(f"expected a processing instruction at offset {start}")
            self._nodes[node] = (text[start:end], (node.target, node.text))
            return i + 1
        if isinstance(node, etree._Entity):
            raise _Misaligned("entity reference")
        return self._map_element(node, tokens, i, text)

    # -- writing -----------------------------------------------------------

    def written_self_closing(self, el: etree._Element) -> bool:
        """Whether *el* was written ``<x/>`` in the input (False for ``<x></x>``)."""
        raw = self._elements.get(el)
        return raw is None or raw.empty

    def write_self_closing(self, el: etree._Element) -> None:
        """Write *el* as ``<x/>`` whenever it has no content."""
        self._self_closing.add(el)

    def to_text(self) -> str:
        """The document as text (decoded), see :meth:`to_bytes`."""
        if not self.source_preserved:
            return etree.tostring(self.tree, encoding="unicode")
        out: list[str] = [self._prolog]
        self._write_element(self.root, out)
        out.append(self._epilog)
        return "".join(out)

    def to_bytes(self) -> bytes:
        """The document in its original encoding (and byte-order mark, if any)."""
        if not self.source_preserved:
            declared = self.tree.docinfo.xml_version is not None and bool(
                self.tree.docinfo.encoding
            )
            written = etree.tostring(self.tree, encoding=self.encoding, xml_declaration=declared)
            assert isinstance(written, bytes)
            return self._bom + written
        return self._bom + self.to_text().encode(self._codec, errors="xmlcharrefreplace")

    def _text(self, value: str | None, raw: tuple[str, object] | None) -> str:
        if raw is not None and raw[1] == value:
            return raw[0]
        if not value:
            return ""
        escaped = _escape_text(value)
        return escaped.replace("\n", self.newline) if self.newline != "\n" else escaped

    def _write_node(self, node: etree._Element, out: list[str]) -> None:
        raw = self._nodes.get(node)
        if isinstance(node, etree._Comment):
            out.append(raw[0] if raw and raw[1] == node.text else f"<!--{node.text or ''}-->")
        elif isinstance(node, etree._ProcessingInstruction):
            same = raw is not None and raw[1] == (node.target, node.text)
            body = f" {node.text}" if node.text else ""
            out.append(raw[0] if raw and same else f"<?{node.target!s}{body}?>")
        elif isinstance(node, etree._Entity):
            out.append(f"&{node.name};")
        else:
            self._write_element(node, out)

    def _write_element(self, el: etree._Element, out: list[str]) -> None:
        raw = self._elements.get(el)
        children = list(el)
        has_content = bool(children) or bool(el.text)
        start = self._start_tag(el, raw)
        if start is None:
            start = self._new_start_tag(el, raw)
            if not has_content:
                out.append(start + "/>")
                return
            out.append(start + ">")
        elif raw is not None and raw.empty:
            if not has_content:
                out.append(start)
                return
            out.append(start[:-2].rstrip() + ">")
        elif not has_content and el in self._self_closing:
            out.append(start[:-1].rstrip() + "/>")
            return
        else:
            out.append(start)
        out.append(self._text(el.text, raw.text if raw else None))
        for child in children:
            self._write_node(child, out)
            out.append(self._text(child.tail, self._tails.get(child)))
        if raw is not None and raw.end is not None and raw.tag == el.tag:
            out.append(raw.end)
        else:
            out.append(f"</{_qname(el)}>")

    def _start_tag(self, el: etree._Element, raw: _Raw | None) -> str | None:
        """The original start tag, with changed attribute values patched in; None if
        the tag, the attribute names or the namespace declarations changed."""
        if raw is None or raw.tag != el.tag or raw.nsdecl != _local_namespaces(el):
            return None
        items = _attributes(el)
        if items == raw.attrib:
            return raw.start
        if [k for k, _ in items] != [k for k, _ in raw.attrib]:
            return None
        pieces: list[str] = []
        pos = 0
        index = 0
        name_end = _TAG_NAME.match(raw.start)
        assert name_end is not None
        for match in _ATTRIBUTE.finditer(raw.start, name_end.end()):
            if match.group(2).startswith("xmlns"):
                continue
            value = items[index][1]
            if value != raw.attrib[index][1]:
                quote = '"' if match.group(4) is not None else "'"
                value_start = match.start(4) if quote == '"' else match.start(5)
                value_end = match.end(4) if quote == '"' else match.end(5)
                pieces.append(raw.start[pos:value_start])
                pieces.append(_escape_attribute(value))
                pos = value_end
            index += 1
        if index != len(items):
            return None
        pieces.append(raw.start[pos:])
        return "".join(pieces)

    def _new_start_tag(self, el: etree._Element, raw: _Raw | None) -> str:
        """A start tag without its closing ``>`` or ``/>``."""
        quote = self.quote
        if raw is not None:
            found = _FIRST_QUOTE.search(raw.start)
            if found is not None:
                quote = found.group(1)
        parts = [f"<{_qname(el)}"]
        for prefix, uri in _local_namespaces(el):
            name = f"xmlns:{prefix}" if prefix else "xmlns"
            parts.append(f" {name}={quote}{_escape_attribute(uri)}{quote}")
        prefixes = {uri: prefix for prefix, uri in el.nsmap.items() if prefix}
        for key, value in _attributes(el):
            qname = etree.QName(key)
            if not qname.namespace:
                name = qname.localname
            elif qname.namespace == _XML_NS:
                name = f"xml:{qname.localname}"
            else:
                name = f"{prefixes[qname.namespace]}:{qname.localname}"
            parts.append(f" {name}={quote}{_escape_attribute(value)}{quote}")
        return "".join(parts)


def _check_tree(root: etree._Element) -> None:
    count = 0
    stack: list[tuple[etree._Element, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise InputError(f"refusing a document with more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise InputError(f"refusing a document nested deeper than {MAX_DEPTH} elements")
        if isinstance(node.tag, str) and etree.QName(node).namespace in _XINCLUDE:
            raise UnsafeXmlError("refusing XInclude elements: domain XML never includes files")
        stack.extend((child, depth + 1) for child in node)


def _decode(data: bytes, max_bytes: int) -> tuple[str, tuple[str, str, bytes]]:
    if len(data) > max_bytes:
        raise InputError(f"refusing {len(data)} bytes of input: the limit is {max_bytes}")
    if not data.strip():
        raise InputError("the input is empty")
    encoding = _detect_encoding(data)
    try:
        text = data[len(encoding[2]) :].decode(encoding[1])
    except UnicodeDecodeError as exc:
        raise InputError(
            f"the input is not valid {encoding[0]}: {exc.reason} at byte {exc.start}"
        ) from None
    return text, encoding


def _parse(data: bytes) -> etree._ElementTree:
    try:
        root = etree.fromstring(data, _safe_parser())
    except etree.XMLSyntaxError as exc:
        reason = _one_line(getattr(exc, "msg", None) or exc)
        raise InputError(f"the input is not well-formed XML: {reason}") from None
    tree = root.getroottree()
    if getattr(tree.docinfo, "doctype", "") or tree.docinfo.internalDTD is not None:
        raise UnsafeXmlError("refusing a document with a DOCTYPE")
    return tree


def parse_document(data: bytes, *, max_bytes: int = MAX_BYTES) -> Document:
    """Parse a libvirt domain XML, refusing anything unsafe or not a domain.

    Raises :class:`InputError` (or its :class:`UnsafeXmlError`) with a
    one-line reason.
    """
    text, encoding = _decode(data, max_bytes)
    _refuse_doctype(text)
    tree = _parse(data)
    root = tree.getroot()
    if root.tag != "domain":
        qname = etree.QName(root)
        where = f" in namespace {qname.namespace!r}" if qname.namespace else ""
        raise InputError(
            f"not a libvirt domain: the root element is <{qname.localname}>{where}, "
            "expected <domain> without a namespace"
        )
    _check_tree(root)
    return Document(tree, text, encoding)


def parse_fragment(data: bytes) -> etree._Element:
    """Parse a trusted XML fragment (a template) with the same safe parser."""
    text, _encoding = _decode(data, MAX_BYTES)
    _refuse_doctype(text)
    root = _parse(data).getroot()
    _check_tree(root)
    return root
