"""Sans-I/O: from a domain's live XML to how its console is reached.

``console-broker xml enable`` records, in the domain's ``<metadata>``, which
console is enabled in which mode and which device it uses (read with
:func:`broker.xml.read_consoles`). The live XML (``virDomainGetXMLDesc`` of a
running domain) adds what only exists at run time: the TCP port QEMU chose,
its WebSocket port, the serial port's alias. :func:`plan_endpoint` combines
the two into an :class:`EndpointPlan`; the resolver then opens it.

Modes recorded, and what they become:

``fd``        ``openGraphicsFD(index)`` where *index* is the graphics
              element's position among the domain's ``<graphics>``
``tcp``       a TCP connection to the live ``port`` on the listen address
              (a wildcard address is reached on loopback); a graphics
              element listening on a UNIX socket is reached there
``websocket`` QEMU's own WebSocket port (the live ``websocket`` attribute)
``tls``       tcp mode where the graphics listens for TLS on a port of its own
              (SPICE's live ``tlsPort``) and the protocol's plugin configured
              TLS to it (the protocol's ``console_tls``): a TCP connection to
              that port, then the TLS handshake. With TLS configured the broker
              prefers that port; without, it uses the plain ``port``, and a
              graphics with a TLS port only is refused with what to set
``stream``    ``openConsole(alias)``: a libvirt stream on the serial device;
              a token's ``dev`` claim may choose another of the domain's
              console devices (:func:`console_device`)
"""

from __future__ import annotations

import attrs
from lxml import etree

from broker.service._refusals import CONSOLE_NOT_ENABLED, CONSOLE_UNREACHABLE, Refused

#: The ways an endpoint is opened.
KINDS = ("fd", "tcp", "tls", "unix", "websocket", "stream")

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


@attrs.frozen
class EndpointPlan:
    """How to open one console of a running domain."""

    #: One of :data:`KINDS`.
    kind: str
    #: The console (the protocol name its metadata record carries).
    console: str
    #: ``fd``: the graphics index for virDomainOpenGraphicsFD.
    index: int | None = None
    #: ``tcp``/``tls``/``websocket``: where to connect.
    host: str | None = None
    port: int | None = None
    #: ``unix``: the socket path.
    path: str | None = None
    #: ``stream``: the device alias for virDomainOpenConsole (None: the first console).
    device: str | None = None

    def describe(self) -> str:
        """For the log: where the endpoint is, without secrets."""
        if self.kind == "fd":
            return f"graphics #{self.index} (fd)"
        if self.kind in ("tcp", "tls", "websocket"):
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"{self.kind} {host}:{self.port}"
        if self.kind == "unix":
            return f"unix {self.path}"
        return f"console stream {self.device or '(first console)'}"


def _port(element: etree._Element, name: str) -> int | None:
    value = element.get(name, "")
    if value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return None


def _listen(graphics: etree._Element) -> tuple[str, str]:
    """('address', host) or ('socket', path) or ('none', '') from a live graphics element."""
    for listen in graphics.iterchildren("listen"):
        kind = listen.get("type", "address")
        if kind == "address":
            return "address", listen.get("address", graphics.get("listen", ""))
        if kind == "socket":
            return "socket", listen.get("socket", "")
        if kind == "none":
            return "none", ""
        if kind == "network":
            return "address", listen.get("address", "")
    return "address", graphics.get("listen", "")


def _loopback(host: str) -> str:
    return _WILDCARDS.get(host, host)


def _is_mirror(console: etree._Element) -> bool:
    """A ``<console>`` whose target is a serial port: the same device as that port."""
    target = console.find("target")
    return target is None or target.get("type") in (None, "serial")


def console_device(devices: etree._Element, choice: str) -> str:
    """The alias of the console device *choice* names, for ``openConsole``.

    *choice* is an alias (``serial1``, ``console1``, a user alias ``ua-...``)
    or an index: the domain's ``<serial>`` ports in order, then its
    ``<console>`` elements that are not a serial port's mirror (virtio
    consoles), counted from 0. The device must be a ``pty``. Raises
    :class:`Refused` (``console_not_enabled``) otherwise.
    """
    candidates = [
        *devices.iterchildren("serial"),
        *(c for c in devices.iterchildren("console") if not _is_mirror(c)),
    ]

    def alias(element: etree._Element) -> str | None:
        found = element.find("alias")
        return found.get("name") if found is not None else None

    if choice.isdigit():
        index = int(choice)
        element = candidates[index] if index < len(candidates) else None
    else:
        element = next((c for c in candidates if alias(c) == choice), None)
    if element is None:
        raise Refused(CONSOLE_NOT_ENABLED, f"the domain has no console device {choice!r}")
    name = alias(element)
    if element.get("type") != "pty" or name is None:
        raise Refused(
            CONSOLE_NOT_ENABLED, f"console device {choice!r} is not a pty libvirt can open"
        )
    return name


