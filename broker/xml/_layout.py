"""Placing and removing elements so that the document stays indented like before.

Every operation here has an exact inverse, which is what makes
``disable(enable(x)) == x`` hold byte for byte:

* inserting ``new`` after ``anchor`` gives ``new`` the anchor's tail and the
  anchor a fresh line break at its own indentation;
* removing a node gives its tail back to whatever came before it (the
  previous sibling's tail or the parent's text), dropping the whitespace
  that preceded it;
* replacing keeps the tail where it was.

Indentation is copied from neighbours; a document without line breaks
(all on one line) gets no whitespace at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lxml import etree

#: The order libvirt writes the children of ``<devices>`` in.
DEVICE_ORDER = (
    "emulator", "disk", "controller", "lease", "filesystem", "interface", "smartcard",
    "serial", "parallel", "console", "channel", "input", "tpm", "graphics", "sound",
    "audio", "video", "hostdev", "redirdev", "redirfilter", "hub", "watchdog",
    "memballoon", "rng", "nvram", "panic", "shmem", "memory", "iommu", "vsock", "crypto",
    "pstore",
)  # fmt: skip
#: The order libvirt writes the children of ``<domain>`` in (the part that matters here).
DOMAIN_ORDER = (
    "name", "uuid", "genid", "title", "description", "metadata", "maxMemory", "memory",
    "currentMemory", "blkiotune", "memtune", "memoryBacking", "vcpu", "vcpus", "iothreads",
    "iothreadids", "defaultiothread", "cputune", "numatune", "resource", "sysinfo",
    "bootloader", "bootloader_args", "os", "idmap", "features", "cpu", "clock",
    "on_poweroff", "on_reboot", "on_crash", "on_lockfailure", "pm", "perf", "devices",
    "seclabel", "keywrap", "launchSecurity",
)  # fmt: skip


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def is_element(node: etree._Element) -> bool:
    """True for elements, False for comments, processing instructions and entities."""
    return isinstance(node.tag, str)


def whitespace_before(node: etree._Element) -> str | None:
    """The text right before *node*: the previous sibling's tail or the parent's text."""
    previous = node.getprevious()
    if previous is not None:
        return previous.tail
    parent = node.getparent()
    return parent.text if parent is not None else None


def line_indent(text: str | None) -> str | None:
    """The indentation *text* ends with, or None if it holds no line break."""
    if text is None or "\n" not in text:
        return None
    rest = text[text.rfind("\n") + 1 :]
    return rest if not rest.strip() else None


def indent_of(node: etree._Element) -> str | None:
    """The indentation of the line *node* starts on (None on a shared line)."""
    if node.getparent() is None:
        return ""
    return line_indent(whitespace_before(node))


class Layout:
    """The indentation style of one document: its unit, or None if it has none."""

    def __init__(self, root: etree._Element) -> None:
        self.unit: str | None = None
        for el in root.iter():
            if not is_element(el) or len(el) == 0:
                continue
            outer = indent_of(el)
            inner = line_indent(el.text)
            if outer is not None and inner is not None and inner.startswith(outer):
                self.unit = inner[len(outer) :] or None
                if self.unit:
                    break

    def child_indent(self, parent: etree._Element) -> str | None:
        """The indentation of the children of *parent* (existing or to come)."""
        for child in parent:
            return line_indent(whitespace_before(child))
        outer = indent_of(parent)
        if outer is None or self.unit is None:
            return None
        return outer + self.unit

    def reindent(
        self,
        el: etree._Element,
        indent: str | None,
        opaque: Callable[[etree._Element], bool] | None = None,
    ) -> None:
        """Lay out the blank text inside new content *el*, which sits at *indent*.

        The inside of elements *opaque* accepts is left alone (their tails are not).
        """
        children = list(el)
        if not children:
            return
        inner = None if indent is None or self.unit is None else indent + self.unit
        if _blank(el.text):
            el.text = None if inner is None else "\n" + inner
        for n, child in enumerate(children):
            if _blank(child.tail):
                last = n == len(children) - 1
                child.tail = (
                    None
                    if inner is None or indent is None
                    else ("\n" + (indent if last else inner))
                )
            if is_element(child) and not (opaque is not None and opaque(child)):
                self.reindent(child, inner, opaque)


def insert_after(
    anchor: etree._Element, new: etree._Element, layout: Layout, *, reindent: bool = True
) -> None:
    """Put *new* right after *anchor*, on a line of its own at the anchor's indentation."""
    indent = indent_of(anchor)
    new.tail = anchor.tail
    anchor.tail = None if indent is None else "\n" + indent
    anchor.addnext(new)  # lxml moves an element together with its tail
    if reindent:
        layout.reindent(new, indent)


