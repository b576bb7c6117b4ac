"""Scale figure: many manual sessions in one xlat (eBPF datapath), installed through the
control socket: install rate, install latency as the table grows, daemon memory per
session, kernel map memory, and the cost of 10k sessions expiring at once, with the SIP
latency a UA sees meanwhile (the daemon also listens for SIP).

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
from bench.sip import SipPing

PIPELINE = 200  # requests in flight on the control connection
PROBES = 200  # single round trips per latency checkpoint
IDLE_S = 2.0  # how long the daemon's idle CPU with all sessions installed is measured
SWEEP_WAIT = 2.5  # how long after the timeout we watch (xlat expires within 1 s)
PROBE_GAP = 0.02  # between a SIP probe's answer and the next probe
BASELINE_S = 2.0  # SIP probes before the expiry (same daemon, same sessions, all idle)


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
        with Xlat(lab, media_v4=media4, media_v6=media6, sip_listen=(f"[{GW6}]:5060",),
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

    A SIP OPTIONS from the v6 host, answered by the proxy itself (``SipPing``), every
    20 ms measures what signalling sees: first for BASELINE_S right after the sessions
    went idle (``baseline_sip_ms_*``), then from just before the timeout to SWEEP_WAIT
    after it (``sip_ms_*``). ``stall_ms`` is the slowest answer during the expiry less
    the baseline median, ``stall_at_s`` when it was sent (after the timeout). ``stats``
    (which walks every flow) is asked only before and after, so no probe loads the daemon
    it measures. CPU is the daemon's over the second window (the probes' share is small:
    50 OPTIONS/s)."""
    base = pipe.run([("stats", {})])[0]["sessions"]
    sessions = install(pipe, 0, n, timeout=timeout)
    pipe.run([("version", {})])  # the flows are in the datapath (see media.xlat_relay)
    with SipPing(lab.v6, V6_HOST, GW6) as ping:
        if ping.rtt() is None:
            raise BenchError(f"no answer to OPTIONS sent to [{GW6}]:5060")
        t0 = time.monotonic()
        touch(lab, sessions)
        deadline = time.monotonic() + timeout
        touched_in = deadline - timeout - t0
        before, lost_before = probe(ping, min(deadline - timeout + BASELINE_S, deadline - 0.5))
        time.sleep(max(0.0, deadline - time.monotonic() - 0.2))
        with CpuMeter([daemon.pid]) as cpu:
            during, lost = probe(ping, deadline + SWEEP_WAIT)
    left = pipe.run([("stats", {})])[0]["sessions"] - base
    if not before or not during:
        raise BenchError(f"OPTIONS unanswered: {len(before)} answers before the expiry, "
                         f"{len(during)} during it ({lost} lost)")
    sent_at, worst = max(during, key=lambda sample: sample[1])
    normal = percentile([rtt for _, rtt in before], 0.5)
    return {"figure": "scale_expiry", "impl": "ebpf", "sessions": n, "left": max(0, left),
            "touched_in_s": round(touched_in, 2), **latency("baseline_sip", before),
            "baseline_sip_lost": lost_before, **latency("sip", during), "sip_lost": lost,
            "stall_ms": round((worst - normal) * 1e3, 1),
            "stall_at_s": round(sent_at - deadline, 2),
            "daemon_cpu_ms": round(cpu.used_ns / 1e6, 1)}


def probe(ping: SipPing, until: float) -> tuple[list[tuple[float, float]], int]:
    """An OPTIONS round trip, PROBE_GAP apart, until the monotonic clock passes ``until``:
    (sent at, seconds) of each answered one, and how many went unanswered."""
    answered: list[tuple[float, float]] = []
    lost = 0
    while (sent := time.monotonic()) < until:
        rtt = ping.rtt()
        if rtt is None:
            lost += 1
        else:
            answered.append((sent, rtt))
        time.sleep(PROBE_GAP)
    return answered, lost


def latency(name: str, samples: list[tuple[float, float]]) -> dict[str, float | int]:
    """``{name}_ms_p50``, ``_ms_p99``, ``_ms_max`` of the round trips and ``{name}_probes``."""
    rtts = [rtt for _, rtt in samples]
    return {f"{name}_ms_p50": round(percentile(rtts, 0.5) * 1e3, 2),
            f"{name}_ms_p99": round(percentile(rtts, 0.99) * 1e3, 2),
            f"{name}_ms_max": round(max(rtts) * 1e3, 2),
            f"{name}_probes": len(rtts)}
