"""Which event loop runs the daemon: uvloop (libuv) where it is installed, else the
standard library's.

uvloop does in C what asyncio's selector loop does in Python — socket reads, callbacks,
timers — so each datagram costs the daemon less CPU (``python -m bench.sipcore --edge``
and the ``sip_cps`` / ``ng_setup_rate`` figures of ``make bench``; bench/README.md).
What the daemon relies on behaves the same on both (datagram and stream protocols,
``add_reader``, ``call_at``, signal handlers, ``to_thread``), and the unit tests run the
asyncio edges on both. Differences the edges allow for: uvloop's transports are not
``asyncio.Transport`` subclasses, and its ``call_at`` returns a handle without
``when()``.

``auto`` (the default) takes uvloop when it imports; ``asyncio`` forces the standard
loop; ``uvloop`` insists (EventLoopUnavailable when it is missing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

LOOPS = ("auto", "uvloop", "asyncio")

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class EventLoopUnavailable(RuntimeError):
    """``--event-loop uvloop`` where uvloop is not installed."""


def _uvloop() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def resolve(choice: str) -> tuple[str, LoopFactory | None]:
    """The loop ``choice`` (one of LOOPS) names, as (name, factory); factory None is
    the standard library's. Raises EventLoopUnavailable for ``uvloop`` without it."""
    if choice not in LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(LOOPS)}, not {choice!r}")
    if choice == "asyncio":
        return "asyncio", None
    factory = _uvloop()
    if factory is not None:
        return "uvloop", factory
    if choice == "uvloop":
        raise EventLoopUnavailable(
            "--event-loop uvloop: uvloop is not installed "
            "(apt install python3-uvloop, or pip install uvloop)")
    return "asyncio", None


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    _, factory = resolve(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
