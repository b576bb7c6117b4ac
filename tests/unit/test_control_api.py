import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xlat.control.api import (
    MAX_DEPTH,
    MAX_REQUEST,
    ControlError,
    ControlServer,
    Registry,
    call,
    decode_request,
    listening,
)


def make_registry() -> Registry:
    reg = Registry()
    reg.add("add", lambda a, b=0: a + b, required={"a": float}, optional={"b": float})
    reg.add("greet", lambda name, loud=False: name.upper() if loud else name,
            required={"name": str}, optional={"loud": bool})
    reg.add("boom", lambda: 1 / 0)
    return reg


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ("nope", "request must be"),
        ({"cmd": "what"}, "unknown command"),
        ({"cmd": "add"}, "missing ['a']"),
        ({"cmd": "add", "args": {"a": 1, "c": 2}}, "unexpected ['c']"),
        ({"cmd": "add", "args": [1]}, "args must be an object"),
        ({"cmd": "boom"}, "division by zero"),
        # types come from the command's declaration, named in the error
        ({"cmd": "add", "args": {"a": "20"}}, "add: a must be a number, not a string"),
        ({"cmd": "add", "args": {"a": True}}, "add: a must be a number, not a boolean"),
        ({"cmd": "add", "args": {"a": 1, "b": [2]}}, "add: b must be a number, not an array"),
        ({"cmd": "add", "args": {"a": None}}, "add: a must be a number, not null"),
        ({"cmd": "greet", "args": {"name": 60}}, "greet: name must be a string, not a number"),
        ({"cmd": "greet", "args": {"name": "x", "loud": 1}}, "greet: loud must be true or false"),
        ({"cmd": 7}, "request must be"),
    ],
)
def test_dispatch_turns_every_failure_into_an_error_reply(request_: object, error: str) -> None:
    reply = make_registry().dispatch(request_)
    assert reply["ok"] is False and error in reply["error"]


def test_dispatch_calls_the_handler() -> None:
    assert make_registry().dispatch({"cmd": "add", "args": {"a": 2, "b": 3}}) == {
        "ok": True, "result": 5}
    assert make_registry().dispatch({"cmd": "add", "args": {"a": 2, "b": None}})["result"] == 2
    assert make_registry().dispatch({"cmd": "greet", "args": {"name": "x", "loud": True}})[
        "result"] == "X"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"[" * 60_000, f"nested deeper than {MAX_DEPTH}"),
        (b'{"cmd": "add", "args": {"a": ' + b"{" * 10 + b"}" * 10 + b"}}",
         f"nested deeper than {MAX_DEPTH}"),
        (b'{"cmd": "add\xff"}', "not UTF-8 (byte 12)"),
        (b"\xfe\xff\x00{", "not UTF-8"),
        (b'{"cmd": "add", "args": {"a": NaN}}', "bad JSON: NaN is not JSON"),
        (b'{"cmd": "add", "args": {"a": ' + b"9" * 5000 + b"}}", "bad JSON"),
        (b'{"cmd": "add", "args": {"a": 1e999}}', "a must be a number, not infinite"),
        (b"{not json", "bad JSON"),
        (b" " * (MAX_REQUEST + 1), f"over {MAX_REQUEST}"),
    ],
)
def test_a_bad_request_line_is_one_error_reply(line: bytes, error: str) -> None:
    reply = make_registry().handle(line)
    assert reply["ok"] is False and error in reply["error"]


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    name = "[" * 100 + '\\"{'
    line = json.dumps({"cmd": "greet", "args": {"name": name}}).encode()
    assert decode_request(line) == {"cmd": "greet", "args": {"name": name}}
    assert make_registry().handle(line) == {"ok": True, "result": name}


