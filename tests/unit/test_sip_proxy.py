"""The SIP proxy core across families, driven like a network on a hand-stepped clock.

A tiny in-memory SIP world: phones that build real SIP messages with real SDP, and a
gateway that runs the real proxy core, the real media session manager and a
FakeDatapath. Every check is on the bytes a party receives: what it must route to or
send media to has to be of its own family."""

from __future__ import annotations

import asyncio
import gc
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from xlat.addr import Endpoint
from xlat.media.datapath import CompositeDatapath, FakeDatapath
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sip.auth import ALGORITHMS, Credentials, digest_response, ha1
from xlat.sip.context import Branch, Context, Server
from xlat.sip.message import SipRequest, SipResponse, make_response, parse_message
from xlat.sip.proxy import ProxyConfig, Send, SipProxy
from xlat.sip.transaction import Timers
from xlat.sip.transport import SipServer, _endpoint, start_sip
from xlat.sip.uri import SipUri, format_host

GW4 = Endpoint.parse("203.0.113.1:5060")
GW6 = Endpoint.parse("[2001:db8:6::1]:5060")


def sdp(host: IPv4Address | IPv6Address, port: int, *, direction: str = "sendrecv") -> bytes:
    ip = "IP6" if host.version == 6 else "IP4"
    conn = "0.0.0.0" if direction == "hold" and ip == "IP4" else "::" if direction == "hold" \
        else str(host)
    attr = "sendonly" if direction == "hold" else direction
    return (
        f"v=0\r\no=- 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {conn}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na={attr}\r\n"
        f"a=candidate:1 1 UDP 2122260223 {host} {port} typ host\r\n"
    ).encode()


def sdp_lines(body: bytes, prefix: str) -> list[str]:
    return [line for line in body.decode().split("\r\n") if line.startswith(prefix)]


@dataclass
class Dialog:
    """One side's view of a dialog (RFC 3261 §12)."""

    call_id: str
    local_tag: str
    remote_tag: str | None
    local_uri: str
    remote_uri: str
    remote_target: str
    route_set: list[str]
    cseq: int = 1


@dataclass
class Phone:
    name: str
    addr: Endpoint
    transport: str = "udp"
    via_host: str | None = None  # sent-by if not our own address (NAT64 phones)
    counter: int = 0
    dialogs: dict[str, Dialog] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.via_host or format_host(self.addr.host)

    @property
    def contact(self) -> str:
        return f"<sip:{self.name}@{self.host}:{self.addr.port}>"

    def _next(self, what: str) -> str:
        self.counter += 1
        return f"{what}{self.name}{self.counter}"

    def request(
        self,
        method: str,
        uri: str,
        *,
        dialog: Dialog,
        body: bytes = b"",
        cseq: int | None = None,
        branch: str | None = None,
        extra: tuple[tuple[str, str], ...] = (),
    ) -> SipRequest:
        via = f"SIP/2.0/{self.transport.upper()} {self.host}:{self.addr.port};" \
              f"branch={branch or self._next('z9hG4bK')};rport"
        to = f"<{dialog.remote_uri}>" + (f";tag={dialog.remote_tag}" if dialog.remote_tag else "")
        headers = [
            ("Via", via),
            ("Max-Forwards", "70"),
            ("From", f"<{dialog.local_uri}>;tag={dialog.local_tag}"),
            ("To", to),
            ("Call-ID", dialog.call_id),
            ("CSeq", f"{cseq if cseq is not None else dialog.cseq} {method}"),
        ]
        headers += [("Route", r) for r in dialog.route_set]
        if method in ("INVITE", "UPDATE", "SUBSCRIBE", "REGISTER"):
            headers.append(("Contact", self.contact))
        headers += list(extra)
        if body:
            headers.append(("Content-Type", "application/sdp"))
        return SipRequest(method, SipUri.parse(uri), headers, body)

    def invite(self, uri: str, body: bytes = b"") -> tuple[SipRequest, Dialog]:
        """A new call: the INVITE and the caller's dialog (completed by ``answered``)."""
        dialog = Dialog(
            call_id=self._next("call-"), local_tag=self._next("tag-"), remote_tag=None,
            local_uri=f"sip:{self.name}@{self.host}", remote_uri=uri, remote_target=uri,
            route_set=[],
        )
        return self.request("INVITE", uri, dialog=dialog, body=body), dialog

    def answered(self, dialog: Dialog, response: SipResponse) -> None:
        """The caller learns the dialog from a 2xx (§12.1.2): route set = reversed
        Record-Route, remote target = Contact."""
        dialog.remote_tag = response.to.tag
        dialog.route_set = list(reversed(response.get_all("Record-Route")))
        dialog.remote_target = str(response.contacts[0].uri)

    def reply(
        self, request: SipRequest, status: int, body: bytes = b"", tag: str | None = None
    ) -> SipResponse:
        """The callee's response; a 1xx/2xx to an INVITE sets up its dialog (§12.1.1)."""
        extra: list[tuple[str, str]] = []
        if request.method == "INVITE" and status < 300:
            extra += [("Record-Route", rr) for rr in request.get_all("Record-Route")]
            extra.append(("Contact", self.contact))
        if body:
            extra.append(("Content-Type", "application/sdp"))
        tag = tag or f"tag-{self.name}"
        response = make_response(request, status, None, tag if status > 100 else None, extra)
        response.body = body
        if request.method == "INVITE" and 100 < status < 300 and request.to.tag is None:
            self.dialogs[request.call_id] = Dialog(
                call_id=request.call_id, local_tag=tag, remote_tag=request.from_.tag,
                local_uri=str(request.to.uri), remote_uri=str(request.from_.uri),
                remote_target=str(request.contacts[0].uri),
                route_set=request.get_all("Record-Route"),
            )
        return response

    def in_dialog(self, method: str, dialog: Dialog, body: bytes = b"") -> SipRequest:
        if method not in ("ACK", "CANCEL"):
            dialog.cseq += 1
        return self.request(method, dialog.remote_target, dialog=dialog, body=body)

    def next_hop(self, request: SipRequest) -> Endpoint:
        """Where this phone sends an in-dialog request: its first Route (loose routing)."""
        routes = request.get_all("Route")
        uri = SipUri.parse(routes[0].strip("<>").split(">")[0]) if routes else \
            request.uri
        assert isinstance(uri, SipUri) and uri.host_ip is not None
        return Endpoint(uri.host_ip, uri.port or 5060)


class Gateway:
    """The proxy core + media layer + fake datapath, and a clock."""

    def __init__(self, ports: int = 999, **config: object) -> None:
        self.media = SessionManager(
            pools={
                4: RelayPortPool(GW4.host, 30000, 30000 + ports),
                6: RelayPortPool(GW6.host, 30000, 30000 + ports),
            },
            idle_timeout=60.0,
            delete_delay=10.0,
            rng=random.Random(7),
        )
        self.datapath = FakeDatapath()
        composite = CompositeDatapath([self.datapath])  # as the daemon drives it
        self.media.on_change = lambda: composite.apply(self.media.drain())
        self.proxy = SipProxy(
            ProxyConfig(sip={4: GW4, 6: GW6}, **config),  # type: ignore[arg-type]
            self.media,
            random.Random(42),
        )
        self.now = 0.0

    def local_for(self, phone: Phone) -> Endpoint:
        return GW4 if phone.addr.family == 4 else GW6

    def send(self, phone: Phone, message: SipRequest | SipResponse | bytes) -> list[Send]:
        data = message if isinstance(message, bytes) else message.to_bytes()
        return self.proxy.receive(data, phone.addr, self.local_for(phone), phone.transport,
                                  self.now)

    def advance(self, seconds: float) -> list[Send]:
        """Step the clock, firing every timer on the way (like the asyncio adapter)."""
        end = self.now + seconds
        out: list[Send] = []
        while (when := self.proxy.next_deadline()) is not None and when <= end:
            self.now = max(self.now, when)
            out += self.proxy.handle_timer(self.now)
        self.now = end
        return out


def to(sends: list[Send], dest: Endpoint) -> list[SipRequest | SipResponse]:
    """The messages among ``sends`` addressed to ``dest``, parsed."""
    return [parse_message(s.data) for s in sends if s.dest == dest]


