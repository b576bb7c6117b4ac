"""Scale figure: many manual sessions in one xlat (eBPF datapath), installed through the
control socket: install rate, install latency as the table grows, daemon memory per
session, kernel map memory, and the cost of 10k sessions expiring at once.

There is no bulk API yet, so installs are ``session.add`` requests pipelined on one
control connection (the server answers each line in order)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.env import (
    GW4,
    GW6,
    V4_HOST,
    V6_HOST,
    BenchError,
    BenchLab,
    CpuMeter,
    Xlat,
    extra_media,
    rss_kib,
    run_in,
)
from bench.ng import percentile

PIPELINE = 200  # requests in flight on the control connection
PROBES = 200  # single round trips per latency checkpoint
IDLE_S = 2.0  # how long the daemon's idle CPU with all sessions installed is measured
SWEEP_WAIT = 2.5  # how long after the timeout we watch (xlat expires within 1 s)


class Pipeline:
    """One control connection; ``run`` sends requests back to back, then reads the
    replies in order (the JSON-lines protocol of xlat.control.api)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def run(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        self.sock.sendall(b"".join(json.dumps({"cmd": c, "args": a}).encode() + b"\n"
                                   for c, a in requests))
        results = []
        for _ in requests:
            reply = json.loads(self.reader.readline())
            if not reply.get("ok"):
                raise BenchError(f"xlat: {reply.get('error')}")
            results.append(reply["result"])
        return results


def add_request(i: int, timeout: float | None = None) -> tuple[str, dict[str, Any]]:
    args: dict[str, Any] = {"peer_a": f"[{V6_HOST}]:{10000 + 2 * (i % 20000)}",
                            "peer_b": f"{V4_HOST}:{10000 + 2 * (i % 20000)}"}
    if timeout is not None:
        args["timeout"] = timeout
    return "session.add", args


def install(pipe: Pipeline, first: int, n: int, timeout: float | None = None
            ) -> list[dict[str, Any]]:
    """Add sessions first..first+n-1; returns what ``session add -j`` says of each."""
    made: list[dict[str, Any]] = []
    for start in range(first, first + n, PIPELINE):
        batch = [add_request(i, timeout) for i in range(start, min(first + n, start + PIPELINE))]
        made += pipe.run(batch)
    return made


def probe_latency(pipe: Pipeline, first: int) -> tuple[float, float]:
    """p50/p99 (ms) of PROBES single session.add round trips (the sessions stay)."""
    times = []
    for i in range(first, first + PROBES):
        t0 = time.perf_counter()
        pipe.run([add_request(i)])
        times.append(time.perf_counter() - t0)
    return percentile(times, 0.5) * 1e3, percentile(times, 0.99) * 1e3


def map_memory(lab: BenchLab) -> int:
    """bytes_memlock of every map used by the gateway's tc programs."""
    from bench.media import tc_prog_ids

    map_ids: set[int] = set()
    for prog in tc_prog_ids(lab):
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog)],
                                         capture_output=True, text=True, check=True).stdout)
        map_ids.update(info.get("map_ids", []))
    total = 0
    for m in map_ids:
        info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(m)],
                                         capture_output=True, text=True, check=True).stdout)
        total += int(info.get("bytes_memlock", 0))
    return total


def figures(lab: BenchLab, quick: bool) -> Iterator[dict[str, Any]]:
    checkpoints = (0, 2500, 5000) if quick else (0, 50_000, 100_000)
    expiring, expire_timeout = (2000, 3.0) if quick else (10_000, 10.0)
    media4 = [GW4, *extra_media(4, 12)]
    media6 = [GW6, *extra_media(6, 12)]
    try:
        with Xlat(lab, media_v4=media4, media_v6=media6,
                  extra=["--ports", "20000-59999", "--delete-delay", "0"]) as daemon:
            yield from _measure(lab, daemon, checkpoints, expiring, expire_timeout)
    except BenchError as e:
        yield {"figure": "scale_sessions", "impl": "ebpf", "error": str(e)}


