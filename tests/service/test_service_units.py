"""Sans-I/O parts of the service: routes, origins, limits, refusals, plans, log scrubbing."""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
from pathlib import Path

import pytest
import structlog
from lxml import etree

from broker.plugins import PluginManager
from broker.service import _refusals as R
from broker.service._limits import Limits, SessionCounts
from broker.service._logging import configure_logging, scrub
from broker.service._plan import EndpointPlan, plan_endpoint
from broker.service._refusals import Refused, markdown_table
from broker.service._request import (
    FileRoute,
    NotFound,
    OriginPolicy,
    PageRoute,
    PlainRoute,
    RedirectRoute,
    TrustedProxies,
    WebSocketRoute,
    route,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = (
    "eyJhbGciOiJFZERTQSIsImtpZCI6IngiLCJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
)


# --- routes -------------------------------------------------------------------------------


def test_routes() -> None:
    assert route(f"/ws/vnc?token={TOKEN}") == WebSocketRoute("vnc", TOKEN)
    assert route(f"/ws/raw-vnc?x=1&token={TOKEN}") == WebSocketRoute("raw-vnc", TOKEN)
    assert route("/console/vnc/?token=abc") == PageRoute("vnc", "")
    assert route("/console/vnc/js/app.js") == PageRoute("vnc", "js/app.js")
    assert route("/console/vnc?token=abc") == RedirectRoute("vnc/?token=abc")
    assert route("/healthz") == PlainRoute("healthz")
    assert route("/metrics?x") == PlainRoute("metrics")
    assert route(f"/file/spice?token={TOKEN}") == FileRoute("spice", TOKEN)
    for path in (
        "/",
        "/ws/VNC?token=a",
        "/ws/vnc/extra?token=a",
        "/console/vnc/../x",
        "/console/vnc/a/%2e%2e/b",
        "/console/vnc/a\\b",
        "/elsewhere",
    ):
        assert isinstance(route(path), NotFound), path


def test_routes_under_the_public_urls_prefix() -> None:
    assert route(f"/hv1/ws/vnc?token={TOKEN}", "/hv1") == WebSocketRoute("vnc", TOKEN)
    assert route(f"/ws/vnc?token={TOKEN}", "/hv1/") == WebSocketRoute("vnc", TOKEN)
    assert route("/hv1/healthz", "/hv1") == PlainRoute("healthz")
    assert isinstance(route("/hv10/healthz", "/hv1"), NotFound)


@pytest.mark.parametrize(
    ("target", "refusal"),
    [
        ("/ws/vnc", R.INVALID_TOKEN),
        ("/ws/vnc?token=", R.INVALID_TOKEN),
        ("/file/spice", R.INVALID_TOKEN),
        ("/ws/vnc?token=a&token=b", R.BAD_REQUEST),
        ("/ws/vnc?" + "&".join(f"p{i}=1" for i in range(40)), R.BAD_REQUEST),
        ("/ws/vnc?token=" + "a" * 9000, R.BAD_REQUEST),
    ],
)
def test_malformed_websocket_requests(target: str, refusal: R.Refusal) -> None:
    with pytest.raises(Refused) as info:
        route(target)
    assert info.value.refusal is refusal
    assert "token=" not in str(info.value) and "aaaa" not in info.value.detail


def test_a_route_never_shows_its_token() -> None:
    assert TOKEN not in repr(route(f"/ws/vnc?token={TOKEN}"))


# --- the client's address behind proxies --------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("10.0.0.5", ["192.0.2.1"], "192.0.2.1"),  # one trusted proxy
        ("10.0.0.5", ["192.0.2.9, 192.0.2.1"], "192.0.2.1"),  # the client's own entry ignored
        ("10.0.0.5", ["192.0.2.1, 10.0.0.7"], "192.0.2.1"),  # two trusted proxies
        ("10.0.0.5", ["192.0.2.1", "10.0.0.7"], "192.0.2.1"),  # as two header lines
        ("10.0.0.5", ["not-an-ip, 10.0.0.7"], "10.0.0.7"),  # garbage stops the walk
        ("10.0.0.5", ["10.0.0.6, 10.0.0.7"], "10.0.0.6"),  # all trusted: the farthest
        ("10.0.0.5", [], "10.0.0.5"),  # no header: the proxy itself
        ("::ffff:10.0.0.5", ["2001:db8::1"], "2001:db8::1"),  # an IPv4-mapped peer
        ("192.0.2.50", ["192.0.2.1"], "192.0.2.50"),  # not a trusted peer: header ignored
    ],
)
def test_trusted_proxies_forward_the_nearest_untrusted_address(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert TrustedProxies(["10.0.0.0/24"]).client(peer, forwarded) == client


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert TrustedProxies().client("127.0.0.1", ["192.0.2.1"]) == "127.0.0.1"


# --- origins ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "ok"),
    [
        ("http://127.0.0.1:6080", True),
        ("HTTP://127.0.0.1:6080", True),
        ("https://consoles.example.com", True),
        ("https://consoles.example.com:443", True),
        ("https://consoles.example.com.", True),
        ("http://consoles.example.com", False),  # another scheme
        ("http://127.0.0.1:6081", False),
        ("http://evil.example", False),
        ("http://127.0.0.1.evil.example:6080", False),
        ("null", False),
        ("file://", False),
        ("http://127.0.0.1:6080/path", False),
        ("http://user@127.0.0.1:6080", False),
    ],
)
def test_only_the_allowed_origins_pass(origin: str, ok: bool) -> None:
    policy = OriginPolicy(("http://127.0.0.1:6080", "https://consoles.example.com"))
    assert (policy.check(origin) is None) is ok