def one(
    sends: list[Send], dest: Endpoint, what: str | int | None = None
) -> SipRequest | SipResponse:
    """The single message to ``dest`` (filtered by method or status when given)."""
    msgs = to(sends, dest)
    if what is not None:
        msgs = [m for m in msgs if (m.method if isinstance(m, SipRequest) else m.status) == what]
    assert len(msgs) == 1, f"expected one {what or 'message'} to {dest}, got {msgs} of {sends}"
    return msgs[0]


def request(sends: list[Send], dest: Endpoint, method: str) -> SipRequest:
    msg = one(sends, dest, method)
    assert isinstance(msg, SipRequest)
    return msg


def response(sends: list[Send], dest: Endpoint, status: int) -> SipResponse:
    msg = one(sends, dest, status)
    assert isinstance(msg, SipResponse)
    return msg


def uri_family(value: str) -> int:
    """The family of the IP literal host in a URI or name-addr."""
    m = re.search(r"sips?:(?:[^@;>]*@)?(\[[^\]]+\]|[0-9.]+)", value)
    assert m, value
    return 6 if m.group(1).startswith("[") else 4


ALICE6 = Endpoint.parse("[2001:db8:6::2]:5060")
BOB4 = Endpoint.parse("203.0.113.2:5060")

# The registrar's users: a password each, stored as HA1 per algorithm (as a users file)
REALM = "gw.example"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
CREDENTIALS = Credentials(REALM, {
    user: {a: ha1(a, user, REALM, pw) for a in ALGORITHMS} for user, pw in PASSWORDS.items()})


def registrar(**config: object) -> Gateway:
    """A gateway with its local registrar on (Digest against CREDENTIALS)."""
    return Gateway(users=lambda: CREDENTIALS, auth_secret=b"k" * 32, **config)


def credentials(challenge: str, user: str, password: str, method: str, uri: str,
                nc: int = 1) -> str:
    """The Authorization value a phone computes for ``challenge`` (RFC 7616 §3.4)."""
    params = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
    algorithm = params["algorithm"]
    cnonce, count = "c0ffee", f"{nc:08x}"
    digest = digest_response(algorithm, ha1(algorithm, user, params["realm"], password),
                             nonce=params["nonce"], nc=count, cnonce=cnonce, qop="auth",
                             method=method, uri=uri)
    return (f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
            f'uri="{uri}", response="{digest}", algorithm={algorithm}, cnonce="{cnonce}", '
            f"qop=auth, nc={count}")


def authorized(gw: Gateway, phone: Phone, req: SipRequest, *, user: str | None = None,
               password: str | None = None, dialog: Dialog | None = None,
               algorithm: str = "SHA-256") -> list[Send]:
    """Send ``req``, answer its 401/407 challenge the way a phone does (ACK for an
    INVITE's, then the request again with CSeq + 1 and credentials) and return what
    the retry made the gateway send."""
    user = user or phone.name
    password = password or PASSWORDS.get(user, "wrong")
    challenge = next(m for m in to(gw.send(phone, req), phone.addr)
                     if isinstance(m, SipResponse) and m.status in (401, 407))
    assert isinstance(challenge, SipResponse)
    name = "WWW-Authenticate" if challenge.status == 401 else "Proxy-Authenticate"
    offered = challenge.get_all(name)
    if req.method == "INVITE":
        gw.send(phone, SipRequest("ACK", req.uri, [
            ("Via", req.get("Via") or ""), ("Max-Forwards", "70"),
            ("From", req.get("From") or ""), ("To", challenge.get("To") or ""),
            ("Call-ID", req.call_id), ("CSeq", f"{req.cseq[0]} ACK")]))
    value = credentials(next(c for c in offered if f"algorithm={algorithm}" in c), user,
                        password, req.method, str(req.uri))
    retry = req.copy()
    retry.set("CSeq", f"{req.cseq[0] + 1} {req.method}")
    retry.replace_values("Via", [str(req.vias[0]).replace("branch=", "branch=z9hG4bKa-")])
    retry.insert(len(retry.headers), "Authorization" if name == "WWW-Authenticate"
                 else "Proxy-Authorization", value)
    if dialog is not None:
        dialog.cseq += 1
    return gw.send(phone, retry)


def gw_family_of(phone: Phone) -> Endpoint:
    return GW4 if phone.addr.family == 4 else GW6


def assert_request_for(phone: Phone, msg: SipRequest) -> None:
    """What a phone receiving ``msg`` routes or sends media to is of its family: the
    top Via (responses), the first Record-Route (its route set), Contact, SDP."""
    fam = phone.addr.family
    assert uri_family("sip:" + msg.vias[0].host) == fam
    rrs = msg.get_all("Record-Route")
    if rrs:
        assert uri_family(rrs[0]) == fam
    for contact in msg.get_all("Contact"):
        assert uri_family(contact) == fam
    assert_sdp_family(msg.body, fam)


def assert_response_for(phone: Phone, msg: SipResponse) -> None:
    """A caller's route set is the reversed Record-Route: the last entry must be of its
    family, and so must Contact and SDP."""
    fam = phone.addr.family
    rrs = msg.get_all("Record-Route")
    if rrs:
        assert uri_family(rrs[-1]) == fam
    for contact in msg.get_all("Contact"):
        assert uri_family(contact) == fam
    assert_sdp_family(msg.body, fam)


def assert_sdp_family(body: bytes, fam: int) -> None:
    if not body:
        return
    ip = f"IN IP{fam} "
    for line in sdp_lines(body, "c=") + sdp_lines(body, "o="):
        assert ip in line, line
    assert not sdp_lines(body, "a=candidate"), "ICE candidates name the other family"


def relay_of(body: bytes) -> Endpoint:
    (conn,) = sdp_lines(body, "c=")
    (media,) = sdp_lines(body, "m=")
    host = conn.split()[-1]
    return Endpoint.parse(f"[{host}]:{media.split()[1]}" if ":" in host else
                          f"{host}:{media.split()[1]}")


def call(gw: Gateway, caller: Phone, callee: Phone, uri: str | None = None) -> tuple[
        Dialog, Dialog, Endpoint, Endpoint]:
    """Set up a call caller -> callee through the gateway, checking every message;
    returns both dialogs and the relays each side was told (caller's, callee's)."""
    uri = uri or f"sip:{callee.name}@{format_host(callee.addr.host)}:{callee.addr.port}"
    invite, dialog = caller.invite(uri, sdp(caller.addr.host, 40000))
    sends = gw.send(caller, invite)
    assert response(sends, caller.addr, 100)
    got = request(sends, callee.addr, "INVITE")
    assert_request_for(callee, got)
    assert one(sends, callee.addr).to_bytes() == sends[-1].data
    assert sends[-1].local == gw_family_of(callee)
    relay_for_callee = relay_of(got.body)

    ringing = gw.send(callee, callee.reply(got, 180))
    assert_response_for(caller, response(ringing, caller.addr, 180))
    ok = gw.send(callee, callee.reply(got, 200, sdp(callee.addr.host, 50000)))
    answer = response(ok, caller.addr, 200)
    assert_response_for(caller, answer)
    relay_for_caller = relay_of(answer.body)
    caller.answered(dialog, answer)

    ack = caller.in_dialog("ACK", dialog)
    assert caller.next_hop(ack) == gw_family_of(caller)
    acked = request(gw.send(caller, ack), callee.addr, "ACK")
    assert str(acked.uri) == callee.contact.strip("<>")  # the mapped Contact, restored
    assert_request_for(callee, acked)
    return dialog, callee.dialogs[invite.call_id], relay_for_caller, relay_for_callee


@pytest.mark.parametrize("caller_addr,callee_addr", [(ALICE6, BOB4), (BOB4, ALICE6)],
                         ids=["v6-calls-v4", "v4-calls-v6"])
