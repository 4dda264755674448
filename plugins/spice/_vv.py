"""virt-viewer connection files (``.vv``) for remote-viewer through the CONNECT listener.

remote-viewer reads a ``[virt-viewer]`` section: ``type=spice``, ``host`` and ``port``
of the SPICE server, and ``proxy``, an HTTP proxy it sends one ``CONNECT host:port`` to
per channel. The broker is that proxy (``listen.connect_port``), and ``host`` is the
token's session handle (:func:`broker.service._connect.handle_for_token`): no VM address
appears in the file, and the file is as secret as the token (``delete-this-file=1``
asks remote-viewer to remove it once read). ``port`` is a placeholder the broker
ignores. The broker does no TLS on the CONNECT listener, so the file has no ``ca``,
``host-subject`` or ``tls-port``: the tunnel is plain SPICE, for a listener on loopback
or behind a TLS-terminating proxy.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from broker.config import Config
from broker.hookspecs import ClientFile
from broker.service._connect import handle_for_token

#: What the ``port`` field holds: any port; the broker ignores it.
PLACEHOLDER_PORT = 5900
CONTENT_TYPE = "application/x-virt-viewer"


def proxy_url(config: Config) -> str | None:
    """``http://host:port`` of the broker's CONNECT listener, or None when it has none."""
    port = config.listen.connect_port
    if not port:
        return None
    host = config.listen.connect_host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - naming the wildcard, not binding it
        host = urlsplit(config.public_url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _clean(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable() and ch not in "\r\n")[:200]


def vv_file(token: str, title: str, config: Config) -> ClientFile | None:
    """The ``.vv`` file for *token*, or None when the broker has no CONNECT listener."""
    proxy = proxy_url(config)
    if proxy is None:
        return None
    lines = [
        "[virt-viewer]",
        "type=spice",
        f"host={handle_for_token(token)}",
        f"port={PLACEHOLDER_PORT}",
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
