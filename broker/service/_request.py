"""Sans-I/O request checks: which endpoint a request target names, and whether its Origin may.

Nothing here touches a socket; the listener (``broker.service._app``) feeds it
the request line's target and headers and acts on the result.

Routes (see docs/service.md)::

    /ws/{protocol}?token=T       the WebSocket endpoint of a console
    /ws/{protocol}/control?token=T   a live session's control channel (its presence
                                 and input, for protocols with ``presence``)
    /console/{protocol}/{path}   the console page ("" is the page itself) and its assets
    /file/{protocol}?token=T     a native client's connection file (a .vv for SPICE)
    /handoff/{protocol}          POST, the token in ``Authorization: Bearer``: a handoff
                                 handle for the live session the token opened
    /screenshot?token=T          GET: the token's domain's screen as PNG (``max_width=N``)
    /recording?token=T           a recording token's recording: its index (JSON), or with
                                 ``part=N`` that part's file
    /operator/{path}             the operator page ("" is the page itself) and its files
    /operator/ws?token=T         the operator page's session (an operator token)
    /healthz                     liveness and libvirt reachability (JSON)
    /metrics                     Prometheus text format

When ``broker.public_url`` has a path (a reverse proxy serving the broker
under a prefix), requests may arrive with or without that prefix. A WebSocket
endpoint and the screenshot endpoint answer GET only (a HEAD would use a token up for
nothing), the handoff endpoint POST only, the others GET and HEAD (:class:`NotAllowed`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

from broker.handoff import HANDLE
from broker.screenshots import width_bound
from broker.service._refusals import BAD_REQUEST, INVALID_TOKEN, Refused

_PROTOCOL = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
#: A JWS part's beginning (``{"`` in base64url), as in a token put where it does not belong.
_JSON_B64 = re.compile(r"eyJ[A-Za-z0-9_-]{8}")
#: Longest path segment or method logged as it is (a token's parts are longer).
MAX_LOGGED_SEGMENT = 40
#: Path segments logged at most.
MAX_LOGGED_SEGMENTS = 32
REDACTED = "[redacted]"
#: Longest request target considered (a token is ~400 characters).
MAX_TARGET = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@attrs.frozen
class WebSocketRoute:
    """``/ws/{protocol}?token=...``; ``repr`` leaves the token out."""

    protocol: str
    token: str = attrs.field(repr=False)


@attrs.frozen
class ControlRoute:
    """``/ws/{protocol}/control?token=...``: the control channel of the live session the
    token opened; ``repr`` leaves the token out."""

    protocol: str
    token: str = attrs.field(repr=False)


@attrs.frozen
class FileRoute:
    """``/file/{protocol}?token=...``: a native client's connection file."""

    protocol: str
    token: str = attrs.field(repr=False)


@attrs.frozen
class HandoffRoute:
    """``POST /handoff/{protocol}``: a handoff handle; the token is in a header."""

    protocol: str


@attrs.frozen
class ScreenshotRoute:
    """``GET /screenshot?token=...[&max_width=N]``: the token's domain's screen as PNG."""

    token: str = attrs.field(repr=False)
    #: ``max_width``: scale down to at most this many pixels wide (None: as it is).
    max_width: int | None = None


@attrs.frozen
class RecordingRoute:
    """``/recording?token=...[&part=N]``: a recording's index, or one of its parts."""

    token: str = attrs.field(repr=False)
    #: The part asked for (1-999); None: the index.
    part: int | None = None


@attrs.frozen
class PageRoute:
    """``/console/{protocol}/{path}``: a page or asset a plugin may serve."""

    protocol: str
    path: str


@attrs.frozen
class RedirectRoute:
    """``/console/{protocol}`` without its slash: where the page really is."""

    location: str


@attrs.frozen
class OperatorPageRoute:
    """``/operator/{path}``: the operator page (*path* ``""``) or one of its files."""

    path: str


@attrs.frozen
class OperatorRoute:
    """``/operator/ws?token=...``: the operator page's session; ``repr`` leaves the
    token out."""

    token: str = attrs.field(repr=False)


@attrs.frozen
class PlainRoute:
    """A built-in endpoint: ``healthz`` or ``metrics``."""

    name: str


@attrs.frozen
class NotFound:
    """Nothing lives at this path."""

    path: str


@attrs.frozen
class NotAllowed:
    """Something lives at this path, but does not answer this method (405)."""

    allow: tuple[str, ...]


Route = (
    WebSocketRoute | FileRoute | HandoffRoute | ScreenshotRoute | RecordingRoute | PageRoute
    | RedirectRoute | PlainRoute | NotFound | NotAllowed
    | ControlRoute | OperatorPageRoute | OperatorRoute
)

