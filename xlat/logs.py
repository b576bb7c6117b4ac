"""How the daemon logs: text or JSON lines, journald-aware, with the call on each line.

- Under systemd (``JOURNAL_STREAM`` names our stderr, sd-daemon(3)) every line starts
  with a ``<N>`` syslog priority and carries no timestamp of its own: journald adds
  both, so ``journalctl -p err -u xlat`` finds the errors. Elsewhere a line starts
  with the time.
- ``json``: one object per line (``level``, ``logger``, ``message``, ``call_id``,
  ``session``, ``exc``; ``time`` when not under journald).
- The Call-ID and the session id ride on every record about a call: from ``extra=``
  where the code knows them, or from the context (``call_context``) that signalling
  sets while it handles one message.
- A record logged with ``extra=summarized(KIND)`` is one of a kind that outside input
  can make at any rate (malformed SIP): the first of a window is written, the rest are
  counted and reported as one line with the next that gets through.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

CALL_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_id", default=None)
SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("session", default=None)

SUMMARY_WINDOW = 10.0  # seconds: at most one line per kind of flood-prone record

# sd-daemon(3) / syslog(3) priorities
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (levels between two round down)."""
    return next((p for lvl, p in sorted(_PRIORITY.items(), reverse=True) if levelno >= lvl), 7)


@contextlib.contextmanager
def call_context(call_id: str | None = None, session: str | None = None) -> Iterator[None]:
    """Records logged inside carry this Call-ID and session id."""
    tokens = (CALL_ID.set(call_id), SESSION.set(session))
    try:
        yield
    finally:
        CALL_ID.reset(tokens[0])
        SESSION.reset(tokens[1])


def summarized(kind: str) -> dict[str, str]:
    """``extra=`` for a record of a flood-prone kind (see the module docstring)."""
    return {"summary": kind}


class CallFilter(logging.Filter):
    """Puts ``call_id`` and ``session`` on every record (None when not about a call)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "call_id", None) is None:
            record.call_id = CALL_ID.get()
        if getattr(record, "session", None) is None:
            record.session = SESSION.get()
        return True


class SummaryFilter(logging.Filter):
    """Lets through one record per ``window`` seconds of each ``summary`` kind; the
    next one let through says how many were held back. Time is the record's own."""

    def __init__(self, window: float = SUMMARY_WINDOW) -> None:
        super().__init__()
        self.window = window
        self._open: dict[str, float] = {}  # kind -> when its window began
        self.held: dict[str, int] = {}  # kind -> records not written in that window

    def filter(self, record: logging.LogRecord) -> bool:
        kind = getattr(record, "summary", None)
        if kind is None:
            return True
        began = self._open.get(kind)
        if began is not None and record.created - began < self.window:
            self.held[kind] = self.held.get(kind, 0) + 1
            return False
        self._open[kind] = record.created
        held = self.held.pop(kind, 0)
        if held:
            assert began is not None  # held only counts inside a window
            record.msg = (f"{record.getMessage()} (and {held} more {kind} in the "
                          f"{record.created - began:.0f} s before)")
            record.args = ()
        return True


class TextFormatter(logging.Formatter):
    """``[<N>|TIME ]LEVEL logger: message [call-id=… session=…]``."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        call = _call_fields(record)
        if call:
            line += " " + " ".join(f"{k.replace('_', '-')}={v}" for k, v in call.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            # journald reads one priority per line: keep a traceback in one entry's priority
            prefix = f"<{priority(record.levelno)}>"
            return "\n".join(prefix + part for part in line.split("\n"))
        return f"{self.formatTime(record)} {line}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; under journald with a ``<N>`` prefix before it."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {}
        if not self.journal:
            obj["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
                f".{int(record.msecs):03d}Z"
        obj |= {"level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage(), **_call_fields(record)}
        if hasattr(record, "call"):  # the fields of a call's summary line
            obj["call"] = record.call
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        line = json.dumps(obj, default=str)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def _call_fields(record: logging.LogRecord) -> dict[str, str]:
    return {k: v for k in ("call_id", "session") if (v := getattr(record, k, None))}


def under_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd gave us (sd-daemon(3):
    ``JOURNAL_STREAM=DEV:INODE`` of the stream's file)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every record to ``stream`` (stderr) in format ``fmt`` (text|json)."""
    out = stream or sys.stderr
    journal = under_journal(out)
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter(journal) if fmt == "json" else TextFormatter(journal))
    handler.addFilter(CallFilter())
    handler.addFilter(SummaryFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug is a netlink dump


def level() -> str:
    """The level in force (debug, info, warning or error)."""
    return logging.getLevelName(logging.getLogger().level).lower()


def set_level(name: str) -> str:
    """Change the level of a running daemon (``xlat log level``); returns the old one.
    Raises ValueError for a level name that is not debug, info, warning or error."""
    from xlat.config import LOG_LEVELS

    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be {', '.join(LOG_LEVELS)}, not {name!r}")
    old = level()
    logging.getLogger().setLevel(name.upper())
    return old
