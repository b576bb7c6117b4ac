"""Where a request goes (RFC 3261 §16.4-16.5, RFC 3263) and who may send it (§22).

Sans-I/O, like the proxy it serves: ``route`` picks the destinations of a request
(Route set, registrar bindings, NAT64 flows, ``;xlat=`` originals, configured
routes), ``locate`` turns them into transport hops from the DNS answers it has
(raising ``Unresolved`` for the ones it lacks), and the Digest checks (REGISTER: 401,
a call for one of our users from outside: 407) run before anything tells whether a
user exists. The NAT64 flows it learns are journaled (``drain_records``/``restore``)
so in-dialog requests find their way after a restart.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from netaddr import IPNetwork

from xlat.addr import Endpoint, IPAddress, nat64_embedded
from xlat.sip import dns
from xlat.sip.auth import DigestAuth, Verdict
from xlat.sip.mapping import AddressMap, Hop, host_key
from xlat.sip.message import REASONS, SipRequest
from xlat.sip.registrar import Binding, Registrar
from xlat.sip.settings import KNOWN_TRANSPORTS, ProxyConfig
from xlat.sip.uri import SipUri, format_host, host_ip

log = logging.getLogger(__name__)

__all__ = ["Dest", "Reject", "Router", "Target", "Unresolved"]

# How long the NAT64 flow of a phone that is not registered (a caller behind NAT64) is
# remembered after its last request: longer than any call between two requests.
NAT64_FLOW_LIFETIME = 4 * 3600.0
# A flow learnt again on the same hop is journaled again only this much later (its
# lifetime runs from the last time seen; the journal need not follow every request).
FLOW_JOURNAL_AGE = 600.0


class Reject(Exception):
    """Answer the request with this status instead of forwarding it."""

    def __init__(
        self, status: int, reason: str | None = None, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(reason or REASONS.get(status, ""))
        self.status, self.reason, self.headers = status, reason, tuple(headers)


@dataclass(frozen=True, slots=True)
class Dest:
    """Where routing sends a request: the Request-URI of the branch, and either the
    hop (a registered contact's flow) or the URI of the next hop, located per RFC 3263."""

    uri: SipUri | str
    hop: Hop | None = None
    next_hop: SipUri | None = None


@dataclass(frozen=True, slots=True)
class Target:
    uri: SipUri | str  # Request-URI of the branch
    hop: Hop
    alternatives: tuple[Hop, ...] = ()  # RFC 3263 §4.3: tried in turn if ``hop`` fails


class Unresolved(Exception):
    """Routing needs DNS answers first."""

    def __init__(self, queries: frozenset[dns.Query]) -> None:
        super().__init__(", ".join(sorted(f"{q.name}/{q.rdtype}" for q in queries)))
        self.queries = queries


class Router:
    """Routing state of one proxy: the registrar, the Digest checker (None: no local
    registrar), the DNS cache, the targets that failed lately and the NAT64 flows
    learnt. ``reconfigure`` gives it the configuration (and swaps it: the state stays)."""

    config: ProxyConfig
    addresses: AddressMap

    def __init__(self, registrar: Registrar, auth: DigestAuth | None,
                 rng: random.Random) -> None:
        self.registrar, self.auth, self._rng = registrar, auth, rng
        self.dns = dns.DnsCache()
        self.failed_targets = dns.FailedTargets()
        self._flows: dict[str, tuple[Hop, float]] = {}  # NAT64 phone's Contact -> its flow
        self._flows_changed: set[str] = set()  # since drain_records() (the crash journal)
        self.on_change: Callable[[], None] | None = None  # a flow to journal

    def reconfigure(self, config: ProxyConfig, addresses: AddressMap) -> None:
        self.config, self.addresses = config, addresses
        self._routes = [(host_key(domain), uri) for domain, uri in config.routes
                        if domain != "*"]
        self._default_route = next((uri for domain, uri in config.routes if domain == "*"),
                                   None)

    def route(self, request: SipRequest, now: float) -> list[Dest] | None:
        """§16.4-16.5: pop Route entries naming us, then pick where the request goes
        (see the class docstring). None: the request is for the gateway itself.
        Raises Reject."""
        routes = request.routes
        if routes and isinstance(request.uri, SipUri) and "lr" in request.uri.params \
                and self.addresses.names_us(request.uri):
            # §16.4: a strict router put our Record-Route URI in the Request-URI
            request.uri = routes[-1].uri
            request.replace_values("Route", request.get_all("Route")[:-1])
            routes = request.routes
        ours = 0
        while ours < len(routes) and self.addresses.names_us(routes[ours].uri):
            ours += 1
        if ours:
            request.replace_values("Route", request.get_all("Route")[ours:])
            routes = routes[ours:]
        mapped = False
        if isinstance(request.uri, SipUri):
            original = self.addresses.unmapped(request.uri)
            if original is not None:
                request.uri, mapped = original, True
        uri = request.uri
        if routes:  # (1)
            first = routes[0].uri
            if not isinstance(first, SipUri):
                raise Reject(416, "Route is not a SIP URI")
            return [Dest(uri, next_hop=first)]
        if not isinstance(uri, SipUri):  # tel:, urn:, ...: only a default route knows
            if self._default_route is None:
                raise Reject(416)
            return [Dest(uri, next_hop=self._default_route)]
        own = not mapped and self.addresses.is_ours(uri.host) \
            and uri.port in (None, *self.addresses.our_ports)
        key = Registrar.key(uri) if own else None
        if own:  # (2)
            if request.method == "REGISTER":
                return self._register_targets(request)
            if request.method == "OPTIONS" and uri.user is None:
                return None
            self._authorize_call(request, now)
            bindings = self.registrar.lookup(key, now=now) if key else []
            if bindings:
                return [Dest(b.uri, hop=self._binding_hop(b, now)) for b in bindings]
        else:
            flow = self._flow(uri, now)
            if flow is not None:  # a registered phone or one behind NAT64: use its flow
                return [Dest(uri, hop=flow)]
            if mapped:
                return [Dest(uri, next_hop=uri)]
        route = self._match_route(uri.host)  # (3), (4)
        if route is not None:
            return [Dest(uri, next_hop=route)]
        if own:
            raise Reject(480 if key and self.registrar.lapsed(key, now=now) else 404)
        return [Dest(uri, next_hop=uri)]  # its own host (RFC 3263)

    def learn_flow(self, request: SipRequest, hop: Hop, now: float) -> None:
        """Remember how to reach a phone behind NAT64 at the Contact it gave: through
        the NAT64 binding its request came over (the way a registration is used)."""
        if request.get("Contact") is None or request.wildcard_contact:
            return
        for contact in request.contacts:
            key = str(contact.uri)
            old = self._flows.pop(key, None)
            self._flows[key] = (hop, now)
            if old is None or old[0] != hop or now - old[1] > FLOW_JOURNAL_AGE:
                self._flows_changed.add(key)
        while self._flows:
            key, (_, seen) = next(iter(self._flows.items()))
            if seen + NAT64_FLOW_LIFETIME > now:
                break
            del self._flows[key]
            self._flows_changed.add(key)
        if self._flows_changed and self.on_change is not None:
            self.on_change()

    def drain_records(self) -> list[tuple[str, dict[str, object] | None]]:
        """(Contact, record) of every NAT64 flow learnt or changed since the last call;
        None for one forgotten. A BYE to a phone behind NAT64 that did not register
        needs its flow after a daemon restart too."""
        changed, self._flows_changed = self._flows_changed, set()
        out: list[tuple[str, dict[str, object] | None]] = []
        for key in changed:
            learnt = self._flows.get(key)
            if learnt is None:
                out.append((key, None))
                continue
            hop, seen = learnt
            out.append((key, {"dest": str(hop.dest), "transport": hop.transport,
                              "local": None if hop.local is None else str(hop.local),
                              "family": hop.family, "seen": seen,
                              "nat64": None if hop.nat64 is None else str(hop.nat64)}))
        return out

    def restore(self, items: Mapping[str, Mapping[str, object]], *, now: float,
                shift: float = 0.0) -> int:
        """Take back journaled NAT64 flows (times moved by ``shift``); expired ones and
        records that do not decode are left out. Returns how many are live."""
        for key, d in items.items():  # in journal order, which is about the order seen
            try:
                local = d["local"]
                hop = Hop(Endpoint.parse(str(d["dest"])), str(d["transport"]),
                           None if local is None else Endpoint.parse(str(local)),
                           int(str(d["family"])),
                           None if d["nat64"] is None else IPNetwork(str(d["nat64"])))
                seen = float(str(d["seen"])) + shift
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("journaled NAT64 flow of %r not restored: %s", key, exc)
                continue
            if seen + NAT64_FLOW_LIFETIME > now:
                self._flows[key] = (hop, seen)
            self._flows_changed.add(key)
        return len(self._flows)

    def _flow(self, uri: SipUri, now: float) -> Hop | None:
        """How to reach a Contact that registered here, or of a phone behind NAT64."""
        binding = self.registrar.binding(uri, now=now)
        if binding is not None:
            return self._binding_hop(binding, now)
        learnt = self._flows.get(str(uri))
        if learnt is not None and learnt[1] + NAT64_FLOW_LIFETIME > now:
            return learnt[0]
        return None

    def _binding_hop(self, binding: Binding, now: float) -> Hop:
        """How to reach a registered contact: over the connection it registered on
        (TCP), through the NAT64 it registered through (an IPv6 contact registered
        from an IPv4 source: RFC 5626-style flow reuse), else at its address."""
        contact = binding.uri.host_ip
        local4 = self.config.sip.get(4)
        prefix = self.addresses.nat64_prefix
        behind_nat64 = (binding.source.family == 4 and contact is not None
                        and contact.version == 6 and prefix is not None and local4 is not None
                        and nat64_embedded(self.config.nat64_prefixes, contact) is None)
        if behind_nat64:
            return Hop(binding.source, binding.transport, local4, 6, prefix)
        return self._contact_hop(binding, now)

    def _match_route(self, host: str) -> SipUri | None:
        """The route whose domain is ``host``, else the ``*`` route (None: neither)."""
        wanted = host_key(host)
        for key, uri in self._routes:
            if key == wanted:
                return uri
        return self._default_route

    def locate(self, dests: Sequence[Dest], now: float) -> list[Target]:
        """The transport targets of ``dests`` (RFC 3263 from ``self.dns``), each with
        its alternatives. Raises Unresolved (answers missing), Reject (none)."""
        targets: list[Target] = []
        missing: set[dns.Query] = set()
        for dest in dests:
            if dest.hop is not None:
                targets.append(Target(dest.uri, dest.hop))
                continue
            assert dest.next_hop is not None
            hops = self._hops_to(dest.next_hop, now)
            if isinstance(hops, dns.Lookup):
                missing |= hops.queries
            else:
                targets.append(Target(dest.uri, hops[0], tuple(hops[1:])))
        if missing:
            raise Unresolved(frozenset(missing))
        return targets

    def _hops_to(self, uri: SipUri, now: float) -> list[Hop] | dns.Lookup:
        """Where a request for ``uri`` may go, in the order to try (RFC 3263 §4: maddr,
        else host; port; transport; sips: needs TLS). Targets that failed lately come
        only when nothing else is left. Raises Reject when there is none."""
        transport = uri.transport
        secure = uri.scheme == "sips"
        if secure and transport == "tcp":
            transport = "tls"  # RFC 3261 §26.2.2: sips: over TCP is TLS
        if transport is not None and transport not in KNOWN_TRANSPORTS:
            raise Reject(503, f"Unsupported transport {transport}"[:100])
        if (secure or transport == "tls") and "tls" not in self.config.usable_transports:
            raise Reject(416 if secure else 503, "TLS is not configured here")
        host = uri.params.get("maddr") or uri.host
        where = dns.Destination(host, uri.port, transport, secure)
        result = dns.locate(where, self.dns, now, rng=self._rng,
                            transports=self.config.usable_transports,
                            prefer=self.config.prefer_family)
        if isinstance(result, dns.Lookup):
            return result
        if isinstance(result, dns.Unresolvable):
            raise Reject(503 if result.failed else 404, result.reason[:100])
        hops = [hop for target in self.failed_targets.order(result, now)
                if (hop := self._target_hop(target)) is not None]
        if not hops:
            families = sorted({t.endpoint.family for t in result})
            raise Reject(503, "No " + "/".join(f"IPv{f}" for f in families) + " SIP address")
        return hops

    def _target_hop(self, target: dns.Target) -> Hop | None:
        """The hop to a located target; a NAT64-synthesised IPv6 address is reached on
        its IPv4 address. None when we have no SIP address of its family."""
        ip = target.endpoint.host
        dest = target.endpoint
        if ip.version == 6:
            embedded = nat64_embedded(self.config.nat64_prefixes, ip)
            if embedded is not None:
                dest = Endpoint(embedded, dest.port)
        local = self._local_for(dest.family, target.transport)
        if local is None:
            return None
        return Hop(dest, target.transport, local, dest.family, server_name=target.server_name)

    def _local_for(self, family: int, transport: str) -> Endpoint | None:
        return (self.config.tls if transport == "tls" else self.config.sip).get(family)

    def _contact_hop(self, binding: Binding, now: float) -> Hop:
        """The hop to a registered contact: over the connection it registered on (TCP,
        TLS), else at its address (an IP literal: RFC 3263 §4.2 defaults)."""
        if binding.transport in ("tcp", "tls"):
            source = binding.source
            local = self._local_for(source.family, binding.transport)
            return Hop(source, binding.transport, local, source.family)
        uri = binding.uri
        if uri.host_ip is None:
            raise Reject(404, f"Cannot resolve {uri.host}"[:100])
        hops = self._hops_to(uri, now)
        assert isinstance(hops, list)  # a literal needs no lookup
        return hops[0]

    def _register_targets(self, request: SipRequest) -> list[Dest] | None:
        """Where a REGISTER for our domains goes: None to the local registrar; the
        upstream registrar with our Path (RFC 3327 §5.1: so that requests for the
        contact come back through us; it names us in the upstream's family). Raises
        Reject: 403 with no registrar, or a Contact that names the gateway itself
        (it would make every call to that user loop back to us: a takeover)."""
        upstream = self.config.registrar_upstream
        if upstream is None and self.auth is None:
            raise Reject(403, "Registrar disabled")
        if not request.wildcard_contact and request.get("Contact") is not None:
            for contact in request.contacts:
                uri = contact.uri
                if self.addresses.names_us(uri) or (
                        isinstance(uri, SipUri) and self.addresses.is_ours(uri.host)):
                    raise Reject(403, "Contact names this gateway")
        if upstream is None:
            return None
        family = upstream.host_ip.version if upstream.host_ip is not None else 4
        ours = self.config.sip.get(family)
        if ours is None:
            raise Reject(503, f"No IPv{family} SIP address")
        transport = ";transport=tcp" if upstream.transport == "tcp" else ""
        request.insert("top", "Path", f"<sip:{format_host(ours.host)}:{ours.port}{transport};lr>")
        return [Dest(request.uri, next_hop=upstream)]

    def authorize_register(self, request: SipRequest, now: float) -> None:
        """RFC 3261 §22.4 / §10.3 step 3: a REGISTER binds only with credentials of
        the very user it registers. Unknown user, wrong password, no credentials:
        the same fresh 401 (Asterisk's ``alwaysauthreject``), so a REGISTER scan
        tells no user from another. Raises Reject."""
        assert self.auth is not None  # _register_targets sent it here
        result = self.auth.check(request.get_all("Authorization"), "REGISTER", now)
        if result.verdict is not Verdict.OK:
            raise Reject(401, None, [("WWW-Authenticate", c) for c in self.auth.challenge(
                now, stale=result.verdict is Verdict.STALE)])
        if result.user != Registrar.key(request.to.uri):
            raise Reject(403, "Credentials are for another user")

    def _authorize_call(self, request: SipRequest, now: float) -> None:
        """Before a request for a user of our domains learns anything (the registrar
        is asked only after this), its sender must be a route's next hop or prove it
        is one of our users (407, §22.3). Without this an INVITE or OPTIONS scan
        tells a registered user (the phone answers) from an unknown one (404): what
        Kamailio's ``auth_check`` before ``lookup`` and Asterisk's ``allowguest=no``
        prevent. Only with a local registrar: an upstream one answers for itself.
        Our own credentials are removed before forwarding (§22.3, Kamailio's
        ``consume_credentials``). Raises Reject."""
        if self.auth is None or request.to.tag is not None:
            return
        via = request.vias[0]
        source = host_ip(via.received) if via.received else via.host_ip
        if source is not None and source in self._trusted:
            return
        values = request.get_all("Proxy-Authorization")
        result = self.auth.check(values, request.method, now)
        if result.verdict is not Verdict.OK:
            raise Reject(407, None, [("Proxy-Authenticate", c) for c in self.auth.challenge(
                now, stale=result.verdict is Verdict.STALE)])
        realm = f'realm="{self.auth.realm}"'
        request.headers = [h for h in request.headers
                           if h.key != "proxy-authorization" or realm not in h.value]

    @functools.cached_property
    def _trusted(self) -> frozenset[IPAddress]:
        """The next hops of our routes: a PBX or trunk that sends us calls."""
        uris = [uri for _, uri in self.config.routes]
        return frozenset(ip for uri in uris if (ip := uri.host_ip) is not None)
