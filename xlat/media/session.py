"""Media sessions: which parties talk through which relay ports, and for how long.

Sans-I/O. Signalling (SIP proxy, NG, the CLI) calls ``offer``/``answer``/``delete``/
``add``/``remove`` with the current time; the manager allocates relay pairs,
derives the kernel flows each session needs, and queues the datapath changes.
The daemon pulls them with ``drain()`` (it is told by ``on_change``), so changes
made in one event-loop turn reach the kernel as one batch.

A session has two *sides* (0: the offerer, 1: the answerer; for a manual relay:
peer A and peer B) and one pair of *legs* per media stream: leg ``i`` faces side
``i`` on that side's IP family. Packets a side sends to its own leg's relay leave
from the other leg's relay towards the other side.

Timers are soft state: each session has one deadline (``DeadlineBuckets``). When it
is due the manager asks the datapath only for the due sessions' counters; if media
moved it pushes the deadline forward (and refreshes the nftables elements), otherwise
the session ends. So a sweep costs what is due, not what exists, and ``expire`` takes
a limit so a mass expiry can be spread over several loop turns.

Crash safety: every session a change touched is handed out once per loop turn by
``drain_records`` (its ``record``, or None once it ended) for the daemon's journal
(xlat/state.py); ``restore`` rebuilds sessions from records after a restart, claiming
their ports, and returns their flows for the daemon to adopt.

Memory follows what the signalling said, nothing more: flows are derived from the
sessions whenever they are needed (before and after a change, to queue the
difference), relay endpoints are the port pool's own objects, and only relays that
forks share are reference-counted.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xlat.addr import Endpoint
from xlat.compiled import mypyc_attr
from xlat.media.datapath import Flow, FlowCounters, Latch
from xlat.media.ports import PortsExhausted, RelayPortPool
from xlat.media.timers import DeadlineBuckets

log = logging.getLogger(__name__)

__all__ = [
    "DatapathBatch",
    "MediaSession",
    "PortsExhausted",
    "SessionManager",
    "SessionNotFound",
    "StreamMismatch",
    "StreamSpec",
]

CountersLookup = Callable[[Sequence[Endpoint]], Mapping[Endpoint, FlowCounters]]

# One tuple object per family pair, shared by every session.
_FAMILY_PAIRS = {(a, b): (a, b) for a in (4, 6) for b in (4, 6)}


class StreamMismatch(ValueError):
    """An answer whose streams do not line up with the offer (RFC 3264 §6)."""


@mypyc_attr(native_class=False)  # mypyc: a KeyError subclass cannot be native
class SessionNotFound(KeyError):
    """No session matches the given id, or call-id and tags."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such session"


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One m= line as a party offered or answered it."""

    peer: Endpoint | None  # RTP address:port; None = rejected stream (port 0)
    rtcp: Endpoint | None = None  # from a=rtcp; None = peer.port + 1
    rtcp_mux: bool = False


@dataclass(slots=True)
class Leg:
    """Our relay pair facing one side of one stream, and what that side told us."""

    relay: Endpoint  # RTP; RTCP is relay.port + 1
    peer: Endpoint | None = None
    rtcp_peer: Endpoint | None = None
    rtcp_mux: bool = False

    def learn(self, spec: StreamSpec) -> None:
        self.peer, self.rtcp_peer, self.rtcp_mux = spec.peer, spec.rtcp, spec.rtcp_mux


@dataclass(slots=True)
class MediaSession:
    """Both sides of one dialog (or one manual relay)."""

    id: str
    origin: str  # "sip" | "ng" | "manual"
    call_id: str | None
    tags: tuple[str | None, str | None]  # (side 0, side 1)
    families: tuple[int, int]
    streams: list[tuple[Leg, Leg] | None]  # None: rejected stream
    idle_timeout: float
    lifetime: float | None
    created: float
    activity: float  # last time signalling or media showed it alive
    state: str = "active"  # "active" | "deleting"
    ends_at: float | None = None  # end of the delete delay
    answered: int = 0  # order of answers within a call: the latest owns shared flows
    timer: float = 0.0  # the deadline in the heap that counts

    def side_of(self, tag: str) -> int | None:
        if self.tags[0] == tag:
            return 0
        if self.tags[1] == tag:
            return 1
        return None

    def relays(self, side: int) -> list[Endpoint | None]:
        return [None if s is None else s[side].relay for s in self.streams]

    def legs(self) -> Iterable[Leg]:
        for stream in self.streams:
            if stream is not None:
                yield from stream


@dataclass(slots=True)
class DatapathBatch:
    """Changes for the datapath, applied in this order: remove, install, refresh."""

    remove: list[Endpoint]
    install: list[Flow]
    refresh: list[Flow]


def _usable(peer: Endpoint | None) -> bool:
    return peer is not None and not peer.host.is_unspecified and peer.port != 0


@functools.lru_cache(maxsize=1 << 16)  # relays and peers repeat in every record of a call
def _endpoint_text(ep: Endpoint) -> str:
    return str(ep)  # IPv6 text costs microseconds (ipaddress)


def _text(ep: Endpoint | None) -> str | None:
    return None if ep is None else _endpoint_text(ep)


def _unknown(family: int) -> Endpoint:
    """Placeholder destination: the datapath drops (``no_peer``) until latching learns it."""
    host = ipaddress.IPv4Address(0) if family == 4 else ipaddress.IPv6Address(0)
    return Endpoint(host, 0)


def _shift(ep: Endpoint, by: int) -> Endpoint:
    return Endpoint(ep.host, ep.port + by)


class SessionManager:
    """All media sessions of one gateway. See the module docstring."""

    def __init__(
        self,
        pools: Mapping[int, RelayPortPool | Sequence[RelayPortPool]],
        *,
        idle_timeout: float = 60.0,
        delete_delay: float = 10.0,
        latch: Latch = Latch.LEARN,
        rate_limit_pps: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.pools: dict[int, list[RelayPortPool]] = {
            fam: [p] if isinstance(p, RelayPortPool) else list(p) for fam, p in pools.items()
        }
        self.idle_timeout = idle_timeout
        self.delete_delay = delete_delay
        self.latch = latch
        self.rate_limit_pps = rate_limit_pps
        self.on_change: Callable[[], None] | None = None
        # told of each session that ends (not of ``flush``), before its flows go: the
        # daemon reads their counters for the call's summary line
        self.on_end: Callable[[MediaSession, str, float], None] | None = None
        self._rng = rng or random.Random()
        self._sessions: dict[str, MediaSession] = {}
        # Sessions sharing a call-id (forks share the answerer-facing relays); manual
        # sessions have no call-id and are not listed here.
        self._calls: dict[str, list[MediaSession]] = {}
        self._shared: Counter[Endpoint] = Counter()  # relay -> holders beyond the first
        self._timers: DeadlineBuckets[MediaSession] = DeadlineBuckets()
        self._answers = 0
        self._remove: set[Endpoint] = set()
        self._install: dict[Endpoint, Flow] = {}
        self._refresh: list[Flow] = []
        self._dirty: set[str] = set()  # ids of sessions changed since drain_records()
        self.ended: Counter[str] = Counter()  # reason -> sessions ended
        self.flow_count = 0  # flows the datapath has (or has queued) for all sessions

    # ---- signalling API -------------------------------------------------------

    def offer(
        self,
        call_id: str,
        from_tag: str,
        streams: Sequence[StreamSpec],
        *,
        toward: int,
        now: float,
        offerer_family: int | None = None,
        origin: str = "sip",
        to_tag: str | None = None,
    ) -> list[Endpoint | None]:
        """An offer from ``from_tag`` to be sent to a party of family ``toward``.

        Returns per stream the relay (family ``toward``) for the SDP sent to the
        answerer, None for a rejected stream. Repeating an offer returns the same
        relays; a changed one updates the peers in place. Raises PortsExhausted
        with nothing changed."""
        session = self._find(call_id, from_tag, to_tag) or self._latest(call_id, from_tag)
        created = session is None
        if session is None:
            fam = offerer_family or self._family_of(streams, default=toward)
            session = self._new_session(origin, call_id, (from_tag, to_tag), (fam, toward), now)
        side = session.side_of(from_tag)
        assert side is not None
        before = self._wanted(session)
        try:
            self._update_streams(session, side, streams, now)
        except PortsExhausted:
            if created:  # it has no streams yet: it never had flows
                self._end(session, now, "ports_exhausted")
            raise
        session.activity = now
        self._dirty.add(session.id)
        self._queue(before, self._wanted(session))
        return session.relays(1 - side)

    def answer(
        self,
        call_id: str,
        from_tag: str,
        to_tag: str,
        streams: Sequence[StreamSpec],
        *,
        now: float,
    ) -> list[Endpoint | None]:
        """The answer of ``to_tag`` to the offer of ``from_tag``. Returns per stream the
        relay (offerer's family) for the SDP sent back to the offerer. A new to-tag on
        an already answered offer is a fork and gets its own offerer-facing legs.
        Raises SessionNotFound, StreamMismatch, PortsExhausted (a fork), with nothing
        changed."""
        session = self._find(call_id, from_tag, to_tag)
        offered = session or self._latest(call_id, from_tag)
        # a fork answers the offerer (side 0): an unknown to-tag from the callee's side
        # answers no offer
        if offered is None or (session is None and offered.side_of(from_tag) != 0):
            raise SessionNotFound(f"no offer for call {call_id!r} from tag {from_tag!r}")
        if len(streams) != len(offered.streams):
            raise StreamMismatch(
                f"answer has {len(streams)} streams, the offer had {len(offered.streams)}"
            )
        before = self._wanted(offered)
        if session is None:
            session = self._fork(offered, now)
        side = session.side_of(from_tag)
        assert side is not None
        session.tags = (session.tags[0], to_tag) if side == 0 else (to_tag, session.tags[1])
        self._answers += 1
        session.answered = self._answers
        self._update_streams(session, 1 - side, streams, now, answer=True)
        session.activity = now
        self._dirty.add(session.id)
        self._queue(before, self._wanted(session))
        return session.relays(side)

    def delete(
        self,
        call_id: str,
        from_tag: str | None = None,
        to_tag: str | None = None,
        *,
        now: float,
        delay: float | None = None,
    ) -> bool:
        """End a call, or the sessions of one tag (and to-tag), after ``delay`` seconds
        (default: the delete delay); flows keep forwarding until then."""
        hits = [
            s
            for s in self._calls.get(call_id, ())
            if (from_tag is None or from_tag in s.tags) and (to_tag is None or to_tag in s.tags)
        ]
        wait = self.delete_delay if delay is None else delay
        for s in hits:
            if wait <= 0:
                self._end(s, now, "deleted")
            elif s.state != "deleting":
                s.state, s.ends_at = "deleting", now + wait
                self._schedule(s, now + wait)
                self._dirty.add(s.id)
        self._changed()
        return bool(hits)

    # ---- manual relays (CLI) --------------------------------------------------

    def add(
        self,
        peer_a: Endpoint,
        peer_b: Endpoint,
        *,
        now: float,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
    ) -> MediaSession:
        """A relay between two fixed peers: leg 0 faces A on A's family, leg 1 faces B.
        Raises PortsExhausted with nothing left behind."""
        session = self._new_session("manual", None, (None, None), (peer_a.family, peer_b.family),
                                    now, idle_timeout, lifetime)
        try:
            self._update_streams(session, 0, [StreamSpec(peer_a)], now)
        except PortsExhausted:
            self._end(session, now, "ports_exhausted")
            raise
        self._update_streams(session, 1, [StreamSpec(peer_b)], now, answer=True)
        self._dirty.add(session.id)
        self._queue({}, self._wanted(session))
        return session

    def remove(self, session_id: str, *, now: float) -> MediaSession:
        """End a session at once (no delete delay)."""
        session = self.get(session_id)
        self._end(session, now, "removed")
        return session

    def flush(self, *, now: float) -> int:
        """End every session at once; returns how many. One pass over the legs (no
        per-session flow diff): every relay endpoint's flows are queued for removal."""
        sessions = list(self._sessions.values())
        for session in sessions:
            for leg in session.legs():
                self._remove.update((leg.relay, _shift(leg.relay, 1)))
                self._release(leg.relay, now)
            session.streams = []
        self._dirty.update(self._sessions)
        self._sessions.clear()
        self._calls.clear()
        self._timers = DeadlineBuckets(self._timers.quantum)
        self._install.clear()
        self._refresh.clear()
        self.flow_count = 0
        self.ended["flushed"] += len(sessions)
        log.info("flushed %d session(s)", len(sessions))
        self._changed()
        return len(sessions)

    # ---- crash journal and hitless restart ---------------------------------------------

    def drain_records(self) -> list[tuple[str, dict[str, Any] | None]]:
        """(session id, record) of every session changed since the last call; None for
        one that ended. The daemon journals them (xlat/state.py) once per loop turn."""
        dirty, self._dirty = self._dirty, set()
        return [(sid, None if (s := self._sessions.get(sid)) is None else self.record(s))
                for sid in dirty]

    @staticmethod
    def record(s: MediaSession) -> dict[str, Any]:
        """A session as JSON-able data, for ``restore``: relay ports, peers and tags (what
        a BYE, re-INVITE or NG request after a restart needs), and its times (monotonic
        seconds)."""

        def leg(lg: Leg) -> list[str | bool | None]:
            return [_endpoint_text(lg.relay), _text(lg.peer), _text(lg.rtcp_peer), lg.rtcp_mux]

        return {
            "id": s.id, "origin": s.origin, "call_id": s.call_id, "tags": list(s.tags),
            "families": list(s.families), "idle_timeout": s.idle_timeout,
            "lifetime": s.lifetime, "created": s.created, "activity": s.activity,
            "state": s.state, "ends_at": s.ends_at, "answered": s.answered,
            "streams": [None if st is None else [leg(st[0]), leg(st[1])] for st in s.streams],
        }

    def restore(self, items: Iterable[Mapping[str, Any]], now: float, shift: float = 0.0
                ) -> list[Flow]:
        """Re-create sessions from ``record`` data (times moved by ``shift``, see
        ``xlat.state.clock_shift``), claiming their relay pairs, so no new call is given a
        port a restored one holds. Returns the flows they need; nothing is queued: the
        caller installs only what the datapath lacks (a flow it has keeps its counters and
        what latching learnt). A record that does not decode is skipped and logged."""

        groups: dict[str, MediaSession] = {}  # one session of each call (or manual one)
        for d in items:
            try:
                session = self._restored(d, shift)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                sid = d.get("id") if isinstance(d, Mapping) else d
                log.warning("journaled session %r not restored: %s", sid, exc)
                continue
            if session.ends_at is not None:
                self._schedule(session, session.ends_at)
            else:
                self._arm(session)
            groups[session.call_id or session.id] = session
        flows = [f for s in groups.values() for f in self._wanted(s).values()]
        self.flow_count += len(flows)
        self._changed()
        return flows

    def _restored(self, d: Mapping[str, Any], shift: float) -> MediaSession:
        """One session from its record (validated whole before its ports are claimed)."""

        def ep(text: object) -> Endpoint | None:
            return None if text is None else Endpoint.parse(str(text))

        def leg(data: Sequence[Any]) -> Leg:
            relay = ep(data[0])
            if relay is None:
                raise ValueError("leg without a relay")
            return Leg(relay, ep(data[1]), ep(data[2]), bool(data[3]))

        if d["id"] in self._sessions:
            raise ValueError("session id in use")
        families = _FAMILY_PAIRS[(int(d["families"][0]), int(d["families"][1]))]
        streams = [None if st is None else (leg(st[0]), leg(st[1])) for st in d["streams"]]
        session = MediaSession(
            id=str(d["id"]), origin=str(d["origin"]), call_id=d["call_id"],
            tags=(d["tags"][0], d["tags"][1]), families=families, streams=streams,
            idle_timeout=float(d["idle_timeout"]), lifetime=d["lifetime"],
            created=float(d["created"]) + shift, activity=float(d["activity"]) + shift,
            state=str(d["state"]),
            ends_at=None if d["ends_at"] is None else float(d["ends_at"]) + shift,
            answered=int(d["answered"]),
        )
        for lg in session.legs():
            lg.relay = self._claim(lg.relay)
        self._sessions[session.id] = session
        self._dirty.add(session.id)
        if session.call_id is not None:
            self._calls.setdefault(session.call_id, []).append(session)
        self._answers = max(self._answers, session.answered)
        return session

    # ---- queries -------------------------------------------------------------

    def get(self, session_id: str) -> MediaSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def find(self, call_id: str) -> list[MediaSession]:
        return list(self._calls.get(call_id, ()))

    def sessions(self) -> list[MediaSession]:
        return list(self._sessions.values())

    def flows(self, session: MediaSession) -> list[Flow]:
        """The flows installed for a session (shared ones belong to the latest answer)."""
        return [f for f in self._wanted(session).values() if f.session == session.id]

    def describe(self, session: MediaSession, now: float) -> dict[str, object]:
        """The JSON object ``session list -j`` prints for a session."""

        def leg(lg: Leg) -> dict[str, object]:
            return {"peer": str(lg.peer) if lg.peer else None, "relay": str(lg.relay)}

        streams = [[leg(a), leg(b)] for a, b in (s for s in session.streams if s is not None)]
        return {
            "id": session.id,
            "legs": streams[0] if streams else [],
            "state": session.state,
            "origin": session.origin,
            "call_id": session.call_id,
            "tags": list(session.tags),
            "streams": [{"legs": s} for s in streams],
            "idle_timeout": session.idle_timeout,
            "lifetime": session.lifetime,
            "age": round(now - session.created, 3),
            "idle": round(max(0.0, now - session.activity), 3),
            "ends_in": None if session.ends_at is None else round(session.ends_at - now, 3),
        }

    def next_deadline(self) -> float | None:
        """When ``expire`` has work next (at most two timer buckets, 0.2 s, after the
        deadline)."""
        return self._timers.next_deadline()

    # ---- timers ---------------------------------------------------------------

    def expire(self, now: float, lookup: CountersLookup, limit: int | None = None
               ) -> list[MediaSession]:
        """End what is due: delete delays that ran out, lifetimes, idle sessions.
        ``lookup`` returns datapath counters for the given flow matches; it is asked
        once, about the due sessions only. At most ``limit`` due timers are looked at;
        if more are due, ``next_deadline()`` is already past. Returns the sessions ended."""
        ended: list[MediaSession] = []
        idle: list[MediaSession] = []
        seen: set[str] = set()
        for session in self._timers.pop_due(now, limit):
            if self._sessions.get(session.id) is not session or session.id in seen:
                continue  # ended, or a second entry of a re-armed timer
            seen.add(session.id)
            if session.timer > now:
                if self._timers.bucket(session.timer) <= self._timers.bucket(now):
                    self._timers.defer(now, session)  # its bucket has begun, not its time
                continue  # else: stale entry, the timer sits in a later bucket too
            if session.state == "deleting":
                self._end(session, now, "deleted")
            elif session.lifetime is not None and now >= session.created + session.lifetime:
                self._end(session, now, "lifetime")
            else:
                idle.append(session)
                continue
            ended.append(session)
        flows = {s.id: self.flows(s) for s in idle}
        try:
            counters = lookup([f.match for fs in flows.values() for f in fs]) if idle else {}
        except Exception:
            for session in idle:  # asked again in a second; their deadlines stay
                self._timers.add(now + 1.0, session)
            raise
        for session in idle:
            seen_at = [counters[f.match].last_seen for f in flows[session.id]
                       if f.match in counters]
            session.activity = max([session.activity, *seen_at])
            if now >= session.activity + session.idle_timeout:  # as _arm computes it
                self._end(session, now, "idle")
                ended.append(session)
            else:
                log.debug("session %s alive: last activity %.1f s ago", session.id,
                          now - session.activity)
                self._arm(session)
                self._refresh.extend(flows[session.id])
                self._changed()
        return ended

    def drain(self) -> DatapathBatch:
        """Take the queued datapath changes."""
        batch = DatapathBatch(list(self._remove), list(self._install.values()), self._refresh)
        self._remove, self._install, self._refresh = set(), {}, []
        return batch

    # ---- internals ------------------------------------------------------------

    def _new_session(
        self,
        origin: str,
        call_id: str | None,
        tags: tuple[str | None, str | None],
        families: tuple[int, int],
        now: float,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
    ) -> MediaSession:
        for fam in families:
            if fam not in self.pools:
                raise PortsExhausted(fam)
        sid = f"{self._rng.getrandbits(48):012x}"
        while sid in self._sessions:
            sid = f"{self._rng.getrandbits(48):012x}"
        session = MediaSession(
            id=sid, origin=origin, call_id=call_id, tags=tags,
            families=_FAMILY_PAIRS[families], streams=[],
            idle_timeout=self.idle_timeout if idle_timeout is None else idle_timeout,
            lifetime=lifetime, created=now, activity=now,
        )
        self._sessions[sid] = session
        self._dirty.add(sid)
        if call_id is not None:
            self._calls.setdefault(call_id, []).append(session)
        self._arm(session)
        return session

    def _family_of(self, streams: Sequence[StreamSpec], default: int) -> int:
        return next((s.peer.family for s in streams if s.peer is not None), default)

    def _find(self, call_id: str, tag: str, other: str | None) -> MediaSession | None:
        """The session of ``call_id`` with ``tag`` on one side and ``other`` on the
        other; failing that, one whose other side is not known yet (unanswered)."""
        # the other side's tag of each session ``tag`` is part of
        mine = [(s, s.tags[1 - side]) for s in self._calls.get(call_id, ())
                if (side := s.side_of(tag)) is not None]
        for s, theirs in mine:
            if other is not None and theirs == other:
                return s
        return next((s for s, theirs in mine if theirs is None), None)

    def _latest(self, call_id: str, tag: str) -> MediaSession | None:
        """The most recently answered session of ``call_id`` that ``tag`` is part of."""
        sessions = [s for s in self._calls.get(call_id, ()) if s.side_of(tag) is not None]
        return max(sessions, key=lambda s: s.answered, default=None)

    def _allocate(self, family: int, now: float) -> Endpoint:
        for pool in self.pools[family]:
            try:
                return pool.allocate(now)
            except PortsExhausted:
                continue
        raise PortsExhausted(family)

    def _claim(self, relay: Endpoint) -> Endpoint:
        """A relay of a restored session: the pool's own Endpoint, claimed once and
        shared after that. A relay no pool covers any more (the address or the port
        range changed) is kept as it is."""
        for pool in self.pools.get(relay.family, []):
            if pool.address == relay.host:
                if pool.owns(relay):
                    self._shared[relay] += 1
                try:
                    return pool.claim(relay)
                except ValueError:
                    return relay
        return relay

    def _release(self, relay: Endpoint, now: float) -> None:
        if self._shared[relay] > 0:
            self._shared[relay] -= 1
            if not self._shared[relay]:
                del self._shared[relay]
            return
        for pool in self.pools.get(relay.family, []):
            if pool.owns(relay):
                pool.release(relay, now)

    def _update_streams(
        self,
        session: MediaSession,
        side: int,
        specs: Sequence[StreamSpec],
        now: float,
        answer: bool = False,
    ) -> None:
        """Record what ``side`` said about each stream. An offer may add streams (their
        legs are allocated first: on PortsExhausted nothing has changed) or reject
        them (their legs are released); an answer only fills in its side."""
        streams = session.streams
        added = [] if answer else [
            i for i, spec in enumerate(specs)
            if spec.peer is not None and (i >= len(streams) or streams[i] is None)
        ]
        relays = iter(self._allocate_all(session.families * len(added), now))
        if len(specs) > len(streams) and not answer:
            streams.extend([None] * (len(specs) - len(streams)))
        for i in added:
            streams[i] = (Leg(next(relays)), Leg(next(relays)))
        for i, spec in enumerate(specs):
            stream = streams[i]
            if spec.peer is None:  # rejected (port 0), by the offer or the answer
                if stream is not None:
                    self._drop_stream(session, i, now)
            elif stream is not None:  # (an answer accepting a rejected stream: ignored)
                stream[side].learn(spec)

    def _allocate_all(self, families: Sequence[int], now: float) -> list[Endpoint]:
        """A relay of each of ``families``, all or none (raises PortsExhausted)."""
        held: list[Endpoint] = []
        try:
            for family in families:
                held.append(self._allocate(family, now))
        except PortsExhausted:
            for relay in held:
                self._release(relay, now)
            raise
        return held

    def _drop_stream(self, session: MediaSession, index: int, now: float) -> None:
        stream = session.streams[index]
        assert stream is not None
        session.streams[index] = None
        for leg in stream:
            self._release(leg.relay, now)

    def _fork(self, original: MediaSession, now: float) -> MediaSession:
        """A second answer (new to-tag) to one offer: new offerer-facing legs, the
        answerer-facing legs shared with the original. Raises PortsExhausted with
        nothing changed."""
        live = [s for s in original.streams if s is not None]
        fresh = iter(self._allocate_all([original.families[0]] * len(live), now))
        fork = self._new_session(original.origin, original.call_id,
                                 (original.tags[0], None), original.families, now)
        for stream in original.streams:
            if stream is None:
                fork.streams.append(None)
                continue
            a = Leg(next(fresh), stream[0].peer, stream[0].rtcp_peer, stream[0].rtcp_mux)
            self._shared[stream[1].relay] += 1
            fork.streams.append((a, Leg(stream[1].relay)))
        return fork

    def _flows_of(self, session: MediaSession) -> list[Flow]:
        flows: list[Flow] = []
        for stream in session.streams:
            if stream is None:
                continue
            for receiving, sending in (stream, stream[::-1]):
                flows.extend(self._direction(session, receiving, sending))
        return flows

    def _direction(self, session: MediaSession, into: Leg, out: Leg) -> list[Flow]:
        """Flows for packets arriving at ``into.relay`` (from its side) that leave from
        ``out.relay`` to the other side. None while the other side is unknown or on hold."""
        if out.peer is None or (out.peer.host.is_unspecified and out.peer.port != 0):
            return []
        family = out.relay.family
        if not _usable(out.peer) or out.peer.family != family:
            rtp_to = rtcp_to = _unknown(family)  # learnt from its first packet
        else:
            rtp_to = out.peer
            if out.rtcp_mux:
                rtcp_to = out.peer
            elif out.rtcp_peer is not None and out.rtcp_peer.family == family:
                rtcp_to = out.rtcp_peer
            else:
                rtcp_to = _shift(out.peer, 1)
        strict = self.latch is Latch.STRICT and _usable(into.peer)
        latch = Latch.STRICT if strict else (Latch.LEARN if self.latch else Latch.OFF)
        if rtp_to.port == 0:
            latch = Latch.LEARN if latch is Latch.OFF else latch
        expect_rtcp = None
        if strict and into.peer is not None:
            expect_rtcp = into.peer if into.rtcp_mux else (into.rtcp_peer or _shift(into.peer, 1))

        def flow(match: Endpoint, source: Endpoint, to: Endpoint, expect: Endpoint | None) -> Flow:
            return Flow(session=session.id, match=match, source=source, to=to,
                        idle_timeout=session.idle_timeout, latch=latch, reverse=source,
                        expect=expect, rate_limit_pps=self.rate_limit_pps)

        return [
            flow(into.relay, out.relay, rtp_to, into.peer if strict else None),
            flow(_shift(into.relay, 1), _shift(out.relay, 1), rtcp_to, expect_rtcp),
        ]

    def _group(self, session: MediaSession) -> list[MediaSession]:
        """The sessions whose flows are decided together: a call's, or a manual one."""
        return self._calls.get(session.call_id, []) if session.call_id else [session]

    def _wanted(self, session: MediaSession) -> dict[Endpoint, Flow]:
        """The flows of ``session``'s group, by match (the latest answer owns flows that
        forks share)."""
        group = self._group(session)
        wanted: dict[Endpoint, Flow] = {}
        for s in sorted(group, key=lambda s: s.answered) if len(group) > 1 else group:
            for f in self._flows_of(s):
                wanted[f.match] = f
        return wanted

    def _queue(self, before: Mapping[Endpoint, Flow], after: Mapping[Endpoint, Flow]) -> None:
        """Queue for the datapath what changed between two ``_wanted`` results."""
        self.flow_count += len(after) - len(before)
        for match in before.keys() - after.keys():
            self._install.pop(match, None)
            self._remove.add(match)
        for match, flow in after.items():
            if before.get(match) != flow:
                self._remove.discard(match)
                self._install[match] = flow
        self._changed()

    def _end(self, session: MediaSession, now: float, reason: str) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        self._dirty.add(session.id)
        if self.on_end is not None:
            self.on_end(session, reason, now)
        before = self._wanted(session)
        group = self._group(session)
        group.remove(session)
        for leg in session.legs():
            self._release(leg.relay, now)
        session.streams = []
        self._queue(before, self._wanted(group[0]) if group else {})
        if session.call_id is not None and not group:
            del self._calls[session.call_id]
        self.ended[reason] += 1

    def _arm(self, session: MediaSession) -> None:
        self._schedule(session, session.activity + session.idle_timeout)

    def _schedule(self, session: MediaSession, when: float) -> None:
        if session.lifetime is not None and session.state == "active":
            when = min(when, session.created + session.lifetime)
        session.timer = when
        self._timers.add(when, session)

    def _changed(self) -> None:
        if self.on_change is not None and (
            self._install or self._remove or self._refresh or self._dirty
        ):
            self.on_change()
