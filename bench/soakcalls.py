"""Soak with real calls: SIPp phones (tests/e2e/sipp/uac.xml and uas.xml, each streaming
a PCMU tone for the whole call) through ``xlat run`` in the namespace lab with its
defaults (eBPF datapath, learn latching, 10 s delete delay; the two SIPp hosts are
``--trusted``, as a trunk is), IPv6 caller -> IPv4 callee, CALLS calls at RATE
calls/s, every call's media relayed by the kernel.

What must hold at the end (after the delete delay and Timer L/M/K, 32 s): 0 sessions,
0 SIP transactions, every relay port pair free, and the daemon's open file descriptors
and RSS back to where they were after a warm-up of WARMUP calls (within 5 %).

``python -m bench.soakcalls [--calls N] [--rate R] [--every S]`` prints one JSON line
every S seconds (calls done by SIPp, calls/s over the interval, RSS, fds, sessions,
transactions, ports in use, kernel-relayed packets so far) and a final summary line
(``"figure": "soak_calls"``); exit 0 when everything above held. 100,000 calls at the
default 50 calls/s take about 35 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.env import BenchError, rss_kib
from bench.sip import sipp_stats
from xlat.demo import GW_SIP, SIPP_DIR, TONE, Gateway, start_gateway, write_tone
from xlat.lab import V4_HOST, V6_HOST, Lab, in_netns

METRICS = "127.0.0.1:9108"  # --metrics-listen, in the gateway namespace
CALL_MS = 1000  # each call streams media for this long
SETTLE_S = 120.0  # after the last call: idle timeout (60 s) + Timer L/M (32 s) + slack
_SAMPLE = re.compile(r"^(xlat_[a-z_]+)(?:\{([^}]*)\})? (\S+)$", re.MULTILINE)


def metrics(lab: Lab, address: str = METRICS) -> dict[str, float]:
    """The gateway's Prometheus samples (``--metrics-listen address``), labels folded
    into the name (``a{b="c"}``)."""
    host, _, port = address.rpartition(":")
    with in_netns(lab.gw):
        sock = socket.create_connection((host, int(port)), timeout=10)
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    text = data.decode().partition("\r\n\r\n")[2]
    return {f"{name}{{{labels}}}" if labels else name: float(value)
            for name, labels, value in _SAMPLE.findall(text)}


def relayed(m: dict[str, float], part: str = "ebpf") -> int:
    """Media packets the kernel relayed: of the flows that exist and of ended calls."""
    live = m.get(f'xlat_forwarded_packets_total{{part="{part}"}}', 0.0)
    ended = sum(v for k, v in m.items() if k.startswith("xlat_call_media_packets_total"))
    return int(live + ended)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sipp_done(stats: Path) -> tuple[int, int]:
    """(successful, failed) calls in the last row of a SIPp ``-stf`` file."""
    try:
        row = sipp_stats(stats)
    except (OSError, BenchError):  # not written yet
        return 0, 0
    return int(row["SuccessfulCall(C)"]), int(row["FailedCall(C)"])


def state(gw: Gateway, lab: Lab, pid: int) -> dict[str, Any]:
    stats = gw.json("stats")
    m = metrics(lab)
    return {"rss_kib": rss_kib(pid), "fds": fds(pid), "sessions": stats["sessions"],
            "transactions": int(m.get("xlat_sip_transactions", -1)),
            "ports_in_use": sum(p["in_use"] for p in stats["ports"].values()),
            "kernel_packets": relayed(m),
            "sip_rate_limited": stats["drops"].get("sip_rate_limited", {}).get("packets", 0)}


def run_calls(lab: Lab, work: Path, name: str, calls: int, rate: float,
              gw: Gateway, pid: int, every: float, t0: float) -> tuple[int, int]:
    """``calls`` calls at ``rate`` from a v6 SIPp UAC; one JSON line per ``every`` s."""
    stats = work / f"{name}.csv"
    argv = ["sipp", "-sf", str(SIPP_DIR / "uac.xml"), "-s", "alice", "-i", str(V6_HOST),
            "-p", "5070", "-mi", str(V6_HOST), "-mp", "6000", "-t", "u1",
            "-key", "ruri", f"sip:bob@{V4_HOST}", "-r", f"{rate:g}", "-m", str(calls),
            "-l", str(max(100, int(rate * 10))), "-d", str(CALL_MS), "-nostdin",
            "-recv_timeout", "10000", "-trace_stat", "-stf", str(stats), "-fd", "5",
            "-trace_err", "-error_file", str(work / f"{name}.err"),
            str(GW_SIP[6])]
    with (work / f"{name}.log").open("wb") as log:
        uac = lab.exec(lab.v6, argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log,
                       stderr=subprocess.STDOUT)
    last_t, last_ok = time.monotonic(), 0
    while uac.poll() is None:
        time.sleep(min(every, 5.0))
        now = time.monotonic()
        if now - last_t < every and uac.poll() is None:
            continue
        ok, failed = sipp_done(stats)
        print(json.dumps({"phase": name, "t": round(now - t0), "calls_ok": ok,
                          "calls_failed": failed,
                          "calls_per_s": round((ok - last_ok) / (now - last_t), 1),
                          **state(gw, lab, pid)}), flush=True)
        last_t, last_ok = now, ok
    time.sleep(1.0)  # SIPp writes its last statistics row on exit
    return sipp_done(stats)


def settle(gw: Gateway, lab: Lab, pid: int, timeout: float = SETTLE_S) -> dict[str, Any]:
    """Wait (at most ``timeout`` s) until no session, transaction or port is left."""
    deadline = time.monotonic() + timeout
    while True:
        s = state(gw, lab, pid)
        if not (s["sessions"] or s["transactions"] or s["ports_in_use"]) \
                or time.monotonic() > deadline:
            return s
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soakcalls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=50.0, help="calls/s")
    parser.add_argument("--warmup", type=int, default=5000)
    parser.add_argument("--every", type=float, default=60.0, help="seconds between lines")
    args = parser.parse_args(argv)
    lab = Lab(f"xsk-{os.urandom(3).hex()}")
    t0 = time.monotonic()
    try:
        lab.up()
        work = Path(tempfile.mkdtemp(prefix=f"{lab.tag}-"))  # kept: SIPp's logs
        print(f"soakcalls: logs in {work}", file=sys.stderr)
        write_tone(work / TONE)
        # one SIPp box placing RATE calls/s is a trunk, not a phone: trusted, so the
        # per-source SIP rate limit (200 packets/s) does not apply to it
        gw = start_gateway(lab, "--trusted", f"{V6_HOST}/128", "--trusted", f"{V4_HOST}/32",
                           "--metrics-listen", METRICS,
                           "--log-level", "warning", directory=work / "gw")
        uas_argv = ["sipp", "-sf", str(SIPP_DIR / "uas.xml"), "-s", "bob", "-i", str(V4_HOST),
                    "-p", "5060", "-mi", str(V4_HOST), "-mp", "7000", "-t", "u1",
                    "-l", "100000", "-nostdin"]
        with (work / "uas.log").open("wb") as log:
            uas = lab.exec(lab.v4, uas_argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log,
                           stderr=subprocess.STDOUT)
        try:
            pid = gw.pid()
            assert pid is not None
            time.sleep(0.5)
            warm = run_calls(lab, work, "warmup", args.warmup, args.rate, gw, pid,
                             args.every, t0)
            before = settle(gw, lab, pid)
            t1 = time.monotonic()
            ok, failed = run_calls(lab, work, "soak", args.calls, args.rate, gw, pid,
                                   args.every, t0)
            wall = time.monotonic() - t1
            after = settle(gw, lab, pid)
        finally:
            uas.terminate()
            uas.wait(timeout=10)
            gw.stop()
    finally:
        lab.down()
    summary = {
        "figure": "soak_calls", "impl": "ebpf", "calls": args.calls, "calls_ok": ok,
        "calls_failed": failed, "warmup_ok": warm[0], "rate": args.rate,
        "calls_per_s": round(ok / wall, 1), "seconds": round(wall),
        "kernel_packets": after["kernel_packets"] - before["kernel_packets"],
        "sessions": after["sessions"], "transactions": after["transactions"],
        "ports_in_use": after["ports_in_use"],
        "rss_kib_before": before["rss_kib"], "rss_kib_after": after["rss_kib"],
        "rss_change_pct": round(100 * (after["rss_kib"] - before["rss_kib"])
                                / before["rss_kib"], 1),
        "fds_before": before["fds"], "fds_after": after["fds"],
    }
    print(json.dumps(summary), flush=True)
    held = not (after["sessions"] or after["transactions"] or after["ports_in_use"]) \
        and abs(summary["rss_change_pct"]) <= 5 \
        and abs(after["fds"] - before["fds"]) <= 0.05 * before["fds"]
    return 0 if held and ok == args.calls else 1


if __name__ == "__main__":
    sys.exit(main())
