"""Choosing the daemon's event loop (xlat/eventloop.py) and the event-loop setting."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from xlat import eventloop
from xlat.config import ConfigError, build


def test_auto_takes_uvloop_where_it_is_installed() -> None:
    import uvloop

    name, factory = eventloop.resolve("auto")
    assert name == "uvloop" and factory is uvloop.new_event_loop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert eventloop.run(loop_type()) is uvloop.Loop
    assert issubclass(eventloop.run(loop_type(), "asyncio"), asyncio.BaseEventLoop)
    assert eventloop.run(loop_type(), "asyncio") is not uvloop.Loop


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert eventloop.resolve("auto") == ("asyncio", None)
    with pytest.raises(eventloop.EventLoopUnavailable, match="uvloop is not installed"):
        eventloop.resolve("uvloop")


def test_event_loop_setting_defaults_to_auto_and_rejects_others(tmp_path: Path) -> None:
    assert build(None, media_v4=("192.0.2.1",)).event_loop == "auto"
    f = tmp_path / "xlat.toml"
    f.write_text('media-v4 = "192.0.2.1"\nevent-loop = "asyncio"\n')
    assert build(f).event_loop == "asyncio"
    f.write_text('media-v4 = "192.0.2.1"\nevent-loop = "trio"\n')
    with pytest.raises(ConfigError, match="event-loop") as info:
        build(f)
    assert "\n" not in str(info.value)
