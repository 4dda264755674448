"""Screenshots of a domain's screen, through libvirt, as PNG: ``console-broker screenshot``.

Theory of operation. A screenshot is a capability of the domain, not of a console
protocol: libvirt's ``virDomainScreenshot`` asks QEMU for the current picture of the
domain's video device (``screendump``) and sends it back on a libvirt stream, as PPM
(QEMU) or whatever the driver produces (the test driver: PNG). It reads the display
the guest draws, the same surface the VNC and SPICE servers serve, and does not touch
their clients: live sessions go on as before.

Two steps, each bounded:

1. :func:`capture` (blocking, libvirt): the domain runs and has a screen (a
   ``<video>`` whose model is not ``none``), then its screen 0 on a blocking stream,
   at most ``max_bytes`` of it (an abort beyond);
2. :func:`to_png` (Pillow): the image is read as PPM or PNG only, at most
   ``max_pixels`` (checked from its header, before decoding), scaled down to
   ``max_width`` keeping its aspect ratio (Lanczos), and written as PNG.

Pillow because it is the library for this: it decodes PPM and PNG, encodes PNG,
resizes with a good filter, and is kept up (security releases within days). Both steps
run in a worker thread: the broker's ``GET /screenshot`` (``broker.service._screenshots``)
bounds them with a timeout and a number at once, the command with a timeout.

Errors are :class:`ScreenshotError` with a ``kind`` the callers turn into an HTTP
status or a one-line message. This module imports libvirt, lxml and Pillow in the
functions that need them: ``console-broker --help`` imports it on a client-only
install too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import attrs

from broker.config import ConfigError
from broker.configfile import read_config
from broker.errors import EXIT_USAGE, CommandError

if TYPE_CHECKING:
    from PIL import Image

#: Bytes of one capture at most: a PPM of 4096 x 4096 pixels (48 MiB) and its header.
MAX_BYTES = 49 * 1024 * 1024
#: Pixels of one screen at most (4096 x 4096): a larger image is refused before decoding.
MAX_PIXELS = 4096 * 4096
#: The bounds of ``--max-width`` and ``?max_width=`` (never an enlargement: a screen
#: narrower than the width asked for is sent at its own size).
MIN_WIDTH, MAX_WIDTH = 16, 8192
#: The command's own limit on one screenshot, in seconds.
COMMAND_TIMEOUT = 30.0
#: The image formats read: QEMU's PPM, and PNG (libvirt's test driver, others).
FORMATS = ("PPM", "PNG")
_READ_SIZE = 256 * 1024

ErrorKind: TypeAlias = Literal[
    "unknown_domain", "not_running", "no_screen", "failed", "too_large"
]


class ScreenshotError(Exception):
    """A screenshot that could not be had; ``kind`` says why, the message in words."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


@attrs.frozen
class Capture:
    """What libvirt sent: the image's MIME type (``image/x-portable-pixmap`` from QEMU)
    and bytes."""

    mime: str
    data: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")


@attrs.frozen
class Shot:
    """A screenshot as PNG: its size, and the size of the screen it was taken of."""

    png: bytes = attrs.field(repr=lambda data: f"<{len(data)} bytes>")
    width: int
    height: int
    screen_width: int
    screen_height: int


def width_bound(value: str) -> int:
    """``--max-width`` and ``?max_width=``: a whole number from :data:`MIN_WIDTH` to
    :data:`MAX_WIDTH`, or ValueError saying so."""
    if not value.isascii() or not value.isdigit() or not MIN_WIDTH <= int(value) <= MAX_WIDTH:
        raise ValueError(f"max width: a whole number from {MIN_WIDTH} to {MAX_WIDTH}")
    return int(value)


# --- capturing (libvirt, blocking) --------------------------------------------------------


def has_screen(xml: str) -> bool:
    """Whether a domain's XML has a video device QEMU can take a screenshot of."""
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(xml.encode(), parser)
    for video in root.iterfind("devices/video"):
        model = video.find("model")
        if model is None or model.get("type") != "none":
            return True
    return False


def _message(exc: Any) -> str:
    return str(exc.get_error_message() or exc)


