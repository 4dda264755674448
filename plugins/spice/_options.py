"""The SPICE edit's own options: ``--option spice.tls=yes`` (or ``--spice-tls``) and
``--option spice.usbredir=N`` (or ``--usbredir N``) on ``xml enable`` and ``enable``, and
``spice-tls`` and ``usbredir`` in the libvirt hook's policy. The core offers and checks
them; the edit (broker_spice._xml) reads them with ``options.value(...)``."""

from __future__ import annotations

from broker.api import XMLOption

#: The most USB redirection channels a domain may ask for.
MAX_USBREDIR = 16

#: The SPICE edit's own options (``--option spice.tls=yes`` or ``--spice-tls``; in the
#: libvirt hook's policy ``spice-tls`` and ``usbredir``).
TLS = XMLOption(
    "spice.tls", "make SPICE channels secure by default (defaultMode='secure'); the host "
    "needs spice_tls = 1 and certificates in qemu.conf", False, flag="--spice-tls",
    policy_key="spice-tls",
)
USBREDIR = XMLOption(
    "spice.usbredir", "SPICE USB redirection channels to have at least (0 adds none)", 2,
    flag="--usbredir", minimum=0, maximum=MAX_USBREDIR, policy_key="usbredir",
)
OPTIONS = (TLS, USBREDIR)