def test_call_across_families_every_address_each_party_sees_is_its_own(
        caller_addr: Endpoint, callee_addr: Endpoint) -> None:
    gw = Gateway()
    caller, callee = Phone("alice", caller_addr), Phone("bob", callee_addr)
    _, callee_dialog, relay_caller, relay_callee = call(gw, caller, callee)
    assert relay_caller.family == caller_addr.family
    assert relay_callee.family == callee_addr.family

    # media: what the caller sends to its relay reaches the callee's SDP address
    flow = gw.datapath.flows[relay_caller]
    assert flow.to == Endpoint(callee_addr.host, 50000)
    assert flow.source == relay_callee
    assert gw.datapath.flows[relay_callee].to == Endpoint(caller_addr.host, 40000)

    # the callee hangs up: BYE follows its route set through the gateway to the caller
    bye = callee.in_dialog("BYE", callee_dialog)
    assert callee.next_hop(bye) == gw_family_of(callee)
    sends = gw.send(callee, bye)
    got = request(sends, caller_addr, "BYE")
    assert_request_for(caller, got)
    assert str(got.uri) == caller.contact.strip("<>")  # the mapped Contact, restored
    (session,) = gw.media.sessions()
    assert session.state == "deleting"
    done = gw.send(caller, caller.reply(got, 200))
    assert response(done, callee_addr, 200)
    gw.advance(11.0)
    gw.media.expire(gw.now, lambda matches: {})
    assert gw.media.sessions() == [] and gw.datapath.flows == {}
    gw.advance(40.0)
    assert gw.proxy.transactions == 0 and gw.proxy.next_deadline() is None


def test_finished_transactions_are_freed_without_the_cycle_collector() -> None:
    """At 1,000 calls/s tens of thousands of transactions are alive: the ones that end
    must go by refcounting alone, not wait for (and slow down) a full collection."""
    def alive() -> list[object]:
        return [o for o in gc.get_objects() if isinstance(o, (Server, Branch, Context))]

    gc.collect()
    gc.disable()
    try:
        # other modules (the fuzz targets) may keep a proxy of their own alive: only
        # what this call made counts
        before = {id(o) for o in alive()}
        gw = Gateway()
        caller, callee = Phone("alice", ALICE6), Phone("bob", BOB4)
        caller_dialog, _, _, _ = call(gw, caller, callee)
        got = request(gw.send(caller, caller.in_dialog("BYE", caller_dialog)), BOB4, "BYE")
        gw.send(callee, callee.reply(got, 200))
        gw.advance(40.0)
        assert gw.proxy.transactions == 0
        left = [o for o in alive() if id(o) not in before]
        assert left == []
    finally:
        gc.enable()


def test_cancel_gets_487_and_releases_media() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    assert gw.media.sessions()
    gw.send(bob, bob.reply(got, 180))
    cancel = alice.request("CANCEL", str(invite.uri), dialog=Dialog(
        invite.call_id, invite.from_.tag or "", None, str(invite.from_.uri), str(invite.to.uri),
        str(invite.uri), []), cseq=1, branch=invite.vias[0].branch)
    sends = gw.send(alice, cancel)
    assert response(sends, ALICE6, 200).cseq == (1, "CANCEL")
    fwd = request(sends, BOB4, "CANCEL")
    assert fwd.vias[0].branch == got.vias[0].branch and fwd.cseq == (1, "CANCEL")
    assert_request_for(bob, fwd)
    assert gw.send(bob, bob.reply(fwd, 200)) == []
    sends = gw.send(bob, bob.reply(got, 487))
    ack = request(sends, BOB4, "ACK")  # hop-by-hop ACK for the failure
    assert ack.vias[0].branch == got.vias[0].branch
    assert response(sends, ALICE6, 487)
    assert gw.media.sessions() == [] and gw.datapath.flows == {}
    # the caller's ACK ends our server transaction; it goes nowhere
    ack_up = alice.request("ACK", str(invite.uri), dialog=Dialog(
        invite.call_id, invite.from_.tag or "", "tag-bob", str(invite.from_.uri),
        str(invite.to.uri), str(invite.uri), []), cseq=1, branch=invite.vias[0].branch)
    assert gw.send(alice, ack_up) == []
    gw.advance(64.0)
    assert gw.proxy.transactions == 0


def test_cancel_before_any_provisional_ends_the_call_at_once() -> None:
    """The caller gets its 487 at once (not after Timer B); the silent branch gets its
    CANCEL only when a provisional response comes (RFC 3261 §9.1)."""
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, dialog = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 6000))
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    cancel = alice.request("CANCEL", str(invite.uri), dialog=dialog, cseq=1,
                           branch=invite.vias[0].branch)
    sends = gw.send(alice, cancel)
    assert response(sends, ALICE6, 200) and to(sends, BOB4) == []
    final = response(sends, ALICE6, 487)
    assert final.to.tag and final.cseq == (1, "INVITE")
    assert gw.media.sessions() == []  # the call's relays are released
    sends = gw.send(bob, bob.reply(got, 180))
    assert request(sends, BOB4, "CANCEL") and to(sends, ALICE6) == []
    sends = gw.send(bob, bob.reply(got, 487))
    assert request(sends, BOB4, "ACK") and to(sends, ALICE6) == []


def test_busy_releases_media_and_acks_hop_by_hop() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    busy = bob.reply(got, 486)
    sends = gw.send(bob, busy)
    assert request(sends, BOB4, "ACK").to.tag == busy.to.tag
    assert response(sends, ALICE6, 486).vias[0].host == "[2001:db8:6::2]"
    assert gw.media.sessions() == []
    # a retransmitted 486 is ACKed again and not passed up
    again = gw.send(bob, busy)
    assert [parse_message(s.data).method for s in again] == ["ACK"]  # type: ignore[union-attr]


def test_reinvite_hold_and_back_keeps_relay_ports() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    dialog, bob_dialog, relay_alice, relay_bob = call(gw, alice, bob)
    for direction in ("hold", "sendrecv"):
        reinvite = alice.in_dialog("INVITE", dialog, sdp(ALICE6.host, 40000, direction=direction))
        sends = gw.send(alice, reinvite)
        got = request(sends, BOB4, "INVITE")
        assert_request_for(bob, got)
        assert got.get_all("Record-Route") == []  # in-dialog: the route set is fixed
        assert relay_of(got.body).port == relay_bob.port
        null = "0.0.0.0" if direction == "hold" else "203.0.113.1"
        assert sdp_lines(got.body, "c=") == [f"c=IN IP4 {null}"]
        assert sdp_lines(got.body, "a=sendonly" if direction == "hold" else "a=sendrecv")
        ok = response(gw.send(bob, bob.reply(got, 200, sdp(BOB4.host, 50000))), ALICE6, 200)
        assert relay_of(ok.body) == relay_alice
        acked = request(gw.send(alice, alice.in_dialog("ACK", dialog)), BOB4, "ACK")
        assert acked.cseq[0] == reinvite.cseq[0]
        flows_to_alice = gw.datapath.flows.get(relay_bob)
        if direction == "hold":
            assert flows_to_alice is None  # nothing is sent to a party on hold
        else:
            assert flows_to_alice is not None and flows_to_alice.to == Endpoint(ALICE6.host, 40000)
    assert len(gw.media.sessions()) == 1
    assert bob_dialog.remote_tag == dialog.local_tag


def test_callee_reinvite_is_offered_back_through_the_route_set() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    _, bob_dialog, relay_alice, relay_bob = call(gw, alice, bob)
    reinvite = bob.in_dialog("INVITE", bob_dialog, sdp(BOB4.host, 50002))
    got = request(gw.send(bob, reinvite), ALICE6, "INVITE")
    assert_request_for(alice, got)
    assert relay_of(got.body) == relay_alice
    ok = response(gw.send(alice, alice.reply(got, 200, sdp(ALICE6.host, 40000))), BOB4, 200)
    assert relay_of(ok.body) == relay_bob
    assert gw.datapath.flows[relay_alice].to == Endpoint(BOB4.host, 50002)


def test_late_offer_in_200_answer_in_ack() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, dialog = alice.invite("sip:bob@203.0.113.2:5060")
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    assert got.body == b""
    ok = response(gw.send(bob, bob.reply(got, 200, sdp(BOB4.host, 50000))), ALICE6, 200)
    assert_response_for(alice, ok)
    relay_alice = relay_of(ok.body)
    alice.answered(dialog, ok)
    ack = alice.in_dialog("ACK", dialog, sdp(ALICE6.host, 40000))
    acked = request(gw.send(alice, ack), BOB4, "ACK")
    assert_request_for(bob, acked)
    relay_bob = relay_of(acked.body)
    assert gw.datapath.flows[relay_bob].to == Endpoint(ALICE6.host, 40000)
    assert gw.datapath.flows[relay_alice].to == Endpoint(BOB4.host, 50000)


