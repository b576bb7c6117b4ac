"""Real SIPp phones calling each other through ``xlat run`` in the lab.

Every case is a SIPp scenario (tests/e2e/sipp/) plus assertions on what each phone
saw, read back from SIPp's ``-trace_msg`` logs: in everything a phone must route to
or send media to, only addresses of its own family (xlat.demo.foreign_addresses).
Media is SIPp's RTP stream of a PCMU tone; the kernel's share comes from the
daemon's counters (``xlat flow list -j``, ``xlat stats -j``).
"""

from __future__ import annotations

import random
import re
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import AUTH, DELETE_DELAY, DOMAIN, Nat64

from xlat.addr import Endpoint, parse_ip
from xlat.demo import (
    GW_SIP,
    CallRecord,
    Gateway,
    Message,
    Phone,
    Sipp,
    addresses_in,
    foreign_addresses,
    place_call,
    wait_gone,
)
from xlat.lab import GW4, GW6, V4_HOST2, Lab, in_netns

pytestmark = pytest.mark.e2e


# ---- what the phones saw -------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """The audio stream an SDP body describes."""

    endpoint: Endpoint
    direction: str


def media(msg: Message) -> Media:
    body = msg.body
    c = re.search(r"^c=IN IP[46] (\S+)", body, re.MULTILINE)
    m = re.search(r"^m=audio (\d+) ", body, re.MULTILINE)
    d = re.search(r"^a=(sendrecv|sendonly|recvonly|inactive)\s*$", body, re.MULTILINE)
    assert c and m, f"no audio stream in:\n{msg.text}"
    return Media(Endpoint(parse_ip(c[1]), int(m[1])), d[1] if d else "sendrecv")


def assert_completed(record: CallRecord) -> None:
    assert record.ok, record.explain()


def assert_own_family(record: CallRecord, caller: Phone, callee: Phone) -> None:
    for sipp, phone in ((record.uac, caller), (record.uas, callee)):
        leaks = foreign_addresses(sipp.messages(), phone.family)
        assert not leaks, f"{phone.uri} (IPv{phone.family}) saw:\n" + "\n".join(leaks)


def assert_media_both_ways(record: CallRecord) -> None:
    """Both RTP flows of the call (one per direction) carried packets."""
    rtp = [f for f in record.flows.values() if Endpoint.parse(f["match"]).port % 2 == 0]
    assert len(rtp) == 2, record.flows
    assert all(f["packets"] > 0 for f in rtp), rtp


def assert_kernel_carried(record: CallRecord, kernel_before: int) -> None:
    """At least 90 % of the call's packets were forwarded by the eBPF datapath (the rest
    of ``flow list``'s counts are the userspace relay's)."""
    relayed = sum(f["packets"] for f in record.flows.values())
    assert record.kernel - kernel_before >= 0.9 * relayed > 0, (record.kernel, record.flows)


def assert_gone(gateway: Gateway, record: CallRecord, *, hung_up: bool = True) -> None:
    """The call's sessions leave ``session list`` (and their flows ``flow list``) once
    the call is over; a call ended by BYE stays listed as "deleting" for the delete delay."""
    gone = wait_gone(gateway, record.call_id, DELETE_DELAY + 4)
    assert gone is not None, record.sessions
    lingered = gone - record.ended
    assert lingered < DELETE_DELAY + 2
    if hung_up:
        assert record.sessions, "the call never showed in session list"
        assert {s["state"] for s in record.sessions} == {"deleting"}, record.sessions
        assert lingered > DELETE_DELAY - 0.5
    assert gateway.flows([s["id"] for s in record.sessions]) == []


def invite_200(sipp: Sipp) -> Message:
    return next(m for m in sipp.received(status=200) if m.method == "INVITE")


