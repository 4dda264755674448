"""The values the ``xml``, ``enable``, ``disable`` and ``libvirt-hook`` commands show in
their ``--help`` (choices and defaults), in a module that imports nothing.

Every ``console-broker --help`` builds those commands' parsers, on a client-only install
too, where lxml and libvirt are missing: :mod:`broker.xml.cli` takes these from here and
imports the editor when a command runs. The modules that use them import them from here.
"""

from __future__ import annotations

#: The ways a graphical console can be reached.
#:
#: ``fd``: no listening socket at all (``<listen type='none'/>``); the broker
#: asks libvirt for a connected socket (virDomainOpenGraphicsFD).
#: ``tcp``: QEMU listens on an automatically chosen TCP port.
#: ``websocket``: QEMU also serves its own WebSocket port (VNC only).
MODES = ("fd", "tcp", "websocket")
DEFAULT_MODE = "fd"
#: Where ``tcp`` and ``websocket`` listen unless told otherwise.
DEFAULT_LISTEN = "127.0.0.1"

#: The name that means standard input.
STDIN = "-"

#: Where the libvirt hook reads the host's policy (``--policy`` overrides it).
POLICY_PATH = "/etc/console-broker/hook.toml"

#: The libvirt connection used unless ``--connect`` says otherwise.
DEFAULT_URI = "qemu:///system"
