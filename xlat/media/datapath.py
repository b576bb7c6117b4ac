"""The one interface every media datapath implements.

A *flow* is one direction of one relayed stream: packets arriving at ``match``
(a relay address:port of ours) leave from ``source`` (our relay on the other
leg, possibly the other IP family) towards ``to`` (the peer). A session with one
RTP stream has four flows: RTP and RTCP, each way.

Implementations: ``ebpf.EbpfDatapath`` (the kernel does the work),
``userspace.UserspaceRelay`` (sockets; fallback), ``nft.NftGuard`` (admits the relay
ports a userspace relay serves; it forwards nothing) and, in unit tests,
``FakeDatapath``. The daemon hands each change, in batches, to the forwarders, and to
the guard when a userspace relay runs.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from xlat.addr import Endpoint


class Latch(enum.IntEnum):
    """How a flow treats the source of the packets it receives (symmetric RTP)."""

    OFF = 0  # forward from anyone to ``to``; never learn
    LEARN = 1  # forward from anyone; the first packet's source becomes the reverse flow's ``to``
    STRICT = 2  # forward only packets whose source is ``expect``


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction of one relayed stream. Keyed by ``match``."""

    session: str
    match: Endpoint
    source: Endpoint
    to: Endpoint
    idle_timeout: float  # seconds without a packet before the kernel stops forwarding
    latch: Latch = Latch.LEARN
    reverse: Endpoint | None = None  # ``match`` of the opposite flow (LEARN updates its ``to``)
    expect: Endpoint | None = None  # STRICT: the only accepted source
    rate_limit_pps: int = 0  # per-flow packet-rate cap; 0 = none


@dataclass(slots=True)
class FlowCounters:
    """What the datapath counted for one flow. ``last_seen`` is CLOCK_MONOTONIC seconds
    (``time.monotonic()``, the clock ``bpf_ktime_get_ns`` reads), 0.0 = never."""

    packets: int = 0
    bytes: int = 0
    last_seen: float = 0.0
    to: Endpoint | None = None  # where it sends now (after latching), if the datapath knows


@dataclass(slots=True)
class DropCounter:
    packets: int = 0
    bytes: int = 0


class Datapath(Protocol):
    """Contract: calls are batched (one kernel transaction per call where the kernel
    allows); ``install`` adds or replaces flows by ``match`` (a replaced flow keeps
    its counters); ``remove`` of an unknown match is not an error."""

    name: str

    def install(self, flows: Sequence[Flow]) -> None: ...

    def remove(self, matches: Sequence[Endpoint]) -> None: ...

    def refresh(self, flows: Sequence[Flow]) -> None:
        """Flows that are alive: push their soft-state deadlines forward."""
        ...

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        """Counters of the given flows (all flows when None); unknown matches are left out.
        The expiry sweep asks only for the flows whose deadline is due."""
        ...

    def drops(self) -> dict[str, DropCounter]:
        """Packets not forwarded, by reason (``unallocated``, ``expired``, ...)."""
        ...

    def close(self, keep: bool) -> None:
        """Detach. ``keep``: leave kernel state (pinned maps, filters, table) for a
        restarted daemon to adopt."""
        ...


class Forwarder(Datapath, Protocol):
    """A datapath that moves packets (eBPF, userspace), not only admits them (nft)."""

    def forwarded(self) -> DropCounter:
        """Packets/bytes it relayed itself (eBPF: redirected by the program, not handed
        to the stack), a running total, cheap to read at any number of flows. The eBPF
        total lives in a pinned map: it carries over a ``--keep-datapath`` restart."""
        ...


@dataclass
class FakeDatapath:
    """In-memory datapath for unit tests of the layers above: records what it is told."""

    name: str = "fake"
    flows: dict[Endpoint, Flow] = field(default_factory=dict)
    stats: dict[Endpoint, FlowCounters] = field(default_factory=dict)
    refreshed: list[Endpoint] = field(default_factory=list)
    calls: int = 0

    def install(self, flows: Sequence[Flow]) -> None:
        self.calls += 1
        for f in flows:
            self.flows[f.match] = f
            self.stats.setdefault(f.match, FlowCounters())

    def remove(self, matches: Sequence[Endpoint]) -> None:
        self.calls += 1
        for m in matches:
            self.flows.pop(m, None)
            self.stats.pop(m, None)

    def refresh(self, flows: Sequence[Flow]) -> None:
        self.refreshed.extend(f.match for f in flows)

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        if matches is None:
            return dict(self.stats)
        return {m: self.stats[m] for m in matches if m in self.stats}

    def drops(self) -> dict[str, DropCounter]:
        return {}

    def forwarded(self) -> DropCounter:
        return DropCounter(sum(c.packets for c in self.stats.values()),
                           sum(c.bytes for c in self.stats.values()))

    def close(self, keep: bool) -> None:
        if not keep:
            self.flows.clear()
