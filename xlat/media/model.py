"""The media model, in the spirit of rtpengine's ``call.h``: call → party → media → stream.

- A :class:`Call` is one Call-ID (SIP or NG), or one manual relay: its sessions.
- A :class:`Party` is one tag of a call (the offerer, or one answerer) and the IP family
  it uses in its SDP; it has one :class:`Media` per ``m=`` line.
- A :class:`Media` is what the party said about that line (its RTP address, RTCP
  address, rtcp-mux) and the relay that *stands in* for it: the address written into
  its SDP in place of its own, where the other party sends to reach it (so on the
  other party's family). Its two streams are RTP on ``relay`` and RTCP on
  ``relay + 1`` (:meth:`Media.streams`).
- A :class:`MediaSession` is two parties talking: side 0 offered, side 1 answered (for
  a manual relay: peer A and peer B). Packets a party sends to the other's stand-in
  leave from its own stand-in towards the other party.

Forks are parties sharing a call: every answer with a new to-tag is a party of its own
(its own stand-ins, which the offerer is shown), in a session with the one offerer
party, whose stand-ins (what every answerer was shown) all those sessions share. A
relay is held while a session uses it, so nothing is reference-counted. The call keeps
its sessions in answer order: the latest answer owns the flows they share (those
towards the offerer).

A session's life is one table, ``TRANSITIONS``, keyed ``(state, event)``, as
``xlat.sip.transaction`` does it; an event the table lacks raises
:class:`SessionStateError` and changes nothing.

The views each client needs are methods here, so nothing outside ``xlat.media`` reads
the model's fields: ``describe`` (``session list``), ``record`` (the crash journal),
``Call.query`` (NG ``query``), ``each_way`` (the daemon's end-of-call summary).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from xlat.addr import Endpoint
from xlat.media.datapath import Flow, FlowCounters

__all__ = [
    "TRANSITIONS",
    "Call",
    "Event",
    "Leg",
    "Media",
    "MediaSession",
    "Party",
    "Record",
    "SessionStateError",
    "State",
    "Stream",
    "StreamSpec",
    "decode",
]

_FAMILY_NAMES = {4: "IPv4", 6: "IPv6"}


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """One m= line as a party offered or answered it."""

    peer: Endpoint | None  # RTP address:port; None = rejected stream (port 0)
    rtcp: Endpoint | None = None  # from a=rtcp; None = peer.port + 1
    rtcp_mux: bool = False


def shift(ep: Endpoint, by: int = 1) -> Endpoint:
    return Endpoint(ep.host, ep.port + by)


class Stream(NamedTuple):
    """RTP or RTCP of one media: the relay port standing in for the party, and where
    the party said it receives that stream (None: not known)."""

    kind: str  # "RTP" | "RTCP"
    relay: Endpoint
    advertised: Endpoint | None


@dataclass(slots=True, eq=False)
class Media:
    """One m= line of one party: its stand-in relay and what it said."""

    relay: Endpoint  # RTP; RTCP is relay.port + 1
    peer: Endpoint | None = None
    rtcp_peer: Endpoint | None = None
    rtcp_mux: bool = False

    def learn(self, spec: StreamSpec) -> None:
        self.peer, self.rtcp_peer, self.rtcp_mux = spec.peer, spec.rtcp, spec.rtcp_mux

    def streams(self) -> tuple[Stream, Stream]:
        rtcp = self.peer if self.rtcp_mux else self.rtcp_peer
        if rtcp is None and self.peer is not None:
            rtcp = shift(self.peer)
        return Stream("RTP", self.relay, self.peer), Stream("RTCP", shift(self.relay), rtcp)


@dataclass(slots=True, eq=False)
class Party:
    """One tag of a call (None: an answerer not heard from yet) and its family."""

    tag: str | None
    family: int
    media: list[Media | None]  # per m= line; None: rejected, or never offered

    def at(self, index: int) -> Media | None:
        return self.media[index] if index < len(self.media) else None


class Leg(NamedTuple):
    """The relay facing one side of one stream (the other side's stand-in) and what
    that side said: the shape of a session in ``describe`` and in journal records."""

    relay: Endpoint
    peer: Endpoint | None
    rtcp_peer: Endpoint | None
    rtcp_mux: bool


class State(enum.StrEnum):
    ACTIVE = "active"
    DELETING = "deleting"  # deleted, forwarding until the delete delay runs out
    ENDED = "ended"


class Event(enum.StrEnum):
    OFFER = "offer"
    ANSWER = "answer"
    MEDIA = "media"  # expiry found packets since the last look: the session lives on
    DELETE = "delete"  # a delete with a delay: the delay starts
    # the ends, named as the ``ended`` counters count them
    DELETED = "deleted"  # a delete without delay, or the delay ran out
    IDLE = "idle"
    LIFETIME = "lifetime"
    REMOVED = "removed"  # the CLI's session del
    FLUSHED = "flushed"
    PORTS_EXHAUSTED = "ports_exhausted"  # a new session that found no relay ports


_A, _D, _E = State.ACTIVE, State.DELETING, State.ENDED
_ENDS = (Event.DELETED, Event.REMOVED, Event.FLUSHED)

TRANSITIONS: dict[tuple[State, Event], State] = {
    (_A, Event.OFFER): _A,
    (_A, Event.ANSWER): _A,
    (_A, Event.MEDIA): _A,
    (_A, Event.DELETE): _D,
    (_A, Event.IDLE): _E,
    (_A, Event.LIFETIME): _E,
    (_A, Event.PORTS_EXHAUSTED): _E,
    **{(_A, e): _E for e in _ENDS},
    # a deleted call still takes re-INVITEs and answers until the delay is over; a
    # second delete does not move its end, and neither idleness nor lifetime end it
    (_D, Event.OFFER): _D,
    (_D, Event.ANSWER): _D,
    (_D, Event.DELETE): _D,
    **{(_D, e): _E for e in _ENDS},
}


class SessionStateError(Exception):
    """An event the session's state does not take (our bug, not a peer's); the
    session is left unchanged."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"{event.value} is illegal in session state {state.value}")
        self.state, self.event = state, event


