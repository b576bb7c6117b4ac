"""The one interface every media datapath implements.

A *flow* is one direction of one relayed stream: packets arriving at ``match``
(a relay address:port of ours) leave from ``source`` (our relay on the other
leg, possibly the other IP family) towards ``to`` (the peer). A session with one
RTP stream has four flows: RTP and RTCP, each way.

Implementations: ``ebpf.EbpfDatapath`` (the kernel does the work),
``userspace.UserspaceRelay`` (sockets; fallback), ``nft.NftGuard`` (admits the relay
ports a userspace relay serves; it forwards nothing) and, in unit tests,
``FakeDatapath``. ``CompositeDatapath`` is what the daemon drives: it hands each batch to the
forwarders, and to the guard when a userspace relay runs, and merges their counters.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from xlat.addr import Endpoint

log = logging.getLogger("xlat")


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
    """A datapath that moves packets (eBPF, userspace), not only admits them (nft).

    ``behind_guard``: its packets reach it through the IP stack, after table inet xlat
    (sockets), so the guard must admit its flows' relay ports; eBPF acts at TC ingress,
    before netfilter. ``close_blocks``: ``close`` talks netlink through pyroute2, whose
    synchronous API runs an event loop of its own: call it from a worker thread."""

    behind_guard: bool
    close_blocks: bool

    def forwarded(self) -> DropCounter:
        """Packets/bytes it relayed itself (eBPF: redirected by the program, not handed
        to the stack), a running total, cheap to read at any number of flows. The eBPF
        total lives in a pinned map: it carries over a ``--keep-datapath`` restart."""
        ...


@dataclass
class FakeDatapath:
    """In-memory datapath for unit tests of the layers above: records what it is told."""

    name: str = "fake"
    behind_guard: bool = False
    close_blocks: bool = False
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


class Batch(Protocol):
    """What ``SessionManager.drain()`` hands out, applied in this order."""

    @property
    def remove(self) -> Sequence[Endpoint]: ...

    @property
    def install(self) -> Sequence[Flow]: ...

    @property
    def refresh(self) -> Sequence[Flow]: ...


class Timer(Protocol):
    def cancel(self) -> None: ...


# loop.call_later's shape: the composite arms the guard's batch with it
Scheduler = Callable[[float, Callable[[], None]], Timer]
GUARD_DELAY = 0.02  # seconds the nft guard's changes wait to be batched


class CompositeDatapath:
    """The daemon's one datapath: each batch goes to every forwarder at once, and to the
    guard (nft) within ``GUARD_DELAY``, batched: an nft transaction costs ~0.3 ms, and
    the guard only sees what the kernel passes up (eBPF redirects before netfilter), so
    the kernel path never waits for it. The guard learns flows only when a forwarder is
    ``behind_guard`` (sockets: the guard must admit their relay ports); with eBPF alone
    the whole relay range stays closed to the stack. When every forwarder is behind the
    guard, relay traffic needs its admission first: no delay. Counters and drops are
    merged over the parts; a part that fails a batch is logged, the others still get it.
    """

    def __init__(self, forwarders: Sequence[Forwarder], guard: Datapath | None = None,
                 call_later: Scheduler | None = None, guard_delay: float = GUARD_DELAY
                 ) -> None:
        self.forwarders = list(forwarders)
        self.guard = guard
        self.admits = guard is not None and any(f.behind_guard for f in self.forwarders)
        self._delay = guard_delay if not all(f.behind_guard for f in self.forwarders) else 0.0
        self._call_later = call_later
        self._changes: dict[Endpoint, Flow | None] = {}  # None: remove
        self._refresh: dict[Endpoint, Flow] = {}
        self._timer: Timer | None = None

    @property
    def name(self) -> str:
        """What relays media: ``ebpf``, ``userspace`` or ``ebpf+userspace``."""
        return "+".join(p.name for p in self.forwarders)

    @property
    def parts(self) -> list[Datapath]:
        return [*self.forwarders, *([self.guard] if self.guard is not None else [])]

    def apply(self, batch: Batch) -> None:
        _apply(self.forwarders, batch.remove, batch.install, batch.refresh)
        if not self.admits:
            return
        for match in batch.remove:
            self._changes[match] = None
        for flow in batch.install:
            self._changes[flow.match] = flow
        for flow in batch.refresh:
            self._refresh[flow.match] = flow
        if self._timer is None and (self._changes or self._refresh):
            if self._call_later is None or self._delay == 0.0:
                self.flush_guard()
            else:
                self._timer = self._call_later(self._delay, self.flush_guard)

    def flush_guard(self) -> None:
        """Hand the guard what waits for it now (the timer does; so does a stop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        changes, self._changes = self._changes, {}
        refresh, self._refresh = self._refresh, {}
        if self.guard is None or not (changes or refresh):
            return
        remove = [m for m, f in changes.items() if f is None]
        install = [f for f in changes.values() if f is not None]
        _apply([self.guard], remove, install, [f for m, f in refresh.items() if m not in changes])

    def adopt(self, flows: Sequence[Flow]) -> None:
        """Take over what a previous daemon left in each forwarder: a flow ``flows``
        explains is left as it is (its counters and what latching learnt survive), one
        that lacks is installed, the rest is stale and removed."""
        wanted = {f.match for f in flows}
        stale: list[Endpoint] = []
        for part in self.forwarders:
            present = part.counters()
            drop = [m for m in present if m not in wanted]
            missing = [f for f in flows if f.match not in present]
            _apply([part], drop, missing, [])
            stale += drop
            if present or missing:
                log.info("%s: %d flow(s) adopted as they are, %d installed, %d stale removed",
                         part.name, len(present) - len(drop), len(missing), len(drop))
        if self.admits and self.guard is not None:  # it admits what the sockets serve
            _apply([self.guard], stale, flows, [])

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        """Per-flow counters summed over the forwarders (the kernel and the relay
        sockets for what the kernel passed up); the latest last_seen wins."""
        merged: dict[Endpoint, FlowCounters] = {}
        for part in self.forwarders:
            for match, c in part.counters(matches).items():
                m = merged.setdefault(match, FlowCounters())
                m.packets += c.packets
                m.bytes += c.bytes
                if c.last_seen >= m.last_seen:
                    m.last_seen, m.to = c.last_seen, c.to or m.to
        return merged

    def drops(self) -> dict[str, DropCounter]:
        total: dict[str, DropCounter] = {}
        for part in self.parts:
            for reason, d in part.drops().items():
                t = total.setdefault(reason, DropCounter())
                t.packets += d.packets
                t.bytes += d.bytes
        return total

    async def close(self, keep: bool) -> None:
        """Flush the guard's batch, then close the guard and the forwarders, last first;
        one that blocks on netlink (``close_blocks``) in a worker thread."""
        self.flush_guard()
        for part in reversed(self.parts):
            try:
                if getattr(part, "close_blocks", False):
                    await asyncio.to_thread(part.close, keep)
                else:
                    part.close(keep)
            except Exception:
                log.exception("closing the %s datapath failed", part.name)


def _apply(parts: Sequence[Datapath], remove: Sequence[Endpoint], install: Sequence[Flow],
           refresh: Sequence[Flow]) -> None:
    """One batch to each part; a part that fails is logged and the others still get it."""
    for part in parts:
        try:
            if remove:
                part.remove(remove)
            if install:
                part.install(install)
            if refresh:
                part.refresh(refresh)
        except Exception:
            log.exception("datapath %s rejected a batch (%d install, %d remove)",
                          part.name, len(install), len(remove))
