"""The transaction-stateful SIP proxy core (RFC 3261 §16) that joins IPv6 and IPv4.

Sans-I/O: ``receive`` takes the bytes of one message, where they came from and the
time, and returns the :class:`Send` actions to perform; ``handle_timer(now)`` runs the
transaction timers; ``next_deadline()`` says when it wants to be called again.
Randomness (branches, tags) comes from the injected ``rng``.

What it adds to a plain proxy, for calls that cross address families:

- the Via it pushes and the Record-Route it inserts are of the family each side
  uses; a request that changes family gets two Record-Route entries (RFC 5658), one
  per interface, so each party's route set names the gateway in its own family;
- an IP literal that a party of the other family would have to use (Contact; From
  and To when configured) becomes the gateway's own address of that party's family,
  with the original encoded in a ``;xlat=`` URI parameter and restored on the way
  back (a request whose Request-URI carries it goes to the original address);
- SDP offers and answers go through the media layer (``media/negotiate.py``), which
  allocates relay ports, and are rewritten so every party sees a media address of
  its own family;
- NAT64 (RFC 6052): a request arriving over IPv4 whose top Via is IPv6 comes from an
  IPv6-only phone behind NAT64: it is shown the gateway's synthetic IPv6 address
  (prefix + our IPv4) in Via, Record-Route, Contact and SDP, and requests for it go
  back through the NAT64 binding it came over (its registration, or the flow its
  last request came on); a target whose IPv6 address is NAT64-synthesised is
  reached directly on the IPv4 address it embeds.

This module is the §16 core: transactions, forking, failover, cancellation. What it
delegates, one concern per module: routing, RFC 3263 location, Digest checks and
NAT64 flows to ``sip/routing.py``; what is ours and how each side is shown addresses
to ``sip/mapping.py``; SDP in SIP messages to ``sip/media.py`` (which goes through
``media/negotiate.py``); its records and the §16.7 phase table to ``sip/context.py``;
the timer heap to ``sip/deadlines.py``; its settings to ``sip/settings.py``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence

from xlat.addr import Endpoint, IPAddress
from xlat.logs import CALL_ID, summarized
from xlat.media.session import SessionManager
from xlat.sip import dns
from xlat.sip.auth import DigestAuth
from xlat.sip.context import Branch, Context, Entry, Event, Parked, Phase, Send, Server
from xlat.sip.deadlines import DeadlineHeap
from xlat.sip.errors import SipParseError
from xlat.sip.malformed import error_response
from xlat.sip.mapping import DEFAULT_PORT, AddressMap, Hop
from xlat.sip.media import SipMedia
from xlat.sip.message import (
    SipRequest,
    SipResponse,
    Via,
    derived_request,
    make_response,
    parse_message,
)
from xlat.sip.registrar import Registrar
from xlat.sip.routing import Dest, Reject, Router, Target, Unresolved
from xlat.sip.settings import ProxyConfig
from xlat.sip.transaction import (
    Action,
    Deliver,
    Kind,
    State,
    Timeout,
    Transaction,
    TransactionError,
    Transmit,
    TransportFailure,
)
from xlat.sip.uri import format_host

log = logging.getLogger(__name__)
MALFORMED = summarized("malformed SIP")  # outside input: one line per window, not per packet

__all__ = ["ProxyConfig", "Send", "SipProxy"]

MAGIC = "z9hG4bK"  # RFC 3261 §8.1.1.7 branch cookie
BRANCH_PREFIX = MAGIC + "X"  # ours: z9hG4bKX<loop hash>.<token>
# Methods that never get a Record-Route: REGISTER makes no dialog (RFC 3261 §10.2),
# CANCEL and ACK are not forwarded as new requests.
_NO_RECORD_ROUTE = frozenset({"REGISTER", "CANCEL", "ACK"})


# ---- configuration and output -----------------------------------------------------------




class SipProxy:
    """See the module docstring. Where a request goes (DESIGN.md "CLI"), first match
    wins: (1) Route entries naming us are popped and the next Route wins; (2) for a
    Request-URI in our domains (our names, or our addresses with no port or one of
    our ports), the registrar's bindings, and for any other the flow of a contact
    registered here (TCP/TLS connection, NAT64 binding); a Request-URI we mapped
    (``;xlat=``) goes to the address it encodes; (3) a route whose domain equals the
    Request-URI host; (4) the ``*`` route, for everything else, ours or not, name or
    literal. With no ``*``: 404 for our domains (480 for a user whose bindings
    expired), and any other Request-URI goes to its own host. A route is a next hop;
    the Request-URI stays.

    Next hops are located per RFC 3263 (``xlat.sip.dns``) from the answers in
    ``self.dns``; a request whose answers are missing waits: ``dns_queries()`` says
    what to look up, ``dns_answer()`` hands the answer in and carries on with the
    requests that waited for it. A branch whose target fails (transport error,
    Timer B/F, 503) is retried on the next target on a new branch (§4.3), and the
    failed target is avoided for a while (``dns.FailedTargets``)."""

    def __init__(self, config: ProxyConfig, media: SessionManager, rng: random.Random) -> None:
        self.media = media
        self.registrar = Registrar(*config.register_expires)
        self.auth = None if config.users is None else DigestAuth(
            config.users, config.auth_secret, rng)
        self._rng = rng
        self.router = Router(self.registrar, self.auth, rng)
        self.dns, self.failed_targets = self.router.dns, self.router.failed_targets
        self._servers: dict[tuple[str, ...], Server] = {}
        self._clients: dict[tuple[str, str], Branch] = {}
        self._timers: DeadlineHeap[Entry] = DeadlineHeap(self._alive, self._track)
        self._parked: dict[dns.Query, list[Parked]] = {}  # requests waiting for an answer
        self._queries: list[dns.Query] = []  # asked for, not yet handed to the edge
        # what was received and what the proxy answered itself, for metrics
        self.requests_received: dict[str, int] = {}  # method ->
        self.responses_received: dict[tuple[str, int], int] = {}  # (CSeq method, status) ->
        self.responses_sent: dict[tuple[str, int], int] = {}  # generated here, not forwarded
        self.malformed = 0
        self.reconfigure(config)

    def reconfigure(self, config: ProxyConfig) -> None:
        """Use ``config`` from now on (``systemctl reload``): new requests see its
        domains, routes and NAT64 prefixes; transactions, dialogs and registrations in
        progress keep going. The registrar's lifetimes stay as they were."""
        self.config = config
        self.addresses = AddressMap(
            config.sip, config.tls, aliases=config.aliases, domains=config.domains,
            nat64_prefixes=config.nat64_prefixes, map_contact=config.map_contact,
            map_from_to=config.map_from_to)
        self.router.reconfigure(config, self.addresses)
        self.sdp = SipMedia(self.media, self.addresses, delete_delay=config.delete_delay,
                            retry_after=config.retry_after)

    @property
    def on_change(self) -> Callable[[], None] | None:
        """Called when a NAT64 flow is learnt or forgotten (for the crash journal)."""
        return self.router.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        self.router.on_change = callback

    def drain_records(self) -> list[tuple[str, dict[str, object] | None]]:
        """The NAT64 flows to journal (``Router.drain_records``)."""
        return self.router.drain_records()

    def restore(self, items: Mapping[str, Mapping[str, object]], *, now: float,
                shift: float = 0.0) -> int:
        """Take back journaled NAT64 flows (``Router.restore``)."""
        return self.router.restore(items, now=now, shift=shift)

    # ---- public API -----------------------------------------------------------------

    def receive(
        self, data: bytes, source: Endpoint, local: Endpoint, transport: str, now: float
    ) -> list[Send]:
        """One message from ``source`` received on our ``local`` endpoint. A malformed
        request is answered 400 (or the parser's status hint) when its Via allows;
        anything else malformed is dropped."""
        if not data.strip(b"\r\n"):
            return []  # CRLF keep-alive (RFC 5626 §4.4.1)
        try:
            message = parse_message(data)
        except SipParseError as exc:
            return self._malformed(data, exc, source, local, transport)
        return self.receive_message(message, source, local, transport, now)

    def receive_message(
        self,
        message: SipRequest | SipResponse,
        source: Endpoint,
        local: Endpoint,
        transport: str,
        now: float,
    ) -> list[Send]:
        """Like ``receive``, for a message already parsed (stream transports)."""
        token = CALL_ID.set(message.call_id)  # on every line logged about it
        try:
            if isinstance(message, SipResponse):
                key = (message.cseq[1], message.status)
                self.responses_received[key] = self.responses_received.get(key, 0) + 1
                return self._on_response(message, now)
            method = message.method
            self.requests_received[method] = self.requests_received.get(method, 0) + 1
            return self._on_request(message, source, local, transport, now)
        finally:
            CALL_ID.reset(token)

    def handle_timer(self, now: float) -> list[Send]:
        """Run every transaction timer due at ``now``."""
        out: list[Send] = []
        for entry in self._timers.due(now):
            if isinstance(entry, Server):
                out += self._server_actions(entry, entry.txn.handle_timer(now))
            else:
                out += self._branch_timer(entry, now)
        return out

    def transport_error(self, dest: Endpoint, transport: str, now: float, *,
                        unanswered: bool = False) -> list[Send]:
        """Sending to ``dest`` over ``transport`` failed (a TCP connection refused or
        timed out, an ICMP error): every client transaction that sent there fails now,
        as if answered 503 (§8.1.3.1, §17.1.4), instead of waiting for Timer B or F.
        ``unanswered``: only those with no response yet (an ICMP error names no
        datagram: one to a server that already answered was not its request)."""
        out: list[Send] = []
        for branch in list(self._clients.values()):
            if branch.hop.dest == dest and branch.hop.transport == transport \
                    and not (unanswered and branch.provisional):
                out += self._branch_actions(branch, branch.txn.transport_error(now), now)
        return out

    def dns_queries(self) -> list[dns.Query]:
        """The DNS queries to run now (each asked for once until answered); the edge
        answers each with ``dns_answer``, within a bounded time."""
        queries, self._queries = self._queries, []
        return queries

    def dns_answer(self, query: dns.Query, records: Sequence[dns.Record] | None,
                   ttl: float | None, now: float) -> list[Send]:
        """The answer to ``query``: its records and TTL (``DnsCache.store``), or None
        when the lookup failed. Carries on with every request that waited for it."""
        if records is None:
            self.dns.store_failure(query, now)
        else:
            self.dns.store(query, records, ttl, now)
        out: list[Send] = []
        for parked in self._parked.pop(query, []):
            if not parked.done:
                parked.done = True
                out += parked.resume(now)
        return out

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must run next; None when nothing is pending."""
        return self._timers.next_deadline()

    @property
    def transactions(self) -> int:
        """Live transactions (server + client), for statistics."""
        return len(self._servers) + len(self._clients)

    # ---- requests -------------------------------------------------------------------

    def _on_request(
        self, request: SipRequest, source: Endpoint, local: Endpoint, transport: str, now: float
    ) -> list[Send]:
        self._stamp_via(request, source)
        hop = self._incoming_hop(request.vias[0], source, local, transport)
        if hop.nat64 is not None:
            self.router.learn_flow(request, hop, now)
        if request.method == "ACK":
            return self._on_ack(request, hop, now)
        key = self._server_key(request, request.method)
        server = self._servers.get(key)
        if server is not None:  # a retransmission (§17.2.3)
            return self._server_actions(server, server.txn.receive_request(False, request, now))
        kind = Kind.INVITE_SERVER if request.method == "INVITE" else Kind.NON_INVITE_SERVER
        txn = Transaction(kind, b"", reliable=transport != "udp", timers=self.config.timers)
        server = Server(key, txn, request, hop)
        self._servers[key] = server
        out = self._server_actions(server, txn.start(now))
        if request.method == "INVITE":
            out += self._respond(server, 100, now)
        try:
            out += self._proxy(server, now)
        except Reject as exc:
            log.info("%s %s from %s: %d %s", request.method, request.uri, source, exc.status, exc)
            out += self._respond(server, exc.status, now, exc.reason, exc.headers)
        request.compact()  # kept as long as its transaction
        return out

    def _proxy(self, server: Server, now: float) -> list[Send]:
        """§16.3-16.6 for a new request: validate, route, fork, forward."""
        request = server.request
        if request.method == "CANCEL":
            return self._on_cancel(server, now)
        if request.max_forwards == 0:
            raise Reject(483)
        loop = self._loop_hash(request)
        if self._looped(request, loop):
            raise Reject(482)
        dests = self.router.route(request, now)
        if dests is None:
            return self._respond_locally(server, now)
        return self._forward(server, dests, loop, now)

    def _forward(self, server: Server, dests: Sequence[Dest], loop: str,
                 now: float) -> list[Send]:
        """Locate the next hops of ``dests`` and send a branch to each; when DNS
        answers are missing, wait for them (``_park``). Raises Reject."""
        request = server.request
        try:
            targets = self.router.locate(dests, now)
        except Unresolved as exc:
            server.parked = self._park(exc.queries, functools.partial(
                self._resume, server, dests, loop))
            log.debug("%s %s waits for DNS: %s", request.method, request.uri, exc)
            return []
        server.parked = None
        context = Context(server, loop)
        server.context = context
        offers = self._request_media(context, targets, now)
        out: list[Send] = []
        for i, target in enumerate(targets):
            body = None if offers is None else offers[i]
            if offers is not None and body is None:
                log.warning("call %s: offer not forked to %s (other family)",
                            request.call_id, target.uri)
                continue
            out += self._start_branch(context, target, body, now)
        return out

    def _resume(self, server: Server, dests: Sequence[Dest], loop: str,
                now: float) -> list[Send]:
        """DNS answered for a request that waited: forward it (if it still wants to be:
        a CANCEL may have ended it meanwhile)."""
        if not self._alive(server) or server.parked is None:
            return []
        try:
            return self._forward(server, dests, loop, now)
        except Reject as exc:
            request = server.request
            log.info("%s %s: %d %s", request.method, request.uri, exc.status, exc)
            return self._respond(server, exc.status, now, exc.reason, exc.headers)

    def _park(self, queries: frozenset[dns.Query],
              resume: Callable[[float], list[Send]]) -> Parked:
        parked = Parked(resume)
        for query in queries:
            waiting = self._parked.get(query)
            if waiting is None:  # not asked yet (or asked and answered since)
                self._parked[query] = waiting = []
                self._queries.append(query)
            waiting.append(parked)
        return parked

    def _respond_locally(self, server: Server, now: float) -> list[Send]:
        """A request addressed to the gateway itself: REGISTER, or OPTIONS (keepalive)."""
        request = server.request
        if request.method == "REGISTER":
            self.router.authorize_register(request, now)
            response = self.registrar.register(
                request,
                source=server.hop.dest,
                transport=server.hop.transport,
                now=now,
                to_tag=self._token(),
            )
            return self._server_actions(
                server, server.txn.send_response(response.status, response.to_bytes(), now)
            )
        if request.method == "OPTIONS":
            return self._respond(server, 200, now)
        raise Reject(404)

    def _request_media(self, context: Context, targets: Sequence[Target],
                       now: float) -> list[bytes | None] | None:
        """The offer each target is to get (``SipMedia.request``); raises Reject."""
        offers = self.sdp.request(context.server.request, context.server.hop,
                                  [t.hop for t in targets], now)
        context.offer = context.offer or offers is not None
        return offers

    def _start_branch(
        self, context: Context, target: Target, body: bytes | None, now: float
    ) -> list[Send]:
        incoming = context.server.request
        branch_id = f"{BRANCH_PREFIX}{context.loop}.{self._token()}"
        record = incoming.to.tag is None and incoming.method not in _NO_RECORD_ROUTE
        out = self._forwarded(incoming, target, context.server.hop, branch_id, record, body)
        kind = Kind.INVITE_CLIENT if out.method == "INVITE" else Kind.NON_INVITE_CLIENT
        txn = Transaction(
            kind,
            out.to_bytes(),
            reliable=target.hop.transport != "udp",
            timers=self.config.timers,
            make_ack=functools.partial(_ack_for, out) if kind is Kind.INVITE_CLIENT else None,
        )
        out.compact()  # kept as long as its transaction
        branch = Branch((branch_id, out.method), txn, out, target.hop, context,
                         target.alternatives)
        if out.method == "INVITE":
            branch.timer_c = now + self.config.timer_c
        context.branches.append(branch)
        self._clients[branch.key] = branch
        return self._branch_actions(branch, txn.start(now), now)

    def _forwarded(
        self,
        request: SipRequest,
        target: Target,
        incoming: Hop,
        branch_id: str,
        record_route: bool,
        body: bytes | None,
    ) -> SipRequest:
        """§16.6: the copy of ``request`` that goes to ``target``."""
        out = request.copy()
        if target.uri is not request.uri:
            out.uri = target.uri
        out.set("Max-Forwards", str(request.max_forwards - 1))
        if record_route:
            self.addresses.record_route(out, incoming, target.hop)
        self.addresses.map_addresses(out, target.hop)
        if body is not None:
            out.body = body
        local = self.addresses.our_endpoint(target.hop, transport=True)
        out.insert("top", "Via", f"SIP/2.0/{target.hop.transport.upper()} "
                   f"{format_host(local.host)}:{local.port};branch={branch_id};rport")
        return out

    def _on_cancel(self, server: Server, now: float) -> list[Send]:
        """§16.10: answer the CANCEL, cancel the INVITE's pending branches."""
        invite = self._servers.get(self._server_key(server.request, "INVITE"))
        if invite is None:
            raise Reject(481)
        out = self._respond(server, 200, now)
        if invite.parked is not None:  # still waiting for DNS: nothing was forwarded
            invite.parked.done, invite.parked = True, None
            return out + self._respond(invite, 487, now)
        context = invite.context
        if context is not None and not context.final_sent:
            out += self._cancel_branches(context, now)
        return out

    def _on_ack(self, request: SipRequest, hop: Hop, now: float) -> list[Send]:
        """An ACK for a failure ends its server transaction (hop by hop); an ACK for a
        2xx is forwarded statelessly along its route (end to end), carrying the
        answer to an offer made in the 2xx."""
        server = self._servers.get(self._server_key(request, "INVITE"))
        if server is not None and server.txn.state in (State.COMPLETED, State.CONFIRMED):
            return self._server_actions(server, server.txn.receive_request(True, request, now))
        loop = self._loop_hash(request)
        if request.max_forwards == 0 or self._looped(request, loop):
            return []
        try:
            dests = self.router.route(request, now)
        except Reject as exc:
            log.info("ACK %s not forwarded: %s", request.uri, exc)
            return []
        if not dests:
            return []
        return self._forward_ack(request, hop, dests[0], loop, now)

    def _forward_ack(self, request: SipRequest, hop: Hop, dest: Dest, loop: str,
                     now: float) -> list[Send]:
        try:
            target = self.router.locate([dest], now)[0]
        except Unresolved as exc:
            self._park(exc.queries, functools.partial(self._forward_ack, request, hop, dest,
                                                      loop))
            return []
        except Reject as exc:
            log.info("ACK %s not forwarded: %s", request.uri, exc)
            return []
        body = self.sdp.ack(request, target.hop, now)
        token = hashlib.sha1((request.vias[0].branch or request.call_id).encode()).hexdigest()
        branch_id = f"{BRANCH_PREFIX}{loop}.{token[:16]}"
        out = self._forwarded(request, target, hop, branch_id, False, body)
        return [self._send(out.to_bytes(), target.hop)]

    # ---- responses ------------------------------------------------------------------

    def _on_response(self, response: SipResponse, now: float) -> list[Send]:
        top = response.vias[0]
        branch = self._clients.get((top.branch or "", response.cseq[1]))
        if branch is None:
            log.debug("stray response %d %s dropped", response.status, response.call_id)
            return []
        return self._branch_actions(
            branch, branch.txn.receive_response(response.status, response, now), now
        )

    def _on_branch_response(self, branch: Branch, response: SipResponse, now: float,
                            local: bool = False) -> list[Send]:
        """§16.7: a response of one branch, passed up by its client transaction (or
        ``local``: the one we take it to have given)."""
        context = branch.context
        if context is None:  # the response to a CANCEL of ours
            return []
        out: list[Send] = []
        status = response.status
        if status < 200:
            if branch.cancel_wanted and not branch.provisional:
                out += self._send_cancel(branch, now)
            branch.provisional = True
            if branch.timer_c is not None:
                branch.timer_c = now + self.config.timer_c
            if status == 100 or context.final_sent:
                return out
            return out + self._relay(context, response, now)
        branch.done, branch.timer_c = True, None
        if status == 503 and not local:  # RFC 3263 §4.3: the next target, if any
            self.failed_targets.failed(branch.hop.dest, branch.hop.transport, now)
            retried = self._failover(branch, now)
            if retried is not None:
                return out + retried
        if status < 300:
            out += self._relay(context, response, now)
            context.step(Event.FINAL)
            if branch.request.method == "INVITE":
                out += self._cancel_branches(context, now)
            return out
        context.consider(response, local)
        if status >= 600 and branch.request.method == "INVITE":
            out += self._cancel_branches(context, now)
        return out + self._final_if_done(context, now)

    def _final_if_done(self, context: Context, now: float) -> list[Send]:
        """When every branch has its final response and none was a 2xx, send the best
        one (§16.7 step 6) and release the call's media if it was a new call."""
        if context.final_sent or not all(b.done for b in context.branches):
            return []
        context.step(Event.FINAL)
        best = context.best_final()
        if context.initial_invite:
            request = context.server.request
            self.sdp.release(request, now)
        return self._relay(context, best, now)

    def _relay(self, context: Context, response: SipResponse, now: float) -> list[Send]:
        """Forward a branch's response upstream through the server transaction."""
        server = context.server
        response.pop_top("Via")
        if not response.get_all("Via"):
            return []
        self.addresses.map_addresses(response, server.hop)
        self.sdp.response(context.server.request, context.offer, response, server.hop, now)
        data = response.to_bytes()
        try:
            actions = server.txn.send_response(response.status, data, now)
        except TransactionError:
            # Too late for the server transaction: a 2xx still goes up (every 2xx of
            # every fork reaches the caller, RFC 6026 §7.1), anything else is dropped.
            return [self._send(data, server.hop)] if 200 <= response.status < 300 else []
        return self._server_actions(server, actions)

    # ---- branches and cancellation ----------------------------------------------------

    def _branch_actions(self, branch: Branch, actions: list[Action], now: float) -> list[Send]:
        out: list[Send] = []
        for action in actions:
            if isinstance(action, Transmit):
                out.append(self._send(action.data, branch.hop))
            elif isinstance(action, Deliver):
                assert isinstance(action.message, SipResponse)
                out += self._on_branch_response(branch, action.message, now)
            elif isinstance(action, Timeout) and branch.context is not None:
                # §16.7 step 6 / §16.8: a timed-out branch counts as a 408
                out += self._branch_failed(branch, 408, now)
            elif isinstance(action, TransportFailure) and branch.context is not None:
                out += self._branch_failed(branch, 503, now)
        self._track(branch)
        return out

    def _branch_failed(self, branch: Branch, status: int, now: float) -> list[Send]:
        """The branch's target did not answer (Timer B/F: ``status`` 408) or could not
        be reached (503): the next target, else the branch counts as ``status``."""
        self.failed_targets.failed(branch.hop.dest, branch.hop.transport, now)
        retried = self._failover(branch, now)
        if retried is not None:
            return retried
        return self._on_branch_response(branch, self._local_final(branch, status), now,
                                        local=True)

    def _failover(self, branch: Branch, now: float) -> list[Send] | None:
        """RFC 3263 §4.3: the request again, on a new branch, to the next target that
        can take it; None when there is none (or the request is being cancelled). An
        offer goes along as sent when the target is of the same family; to the other
        family it is made anew (a new call only, with no other branch pending)."""
        context = branch.context
        if context is None or context.phase is not Phase.FORWARDING or branch.cancel_wanted:
            return None
        branch.done, branch.timer_c = True, None
        for i, hop in enumerate(branch.alternatives):
            body: bytes | None = None
            target = Target(branch.request.uri, hop, branch.alternatives[i + 1:])
            if context.offer and hop.media_family == branch.hop.media_family:
                body = branch.request.body
            elif context.offer:
                alone = all(b.done for b in context.branches)
                if not (alone and context.initial_invite):
                    continue
                request = context.server.request
                self.sdp.release(request, now)
                try:
                    offers = self._request_media(context, [target], now)
                except Reject:
                    return None
                body = None if offers is None else offers[0]
            log.info("%s %s: %s/%s failed, trying %s/%s", branch.request.method,
                     branch.request.uri, branch.hop.dest, branch.hop.transport, hop.dest,
                     hop.transport)
            return self._start_branch(context, target, body, now)
        return None

    def _branch_timer(self, branch: Branch, now: float) -> list[Send]:
        out: list[Send] = []
        if branch.timer_c is not None and branch.timer_c <= now:
            branch.timer_c = None  # §16.8: Timer C fired: give up on the branch
            if not branch.done and branch.provisional:
                out += self._send_cancel(branch, now)
            elif not branch.done:  # no provisional, no CANCEL (§9.1): as if answered 408
                branch.cancel_wanted = True
                out += self._on_branch_response(branch, self._local_final(branch, 408), now)
        return out + self._branch_actions(branch, branch.txn.handle_timer(now), now)

    def _cancel_branches(self, context: Context, now: float) -> list[Send]:
        """§16.10: CANCEL every pending INVITE branch. One with no provisional response
        yet may not be cancelled (§9.1): it ends at once as if it had answered 487, so
        the caller is not kept waiting for Timer B (Kamailio's cancel_b_method 0), and
        gets its CANCEL if a provisional response still comes."""
        out: list[Send] = []
        context.step(Event.CANCEL)
        for branch in list(context.branches):
            if branch.done or branch.request.method != "INVITE":
                continue
            if branch.provisional:
                out += self._send_cancel(branch, now)
            else:
                branch.cancel_wanted = True
                out += self._on_branch_response(branch, self._local_final(branch, 487), now)
        return out

    def _local_final(self, branch: Branch, status: int) -> SipResponse:
        """The final response a branch is taken to have given when it gave none."""
        return make_response(branch.request, status, to_tag=self._token())

    def _send_cancel(self, branch: Branch, now: float) -> list[Send]:
        """§9.1: a CANCEL for a branch that had a provisional response."""
        if branch.cancelled:
            return []
        branch.cancelled = True
        cancel = derived_request(branch.request, "CANCEL")
        txn = Transaction(Kind.NON_INVITE_CLIENT, cancel.to_bytes(),
                          reliable=branch.hop.transport != "udp", timers=self.config.timers)
        client = Branch((branch.key[0], "CANCEL"), txn, cancel, branch.hop, None)
        self._clients[client.key] = client
        return self._branch_actions(client, txn.start(now), now)

    # ---- server side helpers ----------------------------------------------------------

    def _respond(
        self,
        server: Server,
        status: int,
        now: float,
        reason: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> list[Send]:
        tag = self._token() if status > 100 else None
        key = (server.request.method, status)
        self.responses_sent[key] = self.responses_sent.get(key, 0) + 1
        response = make_response(server.request, status, reason, tag, headers)
        return self._server_actions(server, server.txn.send_response(status, response.to_bytes(),
                                                                     now))

    def _server_actions(self, server: Server, actions: list[Action]) -> list[Send]:
        out = [self._send(a.data, server.hop) for a in actions if isinstance(a, Transmit)]
        self._track(server)
        return out

    def _malformed(
        self, data: bytes, error: SipParseError, source: Endpoint, local: Endpoint, transport: str
    ) -> list[Send]:
        """Answer an unparseable request from the parts of it that parse (see
        `error_response`); drop responses, ACKs and what has no usable Via or CSeq."""
        self.malformed += 1
        response = error_response(data, error, self._token())
        if response is None:
            log.info("malformed message from %s dropped: %s", source, error.reason,
                     extra=MALFORMED)
            return []
        log.info("malformed request from %s: %d %s", source, error.status, error.reason,
                 extra=MALFORMED)
        via = response.vias[0]
        _stamp(via, source)
        hop = self._incoming_hop(via, source, local, transport)
        return [self._send(response.to_bytes(), hop)]

    @staticmethod
    def _stamp_via(request: SipRequest, source: Endpoint) -> None:
        """§18.2.1 and RFC 3581: note where the request really came from in its top Via."""
        vias = request.vias
        if _stamp(vias[0], source):
            request.replace_values("Via", [str(v) for v in vias])

    def _incoming_hop(self, via: Via, source: Endpoint, local: Endpoint, transport: str) -> Hop:
        """Where responses to a request go (§18.2.2: the connection for TCP; received
        + rport or sent-by port for UDP) and how its sender sees addresses."""
        if transport == "udp":
            port = via.rport if via.rport is not None else via.port or DEFAULT_PORT
            dest = Endpoint(source.host, port)
        else:
            dest = source
        sent_by = via.host_ip
        if source.family == 4 and sent_by is not None and sent_by.version == 6:
            # behind NAT64, hence behind a NAT: answer where it came from (RFC 3581 §4)
            return Hop(source, transport, local, 6, self.addresses.nat64_prefix)
        return Hop(dest, transport, local, source.family)

    def _server_key(self, request: SipRequest, method: str) -> tuple[str, ...]:
        """§17.2.3: branch + sent-by + method (ACK matches INVITE, CANCEL its own)."""
        via = request.vias[0]
        branch = via.branch or ""
        if not branch.startswith(MAGIC):  # RFC 2543 peer: no unique branch
            branch = f"{request.call_id}|{request.cseq[0]}|{request.from_.tag}|{branch}"
        return (branch, via.host.lower(), str(via.port or DEFAULT_PORT), method)

    def _looped(self, request: SipRequest, loop: str) -> bool:
        """§16.3 item 4: one of our Vias carries this very request's loop hash."""
        for via in request.vias:
            branch = via.branch or ""
            ours = branch.startswith(BRANCH_PREFIX) and self.addresses.names_us_via(via)
            if ours and branch[len(BRANCH_PREFIX):].split(".", 1)[0] == loop:
                return True
        return False

    @staticmethod
    def _loop_hash(request: SipRequest) -> str:
        """§16.6 item 8: the fields a looping request keeps unchanged."""
        routes = request.get_all("Route")
        parts = [str(request.uri), request.from_.tag or "", request.to.tag or "",
                 request.call_id, str(request.cseq[0]), routes[0] if routes else ""]
        return hashlib.sha1("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:10]

    # ---- bookkeeping ------------------------------------------------------------------

    def _send(self, data: bytes, hop: Hop) -> Send:
        return Send(data, hop.dest, hop.transport, hop.local, hop.server_name)

    def _token(self) -> str:
        return f"{self._rng.getrandbits(64):016x}"

    def _alive(self, entry: Entry) -> bool:
        if isinstance(entry, Server):
            return self._servers.get(entry.key) is entry
        return self._clients.get(entry.key) is entry

    def _track(self, entry: Entry) -> None:
        """Forget a finished transaction; (re)schedule a live one's next deadline."""
        if entry.txn.terminated:
            # Server, context and branches point at one another: cut this entry's edge
            # so refcounting frees them (no cycles left for the garbage collector).
            entry.context = None
            if isinstance(entry, Server):
                if self._servers.get(entry.key) is entry:
                    del self._servers[entry.key]
            elif self._clients.get(entry.key) is entry:
                del self._clients[entry.key]
            return
        self._timers.push(entry)


# ---- message helpers -------------------------------------------------------------------


def _ack_for(invite: SipRequest, response: object) -> bytes:
    """§17.1.1.3: the ACK a client transaction sends for a failure response."""
    assert isinstance(response, SipResponse)
    return derived_request(invite, "ACK", response).to_bytes()


def _stamp(via: Via, source: Endpoint) -> bool:
    """Add received= (sent-by is not the source address) and fill in a requested
    rport= (RFC 3581, which also asks for received=). True if the Via changed."""
    wanted: dict[str, str] = {}
    if "rport" in via.params:
        wanted = {"received": _ip_text(source.host), "rport": str(source.port)}
    elif via.host_ip != source.host:
        wanted = {"received": _ip_text(source.host)}
    changed = any(via.params.get(name) != value for name, value in wanted.items())
    via.params.update(wanted)
    return changed


@functools.lru_cache(maxsize=4096)  # peers repeat; str() of an IPv6 address is slow
def _ip_text(ip: IPAddress) -> str:
    return str(ip)

