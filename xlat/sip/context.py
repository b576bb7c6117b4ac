"""The proxy's records of what is in progress, and what it emits.

A ``Server`` is a server transaction with the request it received; once the request
is proxied it has a ``Context``, the response context of RFC 3261 §16.7, whose
``Branch`` es are the client transactions that carry the request on (plus the
CANCELs the proxy sends, which have no context). The context's lifecycle is an
explicit ``(phase, event) -> phase`` table, as ``xlat.sip.transaction`` does it for
transactions. ``Send`` is the one action the proxy core hands its edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from xlat.addr import Endpoint
from xlat.sip.mapping import Hop
from xlat.sip.message import REASONS, SipRequest, SipResponse
from xlat.sip.transaction import Transaction

__all__ = ["Branch", "Context", "Entry", "Event", "Parked", "Phase", "Send", "Server"]


class Phase(Enum):
    """Of a response context."""

    FORWARDING = "forwarding"  # branches pending; a failed target is retried elsewhere
    CANCELLING = "cancelling"  # CANCELled, or a fork's 2xx/6xx ended the others: no failover
    ANSWERED = "answered"  # the final response went upstream (§16.7 step 8)


class Event(Enum):
    CANCEL = "cancel"  # §16.10, or §16.7 step 9/10 cancelling the other branches
    FINAL = "final"  # a final response forwarded upstream (a later fork's 2xx too)


_NEXT: dict[tuple[Phase, Event], Phase] = {
    (Phase.FORWARDING, Event.CANCEL): Phase.CANCELLING,
    (Phase.FORWARDING, Event.FINAL): Phase.ANSWERED,
    (Phase.CANCELLING, Event.CANCEL): Phase.CANCELLING,
    (Phase.CANCELLING, Event.FINAL): Phase.ANSWERED,
    (Phase.ANSWERED, Event.CANCEL): Phase.ANSWERED,  # the 2xx cancels the other forks
    (Phase.ANSWERED, Event.FINAL): Phase.ANSWERED,  # every fork's 2xx goes up (RFC 6026)
}


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` to ``dest`` over ``transport`` ("udp" | "tcp" | "tls") from
    ``local`` (our SIP endpoint to send from; for TCP and TLS, the connection to
    ``dest`` is reused if one exists). ``server_name``: for a TLS connection we open,
    the name the server's certificate must show (RFC 5922 §4)."""

    data: bytes
    dest: Endpoint
    transport: str
    local: Endpoint | None
    server_name: str | None = None


@dataclass(eq=False, slots=True)
class Parked:
    """A request waiting for DNS answers: ``resume(now)`` carries on with it."""

    resume: Callable[[float], list[Send]]
    done: bool = False


@dataclass(eq=False, slots=True)
class Server:
    """A server transaction with the request it received (Via stamped, Routes naming
    us popped) and, once proxied, its response context (§16.7)."""

    key: tuple[str, ...]
    txn: Transaction
    request: SipRequest
    hop: Hop
    context: Context | None = None
    pushed: float | None = None
    parked: Parked | None = None  # routing waits for DNS

    def deadline(self) -> float | None:
        return self.txn.next_deadline()


@dataclass(eq=False, slots=True)
class Context:
    """The response context of a proxied request (§16.7): its branches, the best
    final response so far, and its ``phase`` (moved by ``step``, see ``_NEXT``)."""

    server: Server
    loop: str  # loop-detection hash of the request as received (§16.3 item 4)
    branches: list[Branch] = field(default_factory=list)
    offer: bool = False  # the request carried an SDP offer: responses carry the answer
    best: SipResponse | None = None
    best_local: bool = False  # ``best`` is our own verdict (no target reachable)
    phase: Phase = Phase.FORWARDING

    @property
    def initial_invite(self) -> bool:
        request = self.server.request
        return request.method == "INVITE" and request.to.tag is None

    @property
    def final_sent(self) -> bool:
        return self.phase is Phase.ANSWERED

    def step(self, event: Event) -> None:
        self.phase = _NEXT[self.phase, event]

    def consider(self, response: SipResponse, local: bool) -> None:
        """§16.7 step 6: keep ``response`` if it is the best final response so far
        (``local``: one we take a branch to have given)."""
        if self.best is None or _rank(response) < _rank(self.best):
            self.best, self.best_local = response, local

    def best_final(self) -> SipResponse:
        """The final response to send when no branch answered 2xx (§16.7 step 6)."""
        assert self.best is not None
        if self.best.status == 503 and not self.best_local:
            # a downstream 503 would make the caller fail over; our own (no target
            # could be reached, RFC 3263 §4.3) says just that
            copy = self.best.copy()
            copy.status, copy.reason = 500, REASONS[500]
            return copy
        return self.best


@dataclass(eq=False, slots=True)
class Branch:
    """A client transaction: one forwarded request (``context``), or a CANCEL we sent
    (no context)."""

    key: tuple[str, str]
    txn: Transaction
    request: SipRequest  # as sent
    hop: Hop
    context: Context | None
    alternatives: tuple[Hop, ...] = ()
    timer_c: float | None = None
    provisional: bool = False
    done: bool = False  # final response received (or timed out)
    cancel_wanted: bool = False  # CANCEL once a provisional arrives (§9.1)
    cancelled: bool = False
    pushed: float | None = None

    def deadline(self) -> float | None:
        when = self.txn.next_deadline()
        if self.timer_c is None:
            return when
        return self.timer_c if when is None else min(when, self.timer_c)


Entry = Server | Branch


def _rank(response: SipResponse) -> tuple[int, int, int]:
    """§16.7 step 6: lower is better: any 6xx, then the lowest class; a timeout (408)
    last within its class."""
    status = response.status
    return (0 if status >= 600 else 1, status // 100, 1 if status == 408 else 0)
