"""TLS from the broker to a console: the client contexts, and consoles with a TLS port.

Two ways a console asks for TLS. QEMU's VNC server starts TLS inside RFB (VeNCrypt):
the VNC plugin wraps its endpoint itself, at the point the protocol says. QEMU's SPICE
server listens for TLS on a port of its own (the live graphics element's ``tlsPort``):
a plugin whose ``console_broker_console_tls`` hook returns a :class:`ConsoleTLS` has
the core connect to that port and complete the handshake before the session handler
runs (endpoint kind ``tls``).

Either way the broker verifies the console's certificate against the operator's CA:
its name as well where a network lies between the two (``server_name``, else the
address connected to), only the chain on a socket libvirt handed over.
"""

from __future__ import annotations

import ssl

import attrs


@attrs.frozen
class ConsoleTLS:
    """How the broker verifies (and shows itself to) a console's TLS server."""

    #: Verifies the certificate chain and the server's name.
    context: ssl.SSLContext = attrs.field(eq=False, repr=False)
    #: Verifies the certificate chain only (a socket with no network behind it).
    chain_only: ssl.SSLContext = attrs.field(eq=False, repr=False)
    #: The name the console's certificate must carry ("": the address connected to).
    server_name: str = ""

    @classmethod
    def from_files(
        cls, ca: str, cert: str = "", key: str = "", server_name: str = ""
    ) -> ConsoleTLS:
        """Contexts trusting the CA in *ca*, showing *cert*/*key* when given (for a
        server that verifies its clients). OSError or ssl.SSLError when a file cannot
        be loaded."""
        contexts = []
        for check_hostname in (True, False):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = check_hostname
            if cert:
                context.load_cert_chain(cert, key or None)
            contexts.append(context)
        return cls(contexts[0], contexts[1], server_name)

    def for_address(self, address: str | None) -> tuple[ssl.SSLContext, str | None]:
        """The context and server name to verify a console reached at *address*
        (None: a socket with no address, such as one from libvirt)."""
        name = self.server_name or address
        return (self.context, name) if name else (self.chain_only, None)


def tls_error(exc: ssl.SSLError) -> str:
    """What went wrong in a TLS handshake, for logs and close reasons."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({exc.verify_message})"
    return str(exc.reason or exc)
