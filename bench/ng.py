"""Control figure: NG offer+answer+delete cycles per second, one call at a time and 16
in flight, xlat against rtpengine, with set-up latency (offer sent → answer's reply)."""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import ngclient
from bench.env import (
    V4_HOST,
    V6_HOST,
    BenchError,
    BenchLab,
    CpuMeter,
    Rtpengine,
    Xlat,
    free_udp_port,
)

REPLY_TIMEOUT = 2.0  # a request unanswered this long fails its call


@dataclass
class Call:
    """One offer → answer → delete cycle driven by replies."""

    call_id: str
    n: int  # which of the run's calls (gives the peers' ports)
    step: int = 0  # 0 offer, 1 answer, 2 delete, 3 done
    started: float = 0.0
    setup_s: float = 0.0
    sent_at: float = 0.0

    def request(self) -> dict[str, Any]:
        port = 10000 + 2 * (self.n % 9000)
        return [ngclient.offer(self.call_id, (V6_HOST, port)),
                ngclient.answer(self.call_id, (V4_HOST, port)),
                ngclient.delete(self.call_id)][self.step]


@dataclass
class Run:
    calls: int
    in_flight: int
    elapsed: float = 0.0
    failed: int = 0
    setups: list[float] = field(default_factory=list)


def drive(ng: ngclient.NgClient, calls: int, in_flight: int) -> Run:
    """``calls`` cycles with at most ``in_flight`` calls open at once, on one socket;
    replies are matched by cookie. A failed or unanswered request ends its call."""
    run = Run(calls, in_flight)
    pending: dict[bytes, Call] = {}
    started = 0
    t0 = time.perf_counter()

    def send(call: Call) -> None:
        cookie = ng.cookie()
        call.sent_at = time.perf_counter()
        if call.step == 0:
            call.started = call.sent_at
        pending[cookie] = call
        ng.sock.send(ng.encode(cookie, call.request()))

    while started < calls or pending:
        while started < calls and len(pending) < in_flight:
            send(Call(f"ng-{uuid.uuid4().hex[:12]}", started))
            started += 1
        ready, _, _ = select.select([ng.sock], [], [], 0.1)
        now = time.perf_counter()
        if ready:
            cookie, reply = ng.decode(ng.sock.recv(65535))
            call = pending.pop(cookie, None)
            if call is None:
                continue
            if reply.get("result") != b"ok":
                run.failed += 1
                continue
            if call.step == 1:
                run.setups.append(now - call.started)
            call.step += 1
            if call.step < 3:
                send(call)
        for cookie, call in list(pending.items()):
            if now - call.sent_at > REPLY_TIMEOUT:
                del pending[cookie]
                run.failed += 1
    run.elapsed = time.perf_counter() - t0
    return run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def measure(impl: str, lab: BenchLab, port: int, pid: int, calls: int
            ) -> Iterator[dict[str, Any]]:
    with ngclient.NgClient(lab.gw, ("127.0.0.1", port)) as ng:
        drive(ng, min(calls, 50), 1)  # warm-up: first-call costs stay out of the figure
        for in_flight in (1, 16):
            with CpuMeter([pid]) as cpu:
                run = drive(ng, calls, in_flight)
            yield {
                "figure": "ng_setup_rate", "impl": impl, "in_flight": in_flight,
                "calls": calls, "failed": run.failed,
                "calls_per_s": round((calls - run.failed) / run.elapsed, 1),
                "setup_ms_p50": round(percentile(run.setups, 0.5) * 1e3, 3),
                "setup_ms_p99": round(percentile(run.setups, 0.99) * 1e3, 3),
                "daemon_cpu_ms_per_call": round(cpu.used_ns / calls / 1e6, 3),
            }


def figures(lab: BenchLab, quick: bool) -> Iterator[dict[str, Any]]:
    calls = 300 if quick else 3000
    port = free_udp_port(lab.gw)
    try:
        with Xlat(lab, datapath="ebpf", extra=["--ng-listen", f"127.0.0.1:{port}",
                                               "--delete-delay", "0",
                                               "--ports", "20000-59999"]) as daemon:
            yield from measure("xlat", lab, port, daemon.pid, calls)
    except BenchError as e:
        yield {"figure": "ng_setup_rate", "impl": "xlat", "error": str(e)}
    port = free_udp_port(lab.gw)
    try:
        with Rtpengine(lab, port) as rtp:
            yield from measure("rtpengine", lab, port, rtp.pid, calls)
    except BenchError as e:
        yield {"figure": "ng_setup_rate", "impl": "rtpengine", "error": str(e)}
