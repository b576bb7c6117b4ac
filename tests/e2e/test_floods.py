"""Floods and abuse against ``xlat run`` in the lab, with the short timers and the
strict latching an operator can choose (``--timeout 5 --latch strict``, a 40-pair port
pool): an INVITE flood that never ACKs or BYEs, and media from a source the SDP did
not name. The same abuse with the defaults is test_floods_defaults.py. Each test is
bounded in count and time (a few seconds of traffic)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from abuse import Answerer, invite, offered_media, responses, sdp, udp

from xlat.addr import Endpoint
from xlat.demo import GW_SIP, Gateway, Phone, place_call, start_gateway
from xlat.lab import LAB_RUN_DIR, V4_HOST, V4_HOST2, V6_HOST, V6_HOST2, Lab

pytestmark = pytest.mark.e2e

IDLE = 5.0  # --timeout
PORTS = "30000-30079"  # 40 RTP/RTCP pairs per media address
UAS_PORT = 5062
QUARANTINE = 5.0  # a freed port pair rests this long (RelayPortPool's default)


@pytest.fixture(scope="module")
def gateway(lab: Lab) -> Iterator[Gateway]:
    gw = start_gateway(lab, "--timeout", f"{IDLE:g}", "--latch", "strict", "--ports", PORTS,
                       "--delete-delay", "1", directory=LAB_RUN_DIR / lab.tag / "strict")
    try:
        yield gw
    finally:
        gw.stop()


def stats(gw: Gateway) -> dict:  # type: ignore[type-arg]
    return gw.json("stats")  # type: ignore[no-any-return]


def drops(gw: Gateway, reason: str) -> int:
    return int(stats(gw)["drops"].get(reason, {}).get("packets", 0))


def wait_until(check: object, timeout: float) -> float:
    """Poll ``check()`` every 0.1 s; seconds it took, or fail after ``timeout``."""
    started = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - started


FLOOD = 80  # INVITEs: twice the pool


def test_an_invite_flood_that_never_acks_or_byes_is_reclaimed_by_the_timers(
        gateway: Gateway, lab: Lab, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    """FLOOD INVITEs with SDP offers from one host at 40/s; the callee answers every
    other one with 200 + SDP, nobody ever ACKs or says BYE. The pool runs dry (the rest
    get 503), then the idle timer (5 s) frees every session and port, and a real call
    completes."""
    before = stats(gateway)
    capacity = {f: p["capacity"] for f, p in before["ports"].items()}
    assert before["sessions"] == 0 and all(p["in_use"] == 0 for p in before["ports"].values())
    uas = Answerer(Endpoint(V4_HOST, UAS_PORT), udp(lab.v4, V4_HOST, UAS_PORT),
                   lambda n, _: sdp(Endpoint(V4_HOST, 7000 + 2 * n)) if n % 2 else None)
    attacker = udp(lab.v6, V6_HOST2, 5062)
    try:  # the callee stays up, silent: the unanswered are left to the timers
        for i in range(FLOOD):
            attacker.sendto(invite(Endpoint(V6_HOST2, 5062), f"sip:bob@{V4_HOST}:{UAS_PORT}",
                                   sdp(Endpoint(V6_HOST2, 40000 + 2 * i))),
                            (str(GW_SIP[6].host), GW_SIP[6].port))
            time.sleep(0.025)
        peak = stats(gateway)
        got = responses(attacker, 0.5)
        refused = {r.call_id for r in got if r.status == 503}
        answered = {r.call_id for r in got if r.status == 200}
        print(f"\nflood: {FLOOD} INVITEs, {len(uas.invites)} reached the callee, "
              f"{len(answered)} answered, {len(refused)} refused 503; peak "
              f"{peak['sessions']} sessions, ports {peak['ports']}")
        assert {f: p["in_use"] for f, p in peak["ports"].items()} == capacity  # pool ran dry
        assert len(refused) == FLOOD - len(uas.invites) > 0  # the rest: 503, no port taken
        assert answered and peak["sessions"] == len(uas.invites)

        took = wait_until(lambda: stats(gateway)["sessions"] == 0, IDLE + 5)
    finally:
        attacker.close()
        uas.stop()
    after = stats(gateway)
    print(f"all {peak['sessions']} sessions ended {took:.1f} s after the flood: "
          f"{after['ended']}")
    assert all(p["in_use"] == 0 for p in after["ports"].values())
    assert after["ended"].get("idle", 0) - before["ended"].get("idle", 0) == len(uas.invites)
    assert after["flows"] == 0

    time.sleep(QUARANTINE)  # a freed pair rests before it is handed out again
    call = place_call(gateway, alice6, bob4, bob4.uri, tmp_path, pause_ms=500)
    assert call.ok, call.explain()
    assert call.kernel > 0  # its media went through the kernel, strict latching and all


def test_strict_latching_drops_and_counts_media_from_other_sources(gateway: Gateway,
                                                                     lab: Lab) -> None:
    """A relay between A and B (``session add``). After A's media flows, packets to A's
    relay from another host, or from A's host but another port, and packets to B's relay
    from a stranger, are dropped in the kernel and counted as ``strict_mismatch``; A's
    and B's own packets keep flowing both ways."""
    a, b = Endpoint(V6_HOST, 41000), Endpoint(V4_HOST, 42000)
    session = gateway.json("session", "add", "--peer-a", str(a), "--peer-b", str(b))
    relay_a, relay_b = (Endpoint.parse(leg["relay"]) for leg in session["legs"])
    sock_a, sock_b = udp(lab.v6, a.host, a.port), udp(lab.v4, b.host, b.port)
    strangers = [udp(lab.v6, V6_HOST2, a.port), udp(lab.v6, V6_HOST, a.port + 10),
                 udp(lab.v4, V4_HOST2, b.port)]
    mismatch0 = drops(gateway, "strict_mismatch")
    try:
        for i in range(5):
            sock_a.sendto(b"a%d" % i, (str(relay_a.host), relay_a.port))
        assert [sock_b.recv(100) for _ in range(5)] == [b"a%d" % i for i in range(5)]
        for s in strangers:
            relay = relay_b if s.family == sock_b.family else relay_a
            for i in range(10):
                s.sendto(b"forged %d" % i, (str(relay.host), relay.port))
        sock_b.sendto(b"b0", (str(relay_b.host), relay_b.port))
        assert sock_a.recv(100) == b"b0"  # A hears B, and nothing the strangers sent
        sock_a.sendto(b"a5", (str(relay_a.host), relay_a.port))
        assert sock_b.recv(100) == b"a5"  # B hears A, and nothing the strangers sent
        for s in (sock_a, sock_b, *strangers):
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):
                s.recv(100)
        assert drops(gateway, "strict_mismatch") - mismatch0 == 30
        flows = {f["match"]: f for f in gateway.json("flow", "list")
                 if f["session"] == session["id"]}
        assert flows[str(relay_a)]["packets"] == 6 and flows[str(relay_b)]["packets"] == 1
    finally:
        gateway.cli("session", "del", session["id"])
        for s in (sock_a, sock_b, *strangers):
            s.close()


