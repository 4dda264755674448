"""The ``monitor`` protocol's sessions: HMP command lines in, JSON answers out.

Every message is a text message (subprotocol ``console-broker.monitor.v1``):

- first, the broker says ``{"type": "hello", "domain": NAME, "view_only": BOOL,
  "commands": [...]}`` (``commands``: what a view-only session may run; ``null`` for a
  full one, which may run any);
- the client sends one HMP command line per message (``info status``). Blanks around it
  are dropped and an empty line is ignored; a line of more than :data:`MAX_LINE`
  characters, one with a control character (a line break, a tab) or a binary message
  ends the session with ``client_protocol_error`` (4104);
- the broker answers each line, in order, with ``{"type": "output", "command": LINE,
  "output": TEXT, "truncated": BOOL}``: what QEMU printed (its own complaints too,
  ``unknown command: ...``), lines ending in ``\\n``, cut to ``[monitor] max_output``
  characters; or with ``{"type": "error", "command": LINE, "error": TEXT}`` when libvirt
  could not run it, when it did not answer within ``[monitor] timeout`` (it may still
  take effect), or when the previous command, which timed out, has not ended yet. The
  session goes on either way;
- a view-only session's line whose command (its first word, as HMP reads it: up to a
  blank or ``/``) is not in ``[monitor] view_only_commands`` ends the session with
  ``monitor_command_refused`` (4301); the command never reaches QEMU.

One command runs at a time per session, in a worker thread (libvirt blocks): a command
that times out is left to finish there, and the session's next command waits for it
(at most the timeout). The core counts the bytes of command lines and answers
(``session.traffic``), so the idle timeout sees a session that is used.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import anyio.to_thread
import attrs
import libvirt
from prometheus_client import Counter

from broker.api import CLIENT_PROTOCOL_ERROR, Refused

from . import COMMAND_REFUSED, TABLE, MonitorSection

if TYPE_CHECKING:
    from broker.api import PluginContext, Session

#: The longest command line a client may send, in characters.
MAX_LINE = 1024
#: The results the ``commands`` metric counts.
RESULTS = ("ok", "error", "timeout", "refused")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: HMP's command name: up to the first blank or ``/`` (``x/4x`` is ``x``).
_NAME = re.compile(r"[^ /]*")

#: ``call(domain, line) -> output``: runs one HMP command line (blocking; libvirt errors
#: raise ``libvirt.libvirtError``).
MonitorCall = Callable[[Any, str], str]


def hmp(domain: Any, line: str) -> str:
    """Run *line* on the QEMU human monitor of *domain* (a ``libvirt.virDomain``)."""
    import libvirt_qemu

    output: str = libvirt_qemu.qemuMonitorCommand(
        domain, line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )
    return output


def command_name(line: str) -> str:
    """The command HMP runs for *line* (blanks stripped, no control characters)."""
    found = _NAME.match(line)
    assert found is not None  # the pattern matches the empty string
    return found.group()


def command_line(message: bytes | str) -> str | None:
    """The command line a client's *message* holds, or None for an empty one; raises
    :class:`Refused` (``client_protocol_error``) for anything else."""
    if not isinstance(message, str):
        raise Refused(CLIENT_PROTOCOL_ERROR, "a binary message: commands are text messages")
    if len(message) > MAX_LINE:
        raise Refused(CLIENT_PROTOCOL_ERROR, f"a command line of more than {MAX_LINE} characters")
    if _CONTROL.search(message):
        raise Refused(CLIENT_PROTOCOL_ERROR, "a control character in a command line")
    line = message.strip(" ")
    return line or None


class _Dropped(Exception):
    """The command timed out before its worker thread started it: it never ran."""


class _Call:
    """One command in a worker thread. After a timeout, :meth:`abandon` either drops it
    (its thread had not started it: it never will) or leaves it running; :attr:`ended` is
    set once it can no longer reach QEMU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._dropped = False
        self.ended = anyio.Event()

    def run(self, call: MonitorCall, domain: Any, line: str) -> str:
        """In the worker thread."""
        with self._lock:
            if self._dropped:
                raise _Dropped
            self._started = True
        try:
            return call(domain, line)
        finally:
            with suppress(RuntimeError):  # the broker's event loop has ended
                anyio.from_thread.run_sync(self.ended.set)

    def abandon(self) -> bool:
        """After a timeout, on the event loop: whether the command had started."""
        with self._lock:
            if not self._started:
                self._dropped = True
                self.ended.set()
            return self._started


@attrs.define
class MonitorSessions:
    """The ``monitor`` sessions of one broker: its table, its metric, the monitor call."""

    settings: MonitorSection
    #: ``console_broker_monitor_commands_total{result}``.
    commands: Counter
    call: MonitorCall = hmp

    @classmethod
    def from_context(cls, context: PluginContext, call: MonitorCall = hmp) -> MonitorSessions:
        commands = context.metric(
            Counter, "commands",
            "HMP commands monitor sessions sent, by result: ok (QEMU answered), error "
            "(libvirt could not run it), timeout, refused (view-only).",
            ["result"],
        )
        for result in RESULTS:
            commands.labels(result)  # each shows in /metrics from the start, at 0
        return cls(context.config.table(TABLE), commands, call)

    async def serve(self, session: Session) -> None:
        """Run one session until the client leaves (or the core ends it)."""
        view_only = session.view_only
        await self._send(session, {
            "type": "hello",
            "domain": session.domain_name,
            "view_only": view_only,
            "commands": list(self.settings.view_only_commands) if view_only else None,
        })
        previous: _Call | None = None
        while True:
            line = command_line(await session.client.receive_message())
            if line is None:
                continue
            name = command_name(line)
            if view_only and name not in self.settings.view_only_commands:
                self.commands.labels("refused").inc()
                raise Refused(COMMAND_REFUSED, f"a view-only session sent {name!r}")
            result, answer, previous = await self._run(session, line, previous)
            self.commands.labels(result).inc()
            session.log.info("monitor.command", command=name, result=result)
            await self._send(session, answer)

    async def _run(
        self, session: Session, line: str, previous: _Call | None
    ) -> tuple[str, dict[str, Any], _Call | None]:
        """(result, answer, the call that may still run) for *line*."""
        timeout = self.settings.timeout
        if previous is not None:
            with anyio.move_on_after(timeout):
                await previous.ended.wait()
            if not previous.ended.is_set():
                error = "the previous command, which timed out, has not ended yet"
                return "error", {"type": "error", "command": line, "error": error}, previous
        call = _Call()
        session.traffic.count_to_console(len(line.encode()))
        try:
            with anyio.fail_after(timeout):
                output = await anyio.to_thread.run_sync(
                    call.run, self.call, session.domain_handle, line, abandon_on_cancel=True
                )
        except TimeoutError:
            started = call.abandon()
            error = f"no answer within {timeout:g} s"
            if started:
                error += " (the command may still take effect)"
            return "timeout", {"type": "error", "command": line, "error": error}, call
        except libvirt.libvirtError as exc:
            error = exc.get_error_message() or str(exc)
            return "error", {"type": "error", "command": line, "error": error}, None
        output = output.replace("\r\n", "\n")
        limit = self.settings.max_output
        answer = {
            "type": "output",
            "command": line,
            "output": output[:limit],
            "truncated": len(output) > limit,
        }
        return "ok", answer, None

    async def _send(self, session: Session, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        await session.client.send_text(text)
        session.traffic.count_to_client(len(text.encode()))