def test_an_allowed_origin_must_be_one() -> None:
    with pytest.raises(ValueError, match="not an origin"):
        OriginPolicy(("portal.example.com",))


def test_missing_origin_only_where_allowed() -> None:
    assert OriginPolicy().check(None) is not None
    assert OriginPolicy(allow_missing=True).check(None) is None
    assert OriginPolicy(allow_missing=True).check("http://evil") is not None


# --- limits -------------------------------------------------------------------------------


def test_limits() -> None:
    counts = SessionCounts(Limits(total=3, per_domain=2, per_client=2))
    counts.acquire("d1", "c1")
    counts.acquire("d1", "c2")
    with pytest.raises(Refused, match=r"limits\.max_sessions_per_domain") as info:
        counts.check("d1", "c3")
    assert info.value.refusal is R.LIMIT_REACHED
    counts.acquire("d2", "c1")
    with pytest.raises(Refused, match=r"limits\.max_sessions\)"):
        counts.acquire("d3", "c3")
    counts.release("d1", "c2")
    with pytest.raises(Refused, match=r"limits\.max_sessions_per_client"):
        counts.check("d3", "c1")
    counts.acquire("d3", "c2")
    assert (counts.total, counts.domain("d1"), counts.client("c1")) == (3, 1, 2)
    for domain, client in (("d1", "c1"), ("d2", "c1"), ("d3", "c2")):
        counts.release(domain, client)
    assert (counts.total, counts.domain("d1"), counts.client("c1")) == (0, 0, 0)
    with pytest.raises(RuntimeError):
        counts.release("d1", "c1")


# --- refusals -----------------------------------------------------------------------------


def test_every_refusal_has_its_own_close_code_and_status() -> None:
    codes = [r.close_code for r in R.REFUSALS]
    assert len(set(codes)) == len(codes)
    assert all(4000 <= code <= 4999 for code in codes)
    assert all(400 <= r.status <= 599 for r in R.REFUSALS)
    endings = [r.close_code for r in R.ENDINGS if r.close_code >= 4000]
    assert len(set(endings)) == len(endings) and not set(endings) & set(codes)
    reasons = [r.reason for r in (*R.REFUSALS, *R.ENDINGS)]
    assert len(set(reasons)) == len(reasons)


def test_every_token_refusal_maps_to_a_refusal() -> None:
    from broker import tokens

    reasons = {
        cls.reason
        for cls in vars(tokens).values()
        if isinstance(cls, type)
        and issubclass(cls, tokens.TokenRefused)
        and cls is not tokens.TokenRefused
    }
    assert reasons <= set(R.TOKEN_REFUSALS)


