"""console-broker: VNC, SPICE and serial consoles of libvirt/QEMU VMs, brokered safely.

The public API for plugin authors is :data:`hookimpl` (decorate your hook
implementations with it) and the value types in :mod:`broker.hookspecs`.
"""

from importlib.metadata import PackageNotFoundError, version

from broker.hookspecs import PROJECT_NAME, Protocol, hookimpl

try:
    __version__ = version("console-broker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["PROJECT_NAME", "Protocol", "__version__", "hookimpl"]
