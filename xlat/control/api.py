"""The CLI's control protocol: one JSON object per line over a unix socket.

Request ``{"cmd": "session.add", "args": {...}}``; reply ``{"ok": true, "result": …}``
or ``{"ok": false, "error": "one line"}``. Commands are a registry with their
argument names checked before dispatch (the style of Open vSwitch's unixctl).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # a CLI request is a few hundred bytes; bound what a client may send
# Requests are {"cmd", "args": {name: scalar}}: depth 2. The cap is checked on the raw
# text before json.loads, whose recursive descent would otherwise meet 60 KB of "[" with
# a RecursionError (the same habit as h11's buffer caps: refuse before the work).
MAX_DEPTH = 4
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET_RE = re.compile(r"[\[\]{}]")


class ControlError(Exception):
    """A request the daemon refused, or no daemon to ask; the message is one line."""


Handler = Callable[..., Any]
# What an argument may be: JSON gives str, bool, int/float, null, list, object; a command
# declares one of these per argument and the value is checked before the handler runs.
ArgType = type[str] | type[float] | type[int] | type[bool]
_TYPE_NAMES = {str: "a string", float: "a number", int: "an integer", bool: "true or false"}


@dataclass(frozen=True)
class Command:
    handler: Handler
    required: Mapping[str, ArgType] = field(default_factory=dict)
    optional: Mapping[str, ArgType] = field(default_factory=dict)

    def check(self, name: str, args: Mapping[str, object]) -> dict[str, object]:
        """Arity and types (the unixctl habit, with JSON types): one line naming the
        argument at fault. Returns the arguments to call with (an optional one given
        as null is left to its default)."""
        missing = [a for a in self.required if a not in args]
        if missing:
            raise ControlError(f"{name}: missing {missing}")
        extra = sorted(set(args) - set(self.required) - set(self.optional))
        if extra:
            raise ControlError(f"{name}: unexpected {extra}")
        for arg, value in args.items():
            kind = self.required.get(arg) or self.optional[arg]
            if value is None and arg in self.optional:
                continue  # null: the default
            if not _is_a(value, kind):
                raise ControlError(f"{name}: {arg} must be {_TYPE_NAMES[kind]}, "
                                   f"not {_json_type(value)}")
        return {arg: value for arg, value in args.items() if value is not None}


def _is_a(value: object, kind: ArgType) -> bool:
    if isinstance(value, bool):  # a bool is an int in Python, not in JSON
        return kind is bool
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return "infinite"
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def decode_request(line: bytes) -> object:
    """One request line -> its JSON value, with size, encoding and nesting checked
    before the parser sees it. Raises ControlError."""
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request of {len(line)} bytes over {MAX_REQUEST}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ControlError(f"request is not UTF-8 (byte {e.start})") from None
    depth = 0
    for m in _BRACKET_RE.finditer(_STRING_RE.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            raise ControlError(f"request nested deeper than {MAX_DEPTH}")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, or an integer over Python's digit limit
        raise ControlError(f"bad JSON: {e}") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class Registry:
    """Command name → handler with its arguments' names and types."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, name: str, handler: Handler, required: Mapping[str, ArgType] | None = None,
            optional: Mapping[str, ArgType] | None = None) -> None:
        self._commands[name] = Command(handler, dict(required or {}), dict(optional or {}))

    def handle(self, line: bytes) -> dict[str, Any]:
        """One request line -> its reply; nothing a client sends escapes as an exception."""
        try:
            request = decode_request(line)
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        return self.dispatch(request)

    def dispatch(self, request: object) -> dict[str, Any]:
        """Run one request; every failure becomes an error reply."""
        try:
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError('request must be {"cmd": NAME, "args": {...}}')
            command = self._commands.get(request["cmd"])
            if command is None:
                raise ControlError(f"unknown command {request['cmd'][:64]!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("args must be an object")
            kwargs = command.check(request["cmd"], args)
            return {"ok": True, "result": command.handler(**kwargs)}
        except Exception as e:  # the daemon keeps serving whatever a request does
            if not isinstance(e, ControlError | ValueError | KeyError):
                log.exception("control command failed")
            return {"ok": False, "error": str(e).strip("'\"") or type(e).__name__}


class ControlServer:
    """Serves a Registry on a unix socket (mode 0600: root's CLI only)."""

    def __init__(self, registry: Registry, path: Path) -> None:
        self.registry = registry
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # stale: the caller checked nobody listens
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                           limit=MAX_REQUEST)
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    line = e.partial  # the last request may lack its newline
                except asyncio.LimitOverrunError:
                    # over MAX_REQUEST with no newline: answer, then hang up (the rest
                    # of the line cannot be told apart from the next request)
                    writer.write(_reply_bytes({"ok": False, "error":
                                               f"request over {MAX_REQUEST} bytes"}))
                    await writer.drain()
                    break
                if not line.strip():
                    if reader.at_eof():
                        break
                    continue
                writer.write(_reply_bytes(self.registry.handle(line)))
                await writer.drain()
        except ConnectionError:
            pass  # client gone
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening. Open connections stay until the process ends: the one that
        asked for ``exit`` learns the shutdown is complete when it is closed (so no
        ``wait_closed()``, which on Python 3.12 waits for every connection)."""
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _reply_bytes(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


def listening(path: Path) -> bool:
    """Whether a live daemon accepts connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def call(path: Path, cmd: str, args: dict[str, Any] | None = None, *,
         timeout: float = 30.0, until_closed: bool = False) -> Any:
    """Send one command to the daemon and return its result. ``until_closed``: then wait
    (up to ``timeout``) until the daemon closes the connection, which a daemon told to
    ``exit`` does only when its shutdown is complete. Raises ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as e:
            raise ControlError(f"cannot reach xlat at {path}: {e.strerror or e}") from None
        s.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ControlError("daemon closed the connection")
            data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        try:
            while until_closed and s.recv(4096):
                pass
        except TimeoutError:
            raise ControlError(f"xlat at {path} did not finish within {timeout:g} s") from None
        except ConnectionError:
            pass  # reset as the daemon went away: finished too
    return reply.get("result")

