"""RFC 3263 §4 server location (xlat/sip/dns.py): records in, ordered targets out.

Each test plays the resolver by hand: ``locate`` says which queries it needs, the
test stores the zone's answers for exactly those, until targets (or a verdict) come
out. The clock is stepped by hand."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import ip_address

import pytest

from xlat.addr import Endpoint
from xlat.sip.dns import (
    FAILED_TARGET_HOLD,
    FAILURE_TTL,
    MIN_TTL,
    Destination,
    DnsCache,
    FailedTargets,
    Lookup,
    Naptr,
    Query,
    Srv,
    Target,
    Unresolvable,
    locate,
    rfc2782_order,
)

Zone = dict[Query, list[object]]

EXAMPLE_NET: Zone = {
    Query("example.net", "NAPTR"): [
        Naptr(20, 10, "s", "SIP+D2U", "_sip._udp.example.net."),
        Naptr(10, 10, "S", "SIP+D2T", "_sip._tcp.example.net."),
        Naptr(5, 10, "u", "E2U+sip", "!^.*$!sip:x@example.net!"),  # not a SIP service
    ],
    Query("_sip._tcp.example.net", "SRV"): [Srv(10, 0, 5070, "pbx.example.net.")],
    Query("_sip._udp.example.net", "SRV"): [Srv(10, 0, 5060, "pbx.example.net."),
                                            Srv(20, 0, 5062, "pbx2.example.net.")],
    Query("pbx.example.net", "A"): [ip_address("203.0.113.2")],
    Query("pbx.example.net", "AAAA"): [ip_address("2001:db8:6::2")],
    Query("pbx2.example.net", "A"): [ip_address("203.0.113.3")],
    Query("pbx2.example.net", "AAAA"): [],
}


def run(dest: Destination, zone: Zone, *, now: float = 0.0, cache: DnsCache | None = None,
        prefer: int = 6, transports: tuple[str, ...] = ("udp", "tcp", "tls"),
        rng: random.Random | None = None) -> tuple[object, list[set[Query]]]:
    """Drive ``locate`` to its end against ``zone`` (a query not in it: NXDOMAIN);
    returns the result and the queries asked, step by step."""
    cache = cache if cache is not None else DnsCache()
    steps: list[set[Query]] = []
    while True:
        result = locate(dest, cache, now, rng=rng or random.Random(1), transports=transports,
                        prefer=prefer)
        if not isinstance(result, Lookup):
            return result, steps
        steps.append(set(result.queries))
        assert len(steps) < 10, steps
        for query in result.queries:
            cache.store(query, zone.get(query, []), 300, now)  # type: ignore[arg-type]


def endpoints(result: object) -> list[tuple[str, str]]:
    assert isinstance(result, list), result
    return [(str(t.endpoint), t.transport) for t in result]


def test_naptr_then_srv_then_addresses_in_order_preferred_family_first() -> None:
    result, steps = run(Destination("Example.NET"), EXAMPLE_NET)
    assert steps == [
        {Query("example.net", "NAPTR")},
        {Query("_sip._tcp.example.net", "SRV"), Query("_sip._udp.example.net", "SRV")},
        {Query(h, t) for h in ("pbx.example.net", "pbx2.example.net") for t in ("A", "AAAA")},
    ]
    assert endpoints(result) == [
        ("[2001:db8:6::2]:5070", "tcp"), ("203.0.113.2:5070", "tcp"),  # NAPTR order 10
        ("[2001:db8:6::2]:5060", "udp"), ("203.0.113.2:5060", "udp"),  # order 20, prio 10
        ("203.0.113.3:5062", "udp"),  # prio 20, no AAAA
    ]
    assert {t.server_name for t in result} == {"example.net"}  # type: ignore[attr-defined]


def test_prefer_ipv4_puts_a_records_first() -> None:
    result, _ = run(Destination("example.net", transport="udp"), EXAMPLE_NET, prefer=4)
    assert endpoints(result)[:2] == [("203.0.113.2:5060", "udp"), ("[2001:db8:6::2]:5060", "udp")]


def test_numeric_host_skips_dns_with_defaults_of_its_transport() -> None:
    """§4.1/§4.2: an IP literal needs no lookup; the port defaults to 5060, 5061 for TLS."""
    for dest, expected in [
        (Destination("203.0.113.9"), ("203.0.113.9:5060", "udp")),
        (Destination("[2001:db8::9]", 5080, "tcp"), ("[2001:db8::9]:5080", "tcp")),
        (Destination("2001:db8::9", secure=True), ("[2001:db8::9]:5061", "tls")),
    ]:
        result, steps = run(dest, {})
        assert steps == [] and endpoints(result) == [expected]


def test_explicit_port_skips_naptr_and_srv() -> None:
    result, steps = run(Destination("pbx.example.net", 5099), EXAMPLE_NET)
    assert steps == [{Query("pbx.example.net", "AAAA"), Query("pbx.example.net", "A")}]
    assert endpoints(result) == [("[2001:db8:6::2]:5099", "udp"), ("203.0.113.2:5099", "udp")]


def test_explicit_transport_skips_naptr_then_srv_else_default_port() -> None:
    result, steps = run(Destination("example.net", transport="tcp"), EXAMPLE_NET)
    assert steps[0] == {Query("_sip._tcp.example.net", "SRV")}
    assert endpoints(result) == [("[2001:db8:6::2]:5070", "tcp"), ("203.0.113.2:5070", "tcp")]
    # no SRV record of that transport: the host itself, default port (§4.2)
    zone = {Query("pbx.example.net", "A"): [ip_address("203.0.113.2")]}
    result, _ = run(Destination("pbx.example.net", transport="tcp"), zone)
    assert endpoints(result) == [("203.0.113.2:5060", "tcp")]


def test_no_naptr_tries_srv_of_every_transport_then_the_host() -> None:
    zone: Zone = {Query("_sip._udp.b.example", "SRV"): [Srv(0, 0, 5066, "sip.b.example")],
                  Query("sip.b.example", "A"): [ip_address("203.0.113.7")]}
    result, steps = run(Destination("b.example"), zone)
    assert steps[1] == {Query(f"{p}b.example", "SRV")
                        for p in ("_sips._tcp.", "_sip._tcp.", "_sip._udp.")}
    assert endpoints(result) == [("203.0.113.7:5066", "udp")]
    zone = {Query("c.example", "AAAA"): [ip_address("2001:db8::7")]}
    result, _ = run(Destination("c.example"), zone)
    assert endpoints(result) == [("[2001:db8::7]:5060", "udp")]


def test_sips_uses_only_sips_naptr_and_tls() -> None:
    zone: Zone = {
        Query("s.example", "NAPTR"): [Naptr(10, 0, "s", "SIP+D2U", "_sip._udp.s.example"),
                                      Naptr(20, 0, "s", "SIPS+D2T", "_sips._tcp.s.example")],
        Query("_sips._tcp.s.example", "SRV"): [Srv(0, 0, 5061, "tls.s.example")],
        Query("tls.s.example", "A"): [ip_address("203.0.113.8")],
    }
    result, _ = run(Destination("s.example", secure=True), zone)
    assert endpoints(result) == [("203.0.113.8:5061", "tls")]
    assert result[0].server_name == "s.example"  # type: ignore[index]  # RFC 5922 §4
    verdict, _ = run(Destination("s.example", secure=True), zone, transports=("udp", "tcp"))
    assert isinstance(verdict, Unresolvable) and "TLS" in verdict.reason


def test_unsupported_naptr_transport_is_skipped() -> None:
    zone: Zone = {
        Query("t.example", "NAPTR"): [Naptr(10, 0, "s", "SIPS+D2T", "_sips._tcp.t.example"),
                                      Naptr(20, 0, "s", "SIP+D2U", "_sip._udp.t.example")],
        Query("_sip._udp.t.example", "SRV"): [Srv(0, 0, 5060, "u.t.example")],
        Query("u.t.example", "A"): [ip_address("203.0.113.4")],
    }
    result, steps = run(Destination("t.example"), zone, transports=("udp", "tcp"))
    assert steps[1] == {Query("_sip._udp.t.example", "SRV")}
    assert endpoints(result) == [("203.0.113.4:5060", "udp")]


def test_nxdomain_is_404_and_a_dead_server_is_503_cached_briefly() -> None:
    verdict, _ = run(Destination("nowhere.example"), {})
    assert verdict == Unresolvable("Cannot resolve nowhere.example", failed=False)
    cache = DnsCache()
    first = locate(Destination("down.example"), cache, 0.0, rng=random.Random(1))
    assert isinstance(first, Lookup)
    for query in first.queries:
        cache.store_failure(query, 0.0)
    verdict = locate(Destination("down.example"), cache, 1.0, rng=random.Random(1))
    assert isinstance(verdict, Unresolvable) and verdict.failed  # no SRV after a dead NAPTR
    assert isinstance(locate(Destination("down.example"), cache, FAILURE_TTL + 0.1,
                             rng=random.Random(1)), Lookup)  # asked again once it lapsed


def test_cache_keeps_answers_for_their_ttl_negative_ones_for_the_soa_ttl() -> None:
    cache = DnsCache(max_entries=2)
    q = Query("a.example", "A")
    cache.store(q, [ip_address("192.0.2.1")], 60, 0.0)
    assert cache.get(q, 59.9) is not None and cache.get(q, 60.0) is None
    cache.store(q, [], 30, 0.0)  # RFC 2308 negative answer
    entry = cache.get(q, 29.0)
    assert entry is not None and entry.records == () and not entry.failed
    assert cache.get(q, 30.0) is None
    cache.store(q, [], 0, 0.0)  # TTL 0 still serves the lookup in progress
    assert cache.get(q, MIN_TTL / 2) is not None
    for name in ("b", "c", "d"):
        cache.store(Query(f"{name}.example", "A"), [], 60, 0.0)
    assert len(cache) == 2 and cache.get(Query("b.example", "A"), 1.0) is None


def test_srv_weights_follow_rfc2782_and_dot_means_no_service() -> None:
    records = [Srv(10, 60, 1, "a"), Srv(10, 20, 2, "b"), Srv(10, 20, 3, "c"), Srv(10, 0, 4, "z"),
               Srv(5, 0, 9, "first")]
    rng = random.Random(5)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = rfc2782_order(records, rng)
        assert order[0].target == "first"  # lowest priority value first, always
        assert sorted(r.target for r in order) == ["a", "b", "c", "first", "z"]
        firsts[order[1].target] += 1
    assert firsts["a"] / 4000 == pytest.approx(0.6, abs=0.04)
    assert firsts["b"] / 4000 == pytest.approx(0.2, abs=0.03)
    # weight 0: first only when the random number is 0 (1 in 101)
    assert firsts["z"] / 4000 == pytest.approx(1 / 101, abs=0.01)
    zone: Zone = {Query("_sip._udp.x.example", "SRV"): [Srv(0, 0, 0, ".")]}
    verdict, _ = run(Destination("x.example", transport="udp"), zone)
    assert isinstance(verdict, Unresolvable)  # and no A lookup of "." either


def test_failed_targets_are_avoided_for_a_while_unless_nothing_else_is_left() -> None:
    a = Target(Endpoint.parse("203.0.113.2:5060"), "udp")
    b = Target(Endpoint.parse("203.0.113.3:5060"), "udp")
    failed = FailedTargets()
    failed.failed(a.endpoint, "udp", 10.0)
    assert failed.order([a, b], 11.0) == [b]
    assert failed.order([a], 11.0) == [a]  # last resort
    assert not failed.avoided(a.endpoint, "tcp", 11.0)  # per transport
    assert failed.order([a, b], 10.0 + FAILED_TARGET_HOLD) == [a, b]


def test_located_targets_last_until_the_first_answer_expires_and_a_store_forgets_them() -> None:
    cache = DnsCache()
    dest = Destination("pbx.example")
    ttls = {"NAPTR": 600, "SRV": 60, "AAAA": 300, "A": 300}
    zone: Zone = {Query("pbx.example", "NAPTR"): [Naptr(10, 10, "S", "SIP+D2U",
                                                         "_sip._udp.pbx.example")],
                  Query("_sip._udp.pbx.example", "SRV"): [Srv(10, 0, 5080, "uas.pbx.example")],
                  Query("uas.pbx.example", "A"): [ip_address("203.0.113.2")]}
    rng = random.Random(1)
    while isinstance(result := locate(dest, cache, 0.0, rng=rng), Lookup):
        for query in result.queries:
            cache.store(query, zone.get(query, []), ttls[query.rdtype], 0.0)  # type: ignore
    assert endpoints(result) == [("203.0.113.2:5080", "udp")]
    again = locate(dest, cache, 59.9, rng=rng)
    assert again == result and again is not result  # the caller's own list
    assert locate(dest, cache, 60.0, rng=rng) == Lookup(frozenset({Query("_sip._udp.pbx.example",
                                                                         "SRV")}))
    cache.store(Query("_sip._udp.pbx.example", "SRV"), [Srv(10, 0, 5080, "uas.pbx.example")],
                60, 60.0)
    assert endpoints(locate(dest, cache, 61.0, rng=rng)) == [("203.0.113.2:5080", "udp")]
    cache.store(Query("uas.pbx.example", "A"), [ip_address("203.0.113.9")], 300, 62.0)
    assert endpoints(locate(dest, cache, 62.0, rng=rng)) == [("203.0.113.9:5080", "udp")]


def test_srv_records_of_one_priority_are_drawn_anew_for_every_request() -> None:
    zone: Zone = {Query("_sip._udp.x.example", "SRV"): [Srv(10, 50, 5060, "a.x.example"),
                                                       Srv(10, 50, 5060, "b.x.example")],
                  Query("a.x.example", "A"): [ip_address("192.0.2.1")],
                  Query("b.x.example", "A"): [ip_address("192.0.2.2")]}
    cache, rng = DnsCache(), random.Random(3)
    run(Destination("x.example", transport="udp"), zone, cache=cache)
    firsts = Counter(endpoints(locate(Destination("x.example", transport="udp"), cache, 1.0,
                                      rng=rng))[0][0] for _ in range(400))
    assert firsts["192.0.2.1:5060"] / 400 == pytest.approx(0.5, abs=0.1)