@functools.lru_cache(maxsize=1 << 16)  # relays and peers repeat in every record of a call
def _endpoint_text(ep: Endpoint) -> str:
    return str(ep)  # IPv6 text costs microseconds (ipaddress)


def _text(ep: Endpoint | None) -> str | None:
    return None if ep is None else _endpoint_text(ep)


@dataclass(slots=True, eq=False)
class MediaSession:
    """Two parties of one call (or one manual relay)."""

    id: str
    origin: str  # "sip" | "ng" | "manual"
    call: Call
    parties: tuple[Party, Party]  # (side 0, side 1)
    idle_timeout: float
    lifetime: float | None
    created: float
    activity: float  # last time signalling or media showed it alive
    state: State = State.ACTIVE
    ends_at: float | None = None  # end of the delete delay
    timer: float = 0.0  # the deadline in the heap that counts

    def handle(self, event: Event) -> State:
        """Move by ``TRANSITIONS``; returns the new state. Raises SessionStateError."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise SessionStateError(self.state, event)
        self.state = new
        return new

    @property
    def call_id(self) -> str | None:
        return self.call.call_id

    @property
    def tags(self) -> tuple[str | None, str | None]:
        return self.parties[0].tag, self.parties[1].tag

    @property
    def families(self) -> tuple[int, int]:
        return self.parties[0].family, self.parties[1].family

    def side_of(self, tag: str) -> int | None:
        if self.parties[0].tag == tag:
            return 0
        if self.parties[1].tag == tag:
            return 1
        return None

    def has(self, from_tag: str | None, to_tag: str | None) -> bool:
        """Whether the session is one a request naming these tags means (None: any)."""
        tags = self.tags
        return (from_tag is None or from_tag in tags) and (to_tag is None or to_tag in tags)

    def pairs(self) -> list[tuple[Media, Media] | None]:
        """Per m= line, the two parties' media; None where either has none (rejected)."""
        a, b = self.parties
        out: list[tuple[Media, Media] | None] = []
        for i in range(max(len(a.media), len(b.media))):
            x, y = a.at(i), b.at(i)
            out.append(None if x is None or y is None else (x, y))
        return out

    def stand_ins(self, side: int) -> list[Endpoint | None]:
        """Per m= line, the relay standing in for ``side``: what the other side is shown."""
        return [None if p is None else p[side].relay for p in self.pairs()]

    @property
    def streams(self) -> list[tuple[Leg, Leg] | None]:
        """Per m= line, the relay facing each side (where it sends) and what it said."""
        return [None if p is None else (_leg(p[1], p[0]), _leg(p[0], p[1]))
                for p in self.pairs()]

    def legs(self) -> Iterable[Leg]:
        for stream in self.streams:
            if stream is not None:
                yield from stream

    def relay_ports(self) -> list[Endpoint]:
        """Every relay port (RTP and RTCP) the session's streams use."""
        return [ep for leg in self.legs() for ep in (leg.relay, shift(leg.relay))]

    def describe(self, now: float) -> dict[str, object]:
        """The JSON object ``session list -j`` prints for the session."""

        def leg(lg: Leg) -> dict[str, object]:
            return {"peer": str(lg.peer) if lg.peer else None, "relay": str(lg.relay)}

        streams = [[leg(a), leg(b)] for a, b in (s for s in self.streams if s is not None)]
        return {
            "id": self.id,
            "legs": streams[0] if streams else [],
            "state": str(self.state),
            "origin": self.origin,
            "call_id": self.call_id,
            "tags": list(self.tags),
            "streams": [{"legs": s} for s in streams],
            "idle_timeout": self.idle_timeout,
            "lifetime": self.lifetime,
            "age": round(now - self.created, 3),
            "idle": round(max(0.0, now - self.activity), 3),
            "ends_in": None if self.ends_at is None else round(self.ends_at - now, 3),
        }

    def record(self) -> dict[str, Any]:
        """The session as JSON-able data for the crash journal (``SessionManager.restore``):
        relay ports, peers and tags (what a BYE, re-INVITE or NG request after a restart
        needs), its times (monotonic seconds), and ``answered``, its rank in the call's
        answer order."""

        def leg(lg: Leg) -> list[str | bool | None]:
            return [_endpoint_text(lg.relay), _text(lg.peer), _text(lg.rtcp_peer), lg.rtcp_mux]

        return {
            "id": self.id, "origin": self.origin, "call_id": self.call_id,
            "tags": list(self.tags), "families": list(self.families),
            "idle_timeout": self.idle_timeout, "lifetime": self.lifetime,
            "created": self.created, "activity": self.activity, "state": str(self.state),
            "ends_at": self.ends_at, "answered": self.call.sessions.index(self),
            "streams": [None if st is None else [leg(st[0]), leg(st[1])]
                        for st in self.streams],
        }

    def each_way(self, flows: Sequence[Flow], counters: Mapping[Endpoint, FlowCounters]
                 ) -> dict[str, tuple[int, int]]:
        """(packets, bytes) that arrived from side A (``a->b``) and from side B
        (``b->a``), RTP and RTCP, over ``flows`` (those the session owns)."""
        from_a = {p[1].relay for p in self.pairs() if p is not None}  # what A sends to
        ways = {"a->b": (0, 0), "b->a": (0, 0)}
        for f in flows:
            c = counters.get(f.match)
            if c is None:
                continue
            rtp = Endpoint(f.match.host, f.match.port & ~1)  # RTCP arrives on the odd port
            way = "a->b" if rtp in from_a else "b->a"
            p, b = ways[way]
            ways[way] = (p + c.packets, b + c.bytes)
        return ways


