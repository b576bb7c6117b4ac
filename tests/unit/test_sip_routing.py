"""Where the proxy core sends a request (DESIGN.md "Where a request goes"), how it
waits for DNS (RFC 3263) and how it fails over to the next target (§4.3).

The world of test_sip_proxy (phones building real SIP, the real proxy core and
media layer, a hand-stepped clock); DNS answers are handed in as the edge would,
from a zone written in the test."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from test_sip_proxy import (
    ALICE6,
    BOB4,
    GW6,
    PASSWORDS,
    Dialog,
    Gateway,
    Phone,
    assert_request_for,
    authorized,
    credentials,
    registrar,
    relay_of,
    request,
    response,
    sdp,
    to,
)

from xlat.addr import Endpoint
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sip.dns import FAILED_TARGET_HOLD, Naptr, Query, Srv
from xlat.sip.message import SipRequest, parse_message
from xlat.sip.proxy import ProxyConfig, Send, SipProxy
from xlat.sip.transport import _endpoint, start_sip
from xlat.sip.uri import SipUri

DEFAULT = Endpoint.parse("203.0.113.9:5080")  # the "*" next hop
STAR = ("*", SipUri.parse("sip:203.0.113.9:5080"))
TORTURE = Path(__file__).parent / "sip_torture" / "valid"

Zone = dict[Query, list[object]]

# example.net: NAPTR -> SRV (two UDP targets) -> A; v6only.example: AAAA only
ZONE: Zone = {
    Query("example.net", "NAPTR"): [Naptr(10, 10, "s", "SIP+D2U", "_sip._udp.example.net")],
    Query("_sip._udp.example.net", "SRV"): [Srv(10, 0, 5060, "pbx1.example.net"),
                                            Srv(20, 0, 5062, "pbx2.example.net")],
    Query("pbx1.example.net", "A"): [ip_address("203.0.113.2")],
    Query("pbx2.example.net", "A"): [ip_address("203.0.113.3")],
    Query("v6only.example", "AAAA"): [ip_address("2001:db8:6::2")],
    Query("both.example", "AAAA"): [ip_address("2001:db8:6::5")],
    Query("both.example", "A"): [ip_address("203.0.113.5")],
    Query("pbx.example.org", "A"): [ip_address("203.0.113.7")],
}
PBX1 = Endpoint.parse("203.0.113.2:5060")
PBX2 = Endpoint.parse("203.0.113.3:5062")


def answer(gw: Gateway, zone: Zone = ZONE) -> list[Send]:
    """Answer every query the proxy asks (a name not in ``zone``: no records, as
    NXDOMAIN), the way the edge does, until it asks no more."""
    out: list[Send] = []
    while queries := gw.proxy.dns_queries():
        for query in queries:
            out += gw.proxy.dns_answer(query, zone.get(query, []), 300, gw.now)  # type: ignore[arg-type]
    return out


_ALICE = Phone("alice", ALICE6)  # one phone: each of its calls has its own Call-ID, branch


def invite(gw: Gateway, uri: str, caller: Phone | None = None, *,
           auth: bool = False) -> tuple[list[Send], SipRequest]:
    """An INVITE for ``uri``; ``auth``: answer the registrar's 407 (a user of ours)."""
    phone = caller or _ALICE
    msg, _ = phone.invite("sip:placeholder@example.invalid", sdp(phone.addr.host, 40000))
    msg.uri = SipUri.parse(uri) if uri.startswith("sip") else uri
    msg.set("To", f"<{uri}>")
    return (authorized(gw, phone, msg) if auth else gw.send(phone, msg)), msg


def register(gw: Gateway, phone: Phone, aor: str, expires: int = 600) -> None:
    dialog = Dialog(phone._next("reg-"), "r", None, aor, aor, "sip:gw.example", [])
    reg = phone.request("REGISTER", "sip:gw.example", dialog=dialog,
                        extra=(("Expires", str(expires)),))
    assert response(authorized(gw, phone, reg), phone.addr, 200)


# ---- (1)-(4): who claims a request ---------------------------------------------------------


