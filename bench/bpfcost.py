"""BPF program cost figure (``bpf_cost``): nanoseconds bpf/xlat.c spends on one translated
RTP packet (172-byte payload), v6->v4 and v4->v6, timed by the kernel with
BPF_PROG_TEST_RUN in the gateway namespace (so its FIB lookups see the lab's routes).

The program is loaded with its own flows (``EbpfDatapath`` on no interface, pinned in a
directory of its own) and installed as the daemon would: symmetric-RTP latching and a
per-flow rate cap (one high enough never to drop, so the check runs but never limits).
The frames carry complete UDP checksums, as packets from a NIC do, so the checksum is
updated inline; a CHECKSUM_PARTIAL packet (a local sender with tx checksum offload) costs
one bpf_l4_csum_replace() more (bpf/l4.h).

Two ways to time it, both against a baseline measured in the same run, on the same
frames, in the same interleaved loop:

- one run per call (``repeat`` 1), per direction. ``ns_per_packet`` and ``no_flow_ns``
  are medians of such calls minus ``test_run_overhead_ns``: the median duration the
  kernel reports for a baseline program that only returns TC_ACT_OK. That subtracts
  exactly what test_run wraps around one run (its two clock reads, bh disable/enable,
  the dispatch into the program and the program's return), and nothing of ours. Each
  call starts cold-ish (a syscall away), so this is the conservative figure.
- hot, ``repeat`` > 1. A repeated run gets the buffer the previous run rewrote, so a
  lone flow would be timed once and then on its no-flow path. Here two flows chain: the
  6->4 flow sends to the address:port the 4->6 flow matches, which sends back to the
  first one, so every run translates, alternating directions, until the hop limit runs
  out (255 -> 1: ``CYCLE_RUNS`` runs, checked on the frame that comes out). Its record
  (direction ``v6<->v4``) is the mean of both directions minus the baseline program's
  per-run time in the same kind of loop.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.env import PREFIX, BenchError, BenchLab
from xlat.addr import Endpoint
from xlat.lab import GW4, GW6, V4_HOST, V6_HOST, in_netns
from xlat.media.datapath import Flow, Latch
from xlat.media.ebpf import EbpfDatapath, prog_test_run

PAYLOAD = 172  # bytes of RTP: 20 ms of G.711 plus the 12-byte RTP header
RUNS, QUICK_RUNS = 20_000, 3_000  # one-run calls per frame
CYCLES, QUICK_CYCLES = 2_000, 300  # hot-cycle calls
RATE_CAP = 10_000_000  # pps: the rate check runs on every packet and never limits
IDLE_TIMEOUT = 3600.0
TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
HOP_LIMIT = 255
CYCLE_RUNS = HOP_LIMIT - 1  # a packet is translated while its TTL/hop limit is above 1

BASELINE_C = b"""
#include <uapi/linux/pkt_cls.h>
int baseline(struct __sk_buff *skb) { return TC_ACT_OK; }
"""

# The relay of one call, as the netns tests have it: A (IPv6) <-> B (IPv4).
RELAY6, RELAY4 = Endpoint(GW6, 30000), Endpoint(GW4, 30002)
A, B = Endpoint(V6_HOST, 5004), Endpoint(V4_HOST, 40000)
# The hot cycle: both matches are routed out of the gateway, so each FIB lookup succeeds
# and is cached as for a real peer (a local address would fail the lookup every time).
CYCLE6, CYCLE4 = Endpoint(V6_HOST, 6000), Endpoint(V4_HOST, 6004)
CYCLE_SRC6, CYCLE_SRC4 = Endpoint(GW6, 6006), Endpoint(GW4, 6002)
NO_FLOW6, NO_FLOW4 = Endpoint(GW6, 39000), Endpoint(GW4, 39000)  # relay ports with no flow


Runner = Callable[[bytes, int], tuple[int, int, bytes]]  # (frame, repeat) -> test run


@dataclass(frozen=True)
class Probe:
    """One frame to time on one program, and what the program must answer for it."""

    name: str
    run: Runner
    frame: bytes
    retval: int
    repeat: int = 1


def udp_frame(src: Endpoint, dst: Endpoint, hop_limit: int = 64) -> bytes:
    """Ethernet + IPv4/IPv6 + UDP (valid checksum) + PAYLOAD bytes of RTP-like data."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    ip = (IP(src=str(src.host), dst=str(dst.host), ttl=hop_limit) if src.host.version == 4
          else IPv6(src=str(src.host), dst=str(dst.host), hlim=hop_limit))
    rtp = b"\x80\x00" + bytes(range(PAYLOAD - 2))
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip
                 / UDP(sport=src.port, dport=dst.port) / rtp)


def flows() -> list[Flow]:
    """The call's two RTP flows (latching as the daemon installs them) and the cycle."""
    def flow(match: Endpoint, source: Endpoint, to: Endpoint, latch: Latch,
             reverse: Endpoint | None = None) -> Flow:
        return Flow("bpfcost", match, source, to, IDLE_TIMEOUT, latch, reverse,
                    rate_limit_pps=RATE_CAP)

    return [flow(RELAY6, RELAY4, B, Latch.LEARN, RELAY4),
            flow(RELAY4, RELAY6, A, Latch.LEARN, RELAY6),
            flow(CYCLE6, CYCLE_SRC4, CYCLE4, Latch.OFF),
            flow(CYCLE4, CYCLE_SRC6, CYCLE6, Latch.OFF)]


