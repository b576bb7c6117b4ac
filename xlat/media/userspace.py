"""The userspace relay: the same flows as the eBPF datapath, forwarded by Python sockets.

It is the fallback datapath (``--datapath userspace``) and, next to the eBPF program
with ``--fallback-relay``, the receiver of what the kernel path passes up to the stack
(fragments, IPv4 options): the daemon then installs the same flows in both.

``RelayCore`` decides (sans-I/O, ``now`` passed in); ``UserspaceRelay`` is the socket
edge: one UDP socket per relay endpoint, read from the asyncio loop, each datagram
handed to the core and sent on from the socket its verdict names.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xlat.addr import Endpoint
from xlat.media import reasons
from xlat.media.datapath import DropCounter, Flow, FlowCounters, Latch

# Datagrams read from one socket per wake-up before yielding to the loop: enough to
# drain a burst, small enough that one busy stream cannot starve the others.
READ_BATCH = 64
# Largest UDP payload over IPv4/IPv6 (65535 minus the smallest headers).
MAX_DATAGRAM = 65535
# Parsing a source address costs more than the relay decision: the edge remembers up to
# this many (a flood of forged sources only empties the memo).
ADDRESS_MEMO = 4096


class DropReason(enum.StrEnum):
    """Why the relay did not forward a datagram (the keys of ``drops()``): the entries of
    ``bpf/reasons.h`` with a USERSPACE action, named here for the code that returns them (the
    check below holds the two to each other; meanings and actions live in the list)."""

    UNALLOCATED = "unallocated"
    EXPIRED = "expired"
    STRICT_MISMATCH = "strict_mismatch"
    RATE_LIMITED = "rate_limited"
    NO_PEER = "no_peer"
    SEND_FAILED = "send_failed"  # counted at the edge


if {r.value for r in DropReason} != {r.name for r in reasons.counted_by("userspace")}:
    raise reasons.ReasonsError("reasons.h USERSPACE column and userspace.DropReason differ")


@dataclass(frozen=True, slots=True)
class Forward:
    """Verdict: send the datagram from our relay endpoint ``source`` to ``to``."""

    source: Endpoint
    to: Endpoint


@dataclass(slots=True)
class _FlowState:
    flow: Flow
    to: Endpoint  # where it sends now: flow.to, or what the reverse flow latched
    alive_since: float  # install/refresh time or last packet: the idle timer's origin
    counters: FlowCounters = field(default_factory=FlowCounters)
    latched: bool = False  # LEARN: the first packet has set the reverse flow's ``to``
    tokens: float = 0.0  # rate limiter bucket (one second's worth at most)
    tokens_at: float = 0.0


class RelayCore:
    """Forward-or-drop decisions for installed flows. Time is passed in, in the clock of
    ``FlowCounters.last_seen`` (``time.monotonic`` seconds)."""

    def __init__(self) -> None:
        self._flows: dict[Endpoint, _FlowState] = {}
        self._drops: dict[str, DropCounter] = {}
        self._uses: Counter[Endpoint] = Counter()  # endpoint -> flows naming it

    def install(self, flows: Sequence[Flow], now: float
                ) -> tuple[list[Endpoint], list[Endpoint]]:
        """Add or replace flows by ``match``. A replaced flow keeps its counters; it keeps
        what it latched only if the flow itself is unchanged. Returns the endpoints no
        flow used before (the edge binds them) and those no flow uses any more, a
        replaced flow's old source (the edge closes them)."""
        was_used: dict[Endpoint, bool] = {}  # before this batch, for each endpoint it touches
        for flow in flows:
            old = self._flows.get(flow.match)
            state = _FlowState(flow, flow.to, now, tokens=flow.rate_limit_pps, tokens_at=now)
            if old is not None:
                state.counters = old.counters
                if old.flow == flow:
                    state.to, state.latched = old.to, old.latched
            state.counters.to = state.to
            self._flows[flow.match] = state
            for endpoint in (flow.match, flow.source):
                was_used.setdefault(endpoint, endpoint in self._uses)
                self._uses[endpoint] += 1
            if old is not None:
                for endpoint in self._unuse(old.flow):
                    was_used.setdefault(endpoint, True)
        return ([e for e, used in was_used.items() if not used and e in self._uses],
                [e for e, used in was_used.items() if used and e not in self._uses])

    def remove(self, matches: Sequence[Endpoint]) -> list[Endpoint]:
        """Forget flows; returns the endpoints no flow uses any more (the edge closes them)."""
        unused: list[Endpoint] = []
        for match in matches:
            state = self._flows.pop(match, None)
            if state is not None:
                unused += self._unuse(state.flow)
        return unused

    def _unuse(self, flow: Flow) -> list[Endpoint]:
        """Count a flow's endpoints one use less; returns those no flow uses now."""
        unused = []
        for endpoint in (flow.match, flow.source):
            self._uses[endpoint] -= 1
            if self._uses[endpoint] == 0:
                del self._uses[endpoint]
                unused.append(endpoint)
        return unused

    def refresh(self, flows: Sequence[Flow], now: float) -> None:
        """Restart the idle timers of these flows (signalling says they are alive)."""
        for flow in flows:
            state = self._flows.get(flow.match)
            if state is not None:
                state.alive_since = max(state.alive_since, now)

    def endpoints(self) -> set[Endpoint]:
        """Every relay endpoint a socket must be bound on: each flow's match and source."""
        return set(self._uses)

    def receive(
        self, match: Endpoint, sender: Endpoint, size: int, now: float
    ) -> Forward | DropReason:
        """A datagram of ``size`` bytes from ``sender`` arrived at our ``match``: where to
        send it, or why not (also counted in ``drops()``)."""
        verdict = self._decide(match, sender, size, now)
        if isinstance(verdict, DropReason):
            self.count_drop(verdict, size)
        return verdict

    def count_drop(self, reason: DropReason, size: int) -> None:
        """Count a drop (``receive`` does; the edge adds ``SEND_FAILED``)."""
        counter = self._drops.setdefault(reason.value, DropCounter())
        counter.packets += 1
        counter.bytes += size

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        states = (
            self._flows.items() if matches is None
            else ((m, self._flows[m]) for m in matches if m in self._flows)
        )
        return {
            m: FlowCounters(s.counters.packets, s.counters.bytes, s.counters.last_seen, s.to)
            for m, s in states
        }

    def drops(self) -> dict[str, DropCounter]:
        return {reason: DropCounter(c.packets, c.bytes) for reason, c in self._drops.items()}

    def _decide(
        self, match: Endpoint, sender: Endpoint, size: int, now: float
    ) -> Forward | DropReason:
        state = self._flows.get(match)
        if state is None:
            return DropReason.UNALLOCATED
        flow = state.flow
        if now - state.alive_since > flow.idle_timeout:
            return DropReason.EXPIRED
        if flow.latch is Latch.STRICT and sender != flow.expect:
            return DropReason.STRICT_MISMATCH
        if flow.rate_limit_pps and not self._take_token(state, now):
            return DropReason.RATE_LIMITED
        if flow.latch is Latch.LEARN and not state.latched:
            # Before the no_peer check on purpose: when both legs wait for their peer's
            # first packet, the one dropped here still tells the other way where to send.
            state.latched = True
            self._learn(flow.reverse, sender)
        if state.to.port == 0:
            return DropReason.NO_PEER
        state.alive_since = now
        state.counters.packets += 1
        state.counters.bytes += size
        state.counters.last_seen = now
        return Forward(flow.source, state.to)

    def _learn(self, reverse: Endpoint | None, sender: Endpoint) -> None:
        """Symmetric RTP: the reverse flow now sends to where this peer sends from."""
        back = self._flows.get(reverse) if reverse is not None else None
        if back is not None and back.flow.source.family == sender.family:
            back.to = back.counters.to = sender

    def _take_token(self, state: _FlowState, now: float) -> bool:
        rate = state.flow.rate_limit_pps
        state.tokens = min(rate, state.tokens + (now - state.tokens_at) * rate)
        state.tokens_at = now
        if state.tokens < 1.0:
            return False
        state.tokens -= 1.0
        return True


