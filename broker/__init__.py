"""console-broker: VNC, SPICE and serial consoles of libvirt/QEMU VMs, brokered safely.

A plugin imports from :mod:`broker.api`, which holds everything a plugin may use;
the rest of the package is the core's. :data:`hookimpl` and :class:`Protocol` are
here too, for plugins written before ``broker.api``.
"""

from importlib.metadata import PackageNotFoundError, version

from broker.hookspecs import PROJECT_NAME, Protocol, hookimpl

try:
    __version__ = version("console-broker")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["PROJECT_NAME", "Protocol", "__version__", "hookimpl"]