# ---- calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["v6 calls v4", "v4 calls v6"])
def test_call_across_families(gateway: Gateway, phones: dict[int, Phone], tmp_path: Path,
                              direction: str) -> None:
    """The basic call both ways: addresses mapped, SDP rewritten, the session listed with
    origin "sip", RTP both ways through the kernel, then gone and its port closed."""
    caller, callee = (phones[6], phones[4]) if direction == "v6 calls v4" else (
        phones[4], phones[6])
    kernel_before = gateway.forwarded().get("ebpf", 0)

    record = place_call(gateway, caller, callee, callee.uri, tmp_path)

    assert_completed(record)
    assert_own_family(record, caller, callee)
    invite, answer = record.uas.received("INVITE")[0], invite_200(record.uac)
    assert invite.start.split()[1] == callee.uri  # routed on the R-URI's own host
    assert addresses_in(invite.values("contact")[0]) == [GW_SIP[callee.family].host]
    assert addresses_in(answer.values("contact")[0]) == [GW_SIP[caller.family].host]
    offer_in, answer_in = media(invite), media(answer)
    assert offer_in.endpoint.host == GW_SIP[callee.family].host
    assert answer_in.endpoint.host == GW_SIP[caller.family].host

    (session,) = record.sessions
    assert session["origin"] == "sip"
    assert {leg["relay"] for leg in session["legs"]} == {
        str(offer_in.endpoint), str(answer_in.endpoint)}
    assert {leg["peer"] for leg in session["legs"]} == {
        str(Endpoint(p.host, p.media_port)) for p in (caller, callee)}
    assert_media_both_ways(record)
    assert_kernel_carried(record, kernel_before)

    assert_gone(gateway, record)
    # The relay port is closed now: what the caller still sends there is dropped.
    dropped = gateway.json("stats")["drops"]["unallocated"]["packets"]
    with in_netns(callee.ns):
        listener = udp_socket(Endpoint(callee.host, callee.media_port))
    with in_netns(caller.ns):
        sender = udp_socket(Endpoint(caller.host, caller.media_port))
    with listener, sender:
        for _ in range(5):
            sender.sendto(b"\x80\x00" + bytes(170), sockaddr(answer_in.endpoint))
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.recvfrom(2048)
    assert gateway.json("stats")["drops"]["unallocated"]["packets"] >= dropped + 5


@pytest.mark.parametrize("family", [4, 6])
def test_register_then_called_by_aor(gateway: Gateway, lab: Lab, phones: dict[int, Phone],
                                     tmp_path: Path, family: int) -> None:
    """A phone REGISTERs sip:regN@xlat.test with the gateway, then a phone of the other
    family calls that AOR; the gateway finds it in its registrar."""
    registrant, caller = replace(phones[family], user=f"reg{family}"), phones[10 - family]
    register = Sipp(lab, registrant, "register.xml", tmp_path, "register",
                    remote=GW_SIP[family], keys={"domain": DOMAIN}, timeout=10, options=AUTH)
    assert register.wait() == 0, register.explain()
    assert register.received(status=401)  # Digest: nothing binds without the password
    (ok,) = register.received(status=200)
    assert [registrant.host] in [addresses_in(c) for c in ok.values("contact")]

    record = place_call(gateway, caller, registrant, f"sip:{registrant.user}@{DOMAIN}",
                        tmp_path, uac="uac_auth.xml", uac_options=AUTH)

    assert_completed(record)
    assert_own_family(record, caller, registrant)
    invite = record.uas.received("INVITE")[0]
    assert addresses_in(invite.start.split()[1]) == [registrant.host]  # its registered Contact
    assert_media_both_ways(record)
    assert_gone(gateway, record)