def test_service_doc_has_the_refusal_table() -> None:
    """The core's reasons, then the built-in plugins' (console_broker_refusals)."""
    plugins = PluginManager(disabled=(), load_entrypoints=False, plugins=[
        (name, importlib.import_module(f"broker_{name}")) for name in ("vnc", "spice", "serial")
    ])
    table = markdown_table(refusal for _, refusal in plugins.refusals.values())
    text = (DOCS / "service.md").read_text()
    assert table in text, (
        "docs/service.md: paste broker.service._refusals.markdown_table(the plugins' refusals)"
    )


def test_close_reasons_fit_a_close_frame() -> None:
    with pytest.raises(ValueError, match="too long"):
        R.Refusal("x", 400, 4999, "x" * 124)


# --- endpoint plans -----------------------------------------------------------------------

METADATA = """<metadata>
    <cb:consoles xmlns:cb='https://console-broker.dev/xmlns/consoles/1' created='metadata'>
      {records}
    </cb:consoles>
  </metadata>"""


def _live(devices: str, records: str) -> etree._Element:
    return etree.fromstring(
        f"<domain type='qemu' id='4'><name>g</name>{METADATA.format(records=records)}"
        f"<devices>{devices}</devices></domain>"
    )


VNC_RECORD = "<cb:console protocol='vnc' mode='{mode}' device='graphics' device-type='vnc'/>"


def test_fd_mode_uses_the_graphics_index() -> None:
    root = _live(
        "<graphics type='spice' autoport='yes'/>"
        "<graphics type='vnc'><listen type='none'/></graphics>",
        VNC_RECORD.format(mode="fd"),
    )
    assert plan_endpoint(root, "vnc") == EndpointPlan("fd", "vnc", index=1)


@pytest.mark.parametrize(
    ("graphics", "host", "port"),
    [
        (
            "<graphics type='vnc' port='5901' listen='127.0.0.1'>"
            "<listen type='address' address='127.0.0.1'/></graphics>",
            "127.0.0.1",
            5901,
        ),
        (
            "<graphics type='vnc' port='5902' listen='0.0.0.0'>"
            "<listen type='address' address='0.0.0.0'/></graphics>",
            "127.0.0.1",
            5902,
        ),
        (
            "<graphics type='vnc' port='5903'><listen type='address' address='::'/></graphics>",
            "::1",
            5903,
        ),
        ("<graphics type='vnc' port='5904' listen='192.0.2.7'/>", "192.0.2.7", 5904),
    ],
)
def test_tcp_mode_uses_the_live_port(graphics: str, host: str, port: int) -> None:
    plan = plan_endpoint(_live(graphics, VNC_RECORD.format(mode="tcp")), "vnc")
    assert (plan.kind, plan.host, plan.port) == ("tcp", host, port)


def test_tcp_mode_on_a_unix_socket() -> None:
    graphics = "<graphics type='vnc'><listen type='socket' socket='/run/vnc.sock'/></graphics>"
    assert plan_endpoint(_live(graphics, VNC_RECORD.format(mode="tcp")), "vnc") == EndpointPlan(
        "unix", "vnc", path="/run/vnc.sock"
    )


def test_websocket_mode_uses_qemus_websocket_port() -> None:
    graphics = "<graphics type='vnc' port='5900' websocket='5700' listen='127.0.0.1'/>"
    plan = plan_endpoint(_live(graphics, VNC_RECORD.format(mode="websocket")), "vnc")
    assert (plan.kind, plan.host, plan.port) == ("websocket", "127.0.0.1", 5700)


SPICE_RECORD = (
    "<cb:console protocol='spice' mode='tcp' device='graphics' device-type='spice'/>"
)


