"""SIP transactions (RFC 3261 §17, with the RFC 6026 "Accepted" state).

Sans-I/O. One table, ``TRANSITIONS``, keyed ``(kind, state, event)``, holds every legal
move of the four machines — INVITE/non-INVITE × client/server — and the effects it
has; timers are events like any other. A :class:`Transaction` feeds events through
that table with the current time and hands back :data:`Action` values for its user
(the proxy): bytes to transmit, messages to deliver, a timeout. Time only enters as
``now``; ``next_deadline()`` says when ``handle_timer`` wants to run next.

RFC 6026 is used instead of RFC 3261's "2xx terminates the transaction": an INVITE
client transaction that received a 2xx stays (Accepted, Timer M) so retransmitted
2xx responses still find it and are passed up; an INVITE server transaction that
sent a 2xx stays (Accepted, Timer L) and absorbs retransmitted INVITEs.

Over a reliable transport nothing is retransmitted (timers A, E, G are not armed)
and the "wait for retransmissions" timers D, I, J, K are zero (§17.1.1.2, §17.1.2.2,
§17.2.1, §17.2.2).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Action",
    "Deliver",
    "Event",
    "Kind",
    "State",
    "Timeout",
    "Timers",
    "Transaction",
    "TransactionError",
    "Transmit",
    "TransportFailure",
]


class _Member(enum.Enum):
    """An enum hashed by identity (members are singletons and compare by identity):
    Enum.__hash__ is Python code hashing the name, and TRANSITIONS is looked up with
    three members per event."""

    __hash__ = object.__hash__


class Kind(_Member):
    INVITE_CLIENT = "invite client"
    NON_INVITE_CLIENT = "non-invite client"
    INVITE_SERVER = "invite server"
    NON_INVITE_SERVER = "non-invite server"

    @property
    def client(self) -> bool:
        return self in (Kind.INVITE_CLIENT, Kind.NON_INVITE_CLIENT)


class State(_Member):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class Event(_Member):
    # from the network
    RECV_1XX = "1xx received"
    RECV_2XX = "2xx received"
    RECV_FAILURE = "300-699 received"
    RECV_REQUEST = "request retransmission received"
    RECV_ACK = "ACK received"
    TRANSPORT_ERROR = "transport error"  # the request could not be sent (§17.1.4)
    # from the transaction user
    SEND_1XX = "1xx sent"
    SEND_2XX = "2xx sent"
    SEND_FAILURE = "300-699 sent"
    # timers (RFC 3261 §17 table 4; L and M from RFC 6026)
    TIMER_A = "timer A"
    TIMER_B = "timer B"
    TIMER_D = "timer D"
    TIMER_E = "timer E"
    TIMER_F = "timer F"
    TIMER_G = "timer G"
    TIMER_H = "timer H"
    TIMER_I = "timer I"
    TIMER_J = "timer J"
    TIMER_K = "timer K"
    TIMER_L = "timer L"
    TIMER_M = "timer M"


class Effect(_Member):
    RETRANSMIT = "retransmit the request"
    SEND_RESPONSE = "send the TU's response"
    RESEND_RESPONSE = "resend the last response"
    SEND_ACK = "send (or resend) the ACK for a failure"
    DELIVER = "pass the message to the TU"
    TIMEOUT = "tell the TU the transaction timed out"
    FAIL = "tell the TU the transport failed"


K, S, E, F = Kind, State, Event, Effect
_ANY_CLIENT_FINAL = (E.RECV_2XX, E.RECV_FAILURE)

# (kind, state, event) -> (new state, effects). Anything not here is illegal in that
# state: for a network event that means a stray or reordered message, which the
# proxy drops; for a TU event it is a bug in the caller (TransactionError).
TRANSITIONS: dict[tuple[Kind, State, Event], tuple[State, tuple[Effect, ...]]] = {
    # INVITE client, §17.1.1 figure 5 + RFC 6026 figure 3
    (K.INVITE_CLIENT, S.CALLING, E.TIMER_A): (S.CALLING, (F.RETRANSMIT,)),
    (K.INVITE_CLIENT, S.CALLING, E.TIMER_B): (S.TERMINATED, (F.TIMEOUT,)),
    (K.INVITE_CLIENT, S.CALLING, E.RECV_1XX): (S.PROCEEDING, (F.DELIVER,)),
    (K.INVITE_CLIENT, S.CALLING, E.RECV_2XX): (S.ACCEPTED, (F.DELIVER,)),
    (K.INVITE_CLIENT, S.CALLING, E.RECV_FAILURE): (S.COMPLETED, (F.SEND_ACK, F.DELIVER)),
    (K.INVITE_CLIENT, S.PROCEEDING, E.RECV_1XX): (S.PROCEEDING, (F.DELIVER,)),
    (K.INVITE_CLIENT, S.PROCEEDING, E.RECV_2XX): (S.ACCEPTED, (F.DELIVER,)),
    (K.INVITE_CLIENT, S.PROCEEDING, E.RECV_FAILURE): (S.COMPLETED, (F.SEND_ACK, F.DELIVER)),
    (K.INVITE_CLIENT, S.COMPLETED, E.RECV_FAILURE): (S.COMPLETED, (F.SEND_ACK,)),
    (K.INVITE_CLIENT, S.COMPLETED, E.RECV_1XX): (S.COMPLETED, ()),
    (K.INVITE_CLIENT, S.COMPLETED, E.TIMER_D): (S.TERMINATED, ()),
    (K.INVITE_CLIENT, S.ACCEPTED, E.RECV_2XX): (S.ACCEPTED, (F.DELIVER,)),
    (K.INVITE_CLIENT, S.ACCEPTED, E.RECV_1XX): (S.ACCEPTED, ()),
    (K.INVITE_CLIENT, S.ACCEPTED, E.TIMER_M): (S.TERMINATED, ()),
    # non-INVITE client, §17.1.2 figure 6
    (K.NON_INVITE_CLIENT, S.TRYING, E.TIMER_E): (S.TRYING, (F.RETRANSMIT,)),
    (K.NON_INVITE_CLIENT, S.TRYING, E.TIMER_F): (S.TERMINATED, (F.TIMEOUT,)),
    (K.NON_INVITE_CLIENT, S.TRYING, E.RECV_1XX): (S.PROCEEDING, (F.DELIVER,)),
    (K.NON_INVITE_CLIENT, S.PROCEEDING, E.TIMER_E): (S.PROCEEDING, (F.RETRANSMIT,)),
    (K.NON_INVITE_CLIENT, S.PROCEEDING, E.TIMER_F): (S.TERMINATED, (F.TIMEOUT,)),
    (K.NON_INVITE_CLIENT, S.PROCEEDING, E.RECV_1XX): (S.PROCEEDING, (F.DELIVER,)),
    **{
        (K.NON_INVITE_CLIENT, state, event): (S.COMPLETED, (F.DELIVER,))
        for state in (S.TRYING, S.PROCEEDING)
        for event in _ANY_CLIENT_FINAL
    },
    **{
        (K.NON_INVITE_CLIENT, S.COMPLETED, event): (S.COMPLETED, ())
        for event in (E.RECV_1XX, *_ANY_CLIENT_FINAL)
    },
    (K.NON_INVITE_CLIENT, S.COMPLETED, E.TIMER_K): (S.TERMINATED, ()),
    # §17.1.4: a transport failure before the final response ends a client transaction
    **{
        (kind, state, E.TRANSPORT_ERROR): (S.TERMINATED, (F.FAIL,))
        for kind, state in (
            (K.INVITE_CLIENT, S.CALLING),
            (K.INVITE_CLIENT, S.PROCEEDING),
            (K.NON_INVITE_CLIENT, S.TRYING),
            (K.NON_INVITE_CLIENT, S.PROCEEDING),
        )
    },
    # INVITE server, §17.2.1 figure 7 + RFC 6026 figure 5
    (K.INVITE_SERVER, S.PROCEEDING, E.RECV_REQUEST): (S.PROCEEDING, (F.RESEND_RESPONSE,)),
    (K.INVITE_SERVER, S.PROCEEDING, E.SEND_1XX): (S.PROCEEDING, (F.SEND_RESPONSE,)),
    (K.INVITE_SERVER, S.PROCEEDING, E.SEND_2XX): (S.ACCEPTED, (F.SEND_RESPONSE,)),
    (K.INVITE_SERVER, S.PROCEEDING, E.SEND_FAILURE): (S.COMPLETED, (F.SEND_RESPONSE,)),
    (K.INVITE_SERVER, S.COMPLETED, E.RECV_REQUEST): (S.COMPLETED, (F.RESEND_RESPONSE,)),
    (K.INVITE_SERVER, S.COMPLETED, E.TIMER_G): (S.COMPLETED, (F.RESEND_RESPONSE,)),
    (K.INVITE_SERVER, S.COMPLETED, E.RECV_ACK): (S.CONFIRMED, ()),
    (K.INVITE_SERVER, S.COMPLETED, E.TIMER_H): (S.TERMINATED, (F.TIMEOUT,)),
    (K.INVITE_SERVER, S.CONFIRMED, E.RECV_ACK): (S.CONFIRMED, ()),
    (K.INVITE_SERVER, S.CONFIRMED, E.RECV_REQUEST): (S.CONFIRMED, ()),
    (K.INVITE_SERVER, S.CONFIRMED, E.TIMER_I): (S.TERMINATED, ()),
    (K.INVITE_SERVER, S.ACCEPTED, E.RECV_REQUEST): (S.ACCEPTED, ()),
    (K.INVITE_SERVER, S.ACCEPTED, E.SEND_2XX): (S.ACCEPTED, (F.SEND_RESPONSE,)),
    # An ACK with the INVITE's branch after a 2xx (RFC 2543-style UAs) is the TU's.
    (K.INVITE_SERVER, S.ACCEPTED, E.RECV_ACK): (S.ACCEPTED, (F.DELIVER,)),
    (K.INVITE_SERVER, S.ACCEPTED, E.TIMER_L): (S.TERMINATED, ()),
    # non-INVITE server, §17.2.2 figure 8
    (K.NON_INVITE_SERVER, S.TRYING, E.RECV_REQUEST): (S.TRYING, ()),
    (K.NON_INVITE_SERVER, S.TRYING, E.SEND_1XX): (S.PROCEEDING, (F.SEND_RESPONSE,)),
    (K.NON_INVITE_SERVER, S.PROCEEDING, E.SEND_1XX): (S.PROCEEDING, (F.SEND_RESPONSE,)),
    (K.NON_INVITE_SERVER, S.PROCEEDING, E.RECV_REQUEST): (S.PROCEEDING, (F.RESEND_RESPONSE,)),
    **{
        (K.NON_INVITE_SERVER, state, event): (S.COMPLETED, (F.SEND_RESPONSE,))
        for state in (S.TRYING, S.PROCEEDING)
        for event in (E.SEND_2XX, E.SEND_FAILURE)
    },
    (K.NON_INVITE_SERVER, S.COMPLETED, E.RECV_REQUEST): (S.COMPLETED, (F.RESEND_RESPONSE,)),
    (K.NON_INVITE_SERVER, S.COMPLETED, E.TIMER_J): (S.TERMINATED, ()),
}

# The state each machine starts in (§17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2).
INITIAL = {
    K.INVITE_CLIENT: S.CALLING,
    K.NON_INVITE_CLIENT: S.TRYING,
    K.INVITE_SERVER: S.PROCEEDING,
    K.NON_INVITE_SERVER: S.TRYING,
}

# Timers started on entering a state. A timer not listed for the new state is
# cancelled on leaving the old one, except E and F of a non-INVITE client, which go on
# in Proceeding (§17.1.2.2). B only applies in Calling: a provisional response stops
# it (§17.1.1.2; the proxy's Timer C takes over, §16.8).
ENTRY_TIMERS: dict[tuple[Kind, State], tuple[Event, ...]] = {
    (K.INVITE_CLIENT, S.CALLING): (E.TIMER_A, E.TIMER_B),
    (K.INVITE_CLIENT, S.COMPLETED): (E.TIMER_D,),
    (K.INVITE_CLIENT, S.ACCEPTED): (E.TIMER_M,),
    (K.NON_INVITE_CLIENT, S.TRYING): (E.TIMER_E, E.TIMER_F),
    (K.NON_INVITE_CLIENT, S.COMPLETED): (E.TIMER_K,),
    (K.INVITE_SERVER, S.COMPLETED): (E.TIMER_G, E.TIMER_H),
    (K.INVITE_SERVER, S.CONFIRMED): (E.TIMER_I,),
    (K.INVITE_SERVER, S.ACCEPTED): (E.TIMER_L,),
    (K.NON_INVITE_SERVER, S.COMPLETED): (E.TIMER_J,),
}
_SPANNING = {E.TIMER_E, E.TIMER_F}
_CLEARING = {S.COMPLETED, S.ACCEPTED, S.TERMINATED}  # states entered with no spanning timer
_RETRANSMIT_TIMERS = {E.TIMER_A, E.TIMER_E, E.TIMER_G}


@dataclass(frozen=True, slots=True)
class Timers:
    """RFC 3261 §17 table 4 base values (seconds)."""

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
    t4: float = 5.0  # maximum time a message stays in the network

    def first(self, timer: Event, reliable: bool) -> float | None:
        """Initial duration of ``timer``; None: not armed on this transport."""
        if timer in _RETRANSMIT_TIMERS:
            return None if reliable else self.t1
        if timer is E.TIMER_D:
            return 0.0 if reliable else max(32.0, 64 * self.t1)
        if timer in (E.TIMER_I, E.TIMER_K):
            return 0.0 if reliable else self.t4
        if timer is E.TIMER_J:
            return 0.0 if reliable else 64 * self.t1
        return 64 * self.t1  # B, F, H, L, M

    def next_interval(self, timer: Event, interval: float, state: State) -> float:
        """The interval after a retransmission: A doubles without bound (B ends it);
        E and G double up to T2; E in Proceeding is T2 (§17.1.2.2)."""
        if timer is E.TIMER_A:
            return 2 * interval
        if timer is E.TIMER_E and state is S.PROCEEDING:
            return self.t2
        return min(2 * interval, self.t2)


class TransactionError(Exception):
    """The transaction user asked for something illegal in the current state (our bug,
    not the peer's). The transaction is left unchanged."""

    def __init__(self, kind: Kind, state: State, event: Event) -> None:
        super().__init__(f"{event.value} is illegal in {kind.value} state {state.value}")
        self.kind, self.state, self.event = kind, state, event


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send these bytes to the transaction's peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """A message for the transaction user: a response (client) or an ACK (server)."""

    message: Any  # not `object`: mypyc's dataclass support fails on it at import


@dataclass(frozen=True, slots=True)
class Timeout:
    """No final response in time (client: B/F) or no ACK for a failure (server: H)."""


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """The request could not be sent (client): the TU treats it as a 503 (§8.1.3.1)."""


Action = Transmit | Deliver | Timeout | TransportFailure


@dataclass(slots=True)
class Transaction:
    """One transaction. ``request``: the bytes a client transaction sends and
    retransmits (a server transaction never sends its request; it may be empty).
    ``make_ack`` builds the ACK for a failure response (INVITE client only,
    §17.1.1.3)."""

    kind: Kind
    request: bytes
    reliable: bool
    timers: Timers = field(default_factory=Timers)
    make_ack: Callable[[object], bytes] | None = None
    state: State = field(init=False)
    last_response: bytes | None = field(default=None, init=False)
    ack: bytes | None = field(default=None, init=False)
    _deadlines: dict[Event, float] = field(default_factory=dict, init=False)
    _intervals: dict[Event, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.state = INITIAL[self.kind]

    @property
    def terminated(self) -> bool:
        return self.state is S.TERMINATED

    def start(self, now: float) -> list[Action]:
        """Begin: a client transaction sends its request; timers of the first state."""
        self._arm(now)
        return [Transmit(self.request)] if self.kind.client else []

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> list[Action]:
        """Fire every timer due at ``now``, earliest first."""
        actions: list[Action] = []
        while self._deadlines and not self.terminated:
            timer, when = min(self._deadlines.items(), key=lambda item: item[1])
            if when > now:
                break
            del self._deadlines[timer]
            before = self.state
            actions += self._fire(timer, None, now)
            if timer in _RETRANSMIT_TIMERS and self.state is before:
                interval = self.timers.next_interval(timer, self._intervals[timer], self.state)
                self._intervals[timer] = interval
                self._deadlines[timer] = when + interval
        return actions

    def receive_response(self, status: int, response: object, now: float) -> list[Action]:
        """A response matched to this client transaction (§17.1.3). Stray ones (not
        legal in this state) give no action."""
        event = E.RECV_1XX if status < 200 else E.RECV_2XX if status < 300 else E.RECV_FAILURE
        return self._receive(event, response, now)

    def transport_error(self, now: float) -> list[Action]:
        """The transport could not deliver what this client transaction sent (TCP
        connection refused or timed out); nothing when already past that point."""
        return self._receive(E.TRANSPORT_ERROR, None, now)

    def receive_request(self, is_ack: bool, message: object, now: float) -> list[Action]:
        """A retransmitted request, or the ACK, matched to this server transaction."""
        return self._receive(E.RECV_ACK if is_ack else E.RECV_REQUEST, message, now)

    def send_response(self, status: int, data: bytes, now: float) -> list[Action]:
        """The TU's response (server transactions). Raises TransactionError when the
        state does not allow it, e.g. a second final response."""
        event = E.SEND_1XX if status < 200 else E.SEND_2XX if status < 300 else E.SEND_FAILURE
        if (self.kind, self.state, event) not in TRANSITIONS:
            raise TransactionError(self.kind, self.state, event)
        self.last_response = data
        return self._fire(event, None, now)

    def _receive(self, event: Event, message: object, now: float) -> list[Action]:
        if (self.kind, self.state, event) not in TRANSITIONS:
            return []
        return self._fire(event, message, now)

    def _fire(self, event: Event, message: object, now: float) -> list[Action]:
        new_state, effects = TRANSITIONS[(self.kind, self.state, event)]
        actions: list[Action] = []
        for effect in effects:
            actions += self._effect(effect, message)
        if new_state is not self.state:
            self.state = new_state
            self._arm(now)
        return actions

    def _effect(self, effect: Effect, message: object) -> list[Action]:
        if effect is F.RETRANSMIT:
            return [Transmit(self.request)]
        if effect in (F.SEND_RESPONSE, F.RESEND_RESPONSE):
            return [Transmit(self.last_response)] if self.last_response is not None else []
        if effect is F.SEND_ACK:
            if self.ack is None:
                assert self.make_ack is not None, "INVITE client transaction needs make_ack"
                self.ack = self.make_ack(message)
            return [Transmit(self.ack)]
        if effect is F.DELIVER:
            return [Deliver(message)]
        if effect is F.FAIL:
            return [TransportFailure()]
        return [Timeout()]

    def _arm(self, now: float) -> None:
        """Enter the current state's timers; drop the previous state's."""
        if self.state in _CLEARING or not self._deadlines:
            self._deadlines = {}
        else:
            self._deadlines = {t: d for t, d in self._deadlines.items() if t in _SPANNING}
        for timer in ENTRY_TIMERS.get((self.kind, self.state), ()):
            duration = self.timers.first(timer, self.reliable)
            if duration is not None:
                self._intervals[timer] = duration
                self._deadlines[timer] = now + duration