def test_a_route_naming_someone_else_wins_over_every_route() -> None:
    gw = Gateway(routes=(STAR,), domains=("gw.example",))
    alice = Phone("alice", ALICE6)
    dialog = Dialog("c1", "t1", None, "sip:alice@x", "sip:bob@gw.example", "sip:bob@gw.example",
                    ["<sip:203.0.113.1:5060;lr>", "<sip:198.51.100.7:5070;lr>"])
    msg = alice.request("OPTIONS", "sip:bob@gw.example", dialog=dialog)
    got = request(gw.send(alice, msg), Endpoint.parse("198.51.100.7:5070"), "OPTIONS")
    assert str(got.uri) == "sip:bob@gw.example"  # a route is a next hop
    assert got.get_all("Route") == ["<sip:198.51.100.7:5070;lr>"]  # ours popped


def test_own_domain_registrar_before_the_default_route() -> None:
    gw = registrar(routes=(STAR,), domains=("gw.example",))
    bob = Phone("bob", BOB4)
    register(gw, bob, "sip:bob@gw.example")  # REGISTER for our domain: ours, not "*"
    sends, _ = invite(gw, "sip:bob@gw.example", auth=True)
    got = request(sends, BOB4, "INVITE")
    assert str(got.uri) == bob.contact.strip("<>")
    assert_request_for(bob, got)
    options = Phone("alice", ALICE6).request("OPTIONS", "sip:[2001:db8:6::1]", dialog=Dialog(
        "o1", "t", None, "sip:alice@x", "sip:[2001:db8:6::1]", "sip:[2001:db8:6::1]", []))
    assert response(gw.send(Phone("alice", ALICE6), options), ALICE6, 200)  # a keepalive to us


def test_own_domain_without_binding_goes_to_the_default_route() -> None:
    gw = Gateway(routes=(STAR,), domains=("gw.example",))
    for uri in ("sip:carol@gw.example", "sip:carol@203.0.113.1", "sip:carol@[2001:db8:6::1]"):
        sends, _ = invite(gw, uri)
        assert str(request(sends, DEFAULT, "INVITE").uri) == uri


def test_without_default_route_own_domain_is_404_and_a_lapsed_user_480() -> None:
    gw = registrar(domains=("gw.example",))
    bob = Phone("bob", BOB4)
    register(gw, bob, "sip:bob@gw.example", expires=60)
    gw.advance(61.0)
    sends, _ = invite(gw, "sip:bob@gw.example", auth=True)
    assert response(sends, ALICE6, 480)  # known, its binding expired (told once authenticated)
    sends, _ = invite(gw, "sip:nobody@gw.example", auth=True)
    assert response(sends, ALICE6, 404)
    assert gw.media.sessions() == []


@pytest.mark.parametrize(("domain", "uri"), [
    ("example.org", "sip:dave@EXAMPLE.org"),
    ("192.0.2.77", "sip:dave@192.0.2.77:5099"),
    ("[2001:db8::77]", "sip:dave@[2001:db8:0::77]"),
])
def test_a_route_whose_domain_is_the_request_uri_host(domain: str, uri: str) -> None:
    special = Endpoint.parse("[2001:db8:6::9]:5060")
    gw = Gateway(routes=(STAR, (domain, SipUri.parse("sip:[2001:db8:6::9]"))))
    sends, _ = invite(gw, uri, Phone("bob", BOB4))
    got = request(sends, special, "INVITE")
    assert str(got.uri) == uri and got.vias[0].host == "[2001:db8:6::1]"


@pytest.mark.parametrize("uri", [
    "sip:bob@example.net", "sip:bob@203.0.113.2:5060", "sip:bob@[2001:db8::20]:5060",
    "sip:bob@[2001:db8::20];transport=tcp", "tel:+1-212-555-0101",
])
def test_the_default_route_catches_every_other_request(uri: str) -> None:
    gw = Gateway(routes=(STAR,))
    sends, _ = invite(gw, uri)
    got = request(sends, DEFAULT, "INVITE")
    assert str(got.uri) == uri and gw.proxy.dns_queries() == []  # the next hop is a literal