def test_register_then_call_by_aor_forks_to_every_contact() -> None:
    gw = registrar()
    alice = Phone("alice", ALICE6)
    desk, soft = Phone("bob", BOB4), Phone("bob", Endpoint.parse("203.0.113.3:5070"))
    for phone, q in ((desk, "1.0"), (soft, "0.5")):
        reg = phone.request("REGISTER", "sip:203.0.113.1", dialog=Dialog(
            phone._next("reg-"), "r", None, "sip:bob@203.0.113.1", "sip:bob@203.0.113.1",
            "sip:203.0.113.1", []), extra=(("Expires", "600"),))
        reg.replace_values("Contact", [f"{phone.contact};q={q}"])
        ok = response(authorized(gw, phone, reg), phone.addr, 200)
        assert phone.contact in " ".join(ok.get_all("Contact"))
    # calling the AOR on the gateway's *IPv6* address reaches the IPv4 registrations
    invite, dialog = alice.invite("sip:bob@[2001:db8:6::1]", sdp(ALICE6.host, 40000))
    sends = authorized(gw, alice, invite, dialog=dialog)
    branches = [request(sends, phone.addr, "INVITE") for phone in (desk, soft)]
    assert [str(b.uri) for b in branches] == [desk.contact.strip("<>"), soft.contact.strip("<>")]
    assert branches[0].body == branches[1].body  # one offer, one answerer-side relay
    for phone, got in zip((desk, soft), branches, strict=True):
        assert_request_for(phone, got)
        gw.send(phone, phone.reply(got, 180, tag=f"t-{phone.addr.port}"))
    sends = gw.send(soft, soft.reply(branches[1], 200, sdp(soft.addr.host, 50000),
                                     tag=f"t-{soft.addr.port}"))
    ok = response(sends, ALICE6, 200)
    assert_response_for(alice, ok)
    cancel = request(sends, desk.addr, "CANCEL")  # §16.7 step 10: the other branch goes
    gw.send(desk, desk.reply(cancel, 200))
    sends = gw.send(desk, desk.reply(branches[0], 487, tag=f"t-{desk.addr.port}"))
    assert request(sends, desk.addr, "ACK") and to(sends, ALICE6) == []
    assert gw.media.sessions()  # the answered call keeps its media
    alice.answered(dialog, ok)
    acked = request(gw.send(alice, alice.in_dialog("ACK", dialog)), soft.addr, "ACK")
    assert_request_for(soft, acked)


def test_unknown_user_in_our_domain_is_404_and_unregister_works() -> None:
    gw = registrar(domains=("gw.example",))
    bob = Phone("bob", BOB4)
    dialog = Dialog("reg-1", "r", None, "sip:bob@gw.example", "sip:bob@gw.example",
                    "sip:gw.example", [])
    reg = bob.request("REGISTER", "sip:gw.example", dialog=dialog)
    assert response(authorized(gw, bob, reg, dialog=dialog), BOB4, 200)
    dialog.cseq += 1
    unreg = bob.request("REGISTER", "sip:gw.example", dialog=dialog, extra=(("Expires", "0"),))
    assert response(authorized(gw, bob, unreg), BOB4, 200).get_all("Contact") == []
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@gw.example", sdp(ALICE6.host, 40000))
    assert response(authorized(gw, alice, invite), ALICE6, 404)  # authenticated: told
    assert gw.media.sessions() == []


def test_static_routes_are_next_hops_and_keep_the_request_uri() -> None:
    kamailio = Endpoint.parse("203.0.113.9:5080")
    gw = Gateway(routes=(("*", SipUri.parse("sip:203.0.113.9:5080")),
                         ("example.org", SipUri.parse("sip:[2001:db8:6::9]:5060"))))
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:carol@203.0.113.1", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), kamailio, "INVITE")
    assert str(got.uri) == "sip:carol@203.0.113.1"
    invite, _ = bob.invite("sip:dave@example.org", sdp(BOB4.host, 50000))
    got = request(gw.send(bob, invite), Endpoint.parse("[2001:db8:6::9]:5060"), "INVITE")
    assert str(got.uri) == "sip:dave@example.org" and got.vias[0].host == "[2001:db8:6::1]"
    invite, _ = bob.invite("sip:erin@elsewhere.example", sdp(BOB4.host, 50000))
    got = request(gw.send(bob, invite), kamailio, "INVITE")  # "*" catches every other name
    assert str(got.uri) == "sip:erin@elsewhere.example"


def test_reconfigure_sends_new_requests_by_the_new_routes_and_keeps_calls_in_progress() -> None:
    """``systemctl reload``: a request after it follows the new routes and domains; a
    transaction begun before it still gets its responses."""
    old_hop, new_hop = Endpoint.parse("203.0.113.9:5080"), Endpoint.parse("203.0.113.10:5060")
    gw = Gateway(routes=(("example.org", SipUri.parse("sip:203.0.113.9:5080")),))
    alice = Phone("alice", ALICE6)
    first, _ = alice.invite("sip:carol@example.org", sdp(ALICE6.host, 40000))
    sent = request(gw.send(alice, first), old_hop, "INVITE")
    gw.proxy.reconfigure(replace(gw.proxy.config, domains=("gw.example",),
                                 routes=(("example.org", SipUri.parse("sip:203.0.113.10:5060")),)))
    carol = Phone("carol", old_hop)
    answer = carol.reply(sent, 200, sdp(IPv4Address("203.0.113.9"), 50000), tag="c1")
    assert response(gw.send(carol, answer), ALICE6, 200)  # the call set up before goes on
    second, _ = alice.invite("sip:dave@example.org", sdp(ALICE6.host, 40002))
    assert request(gw.send(alice, second), new_hop, "INVITE")
    third, _ = alice.invite("sip:erin@gw.example", sdp(ALICE6.host, 40004))
    # our domain now: looked up in the registrar, not resolved as a foreign host
    assert response(gw.send(alice, third), ALICE6, 404).reason == "Not Found"
    assert len(gw.media.sessions()) == 2


def test_timeout_gives_408_and_releases_media() -> None:
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    sends = gw.send(alice, invite)
    first = request(sends, BOB4, "INVITE")
    retransmits = [gw.advance(t) for t in (0.5, 1.0, 2.0, 4.0)]
    assert all(parse_message(r[0].data).to_bytes() == first.to_bytes() for r in retransmits)
    assert gw.advance(0.4) == []
    sends = gw.advance(32.0 - 7.9)
    assert response(sends, ALICE6, 408)
    assert gw.media.sessions() == []


def test_no_ports_is_503_with_retry_after_and_nothing_leaks() -> None:
    gw = Gateway(ports=1)  # one pair per family
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    call(gw, alice, bob)
    before = {fam: pool.in_use for fam, pools in gw.media.pools.items() for pool in pools}
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40002))
    sends = gw.send(alice, invite)
    busy = response(sends, ALICE6, 503)
    assert busy.get("Retry-After") == "5" and to(sends, BOB4) == []
    assert {fam: pool.in_use for fam, pools in gw.media.pools.items() for pool in pools} == before
    assert len(gw.media.sessions()) == 1


def test_bad_sdp_fails_that_call_only_with_488() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", b"v=0\r\nm=audio notaport RTP/AVP 0\r\n")
    sends = gw.send(alice, invite)
    assert response(sends, ALICE6, 488) and to(sends, BOB4) == []
    call(gw, alice, bob)


def test_max_forwards_and_loops() -> None:
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.2")
    invite.set("Max-Forwards", "0")
    assert response(gw.send(alice, invite), ALICE6, 483)
    # a request sent to ourselves comes back with our Via and the same loop hash
    invite, _ = alice.invite("sip:bob@203.0.113.1:5062")
    gw2 = Gateway(routes=(("203.0.113.1", SipUri.parse("sip:203.0.113.1:5060")),))
    sends = gw2.send(alice, invite)
    looped = request(sends, GW4, "INVITE")
    assert response(gw2.send(Phone("gw", GW4), looped), GW4, 482)


