"""Media figures: zero-loss packet rate and CPU per packet of each relay, the BPF
program's own cost, and many concurrent low-rate streams through xlat eBPF.

Every relay is driven through the same ``Relay`` shape: a context manager that runs the
daemon (or nothing) and, per trial, opens a fresh path (a new xlat session, a new
rtpengine call) so one trial's overload cannot poison the next (rtpengine stops
forwarding a stream for good once its socket queue overflowed).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from bench import ngclient
from bench.env import (
    FWD4_HOST,
    FWD6_HOST,
    GW4,
    GW6,
    V4_HOST,
    V6_HOST,
    BenchError,
    BenchLab,
    Lane,
    RawSender,
    Rtpengine,
    Xlat,
    blast,
    free_udp_port,
    run_in,
)

DIRECTIONS = ("v6->v4", "v4->v6")
MAX_LOSS = 0.001  # "zero loss": at most 0.1 % of the datagrams sent
SENDER_SLACK = 0.97  # a trial counts only if the sender reached 97 % of the asked rate
CPU_RATE = 20_000.0  # fixed rate of the CPU runs: every relay here sustains it
SEARCH_START = 20_000.0
SEARCH_MAX = 2_000_000.0


@dataclass
class Settings:
    trial_s: float  # duration of one search trial
    precision: float  # stop bisecting when high/low is below this
    cpu_s: float  # duration of the fixed-rate CPU run
    stream_s: float  # duration of the many-streams runs
    stream_counts: tuple[int, ...] = (100, 1000)
    bpf_rates: tuple[float, ...] = (CPU_RATE, 4 * CPU_RATE)  # busier = warmer caches
    cpu_pairs: int = 3  # direct/relay run pairs per CPU figure
    recover_s: float = 1.0  # pause after a lossy trial


FULL = Settings(trial_s=2.0, precision=1.1, cpu_s=2.0, stream_s=5.0)
QUICK = Settings(trial_s=0.4, precision=2.0, cpu_s=0.5, stream_s=1.0, stream_counts=(100,),
                 bpf_rates=(CPU_RATE,), cpu_pairs=1, recover_s=0.3)


@dataclass
class Relay:
    """One implementation under test. ``open(direction, n)`` is a context manager
    yielding a Lane with ``n`` streams; ``pids`` are the processes that relay."""

    impl: str
    open: Callable[[str, int], contextlib.AbstractContextManager[Lane]]
    pids: list[int] = field(default_factory=list)


class Ports:
    """Fresh even peer ports for every trial (the peers' side, not the relay's)."""

    def __init__(self) -> None:
        self._next = 10000

    def take(self) -> int:
        self._next = 10000 if self._next > 28000 else self._next + 2
        return self._next


def direct(lab: BenchLab) -> Relay:
    """No gateway: the sender sends to a sink on the gateway's own address (one veth
    hop). The sender ceiling, and the CPU baseline every relay is measured against."""
    ports = Ports()

    @contextlib.contextmanager
    def open_(direction: str, n: int) -> Iterator[Lane]:
        q = ports.take()
        if direction == "v6->v4":
            yield Lane(lab.v6, V6_HOST, 0, GW6, (q,) * n, lab.gw, GW6, q)
        else:
            yield Lane(lab.v4, V4_HOST, 0, GW4, (q,) * n, lab.gw, GW4, q)

    return Relay("direct", open_)


def forward(lab: BenchLab) -> Relay:
    """Plain kernel forwarding across the gateway, same family both sides."""
    ports = Ports()

    @contextlib.contextmanager
    def open_(direction: str, n: int) -> Iterator[Lane]:
        q = ports.take()
        if direction == "v6->v4":
            yield Lane(lab.v6, V6_HOST, 0, FWD6_HOST, (q,) * n, lab.v4, FWD6_HOST, q)
        else:
            yield Lane(lab.v4, V4_HOST, 0, FWD4_HOST, (q,) * n, lab.v6, FWD4_HOST, q)

    return Relay("forward", open_)


def _lane(direction: str, lab: BenchLab, p: int, q: int, relays6: list[tuple[str, int]],
          relays4: list[tuple[str, int]]) -> Lane:
    """v6 peer at [V6_HOST]:p, v4 peer at V4_HOST:q; relays6 face the v6 peer."""
    if direction == "v6->v4":
        return Lane(lab.v6, V6_HOST, p, relays6[0][0], tuple(r[1] for r in relays6),
                     lab.v4, V4_HOST, q)
    return Lane(lab.v4, V4_HOST, q, relays4[0][0], tuple(r[1] for r in relays4),
                 lab.v6, V6_HOST, p)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def xlat_relay(lab: BenchLab, datapath: str) -> Iterator[Relay]:
    """xlat as a user runs it; one manual session per stream (``session add``)."""
    ports = Ports()
    with Xlat(lab, datapath=datapath) as daemon:

        @contextlib.contextmanager
        def open_(direction: str, n: int) -> Iterator[Lane]:
            p, q = ports.take(), ports.take()
            sessions = [daemon.call("session.add", peer_a=f"[{V6_HOST}]:{p}",
                                    peer_b=f"{V4_HOST}:{q}") for _ in range(n)]
            # session.add replies before the daemon hands the flows to the datapath (on
            # its next loop turn): packets sent at once are lost. Any later request is
            # served after that turn, so one round trip is the barrier.
            daemon.call("version")
            try:
                yield _lane(direction, lab, p, q,
                            [_host_port(s["legs"][0]["relay"]) for s in sessions],
                            [_host_port(s["legs"][1]["relay"]) for s in sessions])
            finally:
                for s in sessions:
                    daemon.call("session.del", id=s["id"])

        yield Relay(datapath, open_, [daemon.pid])


@contextlib.contextmanager
def rtpengine_relay(lab: BenchLab) -> Iterator[Relay]:
    """Debian's rtpengine (userspace); one NG offer/answer call per stream."""
    ports = Ports()
    ng_port = free_udp_port(lab.gw)
    with Rtpengine(lab, ng_port) as rtp, \
            ngclient.NgClient(lab.gw, ("127.0.0.1", ng_port)) as ng:

        @contextlib.contextmanager
        def open_(direction: str, n: int) -> Iterator[Lane]:
            p, q = ports.take(), ports.take()
            with contextlib.ExitStack() as calls:
                relays = [calls.enter_context(ngclient.call(ng, (V6_HOST, p), (V4_HOST, q)))
                          for _ in range(n)]
                yield _lane(direction, lab, p, q, [r[0] for r in relays],
                            [r[1] for r in relays])

        yield Relay("rtpengine", open_, [rtp.pid])