#: The methods of a WebSocket endpoint, of the handoff endpoint, of the screenshot
#: endpoint, and of every other one.
WEBSOCKET_METHODS = ("GET",)
HANDOFF_METHODS = ("POST",)
SCREENSHOT_METHODS = ("GET",)
HTTP_METHODS = ("GET", "HEAD")
_METHODS = {"ws": WEBSOCKET_METHODS, "handoff": HANDOFF_METHODS, "screenshot": SCREENSHOT_METHODS}
#: A session's control channel is a WebSocket endpoint too.
_METHODS["control"] = WEBSOCKET_METHODS


def strip_prefix(path: str, prefix: str) -> str:
    """*path* without the public URL's path *prefix* (``/hv1``), if it starts with it."""
    prefix = prefix.rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        return path[len(prefix) :] or "/"
    return path


def route(target: str, prefix: str = "", method: str = "GET") -> Route:
    """The route a request *target* (path and query) names for *method*.

    Raises :class:`Refused` (``bad_request`` or ``invalid_token``) for a target
    that is malformed, or a WebSocket or file target that carries no single token
    (a method the endpoint does not answer is :class:`NotAllowed` before the token
    is looked at). Error details never quote the query (it holds the token).
    """
    if len(target) > MAX_TARGET:
        raise Refused(BAD_REQUEST, "request target too long")
    try:
        parts = urlsplit(target)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        raise Refused(BAD_REQUEST, "malformed request target") from None
    path = strip_prefix(parts.path, prefix)
    if path == "/operator" or path.startswith("/operator/"):
        return _operator_route(path, parts.query, method)
    segments = path.split("/")
    endpoint = _endpoint(path, segments)
    if endpoint is None:
        return NotFound(path)
    allow = _METHODS.get(endpoint, HTTP_METHODS)
    if method not in allow:
        return NotAllowed(allow)
    if endpoint == "plain":
        return PlainRoute(path[1:])
    if endpoint == "screenshot":
        return ScreenshotRoute(_token(parts.query), _max_width(parts.query))
    if endpoint == "recording":
        return RecordingRoute(_token(parts.query), _part(parts.query))
    if endpoint == "ws":
        return WebSocketRoute(segments[2], _token(parts.query))
    if endpoint == "control":
        return ControlRoute(segments[2], _token(parts.query))
    if endpoint == "file":
        return FileRoute(segments[2], _token(parts.query))
    if endpoint == "handoff":
        if "token" in _fields(parts.query):
            raise Refused(BAD_REQUEST, "the token goes in the Authorization header, not the query")
        return HandoffRoute(segments[2])
    if len(segments) == 3:
        query = f"?{parts.query}" if parts.query else ""
        return RedirectRoute(f"{segments[2]}/{query}")
    asset = unquote("/".join(segments[3:]))
    if any(part in ("..", ".") for part in asset.split("/")) or "\\" in asset:
        return NotFound(path)
    return PageRoute(segments[2], asset)


def _operator_route(path: str, query: str, method: str) -> Route:
    """``/operator`` (a redirect), ``/operator/ws`` (a WebSocket, GET only), or a file of
    the page (GET and HEAD)."""
    if path == "/operator":
        return RedirectRoute(f"operator/?{query}" if query else "operator/")
    rest = path[len("/operator/"):]
    allow = WEBSOCKET_METHODS if rest == "ws" else HTTP_METHODS
    if method not in allow:
        return NotAllowed(allow)
    if rest == "ws":
        return OperatorRoute(_token(query))
    return OperatorPageRoute(rest)


def _endpoint(path: str, segments: list[str]) -> str | None:
    """Which kind of endpoint *path* names: ``plain``, ``screenshot``, ``recording``,
    ``ws``, ``file``, ``handoff``, ``console``, or None (nothing lives there)."""
    if path in ("/healthz", "/metrics"):
        return "plain"
    if path == "/screenshot":
        return "screenshot"
    if path == "/recording":
        return "recording"
    if len(segments) < 3 or not _PROTOCOL.match(segments[2]):
        return None
    if segments[1] in ("ws", "file", "handoff") and len(segments) == 3:
        return segments[1]
    if segments[1] == "ws" and len(segments) == 4 and segments[3] == "control":
        return "control"
    return "console" if segments[1] == "console" else None


def _fields(query: str) -> dict[str, list[str]]:
    try:
        return parse_qs(query, keep_blank_values=True, strict_parsing=False, max_num_fields=16)
    except ValueError:
        raise Refused(BAD_REQUEST, "too many query parameters") from None


def _token(query: str) -> str:
    tokens = _fields(query).get("token", [])
    if len(tokens) > 1:
        raise Refused(BAD_REQUEST, "more than one token in the query")
    if not tokens or not tokens[0]:
        raise Refused(INVALID_TOKEN, "no token in the query")
    return tokens[0]


def _max_width(query: str) -> int | None:
    """The screenshot's ``max_width`` (one, within the bounds), or None."""
    values = _fields(query).get("max_width", [])
    if len(values) > 1:
        raise Refused(BAD_REQUEST, "more than one max_width in the query")
    if not values:
        return None
    try:
        return width_bound(values[0])
    except ValueError as exc:
        raise Refused(BAD_REQUEST, str(exc)) from None


