import asyncio
import json
from pathlib import Path

import pytest

from xlat.control.api import ControlError, ControlServer, Registry, call, listening


def make_registry() -> Registry:
    reg = Registry()
    reg.add("add", lambda a, b=0: a + b, required=("a",), optional=("b",))
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
    ],
)
def test_dispatch_turns_every_failure_into_an_error_reply(request_: object, error: str) -> None:
    reply = make_registry().dispatch(request_)
    assert reply["ok"] is False and error in reply["error"]


def test_dispatch_calls_the_handler() -> None:
    assert make_registry().dispatch({"cmd": "add", "args": {"a": 2, "b": 3}}) == {
        "ok": True, "result": 5}


def test_server_round_trip_over_a_unix_socket(tmp_path: Path) -> None:
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
        writer.close()
        await server.close()

    asyncio.run(scenario())
    assert not path.exists() and not listening(path)
    with pytest.raises(ControlError, match="cannot reach xlat"):
        call(path, "add", {"a": 1})