@pytest.mark.parametrize(
    ("ports", "tls", "expected"),
    [
        ("port='5900' tlsPort='5901'", True, ("tls", 5901)),  # TLS configured: its port
        ("port='5900' tlsPort='5901'", False, ("tcp", 5900)),  # not configured: the plain one
        ("port='-1' tlsPort='5901'", True, ("tls", 5901)),  # defaultMode='secure'
        ("port='5900'", True, ("tcp", 5900)),  # no TLS port: plain, TLS configured or not
    ],
)
def test_a_tls_port_is_used_where_tls_is_configured(
    ports: str, tls: bool, expected: tuple[str, int]
) -> None:
    graphics = (
        f"<graphics type='spice' {ports} autoport='yes' listen='0.0.0.0'>"
        "<listen type='address' address='0.0.0.0'/></graphics>"
    )
    plan = plan_endpoint(_live(graphics, SPICE_RECORD), "spice", tls=tls)
    assert (plan.kind, plan.port, plan.host) == (*expected, "127.0.0.1")
    assert plan.describe() == f"{expected[0]} 127.0.0.1:{expected[1]}"


def test_a_console_listening_for_tls_only_needs_tls_configured() -> None:
    graphics = "<graphics type='spice' port='-1' tlsPort='5901' listen='127.0.0.1'/>"
    with pytest.raises(Refused, match=r"listens for TLS only \(tlsPort 5901\).*spice.tls_ca"):
        plan_endpoint(_live(graphics, SPICE_RECORD), "spice")


def test_serial_uses_the_devices_alias() -> None:
    devices = (
        "<serial type='file'><alias name='serial0'/></serial>"
        "<serial type='pty'><target port='1'/><alias name='serial1'/></serial>"
    )
    record = "<cb:console protocol='serial' mode='stream' device='serial' device-type='pty'/>"
    assert plan_endpoint(_live(devices, record), "serial") == EndpointPlan(
        "stream", "serial", device="serial1"
    )


@pytest.mark.parametrize(
    ("devices", "records", "refusal", "message"),
    [
        ("<graphics type='vnc'/>", "", R.CONSOLE_NOT_ENABLED, "no vnc console enabled"),
        ("", VNC_RECORD.format(mode="fd"), R.CONSOLE_NOT_ENABLED, "device is missing"),
        (
            "<graphics type='vnc'/>",
            VNC_RECORD.format(mode="carrier-pigeon"),
            R.CONSOLE_NOT_ENABLED,
            "not supported",
        ),
        (
            "<graphics type='vnc' autoport='yes' port='-1'/>",
            VNC_RECORD.format(mode="tcp"),
            R.CONSOLE_UNREACHABLE,
            "no port",
        ),
        (
            "<graphics type='vnc' port='5900'/>",
            VNC_RECORD.format(mode="websocket"),
            R.CONSOLE_UNREACHABLE,
            "no WebSocket port",
        ),
        ("<graphics type='vnc'/>", "<cb:console/>", R.CONSOLE_NOT_ENABLED, "malformed"),
    ],
)
def test_plans_that_cannot_be(devices: str, records: str, refusal: R.Refusal, message: str) -> None:
    with pytest.raises(Refused, match=message) as info:
        plan_endpoint(_live(devices, records), "vnc")
    assert info.value.refusal is refusal


# --- logs ---------------------------------------------------------------------------------


def test_scrub_removes_anything_token_shaped() -> None:
    assert scrub(f"GET /ws/vnc?token={TOKEN} HTTP/1.1") == "GET /ws/vnc?token=[redacted] HTTP/1.1"
    assert TOKEN not in scrub(f"a {TOKEN} b")
    assert scrub("plain text, eyJ alone") == "plain text, eyJ alone"
    assert scrub("/ws/vnc?TOKEN=abc&x=1") == "/ws/vnc?TOKEN=[redacted]&x=1"


def test_configured_logging_is_json_and_scrubbed() -> None:
    out = io.StringIO()
    try:
        configure_logging("json", "debug", stream=out)
        structlog.get_logger("broker.test").info("session.opened", url=f"/ws/vnc?token={TOKEN}")
        logging.getLogger("websockets.server").warning("< GET /ws/vnc?token=%s HTTP/1.1", TOKEN)
        logging.getLogger("websockets.server").debug("< GET /ws/vnc?token=%s", TOKEN)  # silenced
        logging.getLogger("other").info("raw %s", TOKEN)
    finally:
        structlog.reset_defaults()
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["event"] == "session.opened"
    assert len(lines) == 3
    assert TOKEN not in out.getvalue() and not re.search(r"eyJ\w+\.", out.getvalue())
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "broker.test"
