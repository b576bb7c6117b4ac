"""Media sessions: which parties talk through which relay ports, and for how long.

Sans-I/O. Signalling (SIP proxy, NG, the CLI) calls ``offer``/``answer``/``delete``/
``add``/``remove`` with the current time; the manager allocates relay pairs, keeps the
media model (``xlat.media.model``: call → party → media → stream), derives the kernel
flows each session needs, and queues the datapath changes. The daemon pulls them with
``drain()`` (it is told by ``on_change``), so changes made in one event-loop turn reach
the kernel as one batch.

Each party's media has a relay standing in for it (the address its SDP is rewritten
to); packets a party sends to the other's stand-in leave from its own towards the
other party. A relay is held while a session uses it: forks (parties of one call
sharing the offerer) need no reference counts.

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
difference), and relay endpoints are the port pool's own objects.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xlat.addr import Endpoint
from xlat.compiled import mypyc_attr
from xlat.media.datapath import Flow, FlowCounters, Latch
from xlat.media.model import (
    Call,
    Event,
    Media,
    MediaSession,
    Party,
    Record,
    State,
    StreamSpec,
    decode,
    shift,
    totals,
)
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


class StreamMismatch(ValueError):
    """An answer whose streams do not line up with the offer (RFC 3264 §6)."""


@mypyc_attr(native_class=False)  # mypyc: a KeyError subclass cannot be native
class SessionNotFound(KeyError):
    """No session matches the given id, or call-id and tags."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no such session"


@dataclass(slots=True)
class DatapathBatch:
    """Changes for the datapath, applied in this order: remove, install, refresh."""

    remove: list[Endpoint]
    install: list[Flow]
    refresh: list[Flow]


def _usable(peer: Endpoint | None) -> bool:
    return peer is not None and not peer.host.is_unspecified and peer.port != 0


def _unknown(family: int) -> Endpoint:
    """Placeholder destination: the datapath drops (``no_peer``) until latching learns it."""
    host = ipaddress.IPv4Address(0) if family == 4 else ipaddress.IPv6Address(0)
    return Endpoint(host, 0)


