"""Calls to host names (RFC 3263) through ``xlat run``, with a real DNS server.

Debian's dnsmasq runs in the IPv4 host's namespace and serves NAPTR, SRV, AAAA and A
records for the test domains; the gateway namespace's /etc/netns/<ns>/resolv.conf
points at it, so ``ip netns exec <gw> xlat run`` finds it the way a daemon finds its
DNS: through /etc/resolv.conf. No ``*`` route: a foreign Request-URI goes to its own
host. The phones are SIPp, as in test_sip_calls.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest
from conftest import require
from test_sip_calls import (
    assert_completed,
    assert_kernel_carried,
    assert_media_both_ways,
    assert_own_family,
)

from xlat.addr import Endpoint
from xlat.demo import GW_SIP, Gateway, Phone, Sipp, place_call, start_gateway
from xlat.lab import V4_HOST, V4_HOST2, V6_HOST, V6_HOST2, Lab
from xlat.labdns import Dnsmasq, resolv_conf
from xlat.sip.dns import Naptr, Query, Srv
from xlat.sip.resolver import DnsResolver

pytestmark = pytest.mark.e2e

DNS_SERVER = V4_HOST2  # dnsmasq listens here, port 53
PBX = V4_HOST  # the IPv4 phone (bob) is the PBX that example.net's records name
FAILING = V4_HOST2  # a SIPp server answering 503, on port 5060 (dnsmasq has 53 only)
DEAD_PORT = 5070  # nothing listens there: ICMP port unreachable

# dnsmasq options: records of the test zones; --local makes it answer for them alone
# (NXDOMAIN for the rest of the zone, nothing forwarded anywhere).
RECORDS = [
    "--local=/example.net/", "--local=/test/",
    # example.net: NAPTR -> SRV -> A (IPv4 only)
    "--naptr-record=example.net,10,10,S,SIP+D2U,,_sip._udp.example.net",
    "--srv-host=_sip._udp.example.net,pbx.example.net,5060,10,0",
    f"--host-record=pbx.example.net,{PBX}",
    # v6.test: nothing but an AAAA record (no NAPTR, no SRV: §4.2, port 5060)
    "--host-record=v6.test,2001:db8:6::2",
    # failover.test: the first SRV target is dead, the second is the PBX
    f"--srv-host=_sip._udp.failover.test,dead.failover.test,{DEAD_PORT},10,0",
    "--srv-host=_sip._udp.failover.test,pbx.example.net,5060,20,0",
    f"--host-record=dead.failover.test,{PBX}",
    # busy.test: the first SRV target answers 503, the second is the PBX
    "--srv-host=_sip._udp.busy.test,overloaded.busy.test,5060,10,0",
    "--srv-host=_sip._udp.busy.test,pbx.example.net,5060,20,0",
    f"--host-record=overloaded.busy.test,{FAILING}",
    # gone.test: asked only once the server is gone
    f"--host-record=gone.test,{PBX}",
]


@pytest.fixture(scope="module")
def dnsmasq(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    require("dnsmasq", shutil.which("dnsmasq") is not None)
    with Dnsmasq(lab.v4, DNS_SERVER, RECORDS,
                 tmp_path_factory.mktemp("dns") / "dnsmasq.log") as server:
        yield server


@pytest.fixture(scope="module")
def dns_gateway(lab: Lab, dnsmasq: Dnsmasq) -> Iterator[Gateway]:
    """``xlat run`` whose namespace's resolv.conf names the lab's dnsmasq."""
    with resolv_conf(lab.gw, DNS_SERVER):
        gw = start_gateway(lab, "--ports", "30200-30399", "--delete-delay", "1",
                           "--log-level", "debug")
        try:
            yield gw
        finally:
            gw.stop()


@pytest.fixture
def alice6(lab: Lab) -> Phone:
    return Phone(lab.v6, V6_HOST, "alice")


@pytest.fixture
def bob4(lab: Lab) -> Phone:
    return Phone(lab.v4, PBX, "bob")


def test_v6_phone_calls_a_naptr_srv_domain_of_an_ipv4_pbx(
        dns_gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    kernel_before = dns_gateway.forwarded().get("ebpf", 0)
    record = place_call(dns_gateway, alice6, bob4, "sip:bob@example.net", tmp_path)
    assert_completed(record)
    assert_own_family(record, alice6, bob4)
    invite = record.uas.received("INVITE")[0]
    assert invite.start.split()[1] == "sip:bob@example.net"  # the R-URI stays
    assert_media_both_ways(record)
    assert_kernel_carried(record, kernel_before)


def test_v4_phone_calls_a_domain_with_only_an_aaaa_record(
        dns_gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    record = place_call(dns_gateway, bob4, alice6, "sip:alice@v6.test", tmp_path)
    assert_completed(record)
    assert_own_family(record, bob4, alice6)
    assert_media_both_ways(record)


def test_dead_first_srv_target_the_call_completes_on_the_second(
        dns_gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    started = time.monotonic()
    record = place_call(dns_gateway, alice6, bob4, "sip:bob@failover.test", tmp_path)
    assert_completed(record)
    assert record.uas.received("INVITE")  # the PBX got it, from the second target
    assert time.monotonic() - started < 10  # ICMP, not Timer B (32 s)
    assert "failed, trying" in dns_gateway.log_tail(400)


def test_target_answering_503_the_next_one_takes_the_call(
        lab: Lab, dns_gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    overloaded = Sipp(lab, Phone(lab.v4, FAILING, "pbx2"), "uas_unavailable.xml", tmp_path,
                      "overloaded", timeout=15)
    try:
        record = place_call(dns_gateway, alice6, bob4, "sip:bob@busy.test", tmp_path)
    finally:
        overloaded.proc.terminate()
        overloaded.wait()
    assert_completed(record)
    assert overloaded.received("INVITE") and overloaded.sent(status=503)
    assert overloaded.received("ACK")  # hop by hop, from the gateway
    assert not record.uac.received(status=503)  # the caller never saw it


def test_dns_server_gone_bounded_final_response_while_a_literal_call_completes(
        lab: Lab, dnsmasq: Dnsmasq, dns_gateway: Gateway, alice6: Phone, bob4: Phone,
        tmp_path: Path) -> None:
    """Runs last: it stops the DNS server. A call to a name not cached gets its final
    response within a bounded time; a call by IP literal meanwhile is not held up."""
    dnsmasq.stop()
    tmp_path.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    doomed = Sipp(lab, alice6, "uac_unavailable.xml", tmp_path, "doomed", remote=GW_SIP[6],
                  keys={"ruri": "sip:carol@gone.test"}, timeout=15)
    dave6 = Phone(lab.v6, V6_HOST2, "dave")  # a second IPv6 phone, called by literal
    record = place_call(dns_gateway, bob4, dave6, dave6.uri, tmp_path / "literal")
    assert doomed.wait() == 0, doomed.explain()
    elapsed = time.monotonic() - started
    assert_completed(record)
    assert doomed.received(status=503)
    assert elapsed < 15


def test_resolver_edge_reads_real_answers_and_bounds_a_dead_server(tmp_path: Path) -> None:
    """``DnsResolver`` against dnsmasq on loopback: NAPTR, SRV and A records come out
    as the core's records; a name that does not exist is a negative answer; a server
    that does not answer is a failure within the timeout."""
    require("dnsmasq", shutil.which("dnsmasq") is not None)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loopback = ip_address("127.0.0.1")
    with Dnsmasq(None, loopback, RECORDS, tmp_path / "dnsmasq.log", port=port, ttl=120):
        resolver = DnsResolver([Endpoint(loopback, port)], timeout=1.0)

        async def lookups() -> list[object]:
            return [await resolver.lookup(q) for q in (
                Query("example.net", "NAPTR"), Query("_sip._udp.example.net", "SRV"),
                Query("pbx.example.net", "A"), Query("nothing.example.net", "A"))]

        naptr, srv, a, missing = asyncio.run(lookups())
    assert naptr == ([Naptr(10, 10, "S", "SIP+D2U", "_sip._udp.example.net.")], 120.0)
    assert srv == ([Srv(10, 0, 5060, "pbx.example.net.")], 120.0)
    assert a == ([PBX], 120.0)
    assert missing is not None and missing[0] == []  # NXDOMAIN: a negative answer
    dead = DnsResolver([Endpoint.parse(f"127.0.0.1:{port}")], timeout=1.0)
    started = time.monotonic()
    assert asyncio.run(dead.lookup(Query("example.net", "NAPTR"))) is None
    assert time.monotonic() - started < 2.0
