"""Locating SIP servers (RFC 3263 §4): records in, ordered targets out.

Sans-I/O. :func:`locate` takes what a request is sent to (a :class:`Destination`:
host, port, transport, whether it is a ``sips:`` URI) and a :class:`DnsCache`, and
returns either the ordered list of :class:`Target` transport addresses to try
(§4.3: the first, then the next on failure), a :class:`Lookup` naming the queries
whose answers it still needs, or a :class:`Unresolvable` saying why there is none.
The edge (``xlat/sip/resolver.py``) runs the queries, stores their answers in the
cache with :meth:`DnsCache.store` and asks again: each step needs only what the
previous one found (NAPTR, then SRV, then AAAA/A). Time enters as ``now``; the RNG
that orders SRV records of equal priority (RFC 2782) is passed in.

Steps, per §4.1-§4.2:

- a numeric host skips DNS: the port (default 5060, 5061 for TLS) and transport
  (``transport=``, else UDP, TLS for ``sips:``) are the URI's;
- an explicit port skips NAPTR and SRV: AAAA/A of the host with that port;
- an explicit ``transport=`` skips NAPTR: SRV of that transport's service, else
  AAAA/A of the host with the default port;
- otherwise NAPTR (``SIP+D2U``, ``SIP+D2T``, ``SIPS+D2T``; only ``SIPS+D2T`` for a
  ``sips:`` URI), each supported record in order/preference giving its SRV name;
  with no NAPTR record, the SRV names of every supported transport (``_sips._tcp``,
  ``_sip._tcp``, ``_sip._udp``); with no SRV record either, AAAA/A with the default
  port and transport (§4.2).

Every SRV record (priority, then the RFC 2782 weighted order) contributes the
addresses of its target, the preferred family first (``prefer``, default IPv6),
then the other: a failed address is followed by the other family's (§4.3 and RFC
6555's fallback). Later NAPTR records are further fallbacks after the first one's
targets (as Kamailio's ``dns_try_naptr`` does), so a dead transport does not end
the search.

What a walk found is kept in the cache (``DnsCache.located``) until the first answer
it read expires, or anything is stored: later requests to the same name skip the
walk. Not when RFC 2782 weights left a choice: that order is drawn for each request.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from xlat.addr import Endpoint, IPAddress

__all__ = [
    "AAAA",
    "DEFAULT_PORTS",
    "NAPTR",
    "SRV",
    "A",
    "Destination",
    "DnsCache",
    "FailedTargets",
    "Lookup",
    "Naptr",
    "Query",
    "Srv",
    "Target",
    "Unresolvable",
    "locate",
]

NAPTR, SRV, AAAA, A = "NAPTR", "SRV", "AAAA", "A"
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
# RFC 3263 §4.1 table: NAPTR service field -> transport, and the SRV service name of each.
_NAPTR_SERVICES = {"SIP+D2U": "udp", "SIP+D2T": "tcp", "SIPS+D2T": "tls"}
_SRV_PREFIX = {"tls": "_sips._tcp.", "tcp": "_sip._tcp.", "udp": "_sip._udp."}
# Without NAPTR records, the SRV names are tried in this order (§4.1: "for those
# transport protocols it supports"; TLS first, as the RFC's examples prefer it).
_SRV_ORDER = ("tls", "tcp", "udp")
# A cached answer is kept at least this long: an answer with TTL 0 is still the answer
# of the lookup in progress (the next step reads it at once).
MIN_TTL = 1.0
# ... and at most this long (RFC 2308 §5: negative answers should not be cached for
# more than a few hours; BIND's max-cache-ttl is a week, its max-ncache-ttl 3 hours).
MAX_TTL = 86400.0
MAX_NEGATIVE_TTL = 3 * 3600.0
# A lookup that failed (timeout, SERVFAIL: no answer at all) is remembered this long,
# so calls during a DNS outage fail at once instead of each waiting for the timeout
# (RFC 2308 §7: server failure may be cached, at most five minutes).
FAILURE_TTL = 5.0
# Entries kept: names come from the network (Request-URIs), the few real peers repeat.
MAX_CACHE_ENTRIES = 4096
# RFC 3263 §4.3 leaves how long a failed target is avoided to the implementation;
# Kamailio's dispatcher and dns-failover defaults are of this order.
FAILED_TARGET_HOLD = 30.0


@dataclass(frozen=True, slots=True)
class Naptr:
    """A NAPTR record (RFC 3403): order, preference, flags, service, replacement."""

    order: int
    preference: int
    flags: str
    service: str
    replacement: str


@dataclass(frozen=True, slots=True)
class Srv:
    """An SRV record (RFC 2782)."""

    priority: int
    weight: int
    port: int
    target: str


Record = Naptr | Srv | IPAddress


@dataclass(frozen=True, slots=True)
class Query:
    """One DNS question: a (lower-case, dot-less) name and a record type."""

    name: str
    rdtype: str


@dataclass(frozen=True, slots=True)
class Destination:
    """What a request is sent to: the host, port and transport of a URI, and whether
    it is a ``sips:`` URI (which needs TLS all the way, RFC 3261 §26.2.2)."""

    host: str  # a name, or an IP literal (IPv6 with or without brackets)
    port: int | None = None
    transport: str | None = None  # "udp" | "tcp" | "tls", None: not given
    secure: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """One transport address to send to; ``server_name`` is the name a TLS server
    certificate must show (RFC 5922 §4: the domain of the URI, not an SRV target)."""

    endpoint: Endpoint
    transport: str
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Lookup:
    """These queries must be answered (``DnsCache.store``) before ``locate`` can say more."""

    queries: frozenset[Query]


@dataclass(frozen=True, slots=True)
class Unresolvable:
    """There is no target. ``failed``: a lookup failed (timeout, server failure), so
    the name may exist (503); else DNS said there is none (404). ``reason`` is one line."""

    reason: str
    failed: bool


Result = list[Target] | Lookup | Unresolvable


def normalize(name: str) -> str:
    return name.lower().rstrip(".")


# ---- the cache ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    records: tuple[Record, ...]
    expires: float
    failed: bool  # the lookup got no answer at all


_LocateKey = tuple[Destination, tuple[str, ...], int]


class DnsCache:
    """Answers by query until their TTL runs out; negative answers (NXDOMAIN, no
    records) for the SOA's negative TTL (RFC 2308 §5), failures for FAILURE_TTL.
    Bounded: the least recently stored entry goes first."""

    def __init__(self, max_entries: int = MAX_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Query, _Entry] = OrderedDict()
        # What ``locate`` made of the entries, by what it was asked, until the first
        # of those entries expires: the walk NAPTR -> SRV -> AAAA/A is not redone on
        # every request to the same name. Any store() forgets it all.
        self._located: OrderedDict[_LocateKey, tuple[float, tuple[Target, ...]]] = OrderedDict()

    def store(self, query: Query, records: Sequence[Record], ttl: float | None,
              now: float) -> None:
        """The answer to ``query``: its records (empty: a negative answer) and TTL
        (for a negative answer, min(SOA TTL, SOA MINIMUM); None when no SOA came with
        it: not cached beyond MIN_TTL). A failed lookup is ``store_failure``."""
        cap = MAX_TTL if records else MAX_NEGATIVE_TTL
        hold = min(max(ttl or 0.0, MIN_TTL), cap)
        self._put(query, _Entry(tuple(records), now + hold, failed=False))

    def store_failure(self, query: Query, now: float) -> None:
        """``query`` got no answer (timeout, SERVFAIL, no server reachable)."""
        self._put(query, _Entry((), now + FAILURE_TTL, failed=True))

    def get(self, query: Query, now: float) -> _Entry | None:
        entry = self._entries.get(query)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[query]
            return None
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def located(self, key: _LocateKey, now: float) -> list[Target] | None:
        """The targets remembered for ``key`` while every answer they came from holds."""
        known = self._located.get(key)
        if known is None:
            return None
        if known[0] <= now:
            del self._located[key]
            return None
        return list(known[1])

    def remember(self, key: _LocateKey, targets: Sequence[Target], expires: float) -> None:
        self._located[key] = (expires, tuple(targets))
        while len(self._located) > self.max_entries:
            self._located.popitem(last=False)

    def _put(self, query: Query, entry: _Entry) -> None:
        self._located.clear()
        self._entries.pop(query, None)
        self._entries[query] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


# ---- targets that failed -----------------------------------------------------------------


class FailedTargets:
    """Targets that failed (§4.3) are avoided for FAILED_TARGET_HOLD seconds."""

    def __init__(self, hold: float = FAILED_TARGET_HOLD,
                 max_entries: int = MAX_CACHE_ENTRIES) -> None:
        self.hold = hold
        self.max_entries = max_entries
        self._until: OrderedDict[tuple[Endpoint, str], float] = OrderedDict()

    def failed(self, endpoint: Endpoint, transport: str, now: float) -> None:
        key = (endpoint, transport)
        self._until.pop(key, None)
        self._until[key] = now + self.hold
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def avoided(self, endpoint: Endpoint, transport: str, now: float) -> bool:
        until = self._until.get((endpoint, transport))
        if until is None:
            return False
        if until <= now:
            del self._until[(endpoint, transport)]
            return False
        return True

    def order(self, targets: Sequence[Target], now: float) -> list[Target]:
        """``targets`` without the avoided ones, unless all are avoided: then all of
        them as they are (a last resort beats no attempt)."""
        usable = [t for t in targets if not self.avoided(t.endpoint, t.transport, now)]
        return usable or list(targets)


# ---- selection ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=MAX_CACHE_ENTRIES)
def _literal(host: str) -> IPAddress | None:
    """The IP address ``host`` writes, or None for a name. Cached: ``locate`` asks it of
    every host on every request, and ``ip_address`` failing on a name costs ≈ 15 µs."""
    raw = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        return None


def locate(dest: Destination, cache: DnsCache, now: float, *, rng: random.Random,
           transports: Sequence[str] = ("udp", "tcp", "tls"), prefer: int = 6) -> Result:
    """The targets for ``dest`` in the order to try them (see the module docstring).
    ``transports``: those we can use; ``prefer``: the address family tried first."""
    if dest.transport is not None and dest.transport not in transports:
        return Unresolvable(f"transport {dest.transport} not supported", failed=False)
    if dest.secure and "tls" not in transports:
        return Unresolvable("sips: needs TLS, which is not configured", failed=False)
    ip = _literal(dest.host)
    if ip is not None:  # §4.1/§4.2: numeric host, no DNS
        transport = dest.transport or ("tls" if dest.secure else "udp")
        return [Target(Endpoint(ip, dest.port or DEFAULT_PORTS[transport]), transport, str(ip))]
    key = (dest, tuple(transports), prefer)
    known = cache.located(key, now)
    if known is not None:
        return known
    walk = _Walk(cache, now)
    result = _locate_name(dest, walk, rng, transports, prefer)
    if isinstance(result, list) and not walk.chose:  # a random order is drawn anew each time
        cache.remember(key, result, walk.expires)
    return result


class _Walk:
    """One walk through the cache: the entries it read, when the first of them
    expires, and whether RFC 2782 had a choice to draw (then the result is not kept)."""

    def __init__(self, cache: DnsCache, now: float) -> None:
        self.cache, self.now = cache, now
        self.expires = float("inf")
        self.chose = False

    def get(self, query: Query) -> _Entry | None:
        entry = self.cache.get(query, self.now)
        if entry is not None:
            self.expires = min(self.expires, entry.expires)
        return entry


def _locate_name(dest: Destination, walk: _Walk, rng: random.Random,
                 transports: Sequence[str], prefer: int) -> Result:
    """``locate`` for a host name."""
    allowed = ("tls",) if dest.secure else tuple(transports)
    default = "tls" if dest.secure else "udp"
    name = normalize(dest.host)
    if dest.port is not None:  # §4.2: explicit port, AAAA/A only
        transport = dest.transport or default
        return _addresses(name, [(dest.port, transport, name)], walk, prefer, name)
    if dest.transport is not None:  # §4.1: transport known, SRV of that transport
        srv = _srv_targets([_SRV_PREFIX[dest.transport] + name], [dest.transport], walk, rng)
        if isinstance(srv, Lookup | Unresolvable):
            return srv
        hosts = srv or [(DEFAULT_PORTS[dest.transport], dest.transport, name)]
        return _addresses(name, hosts, walk, prefer, name)
    naptr = walk.get(Query(name, NAPTR))
    if naptr is None:
        return Lookup(frozenset({Query(name, NAPTR)}))
    if naptr.failed:  # the server does not answer: asking it more only adds timeouts
        return Unresolvable(f"DNS lookup failed for {name}", failed=True)
    services = _naptr_services(naptr.records, allowed)
    if services:
        names = [replacement for replacement, _ in services]
        kinds = [transport for _, transport in services]
    else:  # no (usable) NAPTR: SRV of every supported transport (§4.1)
        kinds = [t for t in _SRV_ORDER if t in allowed]
        names = [_SRV_PREFIX[t] + name for t in kinds]
    srv = _srv_targets(names, kinds, walk, rng)
    if isinstance(srv, Lookup | Unresolvable):
        return srv
    hosts = srv or [(DEFAULT_PORTS[default], default, name)]  # no SRV: §4.2, default port
    return _addresses(name, hosts, walk, prefer, name)


def _naptr_services(records: Sequence[Record], allowed: Sequence[str]) -> list[tuple[str, str]]:
    """(SRV name, transport) of each NAPTR record we can use, in order, preference
    (RFC 3403 §4.1); only terminal "S" records (RFC 3263 §4.1)."""
    usable = []
    for record in records:
        if not isinstance(record, Naptr) or record.flags.lower() != "s":
            continue
        transport = _NAPTR_SERVICES.get(record.service.upper())
        if transport is not None and transport in allowed and normalize(record.replacement):
            usable.append((record.order, record.preference, normalize(record.replacement),
                           transport))
    usable.sort(key=lambda r: (r[0], r[1]))
    return [(replacement, transport) for _, _, replacement, transport in usable]


def _srv_targets(names: Sequence[str], transports: Sequence[str], walk: _Walk,
                 rng: random.Random) -> list[tuple[int, str, str]] | Lookup | Unresolvable:
    """(port, transport, host) of every SRV record of ``names``, each name's records
    in RFC 2782 order, names in the order given. Empty: no SRV record at all."""
    missing = [Query(n, SRV) for n in names if walk.get(Query(n, SRV)) is None]
    if missing:
        return Lookup(frozenset(missing))
    out: list[tuple[int, str, str]] = []
    failures = 0
    for srv_name, transport in zip(names, transports, strict=True):
        entry = walk.get(Query(srv_name, SRV))
        assert entry is not None
        failures += entry.failed
        records = [r for r in entry.records if isinstance(r, Srv)]
        if len(records) == 1 and normalize(records[0].target) == "":
            continue  # RFC 2782: target "." means "decidedly not available"
        priorities = [r.priority for r in records]
        walk.chose |= len(set(priorities)) < len(priorities)
        out += [(r.port, transport, normalize(r.target)) for r in rfc2782_order(records, rng)
                if normalize(r.target)]
    if not out and failures == len(names):
        return Unresolvable(f"DNS lookup failed for {names[0]}", failed=True)
    return out


def rfc2782_order(records: Sequence[Srv], rng: random.Random) -> list[Srv]:
    """RFC 2782 "Usage rules": ascending priority; within a priority, repeatedly pick
    a record at random with probability proportional to its weight (records of
    weight 0 first in the running list, so they are picked only when nothing else
    is left or the random number is 0)."""
    out: list[Srv] = []
    for priority in sorted({r.priority for r in records}):
        pool = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight != 0)
        while pool:
            total = sum(r.weight for r in pool)
            pick = rng.randint(0, total)
            running = 0
            for i, record in enumerate(pool):
                running += record.weight
                if running >= pick:
                    out.append(pool.pop(i))
                    break
    return out


def _addresses(name: str, hosts: Sequence[tuple[int, str, str]], walk: _Walk, prefer: int,
               server_name: str) -> Result:
    """Every host's addresses (``prefer`` family first) as targets, hosts in order."""
    first, second = (AAAA, A) if prefer == 6 else (A, AAAA)
    missing = set()
    for _, _, host in hosts:
        if _literal(host) is None:
            missing |= {Query(host, t) for t in (first, second) if walk.get(Query(host, t)) is None}
    if missing:
        return Lookup(frozenset(missing))
    targets: list[Target] = []
    failed = 0
    for port, transport, host in hosts:
        literal = _literal(host)
        if literal is not None:
            found: list[IPAddress] = [literal]
        else:
            found = []
            for rdtype in (first, second):
                entry = walk.get(Query(host, rdtype))
                assert entry is not None
                failed += entry.failed
                found += [r for r in entry.records if isinstance(r, ipaddress.IPv4Address |
                                                                  ipaddress.IPv6Address)]
        for ip in found:
            target = Target(Endpoint(ip, port), transport, server_name)
            if target not in targets:
                targets.append(target)
    if targets:
        return targets
    if failed:
        return Unresolvable(f"DNS lookup failed for {name}", failed=True)
    return Unresolvable(f"Cannot resolve {name}", failed=False)
