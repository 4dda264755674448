"""Structured logs for the service: structlog, JSON or console, secrets scrubbed.

``configure_logging`` sets up structlog and routes the standard library's
logging (websockets, libvirtaio) through the same renderer. The last
processor before rendering, :func:`redact`, replaces anything shaped like a
token (a JWS: three base64url parts, a handoff handle, or a ``token=`` query parameter) in
every string value, so a token cannot reach a log line even by accident;
the code never logs one in the first place. websockets logs request lines
(with their query string) at debug level: its loggers are kept at
``warning`` whatever the configured level.

Under systemd the output is the journal's, which stamps every line itself: the console
format then leaves out its own timestamp (:func:`to_journal`); JSON lines keep theirs,
a field of the object.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_JWS = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")
_TOKEN_PARAM = re.compile(r"(?i)(token=)[^&\s\"']+")
#: A handoff handle (broker.handoff.HANDLE), not inside a longer word.
_HANDLE = re.compile(r"(?<![A-Za-z0-9_-])h\.[A-Za-z0-9_-]{32}(?![A-Za-z0-9_-])")
REDACTED = "[redacted]"

#: Loggers of libraries that would log request lines or payloads at debug level.
QUIET_LOGGERS = ("websockets", "websockets.server", "websockets.client", "libvirtaio",
                 "virEventAsyncIOImpl")


def scrub(text: str) -> str:
    """*text* with anything token-shaped replaced by ``[redacted]``."""
    if "eyJ" in text:
        text = _JWS.sub(REDACTED, text)
    if "h." in text:
        text = _HANDLE.sub(REDACTED, text)
    if "token=" in text.lower():
        text = _TOKEN_PARAM.sub(r"\1" + REDACTED, text)
    return text


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor applying :func:`scrub` to every string value."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = scrub(value)
    return event_dict


def to_journal(stream: TextIO) -> bool:
    """Whether *stream* is connected to systemd's journal: ``$JOURNAL_STREAM`` names its
    device and inode (systemd.exec(5), Environment variables in spawned processes)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return f"{found.st_dev}:{found.st_ino}" == f"{device}:{inode}"


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog and the standard library's logging for the service process."""
    out = stream if stream is not None else sys.stderr
    # The journal stamps each line itself; a console line need not say the time twice.
    stamped = fmt == "json" or not to_journal(out)
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        *([structlog.processors.TimeStamper(fmt="iso", utc=True)] if stamped else []),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
