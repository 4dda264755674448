"""The real stack for tests and the demo: libvirtd + QEMU (TCG) + a tiny guest.

This module starts ``virtlogd`` and ``libvirtd`` when they are not running,
builds the tiny guest's initramfs (a static busybox and an ``/init`` script)
into a cache, and defines, boots and removes uniquely named domains. Installing
what it needs (packages, host settings, a kernel) is ``scripts/setup-host``'s
job; docs/testbed.md explains every step.

The guest prints :data:`READY_LINE` on its serial port, then runs a login shell
with the prompt :data:`PROMPT` on the serial console (``ttyS0``) and another on
the VGA console (``tty1``), so keystrokes sent over VNC or SPICE can be proven
by a command that writes to the serial port.

The same guest exists for aarch64 (``guest_xml(..., arch="aarch64")``): QEMU's ``virt``
machine under TCG, Debian's arm64 kernel and busybox (``scripts/setup-host`` fetches
them), its serial console on the PL011 (``ttyAMA0``) and its screen on virtio-gpu, whose
kernel modules the initramfs loads so that the framebuffer console shows ``tty1``.

It is a distribution of its own (``console-broker-testbed``, in ``testbed/`` of the
repository), not part of the broker: ``scripts/setup-host`` installs it into ``.venv``
and tox into its ``py`` environment. Run ``python -m console_broker_testbed --help``
for the command-line face.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libvirt

#: Where the kernel (put there by scripts/setup-host) and the cached initramfs live.
DEFAULT_DIR = Path(os.environ.get("CONSOLE_BROKER_TESTBED_DIR", "/var/lib/console-broker-testbed"))
#: The libvirt URI of the test bed.
URI = "qemu:///system"
#: What the guest prints on its serial port once its shells are about to start.
READY_LINE = "console-broker-guest: ready"
#: The guest shell's prompt, on the serial and on the VGA console.
PROMPT = "guest# "

_LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
_LIBVIRTD_PID = Path("/run/libvirtd.pid")
_VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
_LOG_DIR = Path("/var/log/libvirt")
_BUSYBOX = Path("/bin/busybox")
#: The architectures the tiny guest exists for (libvirt's ``<type arch>``).
ARCHES = ("x86_64", "aarch64")
#: Where the aarch64 guest's files are, under the test bed directory: ``vmlinuz`` (an
#: arm64 Image), ``busybox`` (static, arm64), ``modules/`` and ``modules.load`` (the
#: kernel modules the guest loads, in that order), put there by scripts/setup-host.
ARM64_SUBDIR = "arm64"
#: The emulator libvirt runs an aarch64 domain with (Debian's qemu-system-arm).
AARCH64_EMULATOR = "qemu-system-aarch64"
#: The guest's serial console device per architecture: the 16550 UART of the PC, the
#: PL011 of QEMU's ``virt`` machine.
SERIAL_TTY = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}


def init_script(serial_tty: str = "ttyS0", modules: Sequence[str] = ()) -> str:
    """The guest's ``/init``: its serial console on /dev/*serial_tty*; *modules* (file
    names in ``/lib/modules``) loaded in this order before anything is printed."""
    load = "".join(f"insmod /lib/modules/{name}\n" for name in modules)
    return f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
{load}hostname guest
echo "{READY_LINE}" >/dev/{serial_tty}
echo "{READY_LINE}" >/dev/tty1
# A shell on the VGA console, so keys typed over VNC or SPICE reach a shell.
(while :; do setsid sh -c 'exec sh -l <>/dev/tty1 >&0 2>&1'; sleep 1; done) &
# The serial console's shell, started again whenever it exits.
while :; do setsid sh -c 'exec sh -l <>/dev/{serial_tty} >&0 2>&1'; sleep 1; done
"""


_INIT = init_script()

_PROFILE = f"""export PATH=/bin
export PS1='{PROMPT}'
export TERM=linux
"""


class TestbedError(Exception):
    """The test bed cannot be brought up; the message says what is missing."""

    __test__ = False  # not a pytest test class