Said = tuple[Endpoint, Endpoint | None, Endpoint | None, bool]  # relay, peer, rtcp, mux


@dataclass(frozen=True, slots=True)
class Record:
    """A journal record decoded: ``media[side]`` is, per m= line, the stand-in relay of
    that side and what it said (None: no stream)."""

    id: str
    origin: str
    call_id: str | None
    tags: tuple[str | None, str | None]
    families: tuple[int, int]
    idle_timeout: float
    lifetime: float | None
    created: float
    activity: float
    state: State
    ends_at: float | None
    answered: int
    media: tuple[list[Said | None], list[Said | None]]


def decode(d: Mapping[str, Any], shift: float) -> Record:
    """A ``MediaSession.record`` read back, its times moved by ``shift``. Raises
    KeyError, TypeError, ValueError or IndexError for one that does not decode."""

    def ep(text: object) -> Endpoint | None:
        return None if text is None else Endpoint.parse(str(text))

    def leg(data: Sequence[Any]) -> Said:
        relay = ep(data[0])
        if relay is None:
            raise ValueError("leg without a relay")
        return relay, ep(data[1]), ep(data[2]), bool(data[3])

    media: tuple[list[Said | None], list[Said | None]] = ([], [])
    for stream in d["streams"]:
        if stream is None:
            media[0].append(None)
            media[1].append(None)
            continue
        facing_a, facing_b = leg(stream[0]), leg(stream[1])  # each: the other's stand-in
        media[0].append((facing_b[0], *facing_a[1:]))
        media[1].append((facing_a[0], *facing_b[1:]))
    lifetime, families = d["lifetime"], (int(d["families"][0]), int(d["families"][1]))
    if not set(families) <= {4, 6}:
        raise ValueError(f"families {families}")
    return Record(
        id=str(d["id"]), origin=str(d["origin"]),
        call_id=None if d["call_id"] is None else str(d["call_id"]),
        tags=(d["tags"][0], d["tags"][1]),
        families=families,
        idle_timeout=float(d["idle_timeout"]),
        lifetime=None if lifetime is None else float(lifetime),
        created=float(d["created"]) + shift, activity=float(d["activity"]) + shift,
        state=State(d["state"]),
        ends_at=None if d["ends_at"] is None else float(d["ends_at"]) + shift,
        answered=int(d["answered"]), media=media,
    )


