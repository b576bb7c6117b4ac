"""``xlat monitor``: calls, rates and drops of a running daemon, refreshed each second.

The core is pure: two samples of the daemon's ``stats`` (and ``session.list``) replies
in, a :class:`View` of rates out, rendered as a screen (terminal) or as one line or JSON
object per refresh (anything else). Only :func:`run` touches the clock, the terminal
and the daemon (through the ``fetch`` callable it is given).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from xlat.control.api import ControlError, call
from xlat.tables import si, table

Reply = Mapping[str, Any]

# the terminal: alternate screen and hidden cursor while running (as top(1) does), then
# home + clear for each frame; all of it plain ECMA-48, no curses
ENTER, LEAVE, CLEAR = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l", "\x1b[H\x1b[J"
QUIT_KEYS = b"qQ"


@dataclass(frozen=True)
class Sample:
    """What the daemon said at ``at`` (monotonic seconds): its ``stats`` reply and, when
    asked, its ``session.list`` reply."""

    at: float
    stats: Reply
    sessions: Sequence[Reply] | None = None


@dataclass(frozen=True)
class Rate:
    """Packets/s and bits/s over the last interval; None when there is no earlier
    sample to compare with (the first one, a new session, a restarted daemon)."""

    pps: float | None
    bps: float | None

    def as_json(self) -> dict[str, float | None]:
        return {"pps": _round(self.pps), "bps": _round(self.bps)}


@dataclass(frozen=True)
class Call:
    """One session as the monitor shows it."""

    id: str
    state: str
    origin: str
    call_id: str | None
    peers: tuple[str, str]
    packets: int
    rate: Rate


@dataclass(frozen=True)
class View:
    stats: Reply
    forwarded: dict[str, Rate]  # by datapath (ebpf, userspace)
    drops: dict[str, Rate]  # by reason
    calls: list[Call] | None  # busiest first; None when session.list was not asked


def _rate(before: Reply | None, now: Reply, seconds: float) -> Rate:
    """The rate between two ``{"packets", "bytes"}`` counters; None where a counter went
    backwards (it was reset) or no time passed."""

    def per_second(key: str, scale: int) -> float | None:
        if before is None or seconds <= 0 or now[key] < before[key]:
            return None
        return (now[key] - before[key]) * scale / seconds

    return Rate(per_second("packets", 1), per_second("bytes", 8))


def view(prev: Sample | None, cur: Sample) -> View:
    """The rates between ``prev`` and ``cur``. A daemon whose uptime went down was
    restarted: its counters start again, so nothing is compared with before."""
    if prev is not None and cur.stats["uptime"] < prev.stats["uptime"]:
        prev = None
    dt = cur.at - prev.at if prev is not None else 0.0
    old = prev.stats if prev is not None else {}

    def rates(key: str) -> dict[str, Rate]:
        return {name: _rate(old.get(key, {}).get(name), c, dt)
                for name, c in cur.stats[key].items()}

    earlier = {s["id"]: s for s in (prev.sessions or ())} if prev is not None else {}
    calls = None if cur.sessions is None else sorted(
        (Call(id=s["id"], state=s["state"], origin=s["origin"], call_id=s["call_id"],
              peers=_peers(s), packets=s["packets"], rate=_rate(earlier.get(s["id"]), s, dt))
         for s in cur.sessions),
        key=lambda c: (-(c.rate.pps or 0.0), c.rate.pps is None, c.id))
    return View(cur.stats, rates("forwarded"), rates("drops"), calls)


def _peers(session: Reply) -> tuple[str, str]:
    legs = session["legs"]
    if len(legs) != 2:
        return ("-", "-")
    return (legs[0]["peer"] or "?", legs[1]["peer"] or "?")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _show(value: float | None, unit: str = "") -> str:
    return "-" + unit if value is None else si(value, unit)


def _headline(v: View) -> list[str]:
    s = v.stats
    ports = "  ".join(f"{fam} {p['in_use']}/{p['capacity']}" for fam, p in s["ports"].items())
    fwd = "   ".join(f"{name} {_show(r.pps, ' pkt/s')} {_show(r.bps, ' bit/s')}"
                     for name, r in v.forwarded.items()) or "-"
    busy = [(reason, r) for reason, r in v.drops.items() if r.pps]
    drops = "   ".join(f"{reason} {_show(r.pps, ' pkt/s')}" for reason, r in busy)
    if not busy:
        drops = "-" if all(r.pps is None for r in v.drops.values()) else "none"
    return [f"sessions {s['sessions']} ({s['deleting']} deleting)   flows {s['flows']}   "
            f"ports {ports}",
            f"forwarded  {fwd}",
            f"drops      {drops}"]


CALL_HEADER = ("ID", "STATE", "ORIGIN", "PKT/S", "BIT/S", "PACKETS", "PEER A", "PEER B",
               "CALL-ID")
CALL_NUMBERS = (3, 4, 5)


def call_rows(calls: Sequence[Call]) -> list[list[str]]:
    return [[c.id, c.state, c.origin, _show(c.rate.pps), _show(c.rate.bps), str(c.packets),
             *c.peers, c.call_id or "-"] for c in calls]


def screen(v: View, title: str, width: int, height: int) -> list[str]:
    """One frame for a terminal of ``width`` x ``height``: the headline, then the
    busiest calls that fit; lines are cut at the terminal's width, not wrapped."""
    lines = [title, *_headline(v), ""]
    room = height - len(lines) - 1  # lines left above the last one, "q quits"
    if v.calls is None:
        lines.append(f"{v.stats['sessions']} sessions: over --max-calls, so not listed "
                     "(listing costs the daemon about 0.15 ms per session)")
    elif not v.calls:
        lines.append("no sessions")
    elif 1 + len(v.calls) <= room:
        lines += table(CALL_HEADER, call_rows(v.calls), right=CALL_NUMBERS)
    else:  # the header, the busiest that fit, and a line saying how many did not
        shown = v.calls[:max(0, room - 2)]
        lines += table(CALL_HEADER, call_rows(shown), right=CALL_NUMBERS)
        lines.append(f"... and {len(v.calls) - len(shown)} more")
    lines = [*lines[:height - 1], "q quits"]
    return [line[:width] for line in lines]