def capture(conn: Any, dom: Any, *, max_bytes: int = MAX_BYTES, screen: int = 0) -> Capture:
    """Screen *screen* of *dom* (a ``libvirt.virDomain`` of *conn*) as libvirt sends it.

    Blocking: call it in a worker thread. Raises :class:`ScreenshotError`: the domain is
    gone (``unknown_domain``), stopped (``not_running``), has no video device
    (``no_screen``), libvirt failed (``failed``), or sent more than *max_bytes*
    (``too_large``; the stream is aborted)."""
    import libvirt

    name = "the domain"
    try:
        name = f"domain {dom.name()}"
        if not dom.isActive():
            raise ScreenshotError("not_running", f"{name} is not running")
        if not has_screen(dom.XMLDesc(0)):
            raise ScreenshotError("no_screen", f"{name} has no screen (no video device)")
        stream = conn.newStream(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise ScreenshotError("unknown_domain", f"{name} is gone") from None
        raise ScreenshotError("failed", f"{name}: {_message(exc)}") from None
    finished = False
    try:
        try:
            mime = dom.screenshot(stream, screen, 0)
        except libvirt.libvirtError as exc:
            raise _screenshot_error(dom, name, exc) from None
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = stream.recv(_READ_SIZE)
            except libvirt.libvirtError as exc:
                raise _screenshot_error(dom, name, exc) from None
            if not isinstance(chunk, bytes) or not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise ScreenshotError(
                    "too_large", f"{name}: the screenshot is larger than {max_bytes} bytes"
                )
            chunks.append(chunk)
        stream.finish()
        finished = True
    finally:
        if not finished:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
    return Capture(str(mime or ""), b"".join(chunks))


def _screenshot_error(dom: Any, name: str, exc: Any) -> ScreenshotError:
    """What a failed ``virDomainScreenshot`` or stream read means: the domain stopped or
    went away meanwhile, it has no screen after all, or libvirt failed."""
    import libvirt

    code = exc.get_error_code()
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return ScreenshotError("unknown_domain", f"{name} is gone")
    try:
        active = bool(dom.isActive())
    except libvirt.libvirtError:
        active = True
    if not active:
        return ScreenshotError("not_running", f"{name} is not running")
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "no screens" in _message(exc):
        return ScreenshotError("no_screen", f"{name} has no screen ({_message(exc)})")
    return ScreenshotError("failed", f"{name}: {_message(exc)}")


# --- PNG (Pillow) -------------------------------------------------------------------------


def to_png(
    captured: Capture, *, max_width: int | None = None, max_pixels: int = MAX_PIXELS
) -> Shot:
    """*captured* as PNG, no wider than *max_width* (its aspect ratio kept).

    Reads PPM and PNG only, and no image of more than *max_pixels* (its header says so
    before anything is decoded). Raises :class:`ScreenshotError`: ``too_large``, or
    ``failed`` for data that is no such image."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(captured.data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own bound (far above ours), met first by a header of a huge image
        raise ScreenshotError(
            "too_large", f"a screen of more than {max_pixels} pixels ({exc})"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ScreenshotError(
            "failed", f"unreadable screenshot ({captured.mime or 'no type'}): {exc}"
        ) from None
    with image:
        width, height = image.size
        if width < 1 or height < 1 or width * height > max_pixels:
            raise ScreenshotError(
                "too_large", f"a screen of {width}x{height} pixels (at most {max_pixels})"
            )
        try:
            image.load()
            rgb = image.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ScreenshotError("failed", f"unreadable screenshot: {exc}") from None
    scaled = _scaled(rgb, max_width)
    out = io.BytesIO()
    _palette(scaled).save(out, "PNG", compress_level=6)
    return Shot(out.getvalue(), scaled.width, scaled.height, width, height)


def _palette(image: Image.Image) -> Image.Image:
    """*image* with a palette when that loses nothing (at most 256 colours: a text console
    has a handful, its thumbnail some hundred greys), which makes the PNG a third or less
    of its RGB size; else as it is."""
    from PIL import Image

    colours = image.getcolors(256)
    if colours is None:
        return image
    return image.quantize(
        colors=len(colours), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )


def _scaled(image: Image.Image, max_width: int | None) -> Image.Image:
    from PIL import Image

    if max_width is None or image.width <= max_width:
        return image
    height = max(1, round(image.height * max_width / image.width))
    return image.resize((max_width, height), Image.Resampling.LANCZOS)


# --- the command --------------------------------------------------------------------------


def _lookup(conn: Any, domain: str, uri: str) -> Any:
    """*domain* (a name or a UUID) at *conn*, or CommandError."""
    import uuid

    import libvirt

    lookups = [conn.lookupByName]
    with contextlib.suppress(ValueError):
        uuid.UUID(domain)
        lookups.insert(0, conn.lookupByUUIDString)
    for lookup in lookups:
        try:
            return lookup(domain)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise CommandError(
                    f"looking up domain {domain!r} at {uri} failed: {_message(exc)}"
                ) from None
    raise CommandError(f"no domain {domain!r} at {uri}")


def take(uri: str, domain: str, *, max_width: int | None = None) -> tuple[str, Shot]:
    """The domain's name and a screenshot of it, through libvirt at *uri* (blocking);
    CommandError with one line when it cannot be had."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raised, not printed
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise CommandError(f"cannot reach libvirt at {uri}: {_message(exc)}") from None
    try:
        dom = _lookup(conn, domain, uri)
        try:
            return dom.name(), to_png(capture(conn, dom), max_width=max_width)
        except ScreenshotError as exc:
            raise CommandError(f"no screenshot: {exc}") from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _in_time(uri: str, domain: str, max_width: int | None, timeout: float) -> tuple[str, Shot]:
    """:func:`take` in a thread, given up after *timeout* seconds (libvirt's call cannot be
    interrupted: the thread is left behind, and the command ends)."""
    result: list[tuple[str, Shot]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(take(uri, domain, max_width=max_width))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name="screenshot", daemon=True)
    thread.start()
    thread.join(timeout)
    if error:
        raise error[0]
    if not result:
        raise CommandError(f"no screenshot within {timeout:g} s: libvirt did not answer")
    return result[0]


def write_atomically(path: Path, data: bytes) -> None:
    """*data* into *path* whole or not at all: a temporary file in its directory, renamed
    over it; the file's mode as the umask makes a new file's."""
    directory = path.absolute().parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _size(count: int) -> str:
    return f"{count / 1024:.1f} KiB" if count >= 1024 else f"{count} bytes"


def _screenshot_command(args: argparse.Namespace) -> int:
    if args.output == "-" and sys.stdout.isatty():
        raise CommandError(
            "-o -: standard output is a terminal; redirect it, or give -o FILE.png", EXIT_USAGE
        )
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    uri = args.connect or config.libvirt.uri
    started = time.monotonic()
    name, shot = _in_time(uri, args.domain, args.max_width, args.timeout)
    what = f"{name}: {shot.width}x{shot.height} PNG, {_size(len(shot.png))}"
    if shot.width != shot.screen_width:
        what += f" (screen {shot.screen_width}x{shot.screen_height})"
    what += f", in {(time.monotonic() - started) * 1000:.0f} ms"
    if args.output == "-":
        sys.stdout.buffer.write(shot.png)
        sys.stdout.buffer.flush()
        print(what, file=sys.stderr)
        return 0
    path = Path(args.output)
    try:
        write_atomically(path, shot.png)
    except OSError as exc:
        raise CommandError(f"{path}: cannot write the screenshot: {exc.strerror}") from None
    print(f"{what} -> {path}")
    return 0


def _max_width(value: str) -> int:
    try:
        return width_bound(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r}: seconds, more than 0 and at most 3600")
    return seconds


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "screenshot",
        help="save a domain's screen as PNG, through libvirt",
        description=(
            "Take a screenshot of a running domain's screen through libvirt "
            "(virDomainScreenshot: what its video device shows) and write it as PNG. Live "
            "console sessions are not disturbed. On the hypervisor, with access to libvirt; "
            "through a broker, GET /screenshot?token=... does the same (docs/service.md)."
        ),
    )
    parser.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    parser.add_argument(
        "-o", "--output", required=True, metavar="FILE",
        help="the PNG file to write (written whole or not at all); - for standard output",
    )
    parser.add_argument(
        "--max-width", type=_max_width, metavar="N",
        help=f"scale down to at most N pixels wide, keeping the aspect ratio ({MIN_WIDTH} to "
        f"{MAX_WIDTH}; a narrower screen is kept as it is): a thumbnail",
    )
    parser.add_argument("--connect", "-c", metavar="URI", help="libvirt URI (default: libvirt.uri)")
    parser.add_argument(
        "--timeout", type=_seconds, default=COMMAND_TIMEOUT, metavar="S",
        help=f"give up after S seconds (default: {COMMAND_TIMEOUT:g})",
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help="configuration file, for libvirt.uri (default: $CONSOLE_BROKER_CONFIG, else "
        "/etc/console-broker/broker.toml if it exists, else the built-in defaults)",
    )
    parser.set_defaults(func=_screenshot_command, needs_server=True)
