"""The console pages' browser assets: where they are, and serving files from them safely.

The console pages (VNC, SPICE, serial) are built on JavaScript packages (noVNC,
spice-html5, xterm.js) read from one ``node_modules`` directory, the key
``http.assets_dir``: :func:`assets_dir` resolves it (a source tree's, the one bundled in
the wheel, or an administrator's). A page serves a file of a
package with :func:`package_file`, which refuses anything that is not a plain file
below the package's directory (no ``..``, no hidden files, no link leading out of
it), and names its type with :func:`content_type`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

from broker.hookspecs import Page

#: The browser clients the wheel bundles (setup.py writes them into the build, from
#: package.json's dependencies): where an installed broker finds them.
BUNDLED_ASSETS = Path(__file__).resolve().parent / "web_clients" / "node_modules"
#: Where the assets are looked for when the broker runs neither from a source tree nor
#: from a wheel that bundles them (a distribution's package may install them there).
INSTALLED_ASSETS = Path("/usr/share/console-broker/node_modules")

JAVASCRIPT = "text/javascript; charset=utf-8"
CSS = "text/css; charset=utf-8"
HTML = "text/html; charset=utf-8"
#: Content types by file suffix; anything else is ``application/octet-stream``.
CONTENT_TYPES = {".js": JAVASCRIPT, ".css": CSS, ".html": HTML}


def content_type(name: str) -> str:
    """The ``Content-Type`` of the file *name*, from its suffix."""
    return CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


def source_tree() -> Path | None:
    """The source tree the broker runs from, or None when it runs installed."""
    tree = Path(__file__).resolve().parents[1]
    if (tree / "pyproject.toml").is_file() and (tree / "plugins").is_dir():
        return tree
    return None


def assets_dir(configured: str) -> Path:
    """The ``node_modules`` directory of the console pages, the first of:

    1. *configured* (``http.assets_dir``), when set;
    2. the source tree's ``node_modules``, when the broker runs from one (an editable
       install; ``scripts/setup-host`` runs ``npm ci`` there);
    3. :data:`BUNDLED_ASSETS`, the browser clients the wheel bundles, when the broker runs
       installed from a wheel holding them;
    4. :data:`INSTALLED_ASSETS` (``/usr/share/console-broker/node_modules``).
    """
    if configured:
        return Path(configured)
    tree = source_tree()
    if tree is not None:
        return tree / "node_modules"
    return BUNDLED_ASSETS if BUNDLED_ASSETS.is_dir() else INSTALLED_ASSETS


def read_below(package: Path, relative: str, suffixes: Collection[str] = (".js",)) -> bytes | None:
    """The bytes of the file at *relative* (``/``-separated) below the directory
    *package*, or None when it is not to be served: a suffix not in *suffixes*, an
    empty, ``.``, ``..`` or hidden part, a NUL, a path that is missing, not a plain
    file, or leads (through a link) out of *package*, or a file that cannot be read."""
    parts = relative.split("/")
    if Path(relative).suffix not in suffixes or "\0" in relative:
        return None
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    try:
        root = package.resolve(strict=True)
        target = (package / relative).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, or a link loop
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    try:
        return target.read_bytes()
    except OSError:
        return None


def package_file(
    package: Path,
    relative: str,
    *,
    suffixes: Collection[str] = (".js",),
    headers: Iterable[tuple[str, str]] = (),
) -> Page | None:
    """The file at *relative* below *package* as a :class:`~broker.hookspecs.Page` with
    its content type and *headers*, or None (a 404) where :func:`read_below` refuses it."""
    body = read_below(package, relative, suffixes)
    if body is None:
        return None
    return Page(body, content_type(relative), headers=tuple(headers))