def test_a_request_uri_we_mapped_goes_where_it_points_not_to_the_default_route() -> None:
    """An in-dialog request to a Contact the gateway rewrote (``;xlat=``) goes to the
    address it encodes: the gateway made that URI, nothing else can claim it."""
    gw = Gateway(routes=(STAR,))
    bob = Phone("bob", BOB4)
    sends, msg = invite(gw, "sip:bob@203.0.113.2")
    got = request(sends, DEFAULT, "INVITE")
    ok = parse_message(gw.send(bob, bob.reply(got, 200, sdp(BOB4.host, 50000)))[0].data)
    mapped = ok.contacts[0].uri  # type: ignore[union-attr]
    assert "xlat=" in str(mapped)
    alice = Phone("alice", ALICE6)
    dialog = Dialog(msg.call_id, msg.from_.tag or "", ok.to.tag, "sip:alice@x",  # type: ignore[union-attr]
                    "sip:bob@203.0.113.2", str(mapped), [], cseq=2)
    bye = alice.request("BYE", str(mapped), dialog=dialog)
    assert request(gw.send(alice, bye), BOB4, "BYE")


def test_without_default_route_a_foreign_uri_goes_to_its_own_host() -> None:
    gw = Gateway()
    sends, _ = invite(gw, "sip:bob@203.0.113.2")
    assert request(sends, BOB4, "INVITE")
    sends, _ = invite(gw, "sip:bob@example.net")
    assert to(sends, PBX1) == []  # waits for DNS; the caller has its 100
    assert response(sends, ALICE6, 100)
    got = request(answer(gw), PBX1, "INVITE")  # NAPTR -> SRV -> A
    assert str(got.uri) == "sip:bob@example.net"


def test_route_targets_may_be_names() -> None:
    gw = Gateway(routes=(("*", SipUri.parse("sip:example.net")),
                         ("example.org", SipUri.parse("sip:pbx.example.org:5099;transport=tcp"))))
    sends, _ = invite(gw, "sip:bob@[2001:db8::20]")
    assert request(sends + answer(gw), PBX1, "INVITE")
    sends, _ = invite(gw, "sip:bob@example.org")
    out = answer(gw)
    got = request(out, Endpoint.parse("203.0.113.7:5099"), "INVITE")
    assert str(got.uri) == "sip:bob@example.org"
    assert [s.transport for s in out if s.dest.port == 5099] == ["tcp"]


def test_every_valid_torture_request_goes_to_the_default_route() -> None:
    """RFC 4475 / RFC 5118-style requests (names and literals of both families, tel:,
    REGISTERs for other domains, an ACK): every one reaches the "*" next hop, but
    those whose Route header names another proxy, which go there (rule 1)."""
    forwarded, elsewhere = [], []
    for path in sorted(TORTURE.glob("*.sip")):
        data = path.read_bytes()
        if data.startswith(b"SIP/2.0"):
            continue  # a response
        gw = Gateway(routes=(STAR,))
        sends = gw.proxy.receive(data, Endpoint.parse("[2001:db8::9]:5060"), GW6, "udp", 0.0)
        if to(sends, DEFAULT):
            forwarded.append(path.stem)
        else:
            requests = [s.dest for s in sends if not s.data.startswith(b"SIP/2.0")]
            elsewhere.append((path.stem, requests, gw.proxy.dns_queries()))
    assert len(forwarded) == 23, elsewhere
    assert elsewhere == [
        ("long_values", [], [Query("services.example.com", "NAPTR")]),  # its Route, by DNS
        ("maddr_ipv6", [Endpoint.parse("[2001:db8::2]:5060")], []),
    ]


# ---- waiting for DNS ---------------------------------------------------------------------


def test_a_name_that_does_not_exist_is_404_and_a_dead_dns_is_503() -> None:
    gw = Gateway()
    invite(gw, "sip:bob@nowhere.example")
    final = response(answer(gw, {}), ALICE6, 404)
    assert final.reason == "Cannot resolve nowhere.example"
    invite(gw, "sip:bob@down.example")
    out: list[Send] = []
    for query in gw.proxy.dns_queries():
        out += gw.proxy.dns_answer(query, None, None, gw.now)  # timed out
    assert response(out, ALICE6, 503)
    assert gw.media.sessions() == []