def line(v: View, clock: str) -> str:
    """One refresh as one line of text (stdout is not a terminal)."""
    return f"{clock}  " + "   ".join(" ".join(part.split()) for part in _headline(v))


def as_json(v: View, clock: str) -> dict[str, Any]:
    """One refresh as one JSON object (``-j``)."""
    s = v.stats
    return {"time": clock, "sessions": s["sessions"], "deleting": s["deleting"],
            "flows": s["flows"], "ports": s["ports"],
            "forwarded": {k: r.as_json() for k, r in v.forwarded.items()},
            "drops": {k: r.as_json() for k, r in v.drops.items()},
            "calls": None if v.calls is None else [
                {"id": c.id, "state": c.state, "origin": c.origin, "call_id": c.call_id,
                 "peers": list(c.peers), "packets": c.packets, **c.rate.as_json()}
                for c in v.calls]}


# ---- the edge: clock, terminal, daemon -----------------------------------------------


def fetch(control: Path, with_sessions: bool, max_calls: int) -> Sample:
    """Ask the daemon on ``control``: ``stats``, and ``session.list`` when asked for and
    it holds at most ``max_calls`` sessions (the list costs the daemon per session:
    about 1.3 s of its event loop for 10,000, measured in the lab). Raises ControlError."""
    stats = call(control, "stats", timeout=5.0)
    listed = with_sessions and stats["sessions"] <= max_calls
    return Sample(time.monotonic(), stats,
                  call(control, "session.list", timeout=5.0) if listed else None)


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[int | None]:
    """The terminal's file descriptor in cbreak mode (keys arrive one at a time, Ctrl-C
    still interrupts), restored afterwards; None when ``stream`` is no terminal."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait(fd: int | None, seconds: float) -> bool:
    """Sleep ``seconds``, or less if a quit key arrives; True if one did."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 64)
            if not data or any(k in data for k in QUIT_KEYS):
                return True
    return False


def run(fetch: Callable[[bool], Sample], *, title: str, interval: float = 1.0,
        count: int | None = None, as_json_lines: bool = False,
        out: TextIO = sys.stdout, keys: TextIO = sys.stdin) -> None:
    """Refresh every ``interval`` s, ``count`` times (None: until q or Ctrl-C). On a
    terminal, a full screen; otherwise one line (or JSON object) per refresh.
    ``fetch(with_sessions)`` asks the daemon; its ControlError on the first refresh
    ends the monitor, a later one is shown and the next refresh asks again (a daemon
    restarting)."""
    terminal = out.isatty() and not as_json_lines
    with contextlib.ExitStack() as stack:
        fd = stack.enter_context(_keys(keys)) if terminal else None
        if terminal:
            out.write(ENTER)
            stack.callback(lambda: (out.write(LEAVE), out.flush()))
        prev: Sample | None = None
        frames = 0
        try:
            while True:
                began, clock = time.monotonic(), time.strftime("%H:%M:%S")
                try:
                    cur = fetch(terminal or as_json_lines)
                except ControlError as e:
                    if prev is None:
                        raise
                    _show_problem(out, terminal, f"{clock}  {e}")
                else:
                    _show_frame(out, terminal, as_json_lines, view(prev, cur),
                                f"{title}   {clock}", clock)
                    prev = cur
                frames += 1
                if frames == count or _wait(fd, interval - (time.monotonic() - began)):
                    break
        except KeyboardInterrupt:
            pass  # Ctrl-C is how one quits
        except BrokenPipeError:
            # the reader went away (`xlat monitor | head`): done. Python's own flush at
            # exit would fail on the same pipe, so stdout goes to /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())


def _show_frame(out: TextIO, terminal: bool, as_json_lines: bool, v: View, title: str,
                clock: str) -> None:
    if terminal:
        size = shutil.get_terminal_size()  # 80x24 where the terminal says 0x0
        out.write(CLEAR + "\n".join(screen(v, title, size.columns, size.lines)))
    elif as_json_lines:
        out.write(json.dumps(as_json(v, clock)) + "\n")
    else:
        out.write(line(v, clock) + "\n")
    out.flush()


def _show_problem(out: TextIO, terminal: bool, text: str) -> None:
    if terminal:
        out.write(CLEAR + text)
        out.flush()
    else:
        print(text, file=sys.stderr, flush=True)