def test_nat64_phone_sees_the_gateway_on_synthetic_ipv6() -> None:
    """An IPv6-only phone behind NAT64 reaches us over IPv4 (the NAT64's address) with
    its own IPv6 in Via: Record-Route, Contact and SDP it receives are synthetic IPv6."""
    gw = Gateway()
    nat64_out = Endpoint.parse("198.51.100.7:41000")
    phone = Phone("carol", nat64_out, via_host="[2001:db8:77::5]")
    bob = Phone("bob", BOB4)
    invite, dialog = phone.invite("sip:bob@203.0.113.2", sdp(IPv6Address("2001:db8:77::5"), 4000))
    sends = gw.send(phone, invite)
    assert response(sends, nat64_out, 100)
    got = request(sends, BOB4, "INVITE")
    assert got.get_all("Record-Route") == ["<sip:203.0.113.1:5060;lr;r2=on>",
                                           "<sip:[64:ff9b::cb00:7101]:5060;lr;r2=on>"]
    assert_sdp_family(got.body, 4)
    ok = response(gw.send(bob, bob.reply(got, 200, sdp(BOB4.host, 50000))), nat64_out, 200)
    (conn,) = sdp_lines(ok.body, "c=")
    assert conn == "c=IN IP6 64:ff9b::cb00:7101"  # our relay's IPv4, NAT64-synthesised
    assert ok.contacts[0].uri.host == "[64:ff9b::cb00:7101]"  # type: ignore[union-attr]
    # media: the phone's leg is IPv4 (it arrives through NAT64) and learns its source
    relay = relay_of(ok.body)
    v4_relay = Endpoint(GW4.host, relay.port)
    assert gw.datapath.flows[v4_relay].to == Endpoint(BOB4.host, 50000)
    phone.answered(dialog, ok)
    ack = phone.in_dialog("ACK", dialog)
    assert phone.next_hop(ack) == Endpoint.parse("[64:ff9b::cb00:7101]:5060")
    assert request(gw.send(phone, ack), BOB4, "ACK")
    # the callee hangs up: the BYE reaches the phone back through its NAT64 flow
    bye = request(gw.send(bob, bob.in_dialog("BYE", bob.dialogs[invite.call_id])), nat64_out,
                  "BYE")
    assert str(bye.uri) == phone.contact.strip("<>")
    assert bye.vias[0].host == "[64:ff9b::cb00:7101]"


def test_nat64_synthesised_target_is_reached_on_its_ipv4() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@[64:ff9b::203.0.113.2]", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    assert_request_for(bob, got)


def test_tcp_in_udp_out_and_responses_back_on_the_connection() -> None:
    gw = Gateway()
    alice = Phone("alice", Endpoint.parse("[2001:db8:6::2]:45678"), transport="tcp")
    bob = Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    sends = gw.send(alice, invite)
    assert [s.transport for s in sends] == ["tcp", "udp"]
    got = request(sends, BOB4, "INVITE")
    assert got.get_all("Record-Route") == ["<sip:203.0.113.1:5060;lr;r2=on>",
                                           "<sip:[2001:db8:6::1]:5060;transport=tcp;lr;r2=on>"]
    sends = gw.send(bob, bob.reply(got, 486))
    assert [(s.dest, s.transport) for s in sends if s.dest == alice.addr] == [
        (alice.addr, "tcp")]
    # TCP transactions do not retransmit
    assert gw.advance(1.0) == []


def test_tcp_connection_failure_fails_the_branch_at_once() -> None:
    """RFC 3261 §8.1.3.1, §17.1.4: no waiting for Timer B; with no other target to try
    (RFC 3263 §4.3) the caller gets our 503."""
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.2;transport=tcp", sdp(ALICE6.host, 40000))
    sends = gw.send(alice, invite)
    assert [(s.dest, s.transport) for s in sends if s.dest != ALICE6] == [(BOB4, "tcp")]
    assert gw.media.sessions()
    assert gw.proxy.transport_error(Endpoint.parse("203.0.113.9:5060"), "tcp", gw.now) == []
    assert gw.proxy.transport_error(BOB4, "udp", gw.now) == []
    sends = gw.proxy.transport_error(BOB4, "tcp", gw.now)
    final = response(sends, ALICE6, 503)
    assert final.cseq == (1, "INVITE") and final.to.tag
    assert gw.media.sessions() == []
    # nothing more to bob, no late 408: only the 503's retransmissions (UDP, no ACK)
    assert {(s.dest, s.data[:12]) for s in gw.advance(40.0)} == {(ALICE6, b"SIP/2.0 503 ")}


def test_malformed_requests_get_400_and_the_next_call_completes() -> None:
    gw = Gateway()
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    good = invite.to_bytes()
    rng = random.Random(3)
    mutations = [
        lambda b: b.replace(b"CSeq: 1 INVITE", b"CSeq: x INVITE"),
        lambda b: b.replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE"),
        lambda b: re.sub(rb"Call-ID: [^\r]*\r\n", b"", b),
        lambda b: b.replace(b"From: <sip:alice", b"From: <sip:al ice"),
        lambda b: b.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1),
        lambda b: b.replace(b"To: <sip:bob@203.0.113.2>", b"To: <sip:bob@2001:db8::1>"),
        lambda b: b.replace(b"Max-Forwards: 70", b"Max-Forwards: many"),
        lambda b: b.replace(b"Content-Length: ", b"Content-Length: 9"),
        lambda b: b.replace(b"\r\n\r\n", b"\r\nBad Header Line\r\n\r\n", 1),
        lambda b: b.replace(b"Via: SIP/2.0/UDP", b"Via: SIP/2.0/UDP ,"),
        lambda b: b[: rng.randrange(10, len(b))],
        lambda b: bytes(c if rng.random() > 0.01 else rng.randrange(256) for c in b),
    ]
    answered = dropped = 0
    for i in range(200):
        data = mutations[i % len(mutations)](good.replace(b"call-alice", f"m{i}-".encode()))
        sends = gw.send(alice, data)
        for s in sends:
            if not s.data.startswith(b"SIP/2.0 "):
                assert s.dest == BOB4  # still valid enough to forward
                continue
            # the 400 carries the request's Via/From/To/Call-ID/CSeq where they were
            # valid, and parses itself
            reply = parse_message(s.data)
            assert isinstance(reply, SipResponse)
            status = reply.status
            assert s.dest == ALICE6
            if status >= 400:
                answered += 1
                assert status in (400, 413, 505), s.data
        dropped += not sends
    assert answered > 100 and dropped < 100
    # the media layer did not keep anything for the broken calls... except those that
    # were valid enough to forward; end them
    for session in gw.media.sessions():
        gw.media.remove(session.id, now=gw.now)
    call(gw, alice, bob)


