"""Client certificates: only the holder of one (a front door) reaches the broker.

Theory of operation. With ``tls.client_ca`` set, the broker's server context asks every
connection for a certificate (``CERT_REQUIRED``) and trusts only that CA to sign it, so
OpenSSL fails the handshake of a client that shows none or one from another CA.
``tls.client_subjects`` narrows it to given subjects: :meth:`ClientCertificates.check`
runs right after the handshake, before a byte of the request is read, and the listener
answers 403 and closes.

Both listeners do the handshake where its failure is seen, with the peer's address at
hand. The CONNECT listener wraps its socket in anyio's TLSStream before it reads the
CONNECT head (outer TLS; a tunnel's own TLS runs inside it). asyncio's TLS server
transport fails a handshake silently (no protocol callback, nothing logged outside
debug mode), so with client certificates the WebSocket listener accepts plain TCP and
:class:`~broker.service._connection.BrokerConnection` starts TLS itself
(``loop.start_tls``, with :class:`ClientTLS`).

A refusal is counted in ``connections_refused_total{listener, reason="client_certificate"}``
and logged as ``tls.client_refused`` (``listener``, ``peer``, ``reason``: ``no
certificate``, ``unknown CA``, ``certificate not valid (...)``, ``subject not accepted:
SUBJECT``), at most one line a second per listener, each line with the number of
refusals not logged since the previous one (``suppressed``). Other handshake failures
(no TLS at all, the client not trusting the broker, a timeout) are logged at debug level
only (``tls.handshake_failed``), as they were before client certificates.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable

import attrs
import structlog
from cryptography import x509

from broker.config import Config, rfc4514_name
from broker.service._metrics import Metrics
from broker.service._tls import tls_error

_log = structlog.get_logger("broker.service")

#: The ``connections_refused_total`` reason of every refusal here.
REASON = "client_certificate"
#: At most one ``tls.client_refused`` line this often per listener (seconds).
LOG_INTERVAL = 1.0
#: What a certificate with a subject not accepted is answered (403).
NOT_ACCEPTED = "client certificate not accepted"
#: X.509 verify errors that mean "not signed by the CA trusted" (OpenSSL's
#: X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT, DEPTH_ZERO_SELF_SIGNED_CERT,
#: SELF_SIGNED_CERT_IN_CHAIN, UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
#: UNABLE_TO_VERIFY_LEAF_SIGNATURE).
_UNKNOWN_CA_CODES = frozenset({2, 18, 19, 20, 21})


def _clean(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


class ClientCertificates:
    """Which client certificates the broker accepts, and its refusals' logs and metrics
    (see the module's notes)."""

    def __init__(self, subjects: Iterable[x509.Name], metrics: Metrics) -> None:
        #: The subjects accepted (empty: any the CA signed).
        self.subjects = frozenset(subjects)
        self._metrics = metrics
        #: Per listener: when its last line was logged, and the refusals since.
        self._logged_at: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics) -> ClientCertificates:
        """The subjects ``tls.client_subjects`` accepts."""
        return cls((rfc4514_name(text) for text in config.tls.client_subjects), metrics)

    def check(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
        """Why the certificate the peer of a finished handshake showed is not accepted, or
        None when it is."""
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return "no certificate"
        if not self.subjects:
            return None
        try:
            subject = x509.load_der_x509_certificate(der).subject
        except ValueError:  # OpenSSL took it, cryptography cannot read it
            return "certificate not readable"
        if subject in self.subjects:
            return None
        return f"subject not accepted: {_clean(subject.rfc4514_string())}"

    def handshake_failed(self, exc: BaseException, listener: str, peer: str) -> None:
        """A TLS handshake on *listener* failed with *exc*: a refusal when it is about the
        client's certificate, else a debug line."""
        reason = _certificate_problem(exc)
        if reason is not None:
            self.refused(listener, peer, reason)
            return
        if isinstance(exc, ssl.SSLError):
            detail = tls_error(exc)
        elif isinstance(exc, TimeoutError):
            detail = "timed out"
        elif isinstance(exc, OSError):
            detail = exc.strerror or str(exc) or type(exc).__name__
        else:
            detail = "the client left"
        _log.debug("tls.handshake_failed", listener=listener, peer=peer, detail=detail)

    def refused(self, listener: str, peer: str, reason: str) -> None:
        """Count a refusal of *peer*'s certificate on *listener*; log it unless a line
        for *listener* was logged less than :data:`LOG_INTERVAL` ago."""
        self._metrics.connections_refused.labels(listener, REASON).inc()
        now = time.monotonic()
        if now - self._logged_at.get(listener, -LOG_INTERVAL) < LOG_INTERVAL:
            self._suppressed[listener] = self._suppressed.get(listener, 0) + 1
            return
        _log.warning("tls.client_refused", listener=listener, peer=peer, reason=reason,
                     suppressed=self._suppressed.pop(listener, 0))
        self._logged_at[listener] = now


def _certificate_problem(exc: BaseException) -> str | None:
    """What a failed handshake says about the client's certificate, or None when it
    failed for another reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _UNKNOWN_CA_CODES:
            return "unknown CA"
        return f"certificate not valid ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no certificate"
    return None


@attrs.frozen
class ClientTLS:
    """How a listener that requires client certificates does its TLS handshakes."""

    #: The broker's certificate, ``CERT_REQUIRED``, ``tls.client_ca`` (not the tunnels'
    #: own TLS: remote-viewer shows no certificate).
    context: ssl.SSLContext = attrs.field(eq=False, repr=False)
    certificates: ClientCertificates = attrs.field(eq=False)
    #: ``limits.handshake_timeout``: the TLS handshake's own.
    handshake_timeout: float
    #: Time the TLS shutdown gets when the connection closes.
    shutdown_timeout: float
