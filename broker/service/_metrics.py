"""The broker's Prometheus metrics, in a registry of its own (several brokers per process work).

Names (all prefixed ``console_broker_``):

``sessions_active{protocol}``               gauge: open sessions
``sessions_total{protocol}``                counter: sessions opened
``bytes_total{protocol,direction}``         counter: bytes proxied, ``to_client`` / ``to_console``
``refusals_total{reason}``                  counter: requests refused, by reason
``sessions_closed_total{protocol,reason}``  counter: sessions closed, by why they ended
``handshake_seconds{protocol}``             histogram: request received to console connected
``libvirt_connected``                       gauge: 1 while the hypervisor is reachable
``connections_pending{listener}``           gauge: connections not yet past their request
``connections_refused_total{listener,reason}`` counter: connections closed before their
                                            request: ``pending_limit``, ``client_pending_limit``,
                                            ``request_head_too_large``, ``malformed_request``,
                                            ``out_of_descriptors``, ``client_certificate``
                                            (``tls.client_ca``: none, another CA's, a subject
                                            not accepted), ``proxy_protocol`` (the CONNECT
                                            listener: no valid PROXY header from a trusted
                                            relay, or one not expected)
``accept_errors_total{listener,error}``     counter: failed accepts (``EMFILE``, ``ENFILE``, ...)
``handoffs_total{protocol}``                counter: handoff handles issued
``screenshots_total{result}``               counter: ``GET /screenshot`` answered: ``ok``, or
                                            the reason it was refused
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: The ``Content-Type`` of :meth:`Metrics.render`.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The metric families of one broker."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge(
            "console_broker_sessions_active", "Open console sessions.", ["protocol"], registry=r
        )
        self.sessions = Counter(
            "console_broker_sessions", "Console sessions opened.", ["protocol"], registry=r
        )
        self.bytes = Counter(
            "console_broker_bytes",
            "Bytes proxied, by direction (to_client, to_console).",
            ["protocol", "direction"],
            registry=r,
        )
        self.refusals = Counter(
            "console_broker_refusals",
            "Console requests refused, by reason.",
            ["reason"],
            registry=r,
        )
        self.sessions_closed = Counter(
            "console_broker_sessions_closed",
            "Console sessions closed, by protocol and reason (client_closed, vm_stopped, ...).",
            ["protocol", "reason"],
            registry=r,
        )
        self.handshake = Histogram(
            "console_broker_handshake_seconds",
            "Time from the request to a connected console.",
            ["protocol"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.libvirt_connected = Gauge(
            "console_broker_libvirt_connected", "1 while the hypervisor is reachable.", registry=r
        )

        self.connections_pending = Gauge(
            "console_broker_connections_pending",
            "Connections not yet past their request (no token checked yet), by listener.",
            ["listener"],
            registry=r,
        )
        self.connections_refused = Counter(
            "console_broker_connections_refused",
            "Connections closed before their request was read, by listener and reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "console_broker_accept_errors",
            "Connections the listeners failed to accept, by listener and error (EMFILE, ...).",
            ["listener", "error"],
            registry=r,
        )
        self.handoffs = Counter(
            "console_broker_handoffs",
            "Handoff handles issued (POST /handoff/{protocol}), by protocol.",
            ["protocol"],
            registry=r,
        )
        self.screenshots = Counter(
            "console_broker_screenshots",
            "GET /screenshot requests answered, by result (ok, or the refusal's reason).",
            ["result"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