def test_answers_are_cached_and_one_query_serves_every_waiting_request() -> None:
    gw = Gateway()
    invite(gw, "sip:bob@example.net")
    invite(gw, "sip:carol@example.net")
    (naptr,) = gw.proxy.dns_queries()  # asked once
    assert naptr == Query("example.net", "NAPTR")
    out = gw.proxy.dns_answer(naptr, ZONE[naptr], 300, gw.now) + answer(gw)  # type: ignore[arg-type]
    assert len([m for m in to(out, PBX1) if isinstance(m, SipRequest)]) == 2
    sends, _ = invite(gw, "sip:dave@example.net")  # warm cache: no waiting
    assert request(sends, PBX1, "INVITE") and gw.proxy.dns_queries() == []


def test_cancel_while_waiting_for_dns_ends_the_call_with_487() -> None:
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    msg, _ = alice.invite("sip:bob@example.net", sdp(ALICE6.host, 40000))
    gw.send(alice, msg)
    cancel = alice.request("CANCEL", "sip:bob@example.net", dialog=Dialog(
        msg.call_id, msg.from_.tag or "", None, str(msg.from_.uri), "sip:bob@example.net",
        "sip:bob@example.net", []), branch=msg.vias[0].branch)
    sends = gw.send(alice, cancel)
    assert response(sends, ALICE6, 200) and response(sends, ALICE6, 487)
    assert to(answer(gw), PBX1) == []  # the answer finds nothing left to forward


# ---- failover (RFC 3263 §4.3) ---------------------------------------------------------------


def test_unreachable_first_target_fails_over_to_the_next_on_a_new_branch() -> None:
    gw = Gateway()
    sends, _ = invite(gw, "sip:bob@example.net")
    first = request(answer(gw), PBX1, "INVITE")
    out = gw.proxy.transport_error(PBX1, "udp", gw.now)  # ICMP port unreachable
    second = request(out, PBX2, "INVITE")
    assert str(second.uri) == "sip:bob@example.net"
    assert second.vias[0].branch != first.vias[0].branch
    assert second.body == first.body  # same family: the same offer
    bob = Phone("bob", PBX2)
    ok = gw.send(bob, bob.reply(second, 200, sdp(PBX2.host, 50000)))
    assert response(ok, ALICE6, 200)
    # the dead target is skipped by the next call, and tried again after the hold
    sends, _ = invite(gw, "sip:carol@example.net")
    assert to(sends, PBX1) == [] and request(sends, PBX2, "INVITE")
    gw.advance(FAILED_TARGET_HOLD)
    sends, _ = invite(gw, "sip:dave@example.net")
    assert request(sends + answer(gw), PBX1, "INVITE")


def test_a_503_sends_the_request_to_the_next_target_and_the_last_failure_is_final() -> None:
    gw = Gateway()
    invite(gw, "sip:bob@example.net")
    first = request(answer(gw), PBX1, "INVITE")
    pbx1 = Phone("pbx1", PBX1)
    out = gw.send(pbx1, pbx1.reply(first, 503))
    assert request(out, PBX1, "ACK") and to(out, ALICE6) == []  # hop-by-hop ACK, no final
    second = request(out, PBX2, "INVITE")
    out = gw.proxy.transport_error(PBX2, "udp", gw.now)
    final = response(out, ALICE6, 503)  # none left: our own 503 (not turned into 500)
    assert final.cseq[1] == "INVITE" and second
    assert gw.media.sessions() == []


def test_timer_b_moves_on_to_the_next_target_and_the_last_timeout_is_408() -> None:
    gw = Gateway()
    invite(gw, "sip:bob@example.net")
    request(answer(gw), PBX1, "INVITE")
    out = gw.advance(32.0)
    assert request(out, PBX2, "INVITE") and to(out, ALICE6) == []
    out = gw.advance(32.0)
    assert response(out, ALICE6, 408)