# ---- measurements --------------------------------------------------------------------------


def trial(lab: BenchLab, relay: Relay, direction: str, rate: float, seconds: float,
          streams: int = 1, raw: RawSender | None = None) -> dict[str, Any]:
    with relay.open(direction, streams) as lane:
        return blast(lab.exe, lane, rate, seconds, cpu_pids=relay.pids, raw=raw)


def passed(result: dict[str, Any], rate: float) -> bool:
    achieved = result["sent"] / result["elapsed"]
    return result["loss"] <= MAX_LOSS and achieved >= SENDER_SLACK * rate


def zero_loss_rate(lab: BenchLab, relay: Relay, direction: str, s: Settings,
                   raw: RawSender | None = None) -> dict[str, Any]:
    """Highest rate with loss <= MAX_LOSS: double from SEARCH_START until a trial fails
    (or halve until one passes), then bisect between the last pass and the first fail
    until they are within ``s.precision`` of each other. One trial per rate, a second
    when the sender fell short without loss (another process may have had its core)."""
    results: dict[float, dict[str, Any]] = {}

    def ok(rate: float) -> bool:
        for _ in range(2):
            r = results[rate] = trial(lab, relay, direction, rate, s.trial_s, raw=raw)
            if passed(r, rate):
                return True
            if r["loss"] > MAX_LOSS:
                time.sleep(s.recover_s)  # let an overloaded relay drain before the next
                return False
        return False

    low, high = 0.0, SEARCH_MAX
    rate = SEARCH_START
    if ok(rate):
        low = rate
        while low * 2 <= SEARCH_MAX and ok(low * 2):
            low *= 2
        high = min(low * 2, SEARCH_MAX)
    else:
        high = rate
        while high / 2 >= 1000 and not ok(high / 2):
            high /= 2
        low = high / 2 if high / 2 >= 1000 else 0.0
    while low and high / low > s.precision:
        mid = (low * high) ** 0.5
        if ok(mid):
            low = mid
        else:
            high = mid
    failed = results.get(high)
    out: dict[str, Any] = {"trials": len(results), "trial_s": s.trial_s}
    if low == 0.0:
        return out | {"pps": 0, "error": "loss above 0.1 % even at 1,000 pps"}
    best = results[low]
    out |= {"pps": round(best["sent"] / best["elapsed"]), "loss": round(best["loss"], 6),
            "reordered": round(best["reordered"] / max(1, best["received"]), 6)}
    if failed is not None:
        sender_bound = failed["sent"] / failed["elapsed"] < SENDER_SLACK * high
        out["bound"] = ("sender core" if sender_bound
                        else f"loss {failed['loss']:.2%} at {high:.0f}")
    else:
        out["bound"] = "search cap"
    return out


