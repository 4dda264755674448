"""Why a request is refused or a session ends: one table, one code per reason.

Every refusal has an HTTP status (sent when the broker refuses before the
WebSocket upgrade) and a WebSocket close code in the private range 4000-4999
(sent when it refuses, or ends a session, after the upgrade), and a short
text that fits a close frame. docs/service.md prints this table; a test keeps
the two in step.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

#: Longest close reason a WebSocket close frame carries (125 bytes less the code).
MAX_CLOSE_REASON = 123


@attrs.frozen
class Refusal:
    """One reason a request is refused or a session ends."""

    #: The name logged (``token.rejected``, ``session.closed``) and used as a metric label.
    reason: str
    #: HTTP status before the upgrade (0: the reason only ends open sessions).
    status: int
    #: WebSocket close code after the upgrade (0: the reason only answers a plain HTTP
    #: request, :data:`HTTP_REFUSALS`).
    close_code: int
    #: What the client is told (HTTP body, close frame reason).
    text: str

    def __attrs_post_init__(self) -> None:
        if len(self.text.encode()) > MAX_CLOSE_REASON:
            raise ValueError(f"close reason of {self.reason!r} is too long")


class Refused(Exception):
    """A request refused for *refusal*; *detail* is for the log and never holds a secret."""

    def __init__(self, refusal: Refusal, detail: str = "") -> None:
        super().__init__(f"{refusal.reason}: {detail}" if detail else refusal.reason)
        self.refusal = refusal
        self.detail = detail or refusal.text


def _r(reason: str, status: int, close_code: int, text: str) -> Refusal:
    return Refusal(reason, status, close_code, text)


# --- refusals: the request does not become a session ------------------------------------

BAD_REQUEST = _r("bad_request", 400, 4000, "malformed console request")
INVALID_TOKEN = _r("invalid_token", 401, 4001, "invalid token")
EXPIRED_TOKEN = _r("expired_token", 401, 4002, "token expired")
TOKEN_NOT_YET_VALID = _r("token_not_yet_valid", 401, 4003, "token not valid yet")
REPLAYED_TOKEN = _r("replayed_token", 401, 4004, "token already used")
WRONG_NODE = _r("wrong_node", 421, 4005, "token is for another node")
WRONG_PROTOCOL = _r("wrong_protocol", 403, 4006, "token is for another protocol")
FOREIGN_ORIGIN = _r("foreign_origin", 403, 4007, "origin not allowed")
UNKNOWN_PROTOCOL = _r("unknown_protocol", 404, 4008, "no plugin serves this protocol")
VIEW_ONLY_UNSUPPORTED = _r(
    "view_only_unsupported", 403, 4009, "view-only sessions are not available for this protocol"
)
UNKNOWN_DOMAIN = _r("unknown_domain", 404, 4010, "unknown domain")
CONSOLE_NOT_ENABLED = _r("console_not_enabled", 404, 4011, "console not enabled on this domain")
VM_NOT_RUNNING = _r("vm_not_running", 409, 4012, "VM not running")
CONSOLE_BUSY = _r("console_busy", 409, 4013, "console busy")
LIMIT_REACHED = _r("limit_reached", 429, 4014, "session limit reached")
HYPERVISOR_UNAVAILABLE = _r("hypervisor_unavailable", 503, 4015, "hypervisor unavailable")
CONSOLE_UNREACHABLE = _r("console_unreachable", 502, 4016, "console unreachable")

# --- endings: an open session closes ------------------------------------------------------

CONSOLE_CLOSED = _r("console_closed", 0, 1000, "console closed")
CLIENT_CLOSED = _r("client_closed", 0, 1000, "client closed")
SHUTDOWN = _r("shutdown", 503, 1001, "broker shutting down")
INTERNAL_ERROR = _r("internal_error", 500, 1011, "internal error")
VM_STOPPED = _r("vm_stopped", 0, 4100, "VM stopped")
DOMAIN_UNDEFINED = _r("domain_undefined", 0, 4101, "domain undefined")
IDLE_TIMEOUT = _r("idle_timeout", 0, 4102, "idle timeout")
HYPERVISOR_LOST = _r("hypervisor_lost", 0, 4103, "hypervisor connection lost")
# A plugin ends a session with one of these by raising Refused from its handler (or with
# a refusal of its own, declared with console_broker_refusals).
CLIENT_PROTOCOL_ERROR = _r(
    "client_protocol_error", 0, 4104, "the client sent a message the broker cannot check"
)
CONSOLE_PROTOCOL_ERROR = _r("console_protocol_error", 0, 4105, "console protocol error")
CONSOLE_AUTH_FAILED = _r(
    "console_auth_failed", 0, 4106, "the broker could not log in to the console"
)
# The client's outgoing buffer stayed full for limits.write_timeout: it stopped reading.
CLIENT_STALLED = _r("client_stalled", 0, 4108, "the client stopped reading")
# An operator ended it (console-broker sessions end): the close frame's reason is this
# text, then the operator's reason when one was given (ended_by_operator()).
ENDED_BY_OPERATOR = _r("ended_by_operator", 0, 4109, "ended by an operator")

# --- answers of GET /screenshot alone: HTTP only, no close code (docs/service.md) -----------

NO_SCREEN = _r("no_screen", 404, 0, "the VM has no screen (no video device)")
SCREENSHOT_BUSY = _r("screenshot_busy", 429, 0, "too many screenshots at once; try again")
SCREENSHOT_FAILED = _r("screenshot_failed", 502, 0, "the hypervisor could not take a screenshot")
SCREENSHOT_TOO_LARGE = _r("screenshot_too_large", 502, 0, "the screen is too large to capture")
SCREENSHOT_TIMEOUT = _r("screenshot_timeout", 504, 0, "the screenshot took too long")
# --- answers of GET /recording alone -------------------------------------------------------

NO_RECORDING = _r("no_recording", 404, 0, "no such recording (never made here, or deleted)")
#: The refusals only an HTTP endpoint answers (never a session's): no close code.
HTTP_REFUSALS: tuple[Refusal, ...] = (
    NO_SCREEN,
    SCREENSHOT_BUSY,
    SCREENSHOT_FAILED,
    SCREENSHOT_TOO_LARGE,
    SCREENSHOT_TIMEOUT,
    NO_RECORDING,
)

#: Every refusal, in table order (docs/service.md).
REFUSALS: tuple[Refusal, ...] = (
    BAD_REQUEST,
    INVALID_TOKEN,
    EXPIRED_TOKEN,
    TOKEN_NOT_YET_VALID,
    REPLAYED_TOKEN,
    WRONG_NODE,
    WRONG_PROTOCOL,
    FOREIGN_ORIGIN,
    UNKNOWN_PROTOCOL,
    VIEW_ONLY_UNSUPPORTED,
    UNKNOWN_DOMAIN,
    CONSOLE_NOT_ENABLED,
    VM_NOT_RUNNING,
    CONSOLE_BUSY,
    LIMIT_REACHED,
    HYPERVISOR_UNAVAILABLE,
    CONSOLE_UNREACHABLE,
)
#: Every way an open session ends, in table order.
ENDINGS: tuple[Refusal, ...] = (
    CONSOLE_CLOSED,
    CLIENT_CLOSED,
    SHUTDOWN,
    INTERNAL_ERROR,
    VM_STOPPED,
    DOMAIN_UNDEFINED,
    IDLE_TIMEOUT,
    HYPERVISOR_LOST,
    CLIENT_PROTOCOL_ERROR,
    CONSOLE_PROTOCOL_ERROR,
    CONSOLE_AUTH_FAILED,
    CLIENT_STALLED,
    ENDED_BY_OPERATOR,
)
#: The core's refusals and endings: no plugin may declare their reasons or codes.
CORE_REFUSALS: tuple[Refusal, ...] = (*REFUSALS, *ENDINGS)
#: Close codes plugins declare their refusals with (``console_broker_refusals``): this
#: range, less the core's own codes. 4000-4099 are the core's refusals before a session.
PLUGIN_CODES = range(4100, 5000)

#: :class:`broker.tokens.TokenRefused` reasons -> refusals.
TOKEN_REFUSALS: dict[str, Refusal] = {
    "invalid": INVALID_TOKEN,
    "expired": EXPIRED_TOKEN,
    "not_yet_valid": TOKEN_NOT_YET_VALID,
    "replayed": REPLAYED_TOKEN,
    "limit_reached": LIMIT_REACHED,
    "wrong_protocol": WRONG_PROTOCOL,
    "wrong_node": WRONG_NODE,
    "wrong_domain": INVALID_TOKEN,
}


def ended_by_operator(reason: str | None = None) -> Refusal:
    """:data:`ENDED_BY_OPERATOR`, its text followed by the operator's *reason* (cut to fit
    a close frame at a character boundary) when one is given."""
    reason = " ".join((reason or "").split())
    if not reason:
        return ENDED_BY_OPERATOR
    text = f"{ENDED_BY_OPERATOR.text}: {reason}"
    encoded = text.encode()
    if len(encoded) > MAX_CLOSE_REASON:
        text = encoded[:MAX_CLOSE_REASON].decode("utf-8", "ignore")
    return attrs.evolve(ENDED_BY_OPERATOR, text=text)


def markdown_table(plugins: Iterable[Refusal] = ()) -> str:
    """The refusals and endings, the core's and then the plugins' (by close code), as the
    Markdown table of docs/service.md."""
    out = [
        "| reason | HTTP status | close code | text |",
        "| --- | --- | --- | --- |",
    ]
    for refusal in (*REFUSALS, *ENDINGS, *sorted(plugins, key=lambda r: r.close_code)):
        status = str(refusal.status) if refusal.status else "-"
        out.append(
            f"| `{refusal.reason}` | {status} | {refusal.close_code} | {refusal.text} |"
        )
    return "\n".join(out) + "\n"
