"""Hosts on one machine: network namespaces joined by bridges, for cluster tests.

A :class:`Network` makes one *switch* namespace holding a Linux bridge per LAN, and a
namespace per host with one veth link into each LAN it is on (``eth0``, ``eth1``, ...
in the order given), addresses on private /24s and no default route: a host reaches
exactly the LANs it is on, and an address elsewhere is "no route" (``ENETUNREACH``).
Nothing is made in the machine's own namespace: deleting the namespaces removes every
link, and :meth:`Network.close` ends every process still running in them first.

Processes run in a host with ``ip netns exec`` (:meth:`Host.command`); the test's own
sockets are made in a host by a thread that joined its namespace (:meth:`Host.socket`):
a socket belongs to the namespace it was created in, whichever thread uses it after.
libvirt's UNIX socket is on the shared file system, so a broker in any host reaches the
machine's one libvirtd. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")
#: setns(2)'s flag for a network namespace.
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"


class NetnsError(Exception):
    """A namespace, link or address could not be made (the ``ip`` command's message)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _join(namespace: str) -> None:
    """Move the calling thread into *namespace* (a thread initializer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(_NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {namespace}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class Host:
    """One host: a network namespace with an address on each of its LANs."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name = name
        self.namespace = namespace
        #: LAN name to this host's address on it.
        self.addresses: dict[str, str] = {}
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addresses})"

    def address(self, lan: str | None = None) -> str:
        """This host's address on *lan* (default: its only or first LAN)."""
        if lan is None:
            return next(iter(self.addresses.values()))
        return self.addresses[lan]

    def command(self, argv: Sequence[str]) -> list[str]:
        """*argv* run in this host (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """:func:`subprocess.run` of *argv* in this host."""
        return subprocess.run(self.command(argv), check=kwargs.pop("check", True), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """:class:`subprocess.Popen` of *argv* in this host."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def inside(self, function: Callable[[], _T]) -> _T:
        """Call *function* on a thread that is in this host's namespace."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netns-{self.name}",
                initializer=_join, initargs=(self.namespace,),
            )
        return self._executor.submit(function).result()

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket in this host's namespace (usable from any thread)."""
        return self.inside(lambda: socket.socket(family, kind))

    def connect(self, address: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from this host to *address*:*port* (OSError if none)."""
        sock = self.socket()
        try:
            sock.settimeout(timeout)
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def wait_for_port(self, address: str, port: int, timeout: float = 30.0,
                      alive: Callable[[], bool] = lambda: True) -> None:
        """Until a TCP connection from this host to *address*:*port* succeeds; OSError
        (the last) after *timeout*, or as soon as *alive* says the server is gone."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(address, port, timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline or not alive():
                    raise
                time.sleep(0.1)

    def pids(self) -> list[int]:
        """The processes running in this host's namespace."""
        done = subprocess.run(["ip", "netns", "pids", self.namespace],
                              capture_output=True, text=True, check=False)
        return [int(word) for word in done.stdout.split()]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class Network:
    """A set of hosts and LANs (see the module's docstring); a context manager that
    removes them all."""

    def __init__(self, tag: str | None = None) -> None:
        #: Prefix of every namespace name, unique to this process.
        self.tag = tag or f"cb{os.getpid()}"
        self.switch = f"{self.tag}-switch"
        self.lans: dict[str, ipaddress.IPv4Network] = {}
        self.hosts: dict[str, Host] = {}
        self._ports = 0
        try:
            _ip("netns", "add", self.switch)
        except NetnsError:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def add_lan(self, name: str, subnet: str) -> None:
        """A LAN: a bridge in the switch namespace; hosts get addresses in *subnet*."""
        self.lans[name] = ipaddress.IPv4Network(subnet)
        _ip("-n", self.switch, "link", "add", f"br-{name}"[:15], "type", "bridge")
        _ip("-n", self.switch, "link", "set", f"br-{name}"[:15], "up")

    def add_host(self, name: str, lans: dict[str, int]) -> Host:
        """A host on each LAN of *lans* (LAN name to the host number of its address)."""
        namespace = f"{self.tag}-{name}"
        _ip("netns", "add", namespace)
        host = Host(name, namespace)
        self.hosts[name] = host
        _ip("-n", namespace, "link", "set", "lo", "up")
        for index, (lan, number) in enumerate(lans.items()):
            subnet = self.lans[lan]
            self._ports += 1
            port = f"p{self._ports}"
            device = f"eth{index}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth",
                "peer", "name", device, "netns", namespace)
            _ip("-n", self.switch, "link", "set", port, "master", f"br-{lan}"[:15], "up")
            address = str(subnet.network_address + number)
            _ip("-n", namespace, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", device)
            _ip("-n", namespace, "link", "set", device, "up")
            host.addresses[lan] = address
        return host

    def close(self) -> None:
        """End every process in the hosts (TERM, then KILL after 5 s), delete them all."""
        namespaces = [host.namespace for host in self.hosts.values()] + [self.switch]
        for host in self.hosts.values():
            host.close()
        _end(pid for host in self.hosts.values() for pid in host.pids())
        for namespace in namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        self.hosts.clear()


def _end(pids: Iterable[int], grace: float = 5.0) -> None:
    waiting = set(pids)
    for pid in waiting:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while waiting and time.monotonic() < deadline:
        waiting = {pid for pid in waiting if _running(pid)}
        time.sleep(0.05)
    for pid in waiting:
        _signal(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether *pid* still runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    return True


def _signal(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, number)