def cpu_cost(lab: BenchLab, relay: Relay, base: Relay, direction: str, s: Settings
             ) -> dict[str, Any]:
    """CPU per packet the relay adds over the direct path at CPU_RATE: ``s.cpu_pairs``
    pairs of runs, direct then relay, back to back (so both see the same background
    load); the median difference, and the spread. None when the relay lost more than
    1 % at that rate (the packets were not all relayed)."""
    added, runs = [], []
    for _ in range(s.cpu_pairs):
        b = trial(lab, base, direction, CPU_RATE, s.cpu_s)
        r = trial(lab, relay, direction, CPU_RATE, s.cpu_s)
        added.append((r["total_cpu_ns"] / r["sent"] - b["total_cpu_ns"] / b["sent"]) / 1e3)
        runs.append(r)
    worst = max(runs, key=lambda r: r["loss"])
    ok = worst["loss"] <= 0.01
    added.sort()
    return {"cpu_us_per_pkt": round(added[len(added) // 2], 3) if ok else None,
            "cpu_us_range": f"{added[0]:.2f}..{added[-1]:.2f}" if ok and len(added) > 1
            else None,
            "cpu_rate": CPU_RATE, "cpu_run_loss": round(worst["loss"], 6),
            "transit_us_p50": runs[0]["transit_us_p50"],
            "transit_us_p99": runs[0]["transit_us_p99"]}


def media_figures(lab: BenchLab, s: Settings) -> Iterator[dict[str, Any]]:
    """media_pps for every relay and direction, sender_ceiling, bpf_prog_ns, streams."""
    ceiling = direct(lab)
    for d in DIRECTIONS:
        b = trial(lab, ceiling, d, CPU_RATE, s.cpu_s)
        found = zero_loss_rate(lab, ceiling, d, s)
        yield {"figure": "sender_ceiling", "impl": "direct", "direction": d, **found,
               "cpu_us_per_pkt_total": round(b["total_cpu_ns"] / b["sent"] / 1e3, 3)}

    def measure(relay: Relay, d: str) -> dict[str, Any]:
        cpu = cpu_cost(lab, relay, ceiling, d, s)  # before any overload
        found = zero_loss_rate(lab, relay, d, s)
        return {"figure": "media_pps", "impl": relay.impl, "direction": d, **found, **cpu}

    for d in DIRECTIONS:
        yield measure(forward(lab), d)
    # A fresh daemon per direction: what an overload did to one cannot leak into the other.
    for impl, make in (("ebpf", lambda: xlat_relay(lab, "ebpf")),
                       ("userspace", lambda: xlat_relay(lab, "userspace")),
                       ("rtpengine", lambda: rtpengine_relay(lab))):
        for d in DIRECTIONS:
            try:
                with make() as relay:
                    if impl == "ebpf" and d == DIRECTIONS[0]:
                        yield from bpf_cost(lab, relay, s)
                        for n in s.stream_counts:
                            yield streams(lab, relay, n, s, base_relay=ceiling)
                    yield measure(relay, d)
            except BenchError as e:
                yield {"figure": "media_pps", "impl": impl, "direction": d, "error": str(e)}
    try:
        yield from relay_bound(lab, s)
    except BenchError as e:
        yield {"figure": "media_pps_relay", "impl": "-", "error": str(e)}


# ---- where the relay is the limit -----------------------------------------------------------

# With veth, a packet's whole way through the gateway runs in the softirq of the CPU that
# sent it: the socket figures above stop where the sender's core is full, so they
# measure the sender. Here the gateway's receive side is steered to a core of its own
# (RPS on its two veths) while the sender, now ready-made frames through AF_PACKET (no
# UDP socket, no IP output), and the sink share the other one.
SENDER_CPU, RELAY_CPU = 0, 1


@contextlib.contextmanager
def relay_on_its_own_core(lab: BenchLab) -> Iterator[None]:
    """RPS: what gw6 and gw4 receive is processed on RELAY_CPU, for the block."""
    def steer(mask: int) -> None:
        for ifname in ("gw6", "gw4"):
            run_in(lab.gw, ["sh", "-c",
                            f"echo {mask:x} > /sys/class/net/{ifname}/queues/rx-0/rps_cpus"])

    steer(1 << RELAY_CPU)
    try:
        yield
    finally:
        steer(0)


def raw_sender(lab: BenchLab, direction: str) -> RawSender:
    """Frames from the sending host's eth0 to the gateway's MAC on that link."""
    host, gw_if = (lab.v6, "gw6") if direction == "v6->v4" else (lab.v4, "gw4")
    return RawSender("eth0", lab.lab.mac(host, "eth0"), lab.lab.mac(lab.gw, gw_if), SENDER_CPU)


def relay_bound(lab: BenchLab, s: Settings) -> Iterator[dict[str, Any]]:
    """``media_pps_relay``: zero-loss packets/s of plain forwarding and of xlat eBPF with
    the relay on a core of its own and the fast sender, in the same run."""
    if (os.cpu_count() or 1) <= RELAY_CPU:
        yield {"figure": "media_pps_relay", "impl": "-", "error": "needs two CPUs"}
        return
    def measure(relay: Relay) -> Iterator[dict[str, Any]]:
        for d in DIRECTIONS:
            found = zero_loss_rate(lab, relay, d, s, raw=raw_sender(lab, d))
            if found.get("bound") == "sender core":
                found["bound"] = "sender (frames) core"
            yield {"figure": "media_pps_relay", "impl": relay.impl, "direction": d,
                   "sender": "udpblast frames", **found}

    with relay_on_its_own_core(lab):
        yield from measure(forward(lab))  # as in media_pps: no xlat running
        with xlat_relay(lab, "ebpf") as ebpf:
            yield from measure(ebpf)


# ---- many streams ---------------------------------------------------------------------------


STREAM_PPS = 50


def streams(lab: BenchLab, relay: Relay, n: int, s: Settings, base_relay: Relay
            ) -> dict[str, Any]:
    """``n`` streams at 50 pps each, v6->v4, through ``relay``; jitter and CPU compared
    with the same load sent straight to a sink on the gateway."""
    rate = n * STREAM_PPS
    base = trial(lab, base_relay, "v6->v4", rate, s.stream_s, streams=n)
    got = trial(lab, relay, "v6->v4", rate, s.stream_s, streams=n)
    total, base_total = got["total_cpu_ns"], base["total_cpu_ns"]
    return {
        "figure": "media_streams", "impl": relay.impl, "direction": "v6->v4", "streams": n,
        "pps": rate, "streams_seen": got["streams"], "loss": round(got["loss"], 6),
        "jitter_us": got["jitter_us"], "added_jitter_us": round(got["jitter_us"]
                                                                - base["jitter_us"], 3),
        "transit_us_p99": got["transit_us_p99"],
        "added_cpu_pct": round((total - base_total) / got["elapsed"] / 1e7, 2),
        "cpu_us_per_pkt": round((total / got["sent"] - base_total / base["sent"]) / 1e3, 3),
        "daemon_cpu_pct": round(got["relay_cpu_ns"] / got["elapsed"] / 1e7, 2),
    }


# ---- the BPF program's own cost ------------------------------------------------------------


def tc_prog_ids(lab: BenchLab) -> list[int]:
    """Ids of the BPF programs attached at tc ingress of the gateway's interfaces."""
    ids: set[int] = set()
    for ifname in ("gw6", "gw4"):
        out = run_in(lab.gw, ["tc", "-j", "filter", "show", "dev", ifname, "ingress"])
        for f in json.loads(out or "[]"):
            prog = f.get("options", {}).get("prog", {})
            if "id" in prog:
                ids.add(int(prog["id"]))
    return sorted(ids)


def prog_stats(ids: list[int]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over programs (needs kernel.bpf_stats_enabled)."""
    t = c = 0
    for i in ids:
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(i)],
                                         capture_output=True, text=True, check=True).stdout)
        t += int(info.get("run_time_ns", 0))
        c += int(info.get("run_cnt", 0))
    return t, c


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 for the block (a global switch: restored after)."""
    path = "/proc/sys/kernel/bpf_stats_enabled"
    with open(path) as f:
        old = f.read().strip()
    with open(path, "w") as f:
        f.write("1\n")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old + "\n")


# BPF_PROG_TEST_RUN's ``repeat`` reruns the program on the same buffer, which the first
# run has already rewritten (to an address no flow matches): so one run per call, many
# calls, median. Each run is then cold (a fresh skb, cold caches, clock reads around
# one run): an upper bound; the live-traffic figure is the one to quote.
def live_cost(lab: BenchLab, ids: list[int], relay: Relay, d: str, rate: float,
              s: Settings, what: str) -> dict[str, Any]:
    """bpf_stats run_time_ns / run_cnt of the programs over one trial through ``relay``."""
    with bpf_stats():
        t0, c0 = prog_stats(ids)
        r = trial(lab, relay, d, rate, s.cpu_s)
        t1, c1 = prog_stats(ids)
    runs = c1 - c0
    return {"figure": "bpf_prog_ns", "impl": "ebpf", "direction": d,
            "method": f"bpf_stats, {what} at {rate / 1000:.0f} kpps",
            "ns_per_pkt": round((t1 - t0) / runs, 1) if runs else None,
            "runs": runs, "packets": r["sent"]}


def bpf_cost(lab: BenchLab, relay: Relay, s: Settings) -> Iterator[dict[str, Any]]:
    """ns per packet of the tc program on the real traffic of a fixed-rate run
    (run_time_ns / run_cnt with kernel.bpf_stats_enabled). BPF_PROG_TEST_RUN on its own
    is the ``bpf`` figure (bench/bpfcost.py)."""
    ids = tc_prog_ids(lab)
    if not ids:
        yield {"figure": "bpf_prog_ns", "impl": "ebpf", "error": "no tc program found"}
        return
    for d in DIRECTIONS:
        for rate in s.bpf_rates:
            yield live_cost(lab, ids, relay, d, rate, s, "live traffic")
        # the fixed part: packets no flow matches (plain forwarding through the gateway)
        yield live_cost(lab, ids, forward(lab), d, CPU_RATE, s, "packets no flow matches")
