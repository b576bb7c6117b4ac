"""Floods and abuse through the sans-I/O cores, each bounded in count: INVITE floods
that never ACK or BYE, oversized SIP, SDP with thousands of m= lines, NG requests at
the size cap. What they open, the timers close; what is too big is refused whole."""

from __future__ import annotations

from ipaddress import IPv4Address

from test_sip_proxy import ALICE6, BOB4, Gateway, Phone, response, sdp, to

from xlat.control.bencode import decode, encode
from xlat.control.ng import NgCore
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sdp import MAX_STREAMS
from xlat.sip.message import MAX_MESSAGE_SIZE, SipResponse, parse_message

FLOOD = 1000


def ports_in_use(gw: Gateway) -> int:
    return sum(p.in_use for pools in gw.media.pools.values() for p in pools)


def settle(gw: Gateway, seconds: float) -> None:
    """Let the proxy's and the media layer's timers run, second by second."""
    for _ in range(int(seconds)):
        gw.advance(1.0)
        gw.media.expire(gw.now, lambda matches: {})


def test_an_invite_flood_that_never_acks_or_byes_is_reclaimed_by_the_timers() -> None:
    gw = Gateway(ports=4 * FLOOD)
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    answered = 0
    for i in range(FLOOD):
        invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000 + 2 * (i % 100)))
        sends = gw.send(alice, invite)
        forwarded = [m for m in to(sends, BOB4) if not isinstance(m, SipResponse)]
        if i % 2:  # bob answers every other one; alice never ACKs, nobody says BYE
            (got,) = forwarded
            gw.send(bob, bob.reply(got, 200, sdp(BOB4.host, 50000)))
            answered += 1
    assert len(gw.media.sessions()) == FLOOD and ports_in_use(gw) > FLOOD
    # the unanswered: Timer C/B then a 408 nobody ACKs (Timer H); the answered: no
    # media and no BYE, so the idle timer (60 s) ends them
    settle(gw, 240)
    assert gw.proxy.transactions == 0
    assert gw.media.sessions() == [] and ports_in_use(gw) == 0
    assert dict(gw.media.ended).get("idle", 0) >= answered


def test_an_oversized_request_is_refused_whole() -> None:
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    invite.set("Subject", "x" * MAX_MESSAGE_SIZE)
    (reply,) = gw.send(alice, invite)
    parsed = parse_message(reply.data)
    assert isinstance(parsed, SipResponse) and parsed.status == 413
    assert gw.media.sessions() == [] and gw.proxy.transactions == 0


def test_sdp_with_thousands_of_m_lines_takes_no_port() -> None:
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    streams = b"".join(b"m=audio %d RTP/AVP 0\r\n" % (40000 + 2 * i) for i in range(2500))
    body = sdp(ALICE6.host, 40000) + streams
    invite, _ = alice.invite("sip:bob@203.0.113.2", body)
    refused = response(gw.send(alice, invite), ALICE6, 488)
    assert f"more than {MAX_STREAMS} m= lines" in refused.reason
    assert gw.media.sessions() == [] and ports_in_use(gw) == 0


def test_ng_requests_at_the_size_cap() -> None:
    manager = SessionManager({4: RelayPortPool(IPv4Address("203.0.113.1"), 30000, 30999)})
    core = NgCore(manager)
    def ping(size: int) -> bytes:
        pad = size - len(b"c1 " + encode({"command": "ping", "pad": b""}))
        pad -= len(str(pad)) - 1  # the pad's length prefix grows with it
        return b"c1 " + encode({"command": "ping", "pad": b"x" * pad})

    at_cap = ping(core.max_request)
    assert len(at_cap) == core.max_request
    assert decode(core.handle(at_cap, "127.0.0.1:9", 0.0)[3:]) == {"result": b"pong"}  # type: ignore[index]
    over = b"c2 " + ping(core.max_request + 1)[3:]
    reply = decode(core.handle(over, "127.0.0.1:9", 0.0)[3:])  # type: ignore[index]
    assert reply["result"] == b"error" and b"exceeds" in reply["error-reason"]  # type: ignore[index]
    # an offer of thousands of streams is one error, and no port is taken
    streams = b"".join(b"m=audio %d RTP/AVP 0\r\n" % (40000 + 2 * i) for i in range(2000))
    offer = b"c3 " + encode({"command": "offer", "call-id": "x", "from-tag": "a",
                             "sdp": sdp(IPv4Address("192.0.2.9"), 40000) + streams})
    reply = decode(core.handle(offer, "127.0.0.1:9", 0.0)[3:])  # type: ignore[index]
    assert reply["result"] == b"error" and b"m= lines" in reply["error-reason"]  # type: ignore[index]
    assert manager.sessions() == []
    assert sum(p.in_use for ps in manager.pools.values() for p in ps) == 0