def test_failover_to_the_other_family_offers_relays_of_that_family() -> None:
    """both.example: AAAA first (the default preference), then A."""
    gw = Gateway()
    bob = Phone("bob", BOB4)
    invite(gw, "sip:bob@both.example", bob)
    v6 = Endpoint.parse("[2001:db8:6::5]:5060")
    first = request(answer(gw), v6, "INVITE")
    assert relay_of(first.body).family == 6
    out = gw.proxy.transport_error(v6, "udp", gw.now)
    second = request(out, Endpoint.parse("203.0.113.5:5060"), "INVITE")
    assert relay_of(second.body).family == 4 and second.vias[0].host == "203.0.113.1"
    assert len(gw.media.sessions()) == 1


def test_prefer_ipv4_tries_a_records_first() -> None:
    gw = Gateway(prefer_family=4)
    invite(gw, "sip:bob@both.example", Phone("bob", BOB4))
    assert request(answer(gw), Endpoint.parse("203.0.113.5:5060"), "INVITE")


def test_v4_caller_reaches_an_aaaa_only_name_over_ipv6() -> None:
    gw = Gateway()
    bob = Phone("bob", BOB4)
    invite(gw, "sip:alice@v6only.example", bob)
    got = request(answer(gw), ALICE6, "INVITE")
    assert_request_for(Phone("alice", ALICE6), got)


def test_asyncio_edge_icmp_port_unreachable_fails_over_on_loopback(
    run_loop: Callable[..., Any],
) -> None:
    """Real sockets: the first SRV target is a closed UDP port, whose ICMP error the
    edge reads from the socket's error queue; the INVITE then reaches the second."""

    async def scenario() -> tuple[bytes, list[bytes]]:
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]  # closed once the block ends
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            sip4 = Endpoint.parse(f"127.0.0.1:{probe.getsockname()[1]}")
        media = SessionManager(pools={4: RelayPortPool(sip4.host, 31100, 31199)})
        proxy = SipProxy(ProxyConfig(sip={4: sip4}, routes=(
            ("*", SipUri.parse("sip:pbx.test;transport=udp")),)), media, random.Random(5))
        callee_got: asyncio.Queue[bytes] = asyncio.Queue()
        caller_got: asyncio.Queue[bytes] = asyncio.Queue()

        class Collect(asyncio.DatagramProtocol):
            def __init__(self, queue: asyncio.Queue[bytes]) -> None:
                self.queue = queue

            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                self.queue.put_nowait(data)

        live, _ = await loop.create_datagram_endpoint(lambda: Collect(callee_got),
                                                      local_addr=("127.0.0.1", 0))
        live_port = live.get_extra_info("sockname")[1]
        for query, records in (
            (Query("_sip._udp.pbx.test", "SRV"), [Srv(1, 0, dead, "dead.test"),
                                                  Srv(2, 0, live_port, "live.test")]),
            (Query("dead.test", "A"), [ip_address("127.0.0.1")]),
            (Query("live.test", "A"), [ip_address("127.0.0.1")]),
            (Query("dead.test", "AAAA"), []), (Query("live.test", "AAAA"), []),
        ):
            proxy.dns.store(query, records, 300, loop.time())  # type: ignore[arg-type]
        server = await start_sip(proxy, [sip4], ("udp",))
        udp, _ = await loop.create_datagram_endpoint(lambda: Collect(caller_got),
                                                     local_addr=("127.0.0.1", 0))
        alice = Phone("alice", _endpoint(udp.get_extra_info("sockname")))
        msg, _ = alice.invite("sip:bob@example.invalid", sdp(alice.addr.host, 40000))
        udp.sendto(msg.to_bytes(), ("127.0.0.1", sip4.port))
        try:
            forwarded = await asyncio.wait_for(callee_got.get(), 5)
            replies = [caller_got.get_nowait() for _ in range(caller_got.qsize())]
        finally:
            udp.close()
            live.close()
            server.close()
        return forwarded, replies

    forwarded, replies = run_loop(scenario())
    assert forwarded.startswith(b"INVITE sip:bob@example.invalid SIP/2.0")
    assert [r[:12] for r in replies] == [b"SIP/2.0 100 "]  # no final: the second target took it


# ---- TLS and SRTP in the core -----------------------------------------------------------------

TLS6 = Endpoint.parse("[2001:db8:6::1]:5061")


