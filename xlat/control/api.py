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
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # a CLI request is a few hundred bytes; bound what a client may send


class ControlError(Exception):
    """A request the daemon refused, or no daemon to ask; the message is one line."""


Handler = Callable[..., Any]


@dataclass(frozen=True)
class Command:
    handler: Handler
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


class Registry:
    """Command name → handler with its argument names."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, name: str, handler: Handler, required: tuple[str, ...] = (),
            optional: tuple[str, ...] = ()) -> None:
        self._commands[name] = Command(handler, required, optional)

    def dispatch(self, request: object) -> dict[str, Any]:
        """Run one request; every failure becomes an error reply."""
        try:
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError('request must be {"cmd": NAME, "args": {...}}')
            command = self._commands.get(request["cmd"])
            if command is None:
                raise ControlError(f"unknown command {request['cmd']!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("args must be an object")
            missing = [a for a in command.required if a not in args]
            extra = sorted(set(args) - set(command.required) - set(command.optional))
            if missing or extra:
                raise ControlError(
                    f"{request['cmd']}: missing {missing}" if missing
                    else f"{request['cmd']}: unexpected {extra}"
                )
            return {"ok": True, "result": command.handler(**args)}
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
            while line := await reader.readline():
                try:
                    reply = self.registry.dispatch(json.loads(line))
                except json.JSONDecodeError as e:
                    reply = {"ok": False, "error": f"bad JSON: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass  # client gone, or sent a line over MAX_REQUEST
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def listening(path: Path) -> bool:
    """Whether a live daemon accepts connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def call(path: Path, cmd: str, args: dict[str, Any] | None = None, *,
         timeout: float = 30.0) -> Any:
    """Send one command to the daemon and return its result. Raises ControlError."""
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
    return reply.get("result")