def test_the_relay_ports_of_a_strict_call_come_from_its_sdp(gateway: Gateway, lab: Lab) -> None:
    """Strict latching for a SIP call: the relay expects exactly what each SDP said; a
    packet from the caller's host on another port is dropped and counted."""
    caller = Endpoint(V6_HOST2, 5064)
    uas = Answerer(Endpoint(V4_HOST, UAS_PORT), udp(lab.v4, V4_HOST, UAS_PORT),
                   lambda n, _: sdp(Endpoint(V4_HOST, 43000)))
    sock = udp(lab.v6, caller.host, caller.port)
    media = udp(lab.v6, V6_HOST2, 44000)
    wrong_port = udp(lab.v6, V6_HOST2, 44010)
    callee_media = udp(lab.v4, V4_HOST, 43000)
    call_id = f"strict-{time.monotonic_ns()}@abuse.test"
    try:
        sock.sendto(invite(caller, f"sip:bob@{V4_HOST}:{UAS_PORT}",
                           sdp(Endpoint(V6_HOST2, 44000)), call_id=call_id),
                    (str(GW_SIP[6].host), GW_SIP[6].port))
        (ok,) = [r for r in responses(sock, 1.0) if r.status == 200]
        relay6 = offered_media(ok)  # what the caller was told to send to
        mismatch0 = drops(gateway, "strict_mismatch")
        wrong_port.sendto(b"not from the SDP's port", (str(relay6.host), relay6.port))
        media.sendto(b"from the SDP's port", (str(relay6.host), relay6.port))
        assert callee_media.recv(100) == b"from the SDP's port"
        callee_media.settimeout(0.3)
        with pytest.raises(TimeoutError):
            callee_media.recv(100)
        assert drops(gateway, "strict_mismatch") - mismatch0 == 1
    finally:
        for session in gateway.sessions(call_id):
            gateway.cli("session", "del", session["id"])
        uas.stop()
        for s in (sock, media, wrong_port, callee_media):
            s.close()