def median(values: Sequence[int]) -> int:
    return sorted(values)[len(values) // 2]


def timed(probes: Sequence[Probe], calls: int) -> dict[str, int]:
    """Median duration (ns per run, as the kernel reports it) of ``calls`` test runs of
    each probe, interleaved so that machine noise hits every probe alike. Raises
    BenchError if a program answers anything but its probe's ``retval``."""
    got: dict[str, list[int]] = {p.name: [] for p in probes}
    for _ in range(calls):
        for p in probes:
            retval, ns, _ = p.run(p.frame, p.repeat)
            if retval != p.retval:
                raise BenchError(f"bpf_cost: {p.name} returned {retval}, expected {p.retval}")
            got[p.name].append(ns)
    return {name: median(ns) for name, ns in got.items()}


def check_cycle(run: Runner, frame: bytes) -> None:
    """One hot cycle must translate on every run: the frame comes back as IPv6 to CYCLE6
    with hop limit 1 (HOP_LIMIT minus CYCLE_RUNS). Raises BenchError otherwise."""
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    retval, _, out = run(frame, CYCLE_RUNS)
    ip6 = Ether(out).getlayer(IPv6)
    if retval != TC_ACT_REDIRECT or ip6 is None or ip6.hlim != 1 or ip6.dst != str(CYCLE6.host):
        raise BenchError(f"bpf_cost: the hot cycle did not translate {CYCLE_RUNS} times "
                         f"(verdict {retval}, out {Ether(out).summary()})")


def measure(ours: Runner, baseline: Runner, runs: int, cycles: int) -> list[dict[str, Any]]:
    """The records, from test runs of our program and of the baseline program."""
    v64, v46 = udp_frame(A, RELAY6), udp_frame(B, RELAY4)
    once = timed([Probe("baseline", baseline, v64, TC_ACT_OK),
                  Probe("v6->v4", ours, v64, TC_ACT_REDIRECT),
                  Probe("v4->v6", ours, v46, TC_ACT_REDIRECT),
                  Probe("v6->v4 no flow", ours, udp_frame(A, NO_FLOW6), TC_ACT_OK),
                  Probe("v4->v6 no flow", ours, udp_frame(B, NO_FLOW4), TC_ACT_OK)], runs)
    cycle = udp_frame(CYCLE_SRC6, CYCLE6, HOP_LIMIT)
    check_cycle(ours, cycle)
    hot = timed([Probe("baseline", baseline, cycle, TC_ACT_OK, CYCLE_RUNS),
                 Probe("cycle", ours, cycle, TC_ACT_REDIRECT, CYCLE_RUNS)], cycles)
    records: list[dict[str, Any]] = [
        {"figure": "bpf_cost", "impl": "ebpf", "direction": d,
         "ns_per_packet": once[d] - once["baseline"],
         "no_flow_ns": once[f"{d} no flow"] - once["baseline"],
         "test_run_overhead_ns": once["baseline"], "runs": runs,
         "method": "BPF_PROG_TEST_RUN, one run per call, median"}
        for d in ("v6->v4", "v4->v6")]
    records.append(
        {"figure": "bpf_cost", "impl": "ebpf", "direction": "v6<->v4",
         "ns_per_packet": hot["cycle"] - hot["baseline"],
         "test_run_overhead_ns": hot["baseline"], "runs": cycles * CYCLE_RUNS,
         "method": f"BPF_PROG_TEST_RUN, hot: {CYCLE_RUNS} alternating runs per call, "
                   "median of the means"})
    return records


def figures(lab: BenchLab, quick: bool) -> Iterator[dict[str, Any]]:
    """Two ``bpf_cost`` records, one per direction (one run per call), and a hot one."""
    yield from measure_in(lab.gw, lab.bpffs, quick)


def measure_in(netns: str, bpffs: Path, quick: bool) -> list[dict[str, Any]]:
    """The records of ``figures``: the program and its flows loaded in namespace ``netns``
    (maps pinned in a directory of their own under the bpf filesystem ``bpffs``, removed
    after), with the baseline program beside it."""
    from bcc import BPF

    with contextlib.ExitStack() as cleanup:
        baseline = BPF(text=BASELINE_C)
        cleanup.callback(baseline.cleanup)
        with in_netns(netns):
            datapath = EbpfDatapath([], bpffs=bpffs / f"{PREFIX}-cost-{uuid.uuid4().hex[:6]}")
        cleanup.callback(datapath.close, keep=False)
        datapath.install(flows())
        base_fd = baseline.load_func(b"baseline", BPF.SCHED_CLS).fd
        with in_netns(netns):
            return measure(datapath.test_run, functools.partial(prog_test_run, base_fd),
                           *((QUICK_RUNS, QUICK_CYCLES) if quick else (RUNS, CYCLES)))
