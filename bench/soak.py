"""Soak of the sans-I/O cores: N complete calls (bench.sipcore's call: INVITE with an
IPv6 offer, 100/180/200 with an IPv4 answer, ACK, BYE, 200) through SipProxy and a
SessionManager over a FakeDatapath, on a simulated clock, then the clock runs on past
every timer. What must hold: 0 transactions, 0 sessions and every relay port free at
the end, and the process RSS back to where it was after the first K calls (within 5 %):
the parsers' bounded caches (4,096 entries each) fill during those.

``python -m bench.soak [--calls N] [--every K]`` prints one JSON line per K calls
(calls done, calls/s over the last K, RSS in kB, live transactions and sessions) and a
final summary line.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

from bench.sipcore import WARMUP, Bench


def rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def drain(bench: Bench) -> None:
    """What the daemon does once per event-loop turn: hand the changes since the last
    turn to the crash journal (xlat/state.py). Without it the cores keep every changed
    session id and flow for a journal nobody reads: the growth a soak must not see."""
    bench.media.drain_records()
    bench.proxy.drain_records()
    bench.proxy.registrar.drain_records()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    args = parser.parse_args(argv)
    bench = Bench()
    for n in range(WARMUP):
        bench.call(n)
        drain(bench)
    rss0 = 0
    started = last = time.monotonic()
    for n in range(WARMUP, WARMUP + args.calls):
        bench.call(n)
        drain(bench)
        done = n - WARMUP + 1
        if done % args.every == 0:
            now = time.monotonic()
            print(json.dumps({"calls": done, "calls_per_s": round(args.every / (now - last)),
                              "rss_kib": rss_kib(), "transactions": bench.proxy.transactions,
                              "sessions": len(bench.media.sessions())}), flush=True)
            last = now
            rss0 = rss0 or rss_kib()
    wall = time.monotonic() - started
    bench.advance(300.0)  # past Timer K/J/H (32 s), the delete delay and the idle timer
    bench.advance(1.0)
    drain(bench)
    gc.collect()
    rss1 = rss_kib()
    ports = sum(p.in_use for pools in bench.media.pools.values() for p in pools)
    summary = {"calls": args.calls, "calls_per_s": round(args.calls / wall),
               "transactions": bench.proxy.transactions, "sessions": len(bench.media.sessions()),
               "ports_in_use": ports, "flows": len(bench.datapath.flows),
               "rss_kib_after_first": rss0, "rss_kib_end": rss1,
               "rss_change_pct": round(100 * (rss1 - rss0) / rss0, 1)}
    print(json.dumps(summary), flush=True)
    ok = not (summary["transactions"] or summary["sessions"] or ports or summary["flows"])
    return 0 if ok and abs(rss1 - rss0) <= 0.05 * rss0 else 1


if __name__ == "__main__":
    sys.exit(main())
