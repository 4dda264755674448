"""virt-viewer connection files (``.vv``) for remote-viewer through the CONNECT listener.

remote-viewer reads a ``[virt-viewer]`` section: ``type=spice``, ``host`` and ``port``
(or ``tls-port``) of the SPICE server, and ``proxy``, an HTTP proxy it sends one
``CONNECT host:port`` to per channel. The broker is that proxy (``listen.connect_port``;
behind a front door, the front's port for it: ``broker.public_connect_url``), and
``host`` is the token's session handle (:func:`broker.api.handle_for_token`): no VM
address appears in the file, and the file is as secret as the token
(``delete-this-file=1`` asks remote-viewer to remove it once read).

The port tells the broker what the tunnel carries. A broker with TLS (``[tls]``) gets
``tls-port`` (:data:`~broker.api.TLS_PORT`) and no ``port``, with
``secure-channels=all``: every channel is TLS inside its tunnel, answered with the
broker's certificate; ``ca`` carries ``tls.ca`` (PEM, its lines joined with ``\\n``) and
``host-subject`` the certificate's subject, which the client verifies instead of the
host name (the host field is a session handle, not the broker's name). A broker
without TLS gets ``port`` (:data:`~broker.api.PLAIN_PORT`): plain SPICE,
for a listener on loopback or a trusted network.
"""

from __future__ import annotations

from pathlib import Path

from broker.api import PLAIN_PORT, TLS_PORT, ClientFile, Config, PluginError, handle_for_token

CONTENT_TYPE = "application/x-virt-viewer"


def proxy_url(config: Config) -> str | None:
    """The HTTP proxy the file names (:attr:`Config.connect_proxy_url
    <broker.api.Config.connect_proxy_url>`: ``broker.public_connect_url``, else the
    CONNECT listener's address), or None when the broker has no CONNECT listener."""
    return config.connect_proxy_url


def _clean(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable() and ch not in "\r\n")[:200]


def host_subject(cert_file: str) -> str:
    """The subject of the first certificate in *cert_file* as spice-gtk's
    ``host-subject`` wants it: ``KEY=value`` pairs in the certificate's own order,
    joined with ``,`` (a ``,`` or ``\\`` in a value escaped with ``\\``). spice-gtk
    compares it with the certificate's subject, order included (spice-common,
    ``ssl_verify.c``)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    parts = []
    for rdn in cert.subject.rdns:
        for attribute in rdn:
            value = attribute.value
            text = value if isinstance(value, str) else value.decode("utf-8", "replace")
            text = text.replace("\\", "\\\\").replace(",", "\\,")
            parts.append(f"{attribute.rfc4514_attribute_name}={text}")
    return ",".join(parts)


def _ca_line(ca_file: str) -> str:
    """``tls.ca`` as one key-file value: its PEM lines joined with ``\\n`` escapes."""
    text = Path(ca_file).read_text(encoding="ascii").strip()
    return "\\n".join(line.strip() for line in text.splitlines()) + "\\n"


def vv_file(token: str, title: str, config: Config) -> ClientFile | None:
    """The ``.vv`` file for *token*, or None when the broker has no CONNECT listener."""
    proxy = proxy_url(config)
    if proxy is None:
        return None
    lines = [
        "[virt-viewer]",
        "type=spice",
        f"host={handle_for_token(token)}",
    ]
    if config.tls_enabled:
        lines += [f"tls-port={TLS_PORT}", "secure-channels=all"]
        try:
            if config.tls.ca:
                lines.append(f"ca={_ca_line(config.tls.ca)}")
            lines.append(f"host-subject={host_subject(config.tls.cert)}")
        except (OSError, ValueError) as exc:
            raise PluginError(
                f"tls.cert, tls.ca: cannot read the broker's certificate for a .vv file: {exc}"
            ) from None
    else:
        lines.append(f"port={PLAIN_PORT}")
    lines += [
        f"proxy={proxy}",
        f"title={_clean(title)} (%d)",
        "delete-this-file=1",
        "fullscreen=0",
        "release-cursor=shift+f12",
        "secure-attention=ctrl+alt+end",
        "toggle-fullscreen=shift+f11",
        "",
    ]
    return ClientFile(name="vv", body="\n".join(lines), content_type=CONTENT_TYPE,
                      suffix=".vv")