def test_asyncio_edge_udp_v6_in_tcp_v4_out_on_loopback(run_loop: Callable[..., Any]) -> None:
    """The socket adapter: a UDP/IPv6 caller, a TCP/IPv4 callee, real loopback sockets."""

    def free_port() -> int:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s4:
            s6.bind(("::1", 0))
            port = s6.getsockname()[1]
            s4.bind(("127.0.0.1", port))
            return int(port)

    async def scenario() -> list[bytes]:
        port = free_port()
        sip4, sip6 = Endpoint.parse(f"127.0.0.1:{port}"), Endpoint.parse(f"[::1]:{port}")
        media = SessionManager(pools={4: RelayPortPool(sip4.host, 31000, 31099),
                                      6: RelayPortPool(sip6.host, 31000, 31099)})
        proxy = SipProxy(ProxyConfig(sip={4: sip4, 6: sip6}), media, random.Random(5))
        server = await start_sip(proxy, [sip4, sip6])
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[bytes] = asyncio.Queue()
        callee_seen: asyncio.Future[bytes] = loop.create_future()

        async def callee(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            invite = parse_message(head + await reader.readexactly(length))
            assert isinstance(invite, SipRequest)
            callee_seen.set_result(invite.to_bytes())
            bob = Phone("bob", Endpoint.parse("127.0.0.1:1"), transport="tcp")
            writer.write(bob.reply(invite, 200, sdp(sip4.host, 50000)).to_bytes())
            await writer.drain()

        bob_server = await asyncio.start_server(callee, "127.0.0.1", 0)
        bob_port = bob_server.sockets[0].getsockname()[1]

        class Caller(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                got.put_nowait(data)

        udp, _ = await loop.create_datagram_endpoint(Caller, local_addr=("::1", 0))
        alice = Phone("alice", _endpoint(udp.get_extra_info("sockname")))
        invite, _ = alice.invite(f"sip:bob@127.0.0.1:{bob_port};transport=tcp",
                                 sdp(IPv6Address("::1"), 40000))
        udp.sendto(invite.to_bytes(), ("::1", port))
        try:
            replies = [await asyncio.wait_for(got.get(), 5) for _ in range(2)]
            forwarded = await asyncio.wait_for(callee_seen, 5)
        finally:
            udp.close()
            server.close()
            bob_server.close()
        return [*replies, forwarded]

    trying, ok, forwarded = run_loop(scenario())
    assert trying.startswith(b"SIP/2.0 100 ") and ok.startswith(b"SIP/2.0 200 ")
    assert b"Via: SIP/2.0/TCP 127.0.0.1:" in forwarded
    assert b"c=IN IP6 ::1" in ok


def test_asyncio_edge_refused_tcp_fails_the_call_at_once_and_idle_tcp_is_closed(
    run_loop: Callable[..., Any],
) -> None:
    """A TCP callee that refuses the connection: the caller has its final response
    within a second (not after Timer B). Connections left idle are closed."""

    def free_port(kind: int) -> int:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    async def scenario() -> tuple[list[bytes], float, bool, bool]:
        port = free_port(socket.SOCK_DGRAM)
        sip4 = Endpoint.parse(f"127.0.0.1:{port}")
        media = SessionManager(pools={4: RelayPortPool(sip4.host, 31100, 31199)})
        proxy = SipProxy(ProxyConfig(sip={4: sip4}), media, random.Random(6))
        server = await start_sip(proxy, [sip4])
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[bytes] = asyncio.Queue()

        class Caller(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
                got.put_nowait(data)

        udp, _ = await loop.create_datagram_endpoint(Caller, local_addr=("127.0.0.1", 0))
        alice = Phone("alice", _endpoint(udp.get_extra_info("sockname")))
        closed = free_port(socket.SOCK_STREAM)  # nothing listens there
        invite, _ = alice.invite(f"sip:bob@127.0.0.1:{closed};transport=tcp",
                                 sdp(IPv4Address("127.0.0.1"), 40000))
        started = loop.time()
        udp.sendto(invite.to_bytes(), ("127.0.0.1", port))
        try:
            replies = [await asyncio.wait_for(got.get(), 5) for _ in range(2)]
            elapsed = loop.time() - started
            # a phone's connection, then idle past the limit
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            # the refused outgoing connection may still be listed: wait (bounded) for the
            # phone's own, the state the test means, rather than count connections
            phone = _endpoint(writer.get_extra_info("sockname"))

            async def accepted() -> None:
                while phone not in server.connections:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(accepted(), 5)
            conn = server.connections[phone]
            server.sweep_idle()
            kept = not conn.transport.is_closing()  # type: ignore[union-attr]
            conn.active -= server.idle_accepted + 1
            server.sweep_idle()
            idle_closed = conn.transport.is_closing()  # type: ignore[union-attr]
            writer.close()
        finally:
            udp.close()
            server.close()
        return replies, elapsed, kept, idle_closed

    (trying, final), elapsed, kept, idle_closed = run_loop(scenario())
    assert trying.startswith(b"SIP/2.0 100 ") and final.startswith(b"SIP/2.0 503 ")
    assert elapsed < 1.0
    assert kept and idle_closed


def test_same_family_call_gets_one_record_route_and_no_mapping() -> None:
    gw = Gateway()
    alice, carol = Phone("alice", ALICE6), Phone("carol", Endpoint.parse("[2001:db8:6::3]:5060"))
    invite, _ = alice.invite("sip:carol@[2001:db8:6::3]", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), carol.addr, "INVITE")
    assert got.get_all("Record-Route") == ["<sip:[2001:db8:6::1]:5060;lr>"]
    assert got.get("Contact") == alice.contact
    assert sdp_lines(got.body, "c=") == ["c=IN IP6 2001:db8:6::1"]  # anchored on the relay


def test_timer_c_cancels_a_ringing_branch() -> None:
    gw = Gateway(timer_c=181.0)
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    gw.send(bob, bob.reply(got, 180))
    assert to(gw.advance(180.0), BOB4) == []
    cancel = request(gw.advance(1.2), BOB4, "CANCEL")
    gw.send(bob, bob.reply(cancel, 200))
    assert response(gw.send(bob, bob.reply(got, 487)), ALICE6, 487)
    assert gw.media.sessions() == []


def test_timer_c_on_a_silent_branch_is_a_408_and_no_cancel() -> None:
    """§16.8: without a provisional response the branch counts as a 408 (a CANCEL may
    only follow a provisional, §9.1; it does if one still comes)."""
    gw = Gateway(timer_c=10.0)
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2", sdp(ALICE6.host, 40000))
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    sends = gw.advance(10.0)
    assert response(sends, ALICE6, 408)
    assert [m for m in to(sends, BOB4) if isinstance(m, SipRequest) and m.method != "INVITE"] \
        == []  # INVITE retransmissions only
    assert gw.media.sessions() == []
    assert request(gw.send(bob, bob.reply(got, 180)), BOB4, "CANCEL")


def test_from_to_mapping_is_reversible() -> None:
    gw = Gateway(map_from_to=True)
    alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
    invite, _ = alice.invite("sip:bob@203.0.113.2:5060", sdp(ALICE6.host, 40000))
    original_from = invite.get("From")
    got = request(gw.send(alice, invite), BOB4, "INVITE")
    assert uri_family(got.get("From") or "") == 4 and ";xlat=" in (got.get("From") or "")
    assert got.from_.tag == invite.from_.tag
    ok = response(gw.send(bob, bob.reply(got, 200, sdp(BOB4.host, 50000))), ALICE6, 200)
    assert ok.get("From") == original_from  # restored for the caller's dialog matching


def test_strict_router_request_uri_naming_us_is_replaced_by_the_last_route() -> None:
    gw = Gateway()
    bob = Phone("bob", BOB4)
    dialog = Dialog("c-strict", "b1", "a1", "sip:bob@203.0.113.2", "sip:alice@x",
                    "sip:203.0.113.1:5060;lr", ["<sip:alice@[2001:db8:6::2]:5060>"])
    bye = bob.request("BYE", "sip:203.0.113.1:5060;lr", dialog=dialog)
    got = request(gw.send(bob, bye), ALICE6, "BYE")
    assert str(got.uri) == "sip:alice@[2001:db8:6::2]:5060" and got.get_all("Route") == []


def test_two_forks_answer_both_2xx_reach_the_caller_with_their_own_relays() -> None:
    gw = registrar()
    alice = Phone("alice", ALICE6)
    desk, soft = Phone("bob", BOB4), Phone("bob", Endpoint.parse("203.0.113.3:5060"))
    for i, phone in enumerate((desk, soft)):
        reg = phone.request("REGISTER", "sip:203.0.113.1", dialog=Dialog(
            f"r{i}", "r", None, "sip:bob@203.0.113.1", "sip:bob@203.0.113.1",
            "sip:203.0.113.1", []))
        authorized(gw, phone, reg)
    invite, _ = alice.invite("sip:bob@203.0.113.1", sdp(ALICE6.host, 40000))
    sends = authorized(gw, alice, invite)
    oks = []
    for i, phone in enumerate((desk, soft)):
        got = request(sends, phone.addr, "INVITE")
        answer = phone.reply(got, 200, sdp(phone.addr.host, 50000 + i), tag=f"fork{i}")
        oks.append(response(gw.send(phone, answer), ALICE6, 200))
    relays = [relay_of(ok.body) for ok in oks]
    assert relays[0] != relays[1] and {r.family for r in relays} == {6}
    assert gw.datapath.flows[relays[1]].to == Endpoint(soft.addr.host, 50001)


def test_phone_registered_through_nat64_is_called_through_its_flow() -> None:
    gw = registrar()
    flow = Endpoint.parse("198.51.100.7:41000")
    carol = Phone("carol", flow, via_host="[2001:db8:77::5]")
    reg = carol.request("REGISTER", "sip:203.0.113.1", dialog=Dialog(
        "r-carol", "r", None, "sip:carol@203.0.113.1", "sip:carol@203.0.113.1",
        "sip:203.0.113.1", []))
    assert response(authorized(gw, carol, reg), flow, 200)
    bob = Phone("bob", BOB4)
    invite, dialog = bob.invite("sip:carol@203.0.113.1", sdp(BOB4.host, 50000))
    got = request(authorized(gw, bob, invite, dialog=dialog), flow, "INVITE")
    assert str(got.uri) == carol.contact.strip("<>")  # its own IPv6 address
    assert got.get_all("Record-Route")[0] == "<sip:[64:ff9b::cb00:7101]:5060;lr;r2=on>"
    assert got.contacts[0].uri.host == "[64:ff9b::cb00:7101]"  # type: ignore[union-attr]
    assert sdp_lines(got.body, "c=") == ["c=IN IP6 64:ff9b::cb00:7101"]
    ok = response(gw.send(carol, carol.reply(got, 200, sdp(IPv6Address("2001:db8:77::5"),
                                                            4000))), BOB4, 200)
    assert_response_for(bob, ok)
    bob.answered(dialog, ok)
    assert request(gw.send(bob, bob.in_dialog("ACK", dialog)), flow, "ACK")
    sends = gw.send(bob, bob.in_dialog("BYE", dialog))
    bye = request(sends, flow, "BYE")  # it travels over IPv4 to the NAT64...
    assert sends[-1].local == GW4
    assert bye.vias[0].host == "[64:ff9b::cb00:7101]"  # ...and is answered over IPv6


def test_decline_from_one_fork_cancels_the_others_and_503_becomes_500() -> None:
    gw = registrar()
    alice = Phone("alice", ALICE6)
    phones = [Phone("bob", BOB4), Phone("bob", Endpoint.parse("203.0.113.3:5060"))]
    for i, phone in enumerate(phones):
        authorized(gw, phone, phone.request("REGISTER", "sip:203.0.113.1", dialog=Dialog(
            f"r{i}", "r", None, "sip:bob@203.0.113.1", "sip:bob@203.0.113.1",
            "sip:203.0.113.1", [])))
    invite, _ = alice.invite("sip:bob@203.0.113.1", sdp(ALICE6.host, 40000))
    sends = authorized(gw, alice, invite)
    got = [request(sends, p.addr, "INVITE") for p in phones]
    gw.send(phones[0], phones[0].reply(got[0], 180))
    sends = gw.send(phones[1], phones[1].reply(got[1], 603))
    assert request(sends, phones[0].addr, "CANCEL") and to(sends, ALICE6) == []
    sends = gw.send(phones[0], phones[0].reply(got[0], 487))
    assert response(sends, ALICE6, 603)  # a 6xx beats the 487
    assert gw.media.sessions() == []
    # every branch failing with 503 gives the caller a 500 (§16.7 step 6)
    invite, _ = alice.invite("sip:bob@203.0.113.1", sdp(ALICE6.host, 40002))
    sends = authorized(gw, alice, invite)
    for phone in phones:
        out = gw.send(phone, phone.reply(request(sends, phone.addr, "INVITE"), 503))
    assert response(out, ALICE6, 500)


def test_crlf_keepalives_are_ignored() -> None:
    gw = Gateway()
    assert gw.send(Phone("alice", ALICE6), b"\r\n\r\n") == []


def test_malformed_request_reply_carries_the_parser_reason_and_status_hint() -> None:
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.2")
    data = invite.to_bytes()
    (bad_cseq,) = gw.send(alice, data.replace(b"CSeq: 1 INVITE", b"CSeq: x INVITE"))
    assert bad_cseq.data.startswith(b"SIP/2.0 400 bad CSeq: 'x INVITE'\r\n")
    assert b"\r\nVia: SIP/2.0/UDP [2001:db8:6::2]:5060;" in bad_cseq.data
    assert bad_cseq.dest == ALICE6 and bad_cseq.local == GW6
    (version,) = gw.send(alice, data.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
    assert version.data.startswith(b"SIP/2.0 505 ")
    # a malformed response, an ACK, or a request without a usable Via: dropped
    assert gw.send(alice, b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n") == []
    assert gw.send(alice, data.replace(b"INVITE sip", b"ACK sip", 1)
                   .replace(b"CSeq: 1 INVITE", b"CSeq: x")) == []
    assert gw.send(alice, re.sub(rb"Via: [^\r]*\r\n", b"", data)) == []


def test_one_contact_is_mapped_for_each_family_it_is_shown_to() -> None:
    """The gateway keeps the mapping of a Contact it has seen: the same Contact shown to
    an IPv4 party and to an IPv6 party must still come out right for each."""
    gw = Gateway()
    alice = Phone("alice", ALICE6)
    bob4, carol6 = Phone("bob", BOB4), Phone("carol", Endpoint.parse("[2001:db8:6::3]:5060"))
    for callee in (bob4, carol6, bob4):
        uri = f"sip:{callee.name}@{format_host(callee.addr.host)}:{callee.addr.port}"
        invite, _ = alice.invite(uri, sdp(alice.addr.host, 40000))
        (contact,) = request(gw.send(alice, invite), callee.addr, "INVITE").get_all("Contact")
        if callee is carol6:
            assert contact == alice.contact  # same family: untouched
        else:
            assert uri_family(contact) == 4 and ";xlat=" in contact
            assert contact.startswith(f"<sip:alice@{GW4}")


def test_asyncio_edge_keeps_its_timer_when_the_next_deadline_moves_later(
    run_loop: Callable[..., Any],
) -> None:
    """The edge arms one loop timer at the proxy's next deadline and re-arms only for an
    earlier one: a later deadline lets it fire early, find nothing due, and re-arm."""

    async def scenario() -> None:
        gw = Gateway(timers=Timers(t1=0.3))  # Timer A: 0.3 s
        server = SipServer(gw.proxy, asyncio.get_running_loop())
        alice, bob = Phone("alice", ALICE6), Phone("bob", BOB4)
        uri = f"sip:bob@{BOB4}"
        try:
            first, _ = alice.invite(uri, sdp(alice.addr.host, 40000))
            server.received(first.to_bytes(), alice.addr, GW6, "udp")  # Timer A of its branch
            # the edge keeps the deadline itself: uvloop's when() is rounded to a ms
            armed, armed_at = server._timer, server._timer_at
            assert armed is not None and armed_at == gw.proxy.next_deadline()
            await asyncio.sleep(0.05)
            second, _ = alice.invite(uri, sdp(alice.addr.host, 40002))
            server.received(second.to_bytes(), alice.addr, GW6, "udp")
            assert server._timer is armed  # a later deadline: nothing to do
            # the first branch's 180 stops its Timer A: the next deadline is the second's
            branch = next(b for b in gw.proxy._clients.values() if b.request.call_id ==
                          first.call_id)
            ringing = bob.reply(branch.request, 180)
            server.received(ringing.to_bytes(), bob.addr, GW4, "udp")
            later = gw.proxy.next_deadline()
            assert server._timer is armed and later is not None and armed_at < later
            await asyncio.sleep(armed_at - asyncio.get_running_loop().time() + 0.005)
            assert server._timer is not armed and server._timer is not None
            assert server._timer_at == later  # fired early, re-armed where due
        finally:
            server.close()

    run_loop(scenario())


# ---- the registrar cannot be hijacked ---------------------------------------------------


def _register(phone: Phone, user: str | None = None, contact: str | None = None,
              uri: str = "sip:203.0.113.1") -> SipRequest:
    user = user or phone.name
    aor = f"sip:{user}@203.0.113.1"
    reg = phone.request("REGISTER", uri, dialog=Dialog(
        phone._next("reg-"), "r", None, aor, aor, uri, []), extra=(("Expires", "600"),))
    if contact is not None:
        reg.replace_values("Contact", [contact])
    return reg


def _shape(sends: list[Send], dest: Endpoint) -> list[tuple[int, list[str]]]:
    """What a scanner learns from the answers: status and header names and values
    but for the tags, branches and nonces that differ on every request (and the
    fields that echo its own request)."""
    out = []
    for m in to(sends, dest):
        assert isinstance(m, SipResponse)
        values = [re.sub(r'(tag|nonce|branch)=("[^"]*"|[^;,>]+)', r"\1=X", f"{h.name}: {h.value}")
                  for h in m.headers if h.key not in ("call-id", "from", "to", "via", "cseq")]
        out.append((m.status, values))
    return out


def test_the_registrar_is_off_unless_configured() -> None:
    gw = Gateway()
    bob = Phone("bob", BOB4)
    ok = response(gw.send(bob, _register(bob)), BOB4, 403)
    assert ok.reason == "Registrar disabled"
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.1", sdp(ALICE6.host, 40000))
    assert response(gw.send(alice, invite), ALICE6, 404)
    with pytest.raises(ValueError, match="not both"):
        ProxyConfig(sip={4: GW4}, users=lambda: CREDENTIALS,
                    registrar_upstream=SipUri.parse("sip:203.0.113.9"))


def test_register_needs_the_users_own_credentials() -> None:
    gw = registrar()
    bob = Phone("bob", BOB4)
    challenge = response(gw.send(bob, _register(bob)), BOB4, 401)
    offered = challenge.get_all("WWW-Authenticate")
    # RFC 8760 §2.4: one challenge per algorithm, SHA-256 first; qop=auth
    assert [re.search(r"algorithm=([\w-]+)", c).group(1) for c in offered] == [  # type: ignore[union-attr]
        "SHA-256", "MD5"]
    assert all('realm="gw.example"' in c and 'qop="auth"' in c for c in offered)
    assert gw.proxy.registrar.lookup("bob", now=gw.now) == []  # nothing bound yet
    for algorithm in ("MD5", "SHA-256"):
        response(authorized(gw, bob, _register(bob), algorithm=algorithm), BOB4, 200)
    assert len(gw.proxy.registrar.lookup("bob", now=gw.now)) == 1
    # a wrong password, someone else's credentials: nothing bound
    carol = Phone("carol", Endpoint.parse("203.0.113.7:5060"))
    response(authorized(gw, carol, _register(carol, "carol"), password="guess"), carol.addr, 401)
    refused = response(authorized(gw, carol, _register(carol, "bob"), user="carol"),
                       carol.addr, 403)
    assert refused.reason == "Credentials are for another user"
    assert [b.source for b in gw.proxy.registrar.lookup("bob", now=gw.now)] == [BOB4]
    assert gw.proxy.registrar.lookup("carol", now=gw.now) == []


def test_a_captured_authorization_cannot_be_replayed_and_nonces_expire() -> None:
    gw = registrar()
    bob = Phone("bob", BOB4)
    challenge = response(gw.send(bob, _register(bob)), BOB4, 401)
    reg = _register(bob)
    value = credentials(challenge.get_all("WWW-Authenticate")[0], "bob", "bob-pw", "REGISTER",
                        str(reg.uri))
    reg.insert(len(reg.headers), "Authorization", value)
    response(gw.send(bob, reg), BOB4, 200)
    replay = _register(Phone("bob", Endpoint.parse("198.51.100.66:5060")))
    replay.insert(len(replay.headers), "Authorization", value)  # same nonce, same nc
    attacker = Endpoint.parse("198.51.100.66:5060")
    assert response(gw.proxy.receive(replay.to_bytes(), attacker, GW4, "udp", gw.now),
                    attacker, 401)
    # the nonce, with a higher nonce-count, after its lifetime: stale, challenged again
    gw.advance(301)
    late = _register(bob)
    late.insert(len(late.headers), "Authorization", credentials(
        challenge.get_all("WWW-Authenticate")[0], "bob", "bob-pw", "REGISTER", str(late.uri),
        nc=2))
    stale = response(gw.send(bob, late), BOB4, 401)
    assert all("stale=true" in c for c in stale.get_all("WWW-Authenticate"))
    assert [b.source for b in gw.proxy.registrar.lookup("bob", now=gw.now)] == [BOB4]


def test_a_contact_naming_the_gateway_is_refused() -> None:
    """svwar's takeover: REGISTER extension N with a Contact at the gateway itself."""
    gw = registrar(domains=("gw.example",))
    bob = Phone("bob", BOB4)
    for contact in ("<sip:bob@203.0.113.1:5060>", "<sip:bob@[2001:db8:6::1]>",
                    "<sip:bob@gw.example>", "<sip:bob@[64:ff9b::cb00:7101]:5060>"):
        refused = response(gw.send(bob, _register(bob, contact=contact)), BOB4, 403)
        assert refused.reason == "Contact names this gateway"
    assert gw.proxy.registrar.lookup("bob", now=gw.now) == []


def test_unknown_and_registered_users_get_the_same_answer_until_authenticated() -> None:
    gw = registrar(domains=("gw.example",))
    bob = Phone("bob", BOB4)
    response(authorized(gw, bob, _register(bob)), BOB4, 200)
    scanner = Phone("scan", Endpoint.parse("[2001:db8:6::66]:5060"))
    answers = {}
    for user in ("bob", "nobody", "alice"):  # registered, unknown, known but not registered
        for method in ("INVITE", "OPTIONS"):
            uri = f"sip:{user}@gw.example"
            req, _ = scanner.invite(uri, sdp(scanner.addr.host, 40000) if method == "INVITE"
                                    else b"")
            if method == "OPTIONS":
                req = scanner.request("OPTIONS", uri, dialog=Dialog(
                    scanner._next("o-"), "t", None, "sip:scan@x", uri, uri, []))
            answers[user, method] = _shape(gw.send(scanner, req), scanner.addr)
        # and a REGISTER for the user: the same 401 whether it exists or not
        answers[user, "REGISTER"] = _shape(gw.send(scanner, _register(scanner, user)),
                                           scanner.addr)
    for method in ("INVITE", "OPTIONS", "REGISTER"):
        assert answers["bob", method] == answers["nobody", method] == answers["alice", method]
    assert [s for s, _ in answers["bob", "INVITE"]] == [100, 407]
    assert [s for s, _ in answers["bob", "OPTIONS"]] == [407]
    assert [s for s, _ in answers["bob", "REGISTER"]] == [401]
    assert bob.addr not in {s.dest for s in gw.advance(1.0)}  # nothing reached bob
    assert gw.media.sessions() == []


def test_a_route_next_hop_is_trusted_and_our_credentials_are_not_forwarded() -> None:
    pbx = Endpoint.parse("203.0.113.9:5060")
    gw = registrar(routes=(("*", SipUri.parse("sip:203.0.113.9")),))
    bob = Phone("bob", BOB4)
    response(authorized(gw, bob, _register(bob)), BOB4, 200)
    trunk = Phone("pstn", pbx)
    invite, _ = trunk.invite("sip:bob@203.0.113.1", sdp(pbx.host, 41000))
    assert request(gw.send(trunk, invite), BOB4, "INVITE")  # no challenge for the PBX
    alice = Phone("alice", ALICE6)
    invite, _ = alice.invite("sip:bob@203.0.113.1", sdp(ALICE6.host, 40000))
    invite.insert(len(invite.headers), "Proxy-Authorization",
                  'Digest username="x", realm="other.example", nonce="n", uri="u", response="r"')
    got = request(authorized(gw, alice, invite), BOB4, "INVITE")
    assert got.get_all("Proxy-Authorization") == [  # §22.3: another realm's stays
        'Digest username="x", realm="other.example", nonce="n", uri="u", response="r"']


def test_register_goes_upstream_with_a_path_and_calls_come_back_through_us() -> None:
    """RFC 3327: a PBX behind the gateway is the registrar; xlat binds nothing."""
    pbx = Endpoint.parse("203.0.113.9:5060")
    gw = Gateway(registrar_upstream=SipUri.parse("sip:203.0.113.9"))
    alice = Phone("alice", ALICE6)  # an IPv6 phone registering with an IPv4 PBX
    reg = alice.request("REGISTER", "sip:[2001:db8:6::1]", dialog=Dialog(
        "r-up", "r", None, "sip:alice@[2001:db8:6::1]", "sip:alice@[2001:db8:6::1]",
        "sip:[2001:db8:6::1]", []))
    up = request(gw.send(alice, reg), pbx, "REGISTER")
    assert up.get_all("Path") == ["<sip:203.0.113.1:5060;lr>"]  # us, in the PBX's family
    mapped = up.contacts[0].uri
    assert isinstance(mapped, SipUri) and mapped.host == "203.0.113.1"  # reachable by the PBX
    pbx_phone = Phone("pbx", pbx)
    ok = response(gw.send(pbx_phone, pbx_phone.reply(up, 200)), ALICE6, 200)
    assert ok.status == 200 and gw.proxy.registrar.lookup("alice", now=gw.now) == []
    # the PBX calls the registered contact with the Path as its Route
    invite = pbx_phone.request("INVITE", str(mapped), dialog=Dialog(
        "c-up", "p", None, "sip:pbx@203.0.113.9", str(mapped), str(mapped),
        ["<sip:203.0.113.1:5060;lr>"]), body=sdp(pbx.host, 42000))
    got = request(gw.send(pbx_phone, invite), ALICE6, "INVITE")
    assert str(got.uri) == alice.contact.strip("<>")