def test_call_forks_to_two_contacts_and_cancels_the_loser(
        gateway: Gateway, lab: Lab, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    """Two IPv4 phones register the same AOR; a call from the IPv6 phone rings both
    (one offer, one leg per To-tag), one answers, the gateway cancels the other."""
    answers = replace(bob4, user="multi")
    rings = Phone(lab.v4, V4_HOST2, "multi", media_port=6010)
    for phone in (answers, rings):
        register = Sipp(lab, phone, "register.xml", tmp_path, f"register-{phone.host}",
                        remote=GW_SIP[4], keys={"domain": DOMAIN}, timeout=10, options=AUTH)
        assert register.wait() == 0, register.explain()
    ringing = Sipp(lab, rings, "uas_cancel.xml", tmp_path, "rings", timeout=15)

    record = place_call(gateway, alice6, answers, f"sip:multi@{DOMAIN}", tmp_path,
                        uac="uac_auth.xml", uac_options=AUTH)

    assert ringing.wait() == 0, ringing.explain()
    assert_completed(record)
    assert_own_family(record, alice6, answers)
    assert not foreign_addresses(ringing.messages(), 4)
    assert ringing.received("CANCEL") and ringing.received("ACK")
    finals = [m.status for m in record.uac.received() if m.method == "INVITE"
              and (m.status or 0) >= 200]
    assert finals == [407, 200]  # challenged (a user of our domain), then answered
    assert_media_both_ways(record)
    assert_gone(gateway, record)


@pytest.mark.parametrize("family", [6, 4])
def test_phone_ignoring_record_route_hangs_up_through_mapped_contact(
        gateway: Gateway, phones: dict[int, Phone], tmp_path: Path, family: int) -> None:
    """The caller (of ``family``) sends ACK and BYE to the callee's Contact with no Route:
    that Contact must be the gateway's address of the caller's family, mapped back."""
    caller, callee = phones[family], phones[10 - family]
    record = place_call(gateway, caller, callee, callee.uri, tmp_path, uac="uac_norr.xml")

    assert_completed(record)
    assert_own_family(record, caller, callee)
    (bye,) = record.uac.sent("BYE")
    assert bye.values("route") == []
    assert addresses_in(bye.start.split()[1]) == [GW_SIP[family].host]  # the mapped Contact
    (bye_in,) = record.uas.received("BYE")
    assert addresses_in(bye_in.start.split()[1]) == [callee.host]  # mapped back
    assert record.uac.received(status=200)[-1].method == "BYE"
    assert_gone(gateway, record)


@pytest.mark.parametrize("family", [4, 6])
def test_callee_hangs_up_along_its_route_set(gateway: Gateway, phones: dict[int, Phone],
                                             tmp_path: Path, family: int) -> None:
    """The callee (of ``family``) sends the BYE: to the caller's Contact as the gateway
    mapped it, through the Record-Route entry of its own family."""
    callee, caller = phones[family], phones[10 - family]
    record = place_call(gateway, caller, callee, callee.uri, tmp_path,
                        uac="uac_callee_bye.xml", uas="uas_bye.xml")

    assert_completed(record)
    assert_own_family(record, caller, callee)
    (bye,) = record.uas.sent("BYE")
    assert addresses_in(bye.start.split()[1]) == [GW_SIP[family].host]  # the mapped Contact
    assert addresses_in(bye.values("route")[0]) == [GW_SIP[family].host]
    (bye_in,) = record.uac.received("BYE")
    assert addresses_in(bye_in.start.split()[1]) == [caller.host]  # mapped back
    assert_media_both_ways(record)
    assert_gone(gateway, record)


def test_cancel_before_answer(gateway: Gateway, alice6: Phone, bob4: Phone,
                              tmp_path: Path) -> None:
    record = place_call(gateway, alice6, bob4, bob4.uri, tmp_path,
                        uac="uac_cancel.xml", uas="uas_cancel.xml")

    assert_completed(record)
    assert_own_family(record, alice6, bob4)
    assert record.uas.received("CANCEL")
    assert record.uac.received(status=487)
    assert record.uas.received("ACK")  # the gateway acknowledged bob's 487 itself
    assert_gone(gateway, record, hung_up=False)


def test_busy(gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    record = place_call(gateway, alice6, bob4, bob4.uri, tmp_path,
                        uac="uac_busy.xml", uas="uas_busy.xml")

    assert_completed(record)
    assert_own_family(record, alice6, bob4)
    assert record.uac.received(status=486)
    assert record.uas.received("ACK")
    assert_gone(gateway, record, hung_up=False)


HOLD = {  # who puts the call on hold: (caller's scenario, callee's scenario)
    "caller": ("uac_hold.xml", "uas_hold.xml"),
    "callee": ("uac_held.xml", "uas_holds.xml"),
}


@pytest.mark.parametrize("holder", HOLD)
def test_hold_and_resume(gateway: Gateway, alice6: Phone, bob4: Phone, tmp_path: Path,
                         holder: str) -> None:
    """A re-INVITE puts the call on hold (a=sendonly, answered a=recvonly), another takes
    it back; the relay ports stay the same all along."""
    uac, uas = HOLD[holder]
    record = place_call(gateway, alice6, bob4, bob4.uri, tmp_path, uac=uac, uas=uas,
                        pause_ms=600)

    assert_completed(record)
    assert_own_family(record, alice6, bob4)
    at_caller = [media(m) for m in record.uac.received() if m.method == "INVITE" and m.body]
    at_callee = [media(m) for m in record.uas.received() if m.method == "INVITE" and m.body]
    held, holding = (at_callee, at_caller) if holder == "caller" else (at_caller, at_callee)
    assert [m.direction for m in held] == ["sendrecv", "sendonly", "sendrecv"]
    assert [m.direction for m in holding] == ["sendrecv", "recvonly", "sendrecv"]
    assert {m.endpoint for m in at_callee} == {at_callee[0].endpoint}
    assert {m.endpoint for m in at_caller} == {at_caller[0].endpoint}
    assert at_callee[0].endpoint.host == GW4 and at_caller[0].endpoint.host == GW6
    assert len(record.sessions) == 1
    assert_media_both_ways(record)
    assert_gone(gateway, record)


@pytest.mark.parametrize("tcp_side", ["caller", "callee"])
def test_tcp_on_one_side_udp_on_the_other(gateway: Gateway, alice6: Phone, bob4: Phone,
                                          tmp_path: Path, tcp_side: str) -> None:
    caller = replace(alice6, tcp=tcp_side == "caller")
    callee = replace(bob4, tcp=tcp_side == "callee")
    ruri = callee.uri + (";transport=tcp" if callee.tcp else "")

    record = place_call(gateway, caller, callee, ruri, tmp_path)

    assert_completed(record)
    assert_own_family(record, caller, callee)
    for sipp, phone in ((record.uac, caller), (record.uas, callee)):
        assert {m.transport for m in sipp.messages()} == {"TCP" if phone.tcp else "UDP"}
    assert_media_both_ways(record)
    assert_gone(gateway, record)


# ---- robustness -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A malformed message and what a proxy must do with it: answer 400, or drop it
    (responses; requests without a usable Via)."""

    name: str
    answered: bool
    build: str  # how: "drop:<Header>", "set:<Header>:<value>", "add:<line>", …


BAD = [
    Bad("no Call-ID", True, "drop:Call-ID"),
    Bad("no CSeq", True, "drop:CSeq"),
    Bad("no From", True, "drop:From"),
    Bad("no To", True, "drop:To"),
    Bad("CSeq method differs from the request's", True, "set:CSeq:1 BYE"),
    Bad("CSeq number not a number", True, "set:CSeq:one INVITE"),
    Bad("Max-Forwards not a number", True, "set:Max-Forwards:lots"),
    Bad("Content-Length past the datagram's end", True, "set:Content-Length:80"),
    Bad("header line without a colon", True, "add:this line has no colon"),
    Bad("no Via", False, "drop:Via"),
    Bad("Via that is not a Via", False, "set:Via:not a via at all"),
    Bad("malformed response", False, "response"),
    Bad("binary garbage", False, "garbage"),
]


def bad_message(bad: Bad, index: int, me: Endpoint, rng: random.Random) -> bytes:
    """Message ``index`` of kind ``bad`` from the socket ``me``; its branch is
    ``z9hG4bK-bad-<index>`` so replies can be matched to it."""
    if bad.build == "garbage":
        return rng.randbytes(rng.randrange(1, 400))
    headers = {
        "Via": f"SIP/2.0/UDP {me};branch=z9hG4bK-bad-{index}",
        "From": f"<sip:mallory@[{me.host}]>;tag=bad{index}",
        "To": "<sip:bob@203.0.113.2>",
        "Call-ID": f"bad-{index}@xlat.test",
        "CSeq": "1 INVITE",
        "Max-Forwards": "70",
        "Content-Length": "0",
    }
    start = "INVITE sip:bob@203.0.113.2 SIP/2.0"
    extra: list[str] = []
    action, _, arg = bad.build.partition(":")
    if action == "drop":
        del headers[arg]
    elif action == "set":
        name, _, value = arg.partition(":")
        headers[name] = value
    elif action == "add":
        extra.append(arg)
    elif action == "response":
        start = "SIP/2.0 200 OK"
        del headers["Call-ID"]
    lines = [start, *(f"{k}: {v}" for k, v in headers.items()), *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_bad_messages_get_400_or_are_dropped_then_a_call_works(
        gateway: Gateway, lab: Lab, alice6: Phone, bob4: Phone, tmp_path: Path) -> None:
    me = Endpoint(parse_ip("2001:db8:6::3"), 5070)
    rng = random.Random(5060)
    replies: dict[str, list[int]] = {}
    with in_netns(lab.v6):
        sock = udp_socket(me)
    with sock:
        for index in range(200):
            bad = BAD[index % len(BAD)]
            sock.sendto(bad_message(bad, index, me, rng), sockaddr(GW_SIP[6]))
            deadline = time.monotonic() + (2.0 if bad.answered else 0.0)
            while f"bad-{index}" not in replies and time.monotonic() < deadline:
                read_reply(sock, replies, deadline)
            time.sleep(0.008)  # stay under the gateway's SIP rate limit (200/s per /64)
        read_reply(sock, replies, time.monotonic() + 0.5)
    expected = {f"bad-{i}": [400] for i in range(200) if BAD[i % len(BAD)].answered}
    assert replies == expected

    record = place_call(gateway, alice6, bob4, bob4.uri, tmp_path)
    assert_completed(record)
    assert_own_family(record, alice6, bob4)
    assert_gone(gateway, record)


def read_reply(sock: socket.socket, replies: dict[str, list[int]], deadline: float) -> None:
    """Read what arrives until ``deadline``; file each status under its Via branch."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return
        text = data.decode(errors="replace")
        branch = re.search(r"branch=z9hG4bK-(bad-\d+)", text)
        status = re.match(r"SIP/2\.0 (\d{3})", text)
        key = branch[1] if branch else f"unmatched: {text[:80]!r}"
        replies.setdefault(key, []).append(int(status[1]) if status else 0)
        return


# ---- NAT64 ------------------------------------------------------------------------------------


def test_ipv6_only_phone_behind_nat64_calls_ipv4_phone(
        gateway: Gateway, nat64: Nat64, bob4: Phone, tmp_path: Path) -> None:
    """carol has only IPv6; she reaches the gateway's IPv4 SIP address through tayga
    (64:ff9b::203.0.113.1). She must be shown only IPv6 (NAT64-synthesised) addresses,
    bob only IPv4 ones, and media must flow through the NAT64 both ways."""
    carol = nat64.phone
    gw_via_nat64 = Endpoint(parse_ip(str(nat64.prefix[int(GW4)])), GW_SIP[4].port)
    kernel_before = gateway.forwarded().get("ebpf", 0)

    record = place_call(gateway, carol, bob4, bob4.uri, tmp_path, remote=gw_via_nat64)

    assert_completed(record)
    assert_own_family(record, carol, bob4)
    answer = invite_200(record.uac)
    assert media(answer).endpoint.host == gw_via_nat64.host
    assert addresses_in(answer.values("contact")[0]) == [gw_via_nat64.host]
    assert addresses_in(answer.values("record-route")[-1]) == [gw_via_nat64.host]
    assert media(record.uas.received("INVITE")[0]).endpoint.host == GW4
    assert_media_both_ways(record)
    assert_kernel_carried(record, kernel_before)
    assert_gone(gateway, record)


# ---- sockets -----------------------------------------------------------------------------------


def udp_socket(bind: Endpoint) -> socket.socket:
    """A UDP socket bound in the calling thread's namespace (use inside in_netns)."""
    sock = socket.socket(socket.AF_INET6 if bind.family == 6 else socket.AF_INET,
                         socket.SOCK_DGRAM)
    sock.bind((str(bind.host), bind.port))
    return sock


def sockaddr(ep: Endpoint) -> tuple[str, int]:
    return (str(ep.host), ep.port)