def test_phone_registered_over_tls_is_called_over_its_connection() -> None:
    gw = registrar(domains=("gw.example",), tls={6: TLS6})
    alice = Phone("alice", Endpoint.parse("[2001:db8:6::2]:40123"), transport="tls")
    dialog = Dialog("reg-tls", "r", None, "sip:alice@gw.example", "sip:alice@gw.example",
                    "sip:gw.example", [])
    reg = alice.request("REGISTER", "sip:gw.example", dialog=dialog)
    sends = gw.proxy.receive(reg.to_bytes(), alice.addr, TLS6, "tls", gw.now)
    assert [(s.dest, s.transport) for s in sends] == [(alice.addr, "tls")]  # the 401
    challenge = parse_message(sends[0].data)
    reg = alice.request("REGISTER", "sip:gw.example", dialog=dialog, extra=(
        ("Authorization", credentials(challenge.get_all("WWW-Authenticate")[0], "alice",
                                      PASSWORDS["alice"], "REGISTER", "sip:gw.example")),))
    sends = gw.proxy.receive(reg.to_bytes(), alice.addr, TLS6, "tls", gw.now)
    assert [(s.dest, s.transport, s.data[:12]) for s in sends] == [
        (alice.addr, "tls", b"SIP/2.0 200 ")]
    bob = Phone("bob", BOB4)
    sends, _ = invite(gw, "sip:alice@gw.example", bob, auth=True)
    got = request(sends, alice.addr, "INVITE")
    assert [s.transport for s in sends if s.dest == alice.addr] == ["tls"]
    assert got.get_all("Via")[0].startswith("SIP/2.0/TLS [2001:db8:6::1]:5061;")
    assert got.get_all("Record-Route") == ["<sip:[2001:db8:6::1]:5061;transport=tls;lr;r2=on>",
                                           "<sip:203.0.113.1:5060;lr;r2=on>"]


def test_sips_without_a_tls_listener_is_refused() -> None:
    gw = Gateway()
    sends, _ = invite(gw, "sips:bob@203.0.113.2")
    assert response(sends, ALICE6, 416).reason == "TLS is not configured here"


def test_srtp_offer_and_answer_keep_crypto_and_the_secure_profile() -> None:
    """RFC 4568 a=crypto and RTP/SAVP cross untouched; only the relay address and port
    change (the media is relayed like any RTP)."""
    crypto = (b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 "
              b"inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32\r\n")

    def srtp(host: str, port: int, ip: str) -> bytes:
        return (f"v=0\r\no=- 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {host}\r\nt=0 0\r\n"
                f"m=audio {port} RTP/SAVP 0\r\n").encode() + crypto + b"a=rtpmap:0 PCMU/8000\r\n"
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    offer = srtp("2001:db8:6::2", 40000, "IP6")
    msg, _ = alice.invite("sip:bob@203.0.113.2", offer)
    got = request(gw.send(alice, msg), BOB4, "INVITE")
    relay = relay_of(got.body)
    assert got.body == offer.replace(b"IN IP6 2001:db8:6::2", b"IN IP4 203.0.113.1").replace(
        b"m=audio 40000 ", f"m=audio {relay.port} ".encode())
    answer_sdp = srtp("203.0.113.2", 50000, "IP4")
    ok = response(gw.send(bob, bob.reply(got, 200, answer_sdp)), ALICE6, 200)
    back = relay_of(ok.body)
    assert ok.body == answer_sdp.replace(b"IN IP4 203.0.113.2", b"IN IP6 2001:db8:6::1").replace(
        b"m=audio 50000 ", f"m=audio {back.port} ".encode())


def test_unusable_tls_files_are_one_line_errors(tmp_path: Path) -> None:
    from xlat.config import build
    from xlat.sip.transport import TlsSetupError, tls_contexts

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cfg = build(None, media_v4=("192.0.2.1",), sip_listen=("tls:192.0.2.1:5061",),
                tls_cert=str(junk), tls_key=str(junk))
    with pytest.raises(TlsSetupError, match=r"--tls-cert .*junk\.pem") as info:
        tls_contexts(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(TlsSetupError, match="--tls-ca"):
        tls_contexts(build(None, media_v4=("192.0.2.1",), tls_ca=str(junk)))