def _part(query: str) -> int | None:
    """A recording's ``part`` (one, 1-999), or None."""
    values = _fields(query).get("part", [])
    if len(values) > 1:
        raise Refused(BAD_REQUEST, "more than one part in the query")
    if not values:
        return None
    if not re.fullmatch(r"[0-9]{1,3}", values[0]) or not 1 <= int(values[0]) <= 999:
        raise Refused(BAD_REQUEST, "part must be a number from 1 to 999")
    return int(values[0])


def bearer_token(values: list[str]) -> str:
    """The token of the ``Authorization`` header's *values*: exactly one, ``Bearer
    TOKEN`` (the scheme in any case). Raises :class:`Refused` (``invalid_token`` when
    there is none, ``bad_request`` for two); the details never quote the value."""
    if len(values) > 1:
        raise Refused(BAD_REQUEST, "more than one Authorization header")
    if not values:
        raise Refused(INVALID_TOKEN, "no Authorization header (Bearer TOKEN)")
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Refused(INVALID_TOKEN, "the Authorization header is not 'Bearer TOKEN'")
    return token


# --- what a request log line may hold ----------------------------------------------------


def loggable(text: str) -> str:
    """*text* (a path segment, a method) as a log line may hold it: ``[redacted]`` when it
    is long or holds the start of a JWS part or a handoff handle, as a token put where it
    does not belong would."""
    if len(text) > MAX_LOGGED_SEGMENT or _JSON_B64.search(text) or HANDLE.search(text):
        return REDACTED
    return text


def loggable_path(target: str) -> str:
    """The path of a request *target* for the log: no query or fragment (a token's place),
    each segment :func:`loggable`, at most :data:`MAX_LOGGED_SEGMENTS` of them."""
    path = target.partition("?")[0].partition("#")[0]
    segments = [loggable(segment) for segment in path.split("/")]
    if len(segments) > MAX_LOGGED_SEGMENTS:
        segments = [*segments[:MAX_LOGGED_SEGMENTS], "[...]"]
    return "/".join(segments)


# --- Origin -------------------------------------------------------------------------------


def _host_port(netloc: str, default_port: int | None) -> tuple[str, int | None] | None:
    """(lower-case host, port) of ``host[:port]`` (IPv6 in brackets), or None if malformed."""
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.username is not None or parts.path:
        return None
    return host.lower().rstrip("."), port if port is not None else default_port


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of a serialized origin, default ports filled in; None if malformed."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or parts.path or parts.query or parts.fragment:
        return None
    found = _host_port(parts.netloc, _DEFAULT_PORTS[scheme])
    if found is None or found[1] is None:
        return None
    return scheme, found[0], found[1]


@attrs.frozen
class OriginPolicy:
    """Which pages may open a console's WebSocket.

    *allowed*: serialized origins (``https://ui.example.com``), exactly those whose
    pages may: :attr:`broker.config.Config.allowed_origins`, ``http.allowed_origins`` or
    the ones derived from the configuration. Never the request's own ``Host`` header: a
    page whose name an attacker rebinds to the broker's address sends that name as
    ``Host`` and ``Origin`` alike (DNS rebinding).
    *allow_missing*: accept requests that carry no ``Origin`` at all
    (native clients and scripts; browsers always send one).
    """

    allowed: tuple[str, ...] = ()
    allow_missing: bool = False
    _normalized: frozenset[tuple[str, str, int]] = attrs.field(init=False)

    @_normalized.default
    def _normalize(self) -> frozenset[tuple[str, str, int]]:
        found = set()
        for origin in self.allowed:
            normalized = normalize_origin(origin)
            if normalized is None:
                raise ValueError(f"{origin!r} is not an origin")
            found.add(normalized)
        return frozenset(found)

    def check(self, origin: str | None) -> str | None:
        """None when the request may proceed, else why not (for the log)."""
        if origin is None:
            if self.allow_missing:
                return None
            return "no Origin header (http.allow_missing_origin is off)"
        normalized = normalize_origin(origin)
        if normalized is None:
            return "malformed or opaque Origin"
        return None if normalized in self._normalized else "Origin not allowed"


# --- the client's address -----------------------------------------------------------------


class TrustedProxies:
    """Whose ``X-Forwarded-For`` is believed (``http.trusted_proxies``).

    A request from a trusted proxy counts as coming from the nearest address in its
    ``X-Forwarded-For`` list that is not itself a trusted proxy: the list is read from
    the right (each proxy appends the address it received from), trusted addresses are
    skipped, and the first other one is the client. An entry that is not an IP address
    stops the walk (the last trusted hop is then the client): whatever a client wrote
    into the header itself lies to the left of what the trusted proxies added.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client's address for a request from *peer* with these header values."""
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        client = peer
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break
            client = hop
            if not self.trusts(hop):
                break
        return client