def plan_endpoint(
    root: etree._Element, console: str, device: str | None = None, *, tls: bool = False
) -> EndpointPlan:
    """How to reach *console* of the running domain whose live XML is *root*.

    *device* (a token's ``dev`` claim) chooses another console device than
    the one the record names: see :func:`console_device`; only for ``stream``.
    *tls*: the broker has TLS to this console configured, so a TLS port is
    preferred (kind ``tls``).

    Raises :class:`Refused`: ``console_not_enabled`` when the metadata records
    no such console (or names a device the domain does not have, or a mode
    this broker does not know, or *device* is not one of its console
    devices), ``console_unreachable`` when the live XML lacks what the mode
    needs (no port assigned).
    """
    from broker.xml import XmlError, read_consoles

    try:
        records = read_consoles(root)
    except XmlError as exc:
        raise Refused(
            CONSOLE_NOT_ENABLED, f"the console-broker metadata is malformed: {exc}"
        ) from None
    record = records.get(console)
    if record is None:
        enabled = ", ".join(sorted(records)) or "none"
        raise Refused(
            CONSOLE_NOT_ENABLED,
            f"the domain has no {console} console enabled (enabled: {enabled}); "
            f"run 'console-broker xml enable --consoles {console}'",
        )
    if record.device is None or record.index is None:
        raise Refused(
            CONSOLE_NOT_ENABLED, f"the {console} console's device is missing from the domain"
        )
    devices = root.find("devices")
    assert devices is not None  # read_consoles found the device in it
    element = list(devices.iterchildren(record.device.tag))[record.index]
    mode = record.mode
    if mode == "stream":
        if device is not None:
            return EndpointPlan("stream", console, device=console_device(devices, device))
        alias = element.find("alias")
        return EndpointPlan(
            "stream", console, device=alias.get("name") if alias is not None else None
        )
    if device is not None:
        raise Refused(
            CONSOLE_NOT_ENABLED, f"the {console} console has no devices to choose from"
        )
    if record.device.tag != "graphics":
        raise Refused(
            CONSOLE_NOT_ENABLED,
            f"mode {mode!r} needs a graphics device, not <{record.device.tag}>",
        )
    graphics_index = list(devices.iterchildren("graphics")).index(element)
    if mode == "fd":
        return EndpointPlan("fd", console, index=graphics_index)
    if mode not in ("tcp", "websocket"):
        raise Refused(
            CONSOLE_NOT_ENABLED, f"the {console} console's mode {mode!r} is not supported"
        )
    listen_kind, where = _listen(element)
    if mode == "tcp" and listen_kind == "socket" and where:
        return EndpointPlan("unix", console, path=where)
    if listen_kind != "address":
        raise Refused(CONSOLE_UNREACHABLE, f"the {console} graphics listens on no address")
    if mode == "websocket":
        port = _port(element, "websocket")
        if port is None:
            raise Refused(
                CONSOLE_UNREACHABLE, f"the live XML gives the {console} graphics no WebSocket port"
            )
        return EndpointPlan(mode, console, host=_loopback(where), port=port)
    port, tls_port = _port(element, "port"), _port(element, "tlsPort")
    if tls_port is not None and (tls or port is None):
        if not tls:
            raise Refused(
                CONSOLE_UNREACHABLE,
                f"the {console} graphics listens for TLS only (tlsPort {tls_port}) and the "
                f"broker has no TLS to it configured (set {console}.tls_ca to the CA of "
                "QEMU's certificates)",
            )
        return EndpointPlan("tls", console, host=_loopback(where), port=tls_port)
    if port is None:
        raise Refused(CONSOLE_UNREACHABLE, f"the live XML gives the {console} graphics no port")
    return EndpointPlan(mode, console, host=_loopback(where), port=port)
