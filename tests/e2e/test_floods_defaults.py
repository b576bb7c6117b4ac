"""Floods and abuse against ``xlat run`` in the lab with its defaults (learn latching,
2,000 packets/s per flow, 200 SIP packets/s per source), plus the NG listener on
loopback: media from a stranger after latching, a forged SDP that aims a stream at a
third party, oversized SIP, an SDP with thousands of m= lines, NG requests at the size
cap, and a few seconds of SIP junk from a C sender (bench/sipjunk.c; the 60 s figure is
``python -m bench.junk``). Each bounded in count and time; a real call completes after
each. The same with short timers and strict latching: test_floods.py."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from abuse import Answerer, invite, offered_media, responses, sdp, tcp, udp

from bench.env import build_c
from bench.junk import Phones, add_sources, flood_with_calls
from xlat.addr import Endpoint
from xlat.control.bencode import decode, encode
from xlat.demo import GW_SIP, Gateway, Phone, place_call, start_gateway
from xlat.lab import LAB_RUN_DIR, V4_HOST, V4_HOST2, V6_HOST, V6_HOST2, Lab, in_netns
from xlat.sip.message import MAX_MESSAGE_SIZE, SipResponse, parse_message

pytestmark = pytest.mark.e2e

NG = ("127.0.0.1", 2223)
METRICS = "127.0.0.1:9108"
RATE_CAP = 2000  # --rate-limit's default, packets/s per flow
UAS_PORT = 5062


@pytest.fixture(scope="module")
def gateway(lab: Lab) -> Iterator[Gateway]:
    gw = start_gateway(lab, "--ng-listen", f"{NG[0]}:{NG[1]}", "--metrics-listen", METRICS,
                       directory=LAB_RUN_DIR / lab.tag / "defaults")
    try:
        yield gw
    finally:
        gw.stop()


def drops(gw: Gateway, reason: str) -> int:
    return int(gw.json("stats")["drops"].get(reason, {}).get("packets", 0))


def ports_in_use(gw: Gateway) -> int:
    return sum(p["in_use"] for p in gw.json("stats")["ports"].values())


def end_call(gw: Gateway, call_id: str) -> None:
    for session in gw.sessions(call_id):
        gw.cli("session", "del", session["id"])


def test_learn_latches_once_and_a_stranger_cannot_take_the_stream(gateway: Gateway,
                                                                  lab: Lab) -> None:
    """A behind a NAT: its SDP says port 41000, its media comes from 41010. A's first
    packet latches B's direction to 41010. Then a stranger sends to A's relay: learn
    forwards what arrives, but it latched once, so B's media still goes to A's real
    source and none to the stranger."""
    a_sdp, a_real, b = Endpoint(V6_HOST, 41000), Endpoint(V6_HOST, 41010), Endpoint(V4_HOST,
                                                                                    42000)
    session = gateway.json("session", "add", "--peer-a", str(a_sdp), "--peer-b", str(b))
    relay_a, relay_b = (Endpoint.parse(leg["relay"]) for leg in session["legs"])
    sock_a, sock_b = udp(lab.v6, a_real.host, a_real.port), udp(lab.v4, b.host, b.port)
    stranger = udp(lab.v6, V6_HOST2, 41000)
    try:
        sock_a.sendto(b"hello from behind the NAT", (str(relay_a.host), relay_a.port))
        assert sock_b.recv(100) == b"hello from behind the NAT"
        sock_b.sendto(b"b0", (str(relay_b.host), relay_b.port))
        assert sock_a.recv(100) == b"b0"  # latched to where A's media comes from
        for i in range(5):
            stranger.sendto(b"stranger %d" % i, (str(relay_a.host), relay_a.port))
        assert [sock_b.recv(100) for _ in range(5)] == [b"stranger %d" % i for i in range(5)]
        for i in range(5):
            sock_b.sendto(b"b%d" % (i + 1), (str(relay_b.host), relay_b.port))
        assert [sock_a.recv(100) for _ in range(5)] == [b"b%d" % (i + 1) for i in range(5)]
        stranger.settimeout(0.3)
        with pytest.raises(TimeoutError):
            stranger.recv(100)  # the stranger did not re-latch B's direction
        flows = {f["match"]: f for f in gateway.json("flow", "list")
                 if f["session"] == session["id"]}
        assert flows[str(relay_b)]["to"] == str(a_real)
    finally:
        gateway.cli("session", "del", session["id"])
        for s in (sock_a, sock_b, stranger):
            s.close()


BLAST_PPS, BLAST_S = 20_000, 2.0


def test_a_forged_sdp_aiming_at_a_third_party_is_capped_at_the_flow_rate(gateway: Gateway,
                                                                         lab: Lab) -> None:
    """Mallory (IPv6 host) calls her accomplice (IPv4 host) with an offer whose c=/m=
    name a victim, V6_HOST2:45000. The accomplice answers, then blasts 20,000 packets/s
    for 2 s at its relay: the victim gets at most the per-flow cap (2,000/s, plus one
    second of burst), the rest is dropped in the kernel and counted ``rate_limited``."""
    victim = Endpoint(V6_HOST2, 45000)
    mallory = Endpoint(V6_HOST, 5064)
    accomplice_media = Endpoint(V4_HOST, 46000)
    uas = Answerer(Endpoint(V4_HOST, UAS_PORT), udp(lab.v4, V4_HOST, UAS_PORT),
                   lambda n, _: sdp(accomplice_media))
    sock = udp(lab.v6, mallory.host, mallory.port)
    call_id = f"forged-{time.monotonic_ns()}@abuse.test"
    exe = build_c("udpblast")
    sink = lab.exec(lab.v6, [str(exe), "sink", str(victim.host), str(victim.port)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        sock.sendto(invite(mallory, f"sip:accomplice@{V4_HOST}:{UAS_PORT}", sdp(victim),
                           call_id=call_id), (str(GW_SIP[6].host), GW_SIP[6].port))
        assert [r for r in responses(sock, 1.0) if r.status == 200]
        relay4 = offered_media(uas.invites[0])  # where the accomplice was told to send
        limited0 = drops(gateway, "rate_limited")
        blast = subprocess.run(
            ["ip", "netns", "exec", lab.v4, str(exe), "send", str(accomplice_media.host),
             str(accomplice_media.port), str(BLAST_PPS), str(BLAST_S), "172",
             str(relay4.host), str(relay4.port)], capture_output=True, text=True, timeout=30,
            check=True)
        time.sleep(0.3)
    finally:
        sink.terminate()
        got, _ = sink.communicate(timeout=10)
        end_call(gateway, call_id)
        uas.stop()
        sock.close()
    sent = json.loads(blast.stdout)
    received = json.loads(got)["received"]
    limited = drops(gateway, "rate_limited") - limited0
    print(f"\nforged SDP: {sent['sent']} packets in {sent['elapsed']:.2f} s at the relay, "
          f"the victim got {received}, {limited} dropped rate_limited")
    assert sent["sent"] == BLAST_PPS * BLAST_S
    assert RATE_CAP * sent["elapsed"] * 0.5 <= received <= RATE_CAP * (1 + sent["elapsed"]) + 20
    assert limited == sent["sent"] - received


def closed_without_reply(conn: socket.socket) -> bool:
    """The peer closed ``conn`` without sending anything (EOF or RST); closes it."""
    with conn:
        try:
            return conn.recv(65535) == b""
        except ConnectionResetError:
            return True


def test_oversized_sip_is_dropped_and_the_daemon_keeps_serving(
        gateway: Gateway, lab: Lab, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    """Over TCP, a head that never ends past the 65,535-byte cap, and a Content-Length
    over the cap: the connection is closed (the stream cannot be re-synchronised) and
    nothing is forwarded. Over UDP the largest datagram IPv4 carries (65,507 bytes, under
    the cap) is answered with a response that parses. A real call completes after."""
    gw4 = GW_SIP[4]
    endless = tcp(lab.v4, V4_HOST2, gw4)
    try:
        endless.sendall(b"INVITE sip:bob@203.0.113.2 SIP/2.0\r\n")
        for _ in range(MAX_MESSAGE_SIZE // 1000 + 10):
            endless.sendall(b"X-Filler: " + b"x" * 988 + b"\r\n")
    except (ConnectionResetError, BrokenPipeError):
        pass  # closed while we were still sending
    assert closed_without_reply(endless)
    declared = tcp(lab.v4, V4_HOST2, gw4)
    declared.sendall(invite(Endpoint(V4_HOST2, 5090), "sip:bob@203.0.113.2",
                            b"", transport="TCP").replace(b"Content-Length: 0",
                                                          b"Content-Length: 70000"))
    assert closed_without_reply(declared)  # before the body: no 70 kB buffered

    big = udp(lab.v4, V4_HOST2, 5090)
    head = invite(Endpoint(V4_HOST2, 5090), f"sip:bob@{V4_HOST}:5999", b"")
    filler = b"X-Filler: " + b"y" * (65507 - len(head) - len(b"X-Filler: \r\n")) + b"\r\n"
    datagram = head.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\n" + filler)
    assert len(datagram) == 65507
    big.sendto(datagram, (str(gw4.host), gw4.port))
    replies = responses(big, 2.0)
    big.close()
    print(f"\na {len(datagram)}-byte INVITE over UDP: {[r.status for r in replies]}")
    assert replies and all(isinstance(parse_message(r.to_bytes()), SipResponse)
                           for r in replies)

    call = place_call(gateway, alice6, bob4, bob4.uri, tmp_path, pause_ms=300)
    assert call.ok, call.explain() + gateway.log_tail(30)


def test_sdp_with_thousands_of_m_lines_fails_that_call_only(
        gateway: Gateway, lab: Lab, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    """An INVITE over TCP whose SDP has 2,500 m= lines (60 kB) gets 488 and takes no
    port, while a real call placed at the same time completes."""
    streams = b"".join(b"m=audio %d RTP/AVP 0\r\n" % (40000 + 2 * i) for i in range(2500))
    message = invite(Endpoint(V6_HOST2, 5090), f"sip:bob@{V4_HOST}:5999",
                     sdp(Endpoint(V6_HOST2, 40000), streams), transport="TCP")
    assert len(message) < MAX_MESSAGE_SIZE
    answers: list[bytes] = []

    def abuse() -> None:
        conn = tcp(lab.v6, V6_HOST2, GW_SIP[6])
        with conn:
            conn.sendall(message)
            data = b""
            while not any(r.startswith(b"SIP/2.0 488") for r in data.split(b"\r\n\r\n")):
                chunk = conn.recv(65535)
                if not chunk:
                    break
                data += chunk
            answers.append(data[data.find(b"SIP/2.0 488"):])  # after the 100 Trying

    before = ports_in_use(gateway)
    thread = threading.Thread(target=abuse)
    thread.start()
    call = place_call(gateway, alice6, bob4, bob4.uri, tmp_path, pause_ms=500)
    thread.join(timeout=20)
    assert call.ok, call.explain()
    (answer,) = answers
    refused = parse_message(answer)
    assert isinstance(refused, SipResponse) and refused.status == 488, answer[:200]
    assert "m= lines" in refused.reason
    end_call(gateway, call.call_id)  # its ports are held for the delete delay (10 s)
    assert ports_in_use(gateway) <= before  # the refused offer took none


def ng_in(lab: Lab, datagram: bytes) -> dict[str, object]:
    with in_netns(lab.gw):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(5.0)
        s.sendto(datagram, NG)
        reply = s.recv(65535)
    cookie, _, body = reply.partition(b" ")
    assert cookie == datagram.partition(b" ")[0]
    return decode(body)  # type: ignore[return-value]


def padded_ping(size: int) -> bytes:
    """An NG ping of exactly ``size`` bytes (cookie included)."""
    pad = size - len(b"c1 " + encode({"command": "ping", "pad": b""}))
    pad -= len(str(pad)) - 1  # the pad's length prefix grows with it
    return b"c1 " + encode({"command": "ping", "pad": b"x" * pad})


def test_ng_requests_at_the_size_cap(gateway: Gateway, lab: Lab) -> None:
    """The largest NG request a UDP datagram carries over IPv4 (65,507 bytes, under the
    65,535-byte cap) is served; an offer with 2,000 m= lines is one error reply and
    takes no port; the listener keeps answering. (Over the cap cannot arrive over UDP:
    the unit test test_abuse.py::test_ng_requests_at_the_size_cap feeds the core one.)"""
    largest = padded_ping(65507)
    assert len(largest) == 65507
    assert ng_in(lab, largest) == {"result": b"pong"}
    streams = b"".join(b"m=audio %d RTP/AVP 0\r\n" % (40000 + 2 * i) for i in range(2000))
    before = ports_in_use(gateway)
    offer = b"c2 " + encode({"command": "offer", "call-id": "abuse", "from-tag": "a",
                             "sdp": sdp(Endpoint(V4_HOST2, 40000), streams)})
    reply = ng_in(lab, offer)
    assert reply["result"] == b"error" and b"m= lines" in reply["error-reason"]  # type: ignore[operator]
    assert ports_in_use(gateway) == before
    assert ng_in(lab, b"c3 " + encode({"command": "ping"})) == {"result": b"pong"}


JUNK_RATE, JUNK_S = 50_000, 4.0


def test_sip_junk_at_50k_per_second_from_one_source_and_calls_complete(
        gateway: Gateway, lab: Lab, tmp_path: Path) -> None:
    """JUNK_S seconds of junk at JUNK_RATE/s from one IPv4 address (bench/sipjunk.c,
    sendmmsg) at the SIP port the callee's replies also use, while real calls with media
    go on: >= 99 % complete; the nftables meter drops nearly all of the junk."""
    phones = Phones(lab, tmp_path)
    try:
        record = flood_with_calls(lab, gateway, phones, rate=JUNK_RATE, seconds=JUNK_S,
                                  sources=add_sources(lab, 1), cps=5, name="junk1",
                                  metrics_at=METRICS)
    finally:
        phones.stop()
    print(f"\n{record}")
    assert record["ok_pct"] >= 99
    assert record["sip_rate_limited"] >= 0.9 * record["sent"]


def test_sip_junk_from_many_sources_under_the_meter_and_calls_complete(
        gateway: Gateway, lab: Lab, tmp_path: Path) -> None:
    """Junk from 200 addresses at 100/s each (20,000/s, every source under the per-source
    budget) for JUNK_S seconds while real calls go on: >= 99 % complete. All strangers
    together get 10x the per-source rate (2,000/s), so most of the junk is dropped in the
    kernel (sip_strangers_limited); the callee, a known peer (the proxy sent it the
    INVITE), shares the flooded socket and is spared. The daemon parses at most the
    strangers' budget of it."""
    phones = Phones(lab, tmp_path)
    try:
        record = flood_with_calls(lab, gateway, phones, rate=20_000, seconds=JUNK_S,
                                  sources=add_sources(lab, 200), cps=5, name="junk200",
                                  metrics_at=METRICS)
    finally:
        phones.stop()
    print(f"\n{record}")
    assert record["ok_pct"] >= 99
    assert record["sip_strangers_limited"] >= 0.5 * record["sent"]
    assert 0 < record["malformed"] <= 2000 * (JUNK_S + 2) + 2000  # the strangers' rate + burst