def _leg(standing_in: Media, said: Media) -> Leg:
    return Leg(standing_in.relay, said.peer, said.rtcp_peer, said.rtcp_mux)


@dataclass(slots=True, eq=False)
class Call:
    """The sessions of one call-id (None: a manual relay, alone in its call), in answer
    order: unanswered ones first, then each by its latest answer."""

    call_id: str | None
    sessions: list[MediaSession]

    def parties(self) -> list[Party]:
        return list({id(p): p for s in self.sessions for p in s.parties}.values())

    def party(self, tag: str) -> Party | None:
        return next((p for s in self.sessions for p in s.parties if p.tag == tag), None)

    def matching(self, from_tag: str | None, to_tag: str | None) -> list[MediaSession]:
        return [s for s in self.sessions if s.has(from_tag, to_tag)]

    def answered(self, session: MediaSession) -> None:
        """``session`` got an answer: it is the latest now."""
        self.sessions.remove(session)
        self.sessions.append(session)

    def query(self, sessions: Sequence[MediaSession],
              counters: Mapping[Endpoint, FlowCounters]) -> dict[str, object]:
        """rtpengine's ``query`` reply (``tags`` and ``totals``) for ``sessions`` of the
        call, given the datapath counters of their relay ports; rtpengine's UNIX
        timestamps are left out (the core only knows monotonic time)."""
        tags: dict[str, object] = {}
        for session in (s for s in self.sessions if s in sessions):
            pairs = session.pairs()
            for side, party in enumerate(session.parties):
                other = session.parties[1 - side]
                medias = [{"index": index, "flags": ["rtcp-mux"] if p[side].rtcp_mux else [],
                           "streams": _tag_streams(p[side], p[1 - side], counters)}
                          for index, p in enumerate(pairs, start=1) if p is not None]
                tags[party.tag or ""] = {"tag": party.tag or "",
                                         "in dialogue with": other.tag or "", "medias": medias}
        return {"tags": tags, "totals": totals(sessions, counters)}


def totals(sessions: Iterable[MediaSession], counters: Mapping[Endpoint, FlowCounters]
           ) -> dict[str, dict[str, int]]:
    """RTP and RTCP stats summed over the sessions' relay ports (what NG ``delete`` and
    ``statistics`` report)."""
    out = {"RTP": _stats(None), "RTCP": _stats(None)}
    for session in sessions:
        for leg in session.legs():
            _add(out["RTP"], _stats(counters.get(leg.relay)))
            _add(out["RTCP"], _stats(counters.get(shift(leg.relay))))
    return out


def _tag_streams(own: Media, other: Media, counters: Mapping[Endpoint, FlowCounters]
                 ) -> list[dict[str, object]]:
    """RTP and RTCP of one tag's media: the local port is the relay the tag sends to (the
    other party's stand-in); ``stats`` count what arrived there; ``endpoint`` is where
    the flow towards the tag sends (after latching, if the datapath knows), ``advertised
    endpoint`` what its SDP said."""
    out = []
    for mine, theirs in zip(own.streams(), other.streams(), strict=True):
        local = theirs.relay
        entry: dict[str, object] = {"local address": str(local.host), "local port": local.port,
                                    "flags": [mine.kind], "stats": _stats(counters.get(local))}
        sending = counters.get(mine.relay)
        endpoint = sending.to if sending is not None and sending.to else mine.advertised
        if endpoint is not None:
            entry["endpoint"] = _endpoint(endpoint)
        if mine.advertised is not None:
            entry["advertised endpoint"] = _endpoint(mine.advertised)
        out.append(entry)
    return out


def _endpoint(ep: Endpoint) -> dict[str, object]:
    return {"family": _FAMILY_NAMES[ep.family], "address": str(ep.host), "port": ep.port}


def _stats(counters: FlowCounters | None) -> dict[str, int]:
    if counters is None:
        return {"packets": 0, "bytes": 0, "errors": 0}
    return {"packets": counters.packets, "bytes": counters.bytes, "errors": 0}


def _add(total: dict[str, int], stats: dict[str, int]) -> None:
    for key, value in stats.items():
        total[key] += value