# --- daemons -------------------------------------------------------------


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _start_daemon(binary: str, sock: Path, timeout: float) -> None:
    if _socket_answers(sock):
        return
    exe = _which(binary)
    _LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LIBVIRT_LOG_OUTPUTS=f"3:file:{_LOG_DIR / (binary + '.log')}")
    # --daemon forks and detaches; the first process exits at once.
    subprocess.run([exe, "--daemon"], env=env, check=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not _socket_answers(sock):
        if time.monotonic() > deadline:
            raise TestbedError(f"{binary} did not open {sock} within {timeout:.0f} s")
        time.sleep(0.05)


def _which(binary: str) -> str:
    for directory in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        candidate = Path(directory, binary)
        if candidate.exists():
            return str(candidate)
    raise TestbedError(f"{binary} is not installed: run scripts/setup-host as root")


def ensure_daemons(timeout: float = 30.0) -> None:
    """Start virtlogd, then libvirtd, unless they already answer on their sockets."""
    _start_daemon("virtlogd", _VIRTLOGD_SOCK, timeout)
    _start_daemon("libvirtd", _LIBVIRT_SOCK, timeout)


def stop_libvirtd(timeout: float = 30.0) -> None:
    """Stop libvirtd: SIGTERM to the process its pid file names, and wait until it has
    gone. Running domains survive; every client connection breaks. Start it again with
    :func:`ensure_daemons` (:func:`libvirtd_stopped` does)."""
    try:
        pid = int(_LIBVIRTD_PID.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid and _running(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() > deadline:
                raise TestbedError(f"libvirtd (pid {pid}) did not stop within {timeout:.0f} s")
            time.sleep(0.05)


def restart_libvirtd(timeout: float = 30.0) -> None:
    """Stop libvirtd (:func:`stop_libvirtd`) and start it again, so that it reads
    qemu.conf anew. Running domains survive; every client connection breaks
    (:meth:`Testbed.reconnect`)."""
    stop_libvirtd(timeout)
    ensure_daemons(timeout)


@contextmanager
def libvirtd_stopped(timeout: float = 30.0) -> Iterator[None]:
    """libvirtd stopped for the block (:func:`stop_libvirtd`), and running again however
    the block ends (:func:`ensure_daemons`); reconnect the connections it broke after
    (:meth:`Testbed.reconnect`). Tests using it run last (the ``libvirtd_restart``
    marker of the project's tests)."""
    try:
        stop_libvirtd(timeout)
        yield
    finally:
        ensure_daemons(timeout)


# --- the guest's initramfs -------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One entry of a cpio archive in the 'newc' format the kernel unpacks."""
    fields = [
        0,  # inode
        mode,
        0,  # uid
        0,  # gid
        1,  # nlink
        0,  # mtime: fixed, so the archive is reproducible
        len(data),
        0,  # dev major
        0,  # dev minor
        rdev[0],
        rdev[1],
        len(name) + 1,
        0,  # check
    ]
    header = b"070701" + b"".join(b"%08X" % field for field in fields)
    out = header + name.encode() + b"\0"
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def initramfs_bytes(
    busybox: bytes, *, init: str = _INIT, modules: Sequence[tuple[str, bytes]] = ()
) -> bytes:
    """The tiny guest's initramfs: busybox, /init (*init*), /etc/profile and
    /dev/console; *modules* (name, content) in /lib/modules."""
    directories = ["bin", "dev", "etc", "proc", "sys", "tmp", "root"]
    if modules:
        directories += ["lib", "lib/modules"]
    entries = [_cpio_entry(directory, 0o040755) for directory in directories]
    entries.append(_cpio_entry("dev/console", 0o020600, rdev=(5, 1)))
    entries.append(_cpio_entry("bin/busybox", 0o100755, busybox))
    entries.append(_cpio_entry("bin/sh", 0o120777, b"busybox"))
    entries.append(_cpio_entry("init", 0o100755, init.encode()))
    entries += [_cpio_entry(f"lib/modules/{name}", 0o100644, data) for name, data in modules]
    entries.append(_cpio_entry("etc/profile", 0o100644, _PROFILE.encode()))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    archive = b"".join(entries)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz:
        gz.write(archive)
    return buffer.getvalue()


def build_initramfs(directory: Path = DEFAULT_DIR, busybox: Path = _BUSYBOX) -> Path:
    """Build the initramfs into *directory* once per content; return its path."""
    try:
        busybox_bytes = busybox.read_bytes()
    except FileNotFoundError:
        raise TestbedError(f"{busybox} is missing: run scripts/setup-host as root") from None
    digest = hashlib.sha256(busybox_bytes + _INIT.encode() + _PROFILE.encode()).hexdigest()[:16]
    path = directory / f"initramfs-{digest}.cpio.gz"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(initramfs_bytes(busybox_bytes))
        tmp.replace(path)
    return path


def kernel_path(directory: Path = DEFAULT_DIR) -> Path:
    path = directory / "vmlinuz"
    if not path.is_file():
        raise TestbedError(f"no guest kernel at {path}: run scripts/setup-host as root")
    return path


def aarch64_files(directory: Path = DEFAULT_DIR) -> tuple[Path, Path]:
    """The aarch64 guest's kernel and initramfs (built into *directory* once per
    content, like the x86 one, from the files of :data:`ARM64_SUBDIR`): busybox, /init
    with its serial console on ``ttyAMA0``, and the kernel modules of ``modules.load``,
    which /init loads in that order (virtio-gpu's, so that the framebuffer console draws
    ``tty1`` on the screen)."""
    files = directory / ARM64_SUBDIR
    needed = [files / "vmlinuz", files / "busybox", files / "modules.load"]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise TestbedError(
            f"the aarch64 guest's files are missing ({', '.join(missing)}): "
            "run scripts/setup-host as root"
        )
    names = (files / "modules.load").read_text().split()
    try:
        modules = [(name, (files / "modules" / name).read_bytes()) for name in names]
    except FileNotFoundError as exc:
        raise TestbedError(f"{exc.filename} is missing: run scripts/setup-host as root") from None
    busybox = (files / "busybox").read_bytes()
    init = init_script(SERIAL_TTY["aarch64"], names)
    content = hashlib.sha256(busybox + init.encode() + _PROFILE.encode())
    for name, data in modules:
        content.update(name.encode() + b"\0" + data)
    path = directory / f"initramfs-aarch64-{content.hexdigest()[:16]}.cpio.gz"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(initramfs_bytes(busybox, init=init, modules=modules))
        tmp.replace(path)
    return files / "vmlinuz", path


def guest_xml(
    name: str,
    *,
    kernel: Path,
    initrd: Path,
    serial: bool = True,
    devices: str = "",
    domain_uuid: str | None = None,
    memory_mib: int | None = None,
    arch: str = "x86_64",
) -> str:
    """The tiny guest's domain XML for *arch* (one of :data:`ARCHES`).

    *serial* adds a pty serial port and its console; *devices* is extra XML
    placed inside ``<devices>`` (graphics, video, ...).

    x86_64: the ``pc`` machine, 128 MiB, no display (the tests or ``xml enable`` add
    one). aarch64: as virt-install writes one, less its UEFI firmware (the kernel boots
    directly): the ``virt`` machine, a Cortex-A57 (which TCG emulates), 256 MiB, a
    virtio-gpu display, a qemu-xhci USB controller with a keyboard and a tablet.
    """
    if arch not in ARCHES:
        raise ValueError(f"no tiny guest for the architecture {arch!r} (one of {ARCHES})")
    serial_xml = (
        "    <serial type='pty'><target port='0'/></serial>\n"
        "    <console type='pty'><target type='serial' port='0'/></console>\n"
        if serial
        else ""
    )
    if arch == "aarch64":
        machine = "virt"
        cpu = "  <cpu mode='custom' match='exact'><model>cortex-a57</model></cpu>\n"
        memory_mib = memory_mib or 256
        devices = (
            "    <controller type='usb' model='qemu-xhci' ports='15'/>\n"
            "    <input type='keyboard' bus='usb'/>\n"
            "    <input type='tablet' bus='usb'/>\n"
            "    <video><model type='virtio'/></video>\n"
        ) + devices
    else:
        machine, cpu = "pc", ""
        memory_mib = memory_mib or 128
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{domain_uuid or uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='{arch}' machine='{machine}'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>console=tty0 console={SERIAL_TTY[arch]} quiet panic=-1</cmdline>
  </os>
{cpu}  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{serial_xml}{devices}    <memballoon model='none'/>
  </devices>
</domain>
"""


# --- the serial console ------------------------------------------------------


class SerialConsole:
    """A domain's serial console over a libvirt console stream (blocking I/O).

    A reader thread collects output; :meth:`expect` waits for a pattern in
    what arrived since the last match. Open it before resuming a domain started
    paused, so nothing the guest prints is missed.

    It reads over a libvirt connection of its own: with a thread blocked reading a
    console stream on the test bed's shared connection, other calls on that
    connection were seen to hang now and then (virDomainCreate, openConsole,
    openGraphicsFD, each for minutes).
    """

    def __init__(self, conn: Any, dom: Any, device: str | None = None) -> None:
        self._conn = libvirt.open(conn.getURI())
        try:
            own = self._conn.lookupByUUIDString(dom.UUIDString())
            self._stream = self._conn.newStream(0)
            own.openConsole(device, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except libvirt.libvirtError:
            with suppress(libvirt.libvirtError):
                self._conn.close()
            raise
        self._buffer = bytearray()
        self._pos = 0
        self._cond = threading.Condition()
        self._eof = False
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="serial-console", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                data = self._stream.recv(65536)
                if not isinstance(data, bytes) or not data:
                    break
                with self._cond:
                    self._buffer += data
                    self._cond.notify_all()
        except libvirt.libvirtError:
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def output(self) -> bytes:
        """Everything received so far."""
        with self._cond:
            return bytes(self._buffer)

    def expect(self, pattern: str | bytes, timeout: float = 60.0) -> re.Match[bytes]:
        """Wait for the regular expression *pattern* in the output after the last match."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._buffer, self._pos)
                if match:
                    self._pos = match.end()
                    return match
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    tail = bytes(self._buffer[-400:]).decode(errors="replace")
                    why = "the console closed" if self._eof else f"{timeout:.0f} s passed"
                    raise TestbedError(
                        f"{why} before {regex.pattern!r} appeared; last output:\n{tail}"
                    )
                self._cond.wait(remaining)

    def send(self, data: bytes | str) -> None:
        payload = data.encode() if isinstance(data, str) else data
        while payload:
            sent = self._stream.send(payload)
            payload = payload[sent:]

    def run(self, command: str, timeout: float = 30.0) -> str:
        """Type *command* at the shell prompt; return its output.

        The output is framed by markers the shell prints but the terminal's
        echo of the typed line does not contain (they are split by quotes), so
        type-ahead echo and prompt redraws never leak into the result.
        """
        marker = uuid.uuid4().hex[:8]
        self.send(f"echo '[BEGIN-''{marker}]'; {command}; echo '[END-''{marker}]'\n")
        self.expect(rf"\[BEGIN-{marker}\]\r?\n", timeout)
        match = self.expect(rf"([\s\S]*?)\[END-{marker}\]", timeout)
        return match.group(1).decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with suppress(libvirt.libvirtError):
            self._stream.abort()
        self._thread.join(timeout=5)
        with suppress(libvirt.libvirtError):
            self._conn.close()


# --- domains -------------------------------------------------------------------


class Testbed:
    """A connection to the test bed's libvirtd and the domains made through it."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, directory: Path = DEFAULT_DIR, uri: str = URI, prefix: str = "cbtest"
    ) -> None:
        self.directory = directory
        self.uri = uri
        self.prefix = f"{prefix}-{os.getpid()}"
        self._base_prefix = prefix
        self._count = 0
        self.kernel = kernel_path(directory)
        self.initrd = build_initramfs(directory)
        ensure_daemons()
        # libvirt prints every error to stderr by default, also the expected
        # ones (a console stream closing); the exceptions carry them instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self.conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise TestbedError(f"cannot connect to {uri}: {exc}") from exc
        # libvirt's QEMU driver probes every installed emulator (qemu-system-misc alone
        # brings twenty) the first time its capabilities or the hypervisor's version are
        # asked for, about 2 s each here, and caches them on disk: paid once, here, not
        # inside a test that bounds how long libvirt may take to answer.
        self.conn.getCapabilities()
        self._domains: list[Any] = []

    def reconnect(self) -> None:
        """Open the connection again (after :func:`restart_libvirtd`); the domains this
        test bed made are looked up on the new one."""
        uuids = [dom.UUIDString() for dom in self._domains]
        with suppress(libvirt.libvirtError):
            self.conn.close()
        self.conn = libvirt.open(self.uri)
        self._domains = []
        for domain_uuid in uuids:
            with suppress(libvirt.libvirtError):
                self._domains.append(self.conn.lookupByUUIDString(domain_uuid))

    def unique_name(self, label: str = "vm") -> str:
        self._count += 1
        return f"{self.prefix}-{label}-{self._count}"

    def guest_xml(self, name: str | None = None, *, arch: str = "x86_64", **kwargs: Any) -> str:
        """The tiny guest's XML (:func:`guest_xml`) for *arch*, with this test bed's
        files (:meth:`aarch64_files` for aarch64)."""
        kernel, initrd = (self.kernel, self.initrd) if arch != "aarch64" else self.aarch64_files()
        return guest_xml(
            name or self.unique_name(), kernel=kernel, initrd=initrd, arch=arch, **kwargs
        )

    def aarch64_files(self) -> tuple[Path, Path]:
        """The aarch64 guest's kernel and initramfs (:func:`aarch64_files`); a
        :class:`TestbedError` when its emulator or its files are missing."""
        if shutil.which(AARCH64_EMULATOR) is None:
            raise TestbedError(
                f"{AARCH64_EMULATOR} is not installed (Debian's qemu-system-arm): "
                "run scripts/setup-host as root"
            )
        return aarch64_files(self.directory)

    def define(self, xml: str) -> Any:
        """Define a domain from *xml*; it is removed by :meth:`cleanup`."""
        dom = self.conn.defineXML(xml)
        self._domains.append(dom)
        return dom

    def boot(
        self, dom: Any, *, console: bool = True, device: str | None = None
    ) -> SerialConsole | None:
        """Start *dom*; with *console*, return its serial console opened before the
        first instruction runs, after the ready line arrived."""
        if not console:
            dom.create()
            return None
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        serial = SerialConsole(self.conn, dom, device)
        dom.resume()
        try:
            serial.expect(re.escape(READY_LINE), timeout=120)
        except TestbedError:
            serial.close()
            raise
        return serial

    def remove(self, dom: Any) -> None:
        with suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        with suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        if dom in self._domains:
            self._domains.remove(dom)

    def cleanup(self) -> None:
        """Remove this test bed's domains and any left by dead processes."""
        for dom in list(self._domains):
            self.remove(dom)
        for dom in self.conn.listAllDomains():
            match = re.fullmatch(rf"{re.escape(self._base_prefix)}-(\d+)-.*", dom.name())
            if match and not _pid_alive(int(match.group(1))):
                self.remove(dom)

    def close(self) -> None:
        self.cleanup()
        with suppress(libvirt.libvirtError):
            self.conn.close()


def _running(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting for a parent that never reaps it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def running_guest(testbed: Testbed, **kwargs: Any) -> Iterator[tuple[Any, SerialConsole]]:
    """Define and boot a guest; yield (domain, serial console); remove it after."""
    with booted(testbed, testbed.guest_xml(**kwargs)) as running:
        yield running


@contextmanager
def booted(testbed: Testbed, xml: str) -> Iterator[tuple[Any, SerialConsole]]:
    """Define the domain *xml* (one with a serial console) and boot it; yield (domain,
    serial console); remove it after."""
    dom = testbed.define(xml)
    try:
        serial = testbed.boot(dom)
        assert serial is not None
        try:
            yield dom, serial
        finally:
            serial.close()
    finally:
        testbed.remove(dom)


# --- command line ----------------------------------------------------------------


def warm_daemons() -> int:
    """Start the daemons and ask libvirt for its capabilities once (see
    :class:`Testbed`): 0, or 1 with the error on standard error."""
    try:
        ensure_daemons()
        conn = libvirt.open(URI)
        try:
            conn.getCapabilities()
        finally:
            conn.close()
    except (TestbedError, libvirt.libvirtError) as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m console_broker_testbed",
        description="Bring up the real stack (libvirtd + QEMU + the tiny guest) for the demo.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the daemons and define a named guest (kept running)")
    up.add_argument("name", help="domain name; an existing domain of that name is replaced")
    up.add_argument(
        "--no-serial", action="store_true", help="define the guest without a serial port"
    )
    up.add_argument("--no-start", action="store_true", help="define only; do not start")
    up.add_argument(
        "--arch", choices=ARCHES, default="x86_64",
        help="the guest's architecture (default x86_64; aarch64: QEMU's virt machine, "
        "which needs qemu-system-arm and the arm64 files scripts/setup-host fetches)",
    )
    down = sub.add_parser("down", help="stop and undefine a guest made with 'up'")
    down.add_argument("name")
    sub.add_parser(
        "daemons",
        help="start virtlogd and libvirtd and have libvirt probe the installed emulators "
        "(cached on disk after; scripts/test runs it beside the unit tests)",
    )
    args = parser.parse_args(argv)
    if args.command == "daemons":
        return warm_daemons()
    try:
        bed = Testbed(prefix="cbdemo")
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 1
    with suppress(libvirt.libvirtError):
        bed.remove(bed.conn.lookupByName(args.name))
    if args.command == "up":
        try:
            xml = bed.guest_xml(args.name, serial=not args.no_serial, arch=args.arch)
        except TestbedError as exc:
            print(f"testbed: {exc}", file=sys.stderr)
            return 1
        dom = bed.conn.defineXML(xml)
        if not args.no_start:
            dom.create()
        print(
            f"domain {args.name} ({dom.UUIDString()}) {'running' if dom.isActive() else 'defined'}"
        )
    return 0