def _put(party: Party, index: int, media: Media | None) -> None:
    if index >= len(party.media):
        party.media.extend([None] * (index + 1 - len(party.media)))
    party.media[index] = media


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
        self._calls: dict[str, Call] = {}  # by call-id; a manual relay is in no call-id
        self._timers: DeadlineBuckets[MediaSession] = DeadlineBuckets()
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

        Returns per stream the relay standing in for the offerer (family ``toward``)
        for the SDP sent to the answerer, None for a rejected stream. Repeating an offer
        returns the same relays; a changed one updates the peers in place. Raises
        PortsExhausted with nothing changed."""
        session = self._find(call_id, from_tag, to_tag) or self._latest(call_id, from_tag)
        created = session is None
        if session is None:
            fam = offerer_family or self._family_of(streams, default=toward)
            session = self._new_session(origin, call_id, Party(from_tag, fam, []),
                                        Party(to_tag, toward, []), now)
        side = session.side_of(from_tag)
        assert side is not None
        session.handle(Event.OFFER)
        before = self._wanted(session)
        try:
            self._offered(session, side, streams, now)
        except PortsExhausted:
            if created:  # it has no streams yet: it never had flows
                self._end(session, now, Event.PORTS_EXHAUSTED)
            raise
        session.activity = now
        self._dirty.add(session.id)
        self._queue(before, self._wanted(session))
        return session.stand_ins(side)

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
        relay standing in for the answerer (offerer's family) for the SDP sent back to
        the offerer. A new to-tag on an already answered offer is a fork: a party of its
        own, in a session with the offerer. Raises SessionNotFound, StreamMismatch,
        PortsExhausted (a fork), with nothing changed."""
        session = self._find(call_id, from_tag, to_tag)
        offered = session or self._latest(call_id, from_tag)
        # a fork answers the offerer (side 0): an unknown to-tag from the callee's side
        # answers no offer
        if offered is None or (session is None and offered.side_of(from_tag) != 0):
            raise SessionNotFound(f"no offer for call {call_id!r} from tag {from_tag!r}")
        offered_streams = offered.pairs()
        if len(streams) != len(offered_streams):
            raise StreamMismatch(
                f"answer has {len(streams)} streams, the offer had {len(offered_streams)}"
            )
        before = self._wanted(offered)
        if session is None:
            session = self._fork(offered, now)
        side = session.side_of(from_tag)
        assert side is not None
        session.handle(Event.ANSWER)
        session.parties[1 - side].tag = to_tag
        call = session.call
        call.answered(session)
        if len(call.sessions) > 1:  # their ranks in the answer order moved
            self._dirty.update(s.id for s in call.sessions)
        self._learn(session, 1 - side, streams, now)
        session.activity = now
        self._dirty.add(session.id)
        self._queue(before, self._wanted(session))
        return session.stand_ins(1 - side)

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
        call = self._calls.get(call_id)
        hits = [] if call is None else call.matching(from_tag, to_tag)
        wait = self.delete_delay if delay is None else delay
        for s in hits:
            if wait <= 0:
                self._end(s, now, Event.DELETED)
            elif s.state is State.ACTIVE:
                s.handle(Event.DELETE)
                s.ends_at = now + wait
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
        """A relay between two fixed peers, A standing in for B on A's family and B
        for A on B's. Raises PortsExhausted with nothing left behind."""
        session = self._new_session("manual", None, Party(None, peer_a.family, []),
                                    Party(None, peer_b.family, []), now, idle_timeout, lifetime)
        try:
            self._offered(session, 0, [StreamSpec(peer_a)], now)
        except PortsExhausted:
            self._end(session, now, Event.PORTS_EXHAUSTED)
            raise
        self._learn(session, 1, [StreamSpec(peer_b)], now)
        self._dirty.add(session.id)
        self._queue({}, self._wanted(session))
        return session

    def remove(self, session_id: str, *, now: float) -> MediaSession:
        """End a session at once (no delete delay)."""
        session = self.get(session_id)
        self._end(session, now, Event.REMOVED)
        return session

    def flush(self, *, now: float) -> int:
        """End every session at once; returns how many. One pass over the parties (no
        per-session flow diff): every relay endpoint's flows are queued for removal."""
        sessions = list(self._sessions.values())
        calls = {id(s.call): s.call for s in sessions}
        for call in calls.values():
            for party in call.parties():
                for media in party.media:
                    if media is not None:
                        self._remove.update((media.relay, shift(media.relay)))
                        self._release(media.relay, now)
                party.media = []
        for session in sessions:
            session.handle(Event.FLUSHED)
        self._dirty.update(self._sessions)
        self._sessions.clear()
        self._calls.clear()
        self._timers = DeadlineBuckets(self._timers.quantum)
        self._install.clear()
        self._refresh.clear()
        self.flow_count = 0
        self.ended[Event.FLUSHED.value] += len(sessions)
        log.info("flushed %d session(s)", len(sessions))
        self._changed()
        return len(sessions)

    # ---- crash journal and hitless restart ---------------------------------------------

    def drain_records(self) -> list[tuple[str, dict[str, Any] | None]]:
        """(session id, record) of every session changed since the last call; None for
        one that ended. The daemon journals them (xlat/state.py) once per loop turn."""
        dirty, self._dirty = self._dirty, set()
        return [(sid, None if (s := self._sessions.get(sid)) is None else s.record())
                for sid in dirty]

    def restore(self, items: Iterable[Mapping[str, Any]], now: float, shift: float = 0.0
                ) -> list[Flow]:
        """Re-create sessions from ``MediaSession.record`` data (times moved by
        ``shift``, see ``xlat.state.clock_shift``), claiming their relay pairs, so no new
        call is given a port a restored one holds. Returns the flows they need; nothing
        is queued: the caller installs only what the datapath lacks (a flow it has keeps
        its counters and what latching learnt). A record that does not decode is
        skipped and logged."""
        decoded = []
        for d in items:
            try:
                decoded.append(decode(d, shift))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                sid = d.get("id") if isinstance(d, Mapping) else d
                log.warning("journaled session %r not restored: %s", sid, exc)
        calls: dict[int, Call] = {}
        for rec in sorted(decoded, key=lambda r: r.answered):  # the calls' answer order
            if rec.id in self._sessions:
                log.warning("journaled session %r not restored: session id in use", rec.id)
                continue
            call = self._call(rec.call_id)
            first, second = (self._restored_party(call, rec, side) for side in (0, 1))
            session = MediaSession(
                id=rec.id, origin=rec.origin, call=call, parties=(first, second),
                idle_timeout=rec.idle_timeout, lifetime=rec.lifetime, created=rec.created,
                activity=rec.activity, state=rec.state, ends_at=rec.ends_at)
            call.sessions.append(session)
            self._sessions[session.id] = session
            self._dirty.add(session.id)
            if session.ends_at is not None:
                self._schedule(session, session.ends_at)
            else:
                self._arm(session)
            calls[id(call)] = call
        flows = [f for c in calls.values() for f in self._wanted(c.sessions[0]).values()]
        self.flow_count += len(flows)
        self._changed()
        return flows

    def _restored_party(self, call: Call, rec: Record, side: int) -> Party:
        """Side ``side`` of a journaled session: the call's party of that tag (the
        offerer of a fork) or a new one, whose relays are claimed once."""
        tag = rec.tags[side]
        party = None if tag is None else call.party(tag)
        if party is None:
            party = Party(tag, rec.families[side], [])
        for i, said in enumerate(rec.media[side]):
            if said is None:
                continue
            relay, peer, rtcp, mux = said
            media = party.at(i)
            if media is None:
                _put(party, i, Media(self._claim(relay), peer, rtcp, mux))
            else:  # the offerer of a fork: the latest answer's word counts
                media.peer, media.rtcp_peer, media.rtcp_mux = peer, rtcp, mux
        return party

    # ---- queries -------------------------------------------------------------

    def get(self, session_id: str) -> MediaSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(f"no session {session_id!r}") from None

    def find(self, call_id: str, from_tag: str | None = None, to_tag: str | None = None
             ) -> list[MediaSession]:
        """The sessions of ``call_id`` (one per answer: forks), in answer order; only
        those with ``from_tag`` and ``to_tag`` if given."""
        call = self._calls.get(call_id)
        return [] if call is None else call.matching(from_tag, to_tag)

    def sessions(self) -> list[MediaSession]:
        return list(self._sessions.values())

    def call_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` call-ids, oldest first (NG ``list``)."""
        return list(itertools.islice(self._calls, limit))

    def census(self) -> Counter[tuple[str, State]]:
        """Sessions now, by (origin, state)."""
        return Counter((s.origin, s.state) for s in self._sessions.values())

    def family_of(self, call_id: str, tag: str) -> int | None:
        """The IP family party ``tag`` of ``call_id`` uses in its SDP (None: unknown)."""
        call = self._calls.get(call_id)
        party = None if call is None else call.party(tag)
        return None if party is None else party.family

    def flows(self, session: MediaSession) -> list[Flow]:
        """The flows installed for a session (shared ones belong to the latest answer)."""
        return [f for f in self._wanted(session).values() if f.session == session.id]

    def totals(self, sessions: Sequence[MediaSession], lookup: CountersLookup | None
               ) -> dict[str, dict[str, int]]:
        """RTP and RTCP packets and bytes over the sessions' relay ports."""
        return totals(sessions, self._counters(sessions, lookup))

    def query(self, call_id: str, from_tag: str | None, to_tag: str | None,
              lookup: CountersLookup | None) -> dict[str, object]:
        """NG ``query``: per tag, per media, the RTP and RTCP streams, and the totals.
        Raises SessionNotFound."""
        sessions = self.find(call_id, from_tag, to_tag)
        if not sessions:
            raise SessionNotFound(f"unknown call-id {call_id!r}")
        return sessions[0].call.query(sessions, self._counters(sessions, lookup))

    def each_way(self, session: MediaSession, lookup: CountersLookup
                 ) -> dict[str, tuple[int, int]]:
        """(packets, bytes) from side A (``a->b``) and from side B (``b->a``)."""
        flows = self.flows(session)
        return session.each_way(flows, lookup([f.match for f in flows]))

    def next_deadline(self) -> float | None:
        """When ``expire`` has work next (at most two timer buckets, 0.2 s, after the
        deadline)."""
        return self._timers.next_deadline()

    @staticmethod
    def _counters(sessions: Sequence[MediaSession], lookup: CountersLookup | None
                  ) -> Mapping[Endpoint, FlowCounters]:
        matches = [ep for s in sessions for ep in s.relay_ports()]
        return lookup(matches) if lookup is not None and matches else {}

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
            if session.state is State.DELETING:
                self._end(session, now, Event.DELETED)
            elif session.lifetime is not None and now >= session.created + session.lifetime:
                self._end(session, now, Event.LIFETIME)
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
                self._end(session, now, Event.IDLE)
                ended.append(session)
            else:
                log.debug("session %s alive: last activity %.1f s ago", session.id,
                          now - session.activity)
                session.handle(Event.MEDIA)
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

    def _call(self, call_id: str | None) -> Call:
        if call_id is None:
            return Call(None, [])
        call = self._calls.get(call_id)
        if call is None:
            call = self._calls[call_id] = Call(call_id, [])
        return call

    def _new_session(
        self,
        origin: str,
        call: str | Call | None,
        offerer: Party,
        answerer: Party,
        now: float,
        idle_timeout: float | None = None,
        lifetime: float | None = None,
    ) -> MediaSession:
        for party in (offerer, answerer):
            if party.family not in self.pools:
                raise PortsExhausted(party.family)
        sid = f"{self._rng.getrandbits(48):012x}"
        while sid in self._sessions:
            sid = f"{self._rng.getrandbits(48):012x}"
        session = MediaSession(
            id=sid, origin=origin, call=call if isinstance(call, Call) else self._call(call),
            parties=(offerer, answerer),
            idle_timeout=self.idle_timeout if idle_timeout is None else idle_timeout,
            lifetime=lifetime, created=now, activity=now,
        )
        session.call.sessions.insert(0, session)  # unanswered: before every answered one
        self._sessions[sid] = session
        self._dirty.add(sid)
        self._arm(session)
        return session

    def _family_of(self, streams: Sequence[StreamSpec], default: int) -> int:
        return next((s.peer.family for s in streams if s.peer is not None), default)

    def _find(self, call_id: str, tag: str, other: str | None) -> MediaSession | None:
        """The session of ``call_id`` with ``tag`` on one side and ``other`` on the
        other; failing that, one whose other side is not known yet (unanswered)."""
        call = self._calls.get(call_id)
        # the other side's tag of each session ``tag`` is part of
        mine = [(s, s.parties[1 - side].tag) for s in (call.sessions if call else ())
                if (side := s.side_of(tag)) is not None]
        for s, theirs in mine:
            if other is not None and theirs == other:
                return s
        return next((s for s, theirs in mine if theirs is None), None)

    def _latest(self, call_id: str, tag: str) -> MediaSession | None:
        """The most recently answered session of ``call_id`` that ``tag`` is part of."""
        call = self._calls.get(call_id)
        return next((s for s in reversed(call.sessions) if s.side_of(tag) is not None),
                    None) if call else None

    def _allocate(self, family: int, now: float) -> Endpoint:
        for pool in self.pools[family]:
            try:
                return pool.allocate(now)
            except PortsExhausted:
                continue
        raise PortsExhausted(family)

    def _claim(self, relay: Endpoint) -> Endpoint:
        """A relay of a restored session: the pool's own Endpoint. A relay no pool
        covers any more (the address or the port range changed) is kept as it is."""
        for pool in self.pools.get(relay.family, []):
            if pool.address == relay.host:
                try:
                    return pool.claim(relay)
                except ValueError:
                    return relay
        return relay

    def _release(self, relay: Endpoint, now: float) -> None:
        for pool in self.pools.get(relay.family, []):
            if pool.owns(relay):
                pool.release(relay, now)

    def _offered(self, session: MediaSession, side: int, specs: Sequence[StreamSpec],
                 now: float) -> None:
        """Record what ``side`` offered for each stream. An offer may add streams (the
        stand-ins they lack are allocated first: on PortsExhausted nothing has changed)
        or reject them (their relays are released)."""
        pairs = session.pairs()
        added = [i for i, spec in enumerate(specs)
                 if spec.peer is not None and (i >= len(pairs) or pairs[i] is None)]
        first, second = session.parties
        # each party's stand-in is on the other party's family
        wanted = [(party, i, other.family) for i in added
                  for party, other in ((second, first), (first, second)) if party.at(i) is None]
        relays = iter(self._allocate_all([family for _, _, family in wanted], now))
        for party in session.parties:  # a stream rejected from the start: None
            party.media.extend([None] * (len(specs) - len(party.media)))
        for party, i, _ in wanted:
            _put(party, i, Media(next(relays)))
        self._learn(session, side, specs, now)

    def _learn(self, session: MediaSession, side: int, specs: Sequence[StreamSpec],
               now: float) -> None:
        """Record what ``side`` said about each stream it has (an answer only fills in
        its media); a stream it rejects is released."""
        pairs = session.pairs()
        rejected = False
        for i, spec in enumerate(specs):
            pair = pairs[i] if i < len(pairs) else None
            if pair is None:  # (an answer accepting a rejected stream: ignored)
                continue
            if spec.peer is None:  # rejected (port 0), by the offer or the answer
                session.parties[1].media[i] = None  # the side no other session shares
                rejected = True
            else:
                pair[side].learn(spec)
        if rejected:
            self._prune(session.call, session.parties, now)

    def _prune(self, call: Call, parties: Iterable[Party], now: float) -> None:
        """Release the media of ``parties`` that no session of ``call`` uses any more."""
        live = {id(m) for s in call.sessions for pair in s.pairs() if pair for m in pair}
        for party in parties:
            for i, media in enumerate(party.media):
                if media is not None and id(media) not in live:
                    self._release(media.relay, now)
                    party.media[i] = None

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

    def _fork(self, offered: MediaSession, now: float) -> MediaSession:
        """A second answer (new to-tag) to one offer: a new answering party, whose
        stand-ins the offerer is shown, in a session with the offerer. Raises
        PortsExhausted with nothing changed."""
        offerer, first = offered.parties
        live = [pair is not None for pair in offered.pairs()]
        fresh = iter(self._allocate_all([offerer.family] * sum(live), now))
        answerer = Party(None, first.family, [Media(next(fresh)) if ok else None for ok in live])
        return self._new_session(offered.origin, offered.call, offerer, answerer, now)

    def _flows_of(self, session: MediaSession) -> list[Flow]:
        flows: list[Flow] = []
        for pair in session.pairs():
            if pair is not None:
                flows.extend(self._toward(session, pair[1], pair[0]))
                flows.extend(self._toward(session, pair[0], pair[1]))
        return flows

    def _toward(self, session: MediaSession, to: Media, sender: Media) -> list[Flow]:
        """Flows for packets ``sender`` sends to ``to``'s stand-in, leaving from its own
        stand-in towards ``to``. None while ``to`` is unknown or on hold."""
        if to.peer is None or (to.peer.host.is_unspecified and to.peer.port != 0):
            return []
        family = sender.relay.family
        if not _usable(to.peer) or to.peer.family != family:
            rtp_to = rtcp_to = _unknown(family)  # learnt from its first packet
        else:
            rtp_to = to.peer
            if to.rtcp_mux:
                rtcp_to = to.peer
            elif to.rtcp_peer is not None and to.rtcp_peer.family == family:
                rtcp_to = to.rtcp_peer
            else:
                rtcp_to = shift(to.peer)
        strict = self.latch is Latch.STRICT and _usable(sender.peer)
        latch = Latch.STRICT if strict else (Latch.LEARN if self.latch else Latch.OFF)
        if rtp_to.port == 0:
            latch = Latch.LEARN if latch is Latch.OFF else latch
        expect_rtcp = None
        if strict and sender.peer is not None:
            expect_rtcp = (sender.peer if sender.rtcp_mux
                           else (sender.rtcp_peer or shift(sender.peer)))

        def flow(match: Endpoint, source: Endpoint, dest: Endpoint, expect: Endpoint | None
                 ) -> Flow:
            return Flow(session=session.id, match=match, source=source, to=dest,
                        idle_timeout=session.idle_timeout, latch=latch, reverse=source,
                        expect=expect, rate_limit_pps=self.rate_limit_pps)

        return [
            flow(to.relay, sender.relay, rtp_to, sender.peer if strict else None),
            flow(shift(to.relay), shift(sender.relay), rtcp_to, expect_rtcp),
        ]

    def _wanted(self, session: MediaSession) -> dict[Endpoint, Flow]:
        """The flows of ``session``'s call, by match (the latest answer owns flows that
        forks share)."""
        wanted: dict[Endpoint, Flow] = {}
        for s in session.call.sessions:
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

    def _end(self, session: MediaSession, now: float, event: Event) -> None:
        if self._sessions.get(session.id) is not session:
            return
        session.handle(event)
        del self._sessions[session.id]
        self._dirty.add(session.id)
        if self.on_end is not None:
            self.on_end(session, event.value, now)
        before = self._wanted(session)
        call = session.call
        call.sessions.remove(session)
        self._prune(call, session.parties, now)
        self._queue(before, self._wanted(call.sessions[0]) if call.sessions else {})
        if call.call_id is not None and not call.sessions:
            del self._calls[call.call_id]
        self.ended[event.value] += 1

    def _arm(self, session: MediaSession) -> None:
        self._schedule(session, session.activity + session.idle_timeout)

    def _schedule(self, session: MediaSession, when: float) -> None:
        if session.lifetime is not None and session.state is State.ACTIVE:
            when = min(when, session.created + session.lifetime)
        session.timer = when
        self._timers.add(when, session)

    def _changed(self) -> None:
        if self.on_change is not None and (
            self._install or self._remove or self._refresh or self._dirty
        ):
            self.on_change()