def _measure(lab: BenchLab, daemon: Xlat, checkpoints: Sequence[int], expiring: int,
             expire_timeout: float) -> Iterator[dict[str, Any]]:
    pipe = Pipeline(daemon.control)
    try:
        rss0, maps0 = rss_kib(daemon.pid), map_memory(lab)
        have = 0
        for target in checkpoints:
            if target > have:
                t0 = time.perf_counter()
                with CpuMeter([daemon.pid]) as cpu:
                    install(pipe, have, target - have)
                took = time.perf_counter() - t0
                yield {"figure": "scale_install", "impl": "ebpf", "from": have, "to": target,
                       "sessions_per_s": round((target - have) / took),
                       "daemon_cpu_us_per_session": round(cpu.used_ns / (target - have) / 1e3,
                                                          1)}
                have = target
            p50, p99 = probe_latency(pipe, have)
            have += PROBES
            yield {"figure": "scale_latency", "impl": "ebpf", "sessions": have - PROBES,
                   "add_ms_p50": round(p50, 3), "add_ms_p99": round(p99, 3)}
        t0 = time.perf_counter()
        stats = pipe.run([("stats", {})])[0]
        stats_ms = (time.perf_counter() - t0) * 1e3
        n = max(1, stats["sessions"])
        rss, maps = rss_kib(daemon.pid), map_memory(lab)
        with CpuMeter([daemon.pid]) as idle:
            time.sleep(IDLE_S)
        yield {"figure": "scale_sessions", "impl": "ebpf", "sessions": stats["sessions"],
               "flows": stats.get("flows"),
               "rss_mib": round(rss / 1024, 1),
               "rss_bytes_per_session": round((rss - rss0) * 1024 / n),
               "map_memlock_mib": round(maps / 2**20, 1),
               "map_bytes_per_session": round((maps - maps0) / n),
               "idle_daemon_cpu_pct": round(idle.used_ns / IDLE_S / 1e7, 1),
               "stats_ms": round(stats_ms, 1)}
        t0 = time.perf_counter()
        pipe.run([("session.flush", {})])
        yield {"figure": "scale_flush", "impl": "ebpf", "sessions": stats["sessions"],
               "flush_s": round(time.perf_counter() - t0, 3)}
        yield _expiry(lab, pipe, daemon, expiring, timeout=expire_timeout)
    finally:
        pipe.close()


def touch(lab: BenchLab, sessions: list[dict[str, Any]]) -> None:
    """One datagram from the v6 host to each session's v6 relay, as fast as the sender
    goes: the sessions' idle timers then all start within a fraction of a second."""
    by_host: dict[str, list[str]] = {}
    for s in sessions:
        host, _, port = s["legs"][0]["relay"].rpartition(":")
        by_host.setdefault(host.strip("[]"), []).append(port)
    for host, ports in by_host.items():
        run_in(lab.v6, [str(lab.exe), "send", V6_HOST, "0", "1000000",
                        f"{(len(ports) + 0.5) / 1e6:.7f}", "172", host, ",".join(ports)])


def _expiry(lab: BenchLab, pipe: Pipeline, daemon: Xlat, n: int, timeout: float
            ) -> dict[str, Any]:
    """``n`` sessions go idle together (installed, then one packet each) and expire.

    Meanwhile a cheap request (``version``) every 20 ms measures how long the daemon's
    loop stalls, and when; ``stats`` (which walks every flow) is asked only before and
    after, so the probe does not load the daemon it measures. CPU is the daemon's from
    just before the timeout to SWEEP_WAIT after it."""
    base = pipe.run([("stats", {})])[0]["sessions"]
    sessions = install(pipe, 0, n, timeout=timeout)
    pipe.run([("version", {})])  # the flows are in the datapath (see media.xlat_relay)
    t0 = time.monotonic()
    touch(lab, sessions)
    deadline = time.monotonic() + timeout
    touched_in = deadline - timeout - t0
    time.sleep(max(0.0, deadline - time.monotonic() - 0.2))
    worst, worst_at = 0.0, 0.0
    with CpuMeter([daemon.pid]) as cpu:
        while time.monotonic() < deadline + SWEEP_WAIT:
            t1 = time.perf_counter()
            pipe.run([("version", {})])
            took = time.perf_counter() - t1
            if took > worst:
                worst, worst_at = took, time.monotonic() - deadline
            time.sleep(0.02)
    left = pipe.run([("stats", {})])[0]["sessions"] - base
    return {"figure": "scale_expiry", "impl": "ebpf", "sessions": n, "left": max(0, left),
            "touched_in_s": round(touched_in, 2), "stall_ms": round(worst * 1e3, 1),
            "stall_at_s": round(worst_at, 2), "daemon_cpu_ms": round(cpu.used_ns / 1e6, 1)}