def test_server_round_trip_over_a_unix_socket(tmp_path: Path, run_loop: Callable[..., Any]) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        server = ControlServer(make_registry(), path)
        await server.start()
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, lambda: call(path, "add", {"a": 40, "b": 2})) == 42
        with pytest.raises(ControlError, match="unknown command"):
            await loop.run_in_executor(None, lambda: call(path, "nope"))
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"{not json\n")
        assert json.loads(await reader.readline())["ok"] is False
        writer.write(b"[" * 60_000 + b"\n" + b'{"cmd": "add\xff"}\n')
        assert "nested deeper" in json.loads(await reader.readline())["error"]
        assert "not UTF-8" in json.loads(await reader.readline())["error"]
        writer.write(b'{"cmd": "add", "args": {"a": 1, "b": 2}}\n')  # still serving
        assert json.loads(await reader.readline()) == {"ok": True, "result": 3}
        writer.close()
        # a line over the cap gets its error reply before the daemon hangs up
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"[" * (MAX_REQUEST + 10))
        assert f"over {MAX_REQUEST}" in json.loads(await reader.readline())["error"]
        assert await reader.read() == b""
        writer.close()
        await server.close()

    run_loop(scenario())
    assert not path.exists() and not listening(path)
    with pytest.raises(ControlError, match="cannot reach xlat"):
        call(path, "add", {"a": 1})


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"peer_a": "192.0.2.1:4000", "peer_b": "192.0.2.2:4000", "timeout": "20"},
         "session.add: timeout must be a number, not a string"),
        ({"peer_a": "192.0.2.1:4000", "peer_b": 60}, "session.add: peer_b must be a string"),
        ({"peer_a": "192.0.2.1:4000", "peer_b": "2001:db8::1:5"},
         "peer_b: IPv6 addresses must be bracketed"),
        ({"peer_a": "0.0.0.0:4000", "peer_b": "192.0.2.2:4000"},
         "peer_a: 0.0.0.0:4000 is not a usable address"),
        ({"peer_a": "192.0.2.1:4000", "peer_b": "192.0.2.2:4000", "lifetime": -1},
         "lifetime must be positive"),
    ],
)
def test_the_daemons_commands_name_the_bad_argument(args: dict[str, object], error: str) -> None:
    """The daemon's own registry (no datapath started: nothing here reaches one)."""
    import ipaddress

    from xlat.config import Config
    from xlat.daemon import Daemon

    daemon = Daemon(Config(media_v4=(ipaddress.IPv4Address("192.0.2.10"),)))
    reply = daemon._registry().handle(json.dumps({"cmd": "session.add", "args": args}).encode())
    assert reply["ok"] is False and error in reply["error"]
    assert daemon.manager.sessions() == []


def test_call_until_closed_returns_once_the_server_closes_the_connection(
    tmp_path: Path, run_loop: Callable[..., Any],
) -> None:
    """What ``xlat stop`` relies on: a daemon told to ``exit`` closes the connection
    only when its shutdown is over (here: the server goes 0.3 s after replying)."""
    path = tmp_path / "control.sock"

    async def scenario() -> float:
        reg = Registry()
        done = asyncio.Event()

        def exit_() -> bool:
            asyncio.get_running_loop().call_later(0.3, done.set)  # the shutdown's work
            return True

        reg.add("exit", exit_)
        server = ControlServer(reg, path)
        await server.start()
        loop = asyncio.get_running_loop()
        asked = loop.time()
        waiting = loop.run_in_executor(None, lambda: call(path, "exit", until_closed=True))
        await done.wait()
        await server.close()  # no new connections; the open one stays
        await asyncio.sleep(0.1)
        assert not waiting.done()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # what asyncio.run does to the handlers as the daemon ends
        assert await waiting is True
        return loop.time() - asked

    assert run_loop(scenario()) >= 0.4


def test_call_until_closed_times_out_in_one_line(
    tmp_path: Path, run_loop: Callable[..., Any],
) -> None:
    path = tmp_path / "control.sock"

    async def scenario() -> None:
        server = ControlServer(make_registry(), path)
        await server.start()
        loop = asyncio.get_running_loop()
        with pytest.raises(ControlError, match=r"did not finish within 0\.2 s"):
            await loop.run_in_executor(
                None, lambda: call(path, "add", {"a": 1}, timeout=0.2, until_closed=True))
        await server.close()

    run_loop(scenario())