class RelayBindError(OSError):
    """A relay endpoint could not be bound (in use, or not an address of this host)."""


class UserspaceRelay:
    """``Datapath`` over UDP sockets on an asyncio loop (the running loop by default, so
    create it inside one). Sockets are bound in the network namespace of the thread that
    calls ``install``."""

    name = "userspace"
    behind_guard = True  # its sockets see only what table inet xlat admits
    close_blocks = False

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._clock = clock
        self._core = RelayCore()
        self._sockets: dict[Endpoint, socket.socket] = {}
        self._senders: dict[tuple[str, int], Endpoint] = {}
        self._forwarded = DropCounter()  # datagrams the kernel accepted for sending

    def install(self, flows: Sequence[Flow]) -> None:
        """Install the flows and bind a socket on each match and source not bound yet.
        Raises RelayBindError for an endpoint that cannot be bound; the flows stay
        installed and every other endpoint is bound."""
        failed: list[OSError] = []
        bind, close = self._core.install(flows, self._clock())
        for endpoint in close:
            if endpoint in self._sockets:
                self._close(endpoint)
        for endpoint in bind:
            try:
                self._sockets[endpoint] = self._bind(endpoint)
            except OSError as exc:
                exc.strerror = f"cannot bind {endpoint}: {exc.strerror}"
                failed.append(exc)
        if failed:
            raise RelayBindError(failed[0].errno, "; ".join(str(e.strerror) for e in failed))

    def remove(self, matches: Sequence[Endpoint]) -> None:
        """Forget the flows and close the sockets no remaining flow uses."""
        for endpoint in self._core.remove(matches):
            if endpoint in self._sockets:
                self._close(endpoint)

    def refresh(self, flows: Sequence[Flow]) -> None:
        self._core.refresh(flows, self._clock())

    def counters(self, matches: Sequence[Endpoint] | None = None) -> dict[Endpoint, FlowCounters]:
        return self._core.counters(matches)

    def drops(self) -> dict[str, DropCounter]:
        return self._core.drops()

    def forwarded(self) -> DropCounter:
        return DropCounter(self._forwarded.packets, self._forwarded.bytes)

    def close(self, keep: bool) -> None:
        """Close every socket (nothing of a userspace relay can outlive it: ``keep`` is
        irrelevant)."""
        for endpoint in list(self._sockets):
            self._close(endpoint)

    def _bind(self, endpoint: Endpoint) -> socket.socket:
        family = socket.AF_INET6 if endpoint.family == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
            sock.bind((str(endpoint.host), endpoint.port))
        except OSError:
            sock.close()
            raise
        self._loop.add_reader(sock.fileno(), self._readable, endpoint, sock)
        return sock

    def _close(self, endpoint: Endpoint) -> None:
        sock = self._sockets.pop(endpoint)
        self._loop.remove_reader(sock.fileno())
        sock.close()

    def _readable(self, match: Endpoint, sock: socket.socket) -> None:
        for _ in range(READ_BATCH):
            try:
                payload, addr = sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                return  # drained (EAGAIN), or an error the next wake-up reads again
            sender = self._endpoint(addr[0], addr[1])
            verdict = self._core.receive(match, sender, len(payload), self._clock())
            if isinstance(verdict, Forward):
                self._send(verdict, payload)

    def _endpoint(self, host: str, port: int) -> Endpoint:
        ep = self._senders.get((host, port))
        if ep is None:
            if len(self._senders) >= ADDRESS_MEMO:
                self._senders.clear()
            ep = self._senders[host, port] = Endpoint(ipaddress.ip_address(host), port)
        return ep

    def _send(self, verdict: Forward, payload: bytes) -> None:
        out = self._sockets.get(verdict.source)
        if out is not None:
            try:
                out.sendto(payload, (str(verdict.to.host), verdict.to.port))
                self._forwarded.packets += 1
                self._forwarded.bytes += len(payload)
                return
            except OSError:
                pass  # full socket buffer, no route: counted below
        self._core.count_drop(DropReason.SEND_FAILED, len(payload))