def insert_first(
    parent: etree._Element, new: etree._Element, layout: Layout, *, reindent: bool = True
) -> None:
    """Make *new* the first child of *parent*.

    Into a parent written empty (``<devices/>``) this writes line breaks that
    were not there: removing the last child then leaves a blank text that the
    caller turns back into nothing (see :func:`make_empty`).
    """
    if len(parent):
        indent = line_indent(parent.text)
        new.tail = parent.text
    else:
        indent = layout.child_indent(parent)
        if line_indent(parent.text) is not None:
            new.tail = parent.text
        else:
            outer = indent_of(parent)
            new.tail = None if outer is None or indent is None else "\n" + outer
        parent.text = None if indent is None else "\n" + indent
    parent.insert(0, new)
    if reindent:
        layout.reindent(new, indent)


def written_empty(parent: etree._Element) -> bool:
    """True if *parent* has no children and no line break inside (``<x/>``, ``<x></x>``)."""
    return len(parent) == 0 and line_indent(parent.text) is None


def make_empty(parent: etree._Element) -> None:
    """Turn a childless, blank *parent* back into an empty element."""
    if len(parent) == 0 and _blank(parent.text):
        parent.text = None


def append(
    parent: etree._Element, new: etree._Element, layout: Layout, *, reindent: bool = True
) -> None:
    """Make *new* the last child of *parent*."""
    if len(parent):
        insert_after(parent[len(parent) - 1], new, layout, reindent=reindent)
    else:
        insert_first(parent, new, layout, reindent=reindent)


def insert_in_order(
    parent: etree._Element,
    new: etree._Element,
    order: Sequence[str],
    layout: Layout,
    *,
    reindent: bool = True,
) -> None:
    """Insert *new* where libvirt would write it: after the last sibling with its
    tag, else after the last sibling libvirt writes before it, else before the
    first element (or after the comments of an element-less parent)."""
    elements = [child for child in parent if is_element(child)]
    same = [child for child in elements if child.tag == new.tag]
    if same:
        insert_after(same[-1], new, layout, reindent=reindent)
        return
    rank = {tag: n for n, tag in enumerate(order)}
    mine = rank.get(str(new.tag), len(order))
    earlier = [child for child in elements if rank.get(str(child.tag), len(order) + 1) < mine]
    if earlier:
        insert_after(earlier[-1], new, layout, reindent=reindent)
    elif elements:
        previous = elements[0].getprevious()
        if previous is not None:
            insert_after(previous, new, layout, reindent=reindent)
        else:
            insert_first(parent, new, layout, reindent=reindent)
    else:
        append(parent, new, layout, reindent=reindent)


def remove(node: etree._Element) -> None:
    """Take *node* out, giving its tail to what came before it."""
    parent = node.getparent()
    assert parent is not None
    previous = node.getprevious()
    before = previous.tail if previous is not None else parent.text
    joined = node.tail if _blank(before) else (before or "") + (node.tail or "")
    if previous is not None:
        previous.tail = joined
    else:
        parent.text = joined
    parent.remove(node)
    node.tail = None


def replace(
    old: etree._Element, new: etree._Element, layout: Layout, *, reindent: bool = True
) -> None:
    """Put *new* where *old* is; *old* leaves the tree."""
    parent = old.getparent()
    assert parent is not None
    new.tail = old.tail
    parent.replace(old, new)
    old.tail = None
    if reindent:
        layout.reindent(new, indent_of(new))


def _blank_texts(el: etree._Element) -> list[tuple[etree._Element, str]]:
    """(node, "text" | "tail") of every blank text with a line break inside *el*."""
    found: list[tuple[etree._Element, str]] = []
    for node in el.iter():
        if node is not el and node.tail and "\n" in node.tail and _blank(node.tail):
            found.append((node, "tail"))
        if is_element(node) and len(node) and node.text and "\n" in node.text and _blank(node.text):
            found.append((node, "text"))
    return found


def shift(el: etree._Element, extra: str) -> None:
    """Indent the inside of *el* by *extra* more (its own tail is left alone)."""
    for node, which in _blank_texts(el):
        value = getattr(node, which)
        setattr(node, which, value.replace("\n", "\n" + extra))


def unshift(el: etree._Element, extra: str) -> None:
    """Undo :func:`shift` (where the indentation is still there)."""
    for node, which in _blank_texts(el):
        lines = getattr(node, which).split("\n")
        setattr(
            node,
            which,
            "\n".join(
                [lines[0]] + [ln[len(extra) :] if ln.startswith(extra) else ln for ln in lines[1:]]
            ),
        )


def indent_delta(outer: str | None, inner: str | None) -> str | None:
    """What *inner* adds to *outer*, or None if it does not extend it."""
    if outer is None or inner is None or not inner.startswith(outer) or inner == outer:
        return None
    return inner[len(outer) :]
