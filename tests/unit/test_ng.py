"""NgCore driven like Kamailio drives rtpengine: bencoded datagrams in, replies out,
over a real SessionManager whose datapath changes land in a FakeDatapath."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import fastbencode
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xlat.addr import Endpoint
from xlat.control.bencode import BencodeError, decode, encode
from xlat.control.ng import READ_BATCH, NgCore, start_ng
from xlat.media.datapath import CompositeDatapath, FakeDatapath, FlowCounters
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sdp import parse_sdp

RELAY4 = IPv4Address("203.0.113.1")
RELAY6 = IPv6Address("2001:db8:6::1")

V6_OFFER = (
    b"v=0\r\n"
    b"o=- 20018 20018 IN IP6 2001:db8:6::2\r\n"
    b"s=-\r\n"
    b"c=IN IP6 2001:db8:6::2\r\n"
    b"t=0 0\r\n"
    b"a=ice-ufrag:0e8b6a21\r\n"
    b"a=ice-pwd:31ec21eb38b2ec6d36e8dc7b\r\n"
    b"m=audio 11800 RTP/AVP 0 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=candidate:1 1 UDP 2130706431 2001:db8:6::2 11800 typ host\r\n"
    b"a=sendrecv\r\n"
)
V4_ANSWER = (
    b"v=0\r\n"
    b"o=- 77 77 IN IP4 203.0.113.2\r\n"
    b"s=-\r\n"
    b"c=IN IP4 203.0.113.2\r\n"
    b"t=0 0\r\n"
    b"m=audio 20000 RTP/AVP 0\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)
V4_OFFER_MUX = V4_ANSWER + b"a=rtcp-mux\r\n"


class Rig:
    """A core over a real manager; every request's datapath batch goes to a fake."""

    def __init__(self, max_port: int = 30999, **core_kw: Any) -> None:
        self.manager = SessionManager(
            pools={
                4: RelayPortPool(RELAY4, 30000, max_port),
                6: RelayPortPool(RELAY6, 30000, max_port),
            },
            idle_timeout=60.0,
            delete_delay=10.0,
        )
        self.datapath = FakeDatapath()
        self.core = NgCore(self.manager, counters=self.lookup, **core_kw)
        self.now = 100.0
        self.cookies = 0

    @property
    def datapath(self) -> FakeDatapath:
        (fake,) = self.composite.forwarders
        assert isinstance(fake, FakeDatapath)
        return fake

    @datapath.setter
    def datapath(self, fake: FakeDatapath) -> None:  # a restarted daemon keeps the kernel's
        self.composite = CompositeDatapath([fake])  # as the daemon drives it

    def lookup(self, matches: Sequence[Endpoint]) -> Mapping[Endpoint, FlowCounters]:
        return self.composite.counters(matches)

    def apply(self) -> None:
        self.composite.apply(self.manager.drain())

    def raw(self, datagram: bytes, source: str = "127.0.0.1:5000") -> bytes | None:
        reply = self.core.handle(datagram, source, self.now)
        self.apply()
        return reply

    def send(self, fields: dict[str, Any], cookie: str | None = None) -> dict[str, Any]:
        if cookie is None:
            self.cookies += 1
            cookie = f"{self.cookies}_1"
        reply = self.raw(cookie.encode() + b" " + bencode(fields))
        assert reply is not None
        head, _, body = reply.partition(b" ")
        assert head == cookie.encode()
        reply_fields: dict[str, Any] = strings(fastbencode.bdecode(body))  # canonical bencode
        return reply_fields

    def offer(self, sdp: bytes = V6_OFFER, /, **extra: Any) -> dict[str, Any]:
        fields = {"command": "offer", "call-id": "c1", "from-tag": "ft", "sdp": sdp}
        return self.send({**fields, **extra})

    def answer(self, sdp: bytes = V4_ANSWER, /, **extra: Any) -> dict[str, Any]:
        fields = {"command": "answer", "call-id": "c1", "from-tag": "ft", "to-tag": "tt",
                  "sdp": sdp}
        return self.send({**fields, **extra})


def bencode(value: object) -> bytes:
    """Canonical (sorted) bencode of a test request with str keys."""
    def conv(v: object) -> object:
        if isinstance(v, dict):
            return {k.encode(): conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v.encode() if isinstance(v, str) else v
    return bytes(fastbencode.bencode(conv(value)))


def strings(value: Any) -> Any:
    """Decoded reply with text as str, except the SDP which stays bytes."""
    if isinstance(value, dict):
        return {k.decode(): (v if k == b"sdp" else strings(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [strings(v) for v in value]
    return value.decode() if isinstance(value, bytes) else value


def relay_of(sdp: object) -> Endpoint:
    assert isinstance(sdp, bytes)
    media = parse_sdp(sdp).media[0]
    assert media.address is not None
    return Endpoint(media.address, media.port)


# ---- offer / answer / delete ---------------------------------------------------------


def test_offer_answer_delete_round_trip() -> None:
    rig = Rig()
    offer = rig.offer(direction=["v6", "v4"], ICE="remove",
                      replace=["origin", "session-connection"])
    assert offer["result"] == "ok" and "warning" not in offer
    sdp = offer["sdp"]
    assert isinstance(sdp, bytes)
    to_callee = relay_of(sdp)
    assert to_callee.host == RELAY4 and 30000 <= to_callee.port <= 30999
    assert b"o=- 20018 20018 IN IP4 203.0.113.1\r\n" in sdp
    assert b"c=IN IP4 203.0.113.1\r\n" in sdp
    assert b"ice-" not in sdp and b"candidate" not in sdp
    # untouched lines go out byte for byte
    assert b"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n" in sdp

    answer = rig.answer()
    assert answer["result"] == "ok"
    to_caller = relay_of(answer["sdp"])
    assert to_caller.host == RELAY6
    assert b"o=- 77 77 IN IP6 2001:db8:6::1\r\n" in answer["sdp"]

    flows = rig.datapath.flows
    caller, callee = Endpoint.parse("[2001:db8:6::2]:11800"), Endpoint.parse("203.0.113.2:20000")
    assert flows[to_caller].to == callee and flows[to_caller].source == to_callee
    assert flows[to_callee].to == caller and flows[to_callee].source == to_caller
    assert len(flows) == 4  # RTP and RTCP, each way
    (session,) = rig.manager.sessions()
    assert session.origin == "ng" and session.call_id == "c1"

    deleted = rig.send({"command": "delete", "call-id": "c1", "from-tag": "ft"})
    assert deleted["result"] == "ok" and "warning" not in deleted
    assert session.state == "deleting"
    rig.manager.expire(rig.now + 10.5, rig.lookup)
    rig.apply()
    assert rig.manager.sessions() == [] and rig.datapath.flows == {}


def test_delete_delay_zero_ends_at_once() -> None:
    rig = Rig()
    rig.offer(direction=["v6", "v4"])
    rig.answer()
    reply = rig.send({"command": "delete", "call-id": "c1", "from-tag": "ft",
                      "delete delay": 0})
    assert reply["result"] == "ok"
    assert rig.manager.sessions() == [] and rig.datapath.flows == {}


def test_repeated_cookie_gets_cached_reply_without_second_action() -> None:
    rig = Rig()
    datagram = b"42_7 " + bencode({"command": "offer", "call-id": "c1", "from-tag": "ft",
                                   "sdp": V6_OFFER, "address family": "IP4"})
    first = rig.raw(datagram)
    calls = rig.datapath.calls
    assert rig.raw(datagram) == first
    assert rig.core.retransmits == 1 and rig.datapath.calls == calls
    # the same cookie with another body is still the retransmission of the first
    assert rig.raw(b"42_7 " + bencode({"command": "ping"})) == first
    # from another source it is another request
    other = rig.raw(b"42_7 " + bencode({"command": "ping"}), source="127.0.0.1:5001")
    assert other == b"42_7 d6:result4:ponge"


def test_cookie_cache_expires_and_is_bounded() -> None:
    rig = Rig(cache_ttl=30.0, cache_entries=2)
    ping = bencode({"command": "ping"})
    listing = bencode({"command": "list"})
    assert rig.raw(b"a " + ping) == b"a d6:result4:ponge"
    rig.now += 31.0
    assert rig.raw(b"a " + listing) == b"a d5:callsle6:result2:oke"  # acted anew
    rig.raw(b"b " + ping)
    rig.raw(b"c " + ping)  # evicts "a"
    assert rig.raw(b"a " + ping) == b"a d6:result4:ponge"


def test_forking_gives_each_to_tag_its_own_leg() -> None:
    rig = Rig()
    rig.offer(direction=["v6", "v4"])
    first = rig.answer()
    second = rig.answer(sdp=V4_ANSWER.replace(b"203.0.113.2", b"203.0.113.3"), **{"to-tag": "t2"})
    assert first["result"] == second["result"] == "ok"
    assert relay_of(first["sdp"]) != relay_of(second["sdp"])
    assert len(rig.manager.find("c1")) == 2
    query = rig.send({"command": "query", "call-id": "c1"})
    tags = query["tags"]
    assert isinstance(tags, dict) and set(tags) == {"ft", "tt", "t2"}
    assert tags["t2"]["in dialogue with"] == "ft"
    # deleting one fork keeps the other
    reply = rig.send({"command": "delete", "call-id": "c1", "from-tag": "ft", "to-tag": "tt",
                      "delete-delay": 0})
    assert reply["result"] == "ok"
    (left,) = rig.manager.sessions()
    assert left.tags == ("ft", "t2")


def test_reoffer_keeps_ports() -> None:
    rig = Rig()
    first = rig.offer(direction=["v6", "v4"])
    rig.answer()
    again = rig.offer(**{"to-tag": "tt"})  # re-INVITE from the caller, no direction
    assert relay_of(again["sdp"]) == relay_of(first["sdp"])
    assert len(rig.manager.sessions()) == 1


@pytest.mark.parametrize(
    ("keys", "flags"),
    [
        ({"call-id": "c1", "from-tag": "ft", "address-family": "IP4",
          "received-from": ["IP6", "2001:db8:6::2"]}, ["trust-address", "SIP-source-address"]),
        ({"call id": "c1", "from tag": "ft", "address family": "IP4",
          "received from": ["IP6", "2001:db8:6::2"]}, ["trust address", "SIP source address"]),
    ],
)
def test_space_and_hyphen_spellings(keys: dict[str, Any], flags: list[str]) -> None:
    rig = Rig()
    reply = rig.send({"command": "offer", "sdp": V6_OFFER, "flags": flags, **keys})
    assert reply["result"] == "ok" and "warning" not in reply
    assert relay_of(reply["sdp"]).host == RELAY4


@pytest.mark.parametrize(
    ("sdp", "extra", "family"),
    [
        (V6_OFFER, {"direction": ["v6", "v4"]}, 4),
        (V6_OFFER, {"address family": "IP4"}, 4),
        (V6_OFFER, {"direction": ["v6", "v4"], "address family": "IP4"}, 4),
        (V4_ANSWER, {"direction": ["v4", "v6"]}, 6),
        (V4_ANSWER, {"address family": "IP6"}, 6),
        (V4_ANSWER, {}, 4),  # no hint: same family
        (V6_OFFER, {"direction": ["v6", "v6"]}, 6),
    ],
)
def test_direction_and_address_family(sdp: bytes, extra: dict[str, Any], family: int) -> None:
    rig = Rig()
    reply = rig.offer(sdp=sdp, **extra)
    assert reply["result"] == "ok"
    assert relay_of(reply["sdp"]).family == family


def test_direction_family_of_offerer_leg_differs_from_its_sdp() -> None:
    """NAT64: an IPv6 SDP whose sender reaches us on the v4 interface."""
    rig = Rig()
    reply = rig.offer(direction=["v4", "v4"])
    assert reply["result"] == "ok"
    (session,) = rig.manager.sessions()
    assert session.families == (4, 4)


def test_media_address_overrides_sdp_address() -> None:
    rig = Rig()
    reply = rig.offer(direction=["v6", "v4"], **{"media address": "2001:db8:6::3"})
    rig.answer()
    to_callee = relay_of(reply["sdp"])
    assert rig.datapath.flows[to_callee].to == Endpoint.parse("[2001:db8:6::3]:11800")


def test_sip_source_address_uses_received_from() -> None:
    rig = Rig()
    reply = rig.offer(direction=["v6", "v4"], flags=["SIP-source-address"],
                      **{"received-from": ["IP6", "2001:db8:6::3"]})
    rig.answer()
    to_callee = relay_of(reply["sdp"])
    assert rig.datapath.flows[to_callee].to == Endpoint.parse("[2001:db8:6::3]:11800")


def test_answer_address_family_must_match_offerer() -> None:
    rig = Rig()
    rig.offer(direction=["v6", "v4"])
    reply = rig.answer(**{"address family": "IP4"})
    assert reply["result"] == "error" and "IPv6" in str(reply["error-reason"])
    assert rig.answer(**{"address family": "IP6"})["result"] == "ok"


# ---- delete / query / list / statistics --------------------------------------------


def test_delete_unknown_call_is_ok_with_warning_unless_fatal() -> None:
    rig = Rig()
    reply = rig.send({"command": "delete", "call-id": "nope", "from-tag": "x"})
    assert reply["result"] == "ok" and "nope" in str(reply["warning"])
    fatal = rig.send({"command": "delete", "call-id": "nope", "from-tag": "x",
                      "flags": ["fatal"]})
    assert fatal["result"] == "error" and "nope" in str(fatal["error-reason"])


def test_query_shape_and_counters() -> None:
    rig = Rig()
    to_callee = relay_of(rig.offer(direction=["v6", "v4"])["sdp"])
    to_caller = relay_of(rig.answer()["sdp"])
    rig.datapath.stats[to_caller] = FlowCounters(packets=5, bytes=860, last_seen=rig.now)
    rig.datapath.stats[Endpoint(to_callee.host, to_callee.port + 1)] = FlowCounters(2, 160)
    query = rig.send({"command": "query", "call-id": "c1"})
    assert query["result"] == "ok"
    assert query["totals"] == {"RTP": {"packets": 5, "bytes": 860, "errors": 0},
                               "RTCP": {"packets": 2, "bytes": 160, "errors": 0}}
    caller = query["tags"]["ft"]
    assert caller["tag"] == "ft" and caller["in dialogue with"] == "tt"
    (media,) = caller["medias"]
    assert media["index"] == 1
    rtp, rtcp = media["streams"]
    assert rtp["local port"] == to_caller.port and rtp["local address"] == str(RELAY6)
    assert rtp["flags"] == ["RTP"] and rtcp["flags"] == ["RTCP"]
    assert rtp["stats"] == {"packets": 5, "bytes": 860, "errors": 0}
    assert rtp["endpoint"] == {"family": "IPv6", "address": "2001:db8:6::2", "port": 11800}
    assert rtcp["advertised endpoint"]["port"] == 11801
    callee_rtcp = query["tags"]["tt"]["medias"][0]["streams"][1]
    assert callee_rtcp["local port"] == to_callee.port + 1
    assert callee_rtcp["stats"]["packets"] == 2

    unknown = rig.send({"command": "query", "call-id": "nope"})
    assert unknown["result"] == "error"
    deleted = rig.send({"command": "delete", "call-id": "c1", "from-tag": "ft"})
    assert deleted["totals"] == query["totals"]  # what Kamailio's $rtpstat reads


def test_list_and_statistics() -> None:
    rig = Rig()
    for n in range(3):
        rig.offer(**{"call-id": f"c{n}", "direction": ["v6", "v4"]})
    listing = rig.send({"command": "list"})
    assert listing == {"result": "ok", "calls": ["c0", "c1", "c2"]}
    assert rig.send({"command": "list", "limit": 2})["calls"] == ["c0", "c1"]
    assert rig.send({"command": "list", "limit": 0})["result"] == "error"
    rig.send({"command": "delete", "call-id": "c0", "from-tag": "ft", "delete-delay": 0})
    stats = rig.send({"command": "statistics"})["statistics"]
    assert isinstance(stats, dict)
    assert stats["currentstatistics"]["sessionsown"] == 2
    assert stats["currentstatistics"]["sessionstotal"] == 2
    assert stats["totalstatistics"]["managedsessions"] == 3
    assert stats["totalstatistics"]["regularterminatedsessions"] == 1
    assert stats["controlstatistics"]["totaloffercount"] == 3
    relay = relay_of(rig.offer(**{"call-id": "c1"})["sdp"])  # a re-offer: same relay
    rig.datapath.stats[relay] = FlowCounters(packets=7, bytes=700)
    current = rig.send({"command": "statistics"})["statistics"]["currentstatistics"]
    assert (current["relayedpackets"], current["relayedbytes"]) == (7, 700)


# ---- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"1 d7:command4:ping", "malformed bencode"),
        (b"1 l4:pinge", "not a dictionary"),
        (b"1 d7:command5:pronge", "unknown command"),
        (b"1 d7:commandi3ee", "must be a string"),
        (b"1 de", "missing key 'command'"),
        (b"1 d7:command5:offer7:call-id1:x8:from-tag1:ye", "missing key 'sdp'"),
        (b"1 d7:command5:offer8:from-tag1:y3:sdp3:v=0e", "missing key 'call-id'"),
        (b"1 d7:command5:offer7:call-id1:x3:sdp3:v=0e", "missing key 'from-tag'"),
        (b"1 d7:command5:offer7:call-id1:x8:from-tag1:y3:sdp3:x=1e", "bad SDP"),
        (b"1 d7:command6:answer7:call-id1:x8:from-tag1:y3:sdp3:v=0e", "missing key 'to-tag'"),
        (b"1 d7:command4:ping7:command4:pinge", "duplicate"),
        (b"1 d7:command4:ping7:call-id1:x7:call id1:ye", "given twice"),
        (b"1 {\"command\": \"ping\"}", "malformed bencode"),
    ],
)
def test_bad_requests_get_error_replies(datagram: bytes, reason: str) -> None:
    rig = Rig()
    reply = rig.raw(datagram)
    assert reply is not None and reply.startswith(b"1 ")
    decoded = strings(fastbencode.bdecode(reply[2:]))
    assert decoded["result"] == "error" and reason in decoded["error-reason"]
    assert set(decoded) == {"result", "error-reason"}
    assert rig.send({"command": "ping"}) == {"result": "pong"}  # still serving


@pytest.mark.parametrize("datagram", [b"", b"d7:command4:pinge", b" d7:command4:pinge",
                                      b"x" * 100 + b" d7:command4:pinge"])
def test_no_cookie_no_reply(datagram: bytes) -> None:
    assert Rig().raw(datagram) is None


def test_huge_request_is_refused() -> None:
    rig = Rig(max_request=2000)
    sdp = V6_OFFER + b"a=x-pad:" + b"p" * 3000 + b"\r\n"
    reply = rig.offer(sdp=sdp, direction=["v6", "v4"])
    assert reply["result"] == "error" and "exceeds 2000" in str(reply["error-reason"])
    assert rig.manager.sessions() == []


def test_ports_exhausted_is_an_error_and_core_keeps_serving() -> None:
    rig = Rig(max_port=30001)  # one pair per family
    assert rig.offer(direction=["v6", "v4"])["result"] == "ok"
    reply = rig.offer(direction=["v6", "v4"], **{"call-id": "c2"})
    assert reply["result"] == "error" and "relay port" in str(reply["error-reason"])
    assert rig.send({"command": "ping"}) == {"result": "pong"}
    assert [s.call_id for s in rig.manager.sessions()] == ["c1"]


def test_answer_without_offer_is_an_error() -> None:
    reply = Rig().answer()
    assert reply["result"] == "error" and "no offer" in str(reply["error-reason"])


def test_answer_with_other_stream_count_is_an_error() -> None:
    rig = Rig()
    rig.offer(direction=["v6", "v4"])
    two = V4_ANSWER + b"m=video 20002 RTP/AVP 96\r\n"
    assert rig.answer(sdp=two)["result"] == "error"


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"ICE": "force"}, "ICE='force' not supported"),
        ({"codec": {"strip": ["PCMA"]}}, "'codec' not supported"),
        ({"flags": ["codec-strip-PCMA"]}, "flag 'codec-strip-PCMA' not supported"),
        ({"flags": ["record call"]}, "flag 'record-call' not supported"),
        ({"direction": ["pub", "v4"]}, "unknown interface 'pub'"),
        ({"direction": ["v6"]}, "two interfaces"),
        ({"direction": ["v6", "v4"], "address family": "IP6"}, "contradicts"),
        ({"address family": "IPX"}, "IP4 or IP6"),
        ({"transport-protocol": "RTP/SAVP"}, "transport protocol"),
        ({"media address": "not-an-ip"}, "not an IP address"),
    ],
)
def test_what_xlat_cannot_do_is_an_error(extra: dict[str, Any], reason: str) -> None:
    rig = Rig()
    reply = rig.offer(**extra)
    assert reply["result"] == "error" and reason in str(reply["error-reason"])
    assert rig.manager.sessions() == []


def test_rtcp_mux_options_checked_against_the_sdp() -> None:
    rig = Rig()
    assert rig.offer(sdp=V4_ANSWER, **{"rtcp-mux": ["demux"]})["result"] == "ok"
    assert rig.offer(sdp=V4_OFFER_MUX, **{"call-id": "c2", "rtcp-mux": ["accept"]}
                     )["result"] == "ok"
    refused = rig.offer(sdp=V4_OFFER_MUX, **{"call-id": "c3", "rtcp-mux": ["demux"]})
    assert refused["result"] == "error" and "rtcp-mux" in str(refused["error-reason"])
    refused = rig.offer(sdp=V4_ANSWER, **{"call-id": "c4", "rtcp-mux": ["offer"]})
    assert refused["result"] == "error"


def test_harmless_unsupported_things_are_warnings() -> None:
    rig = Rig()
    reply = rig.offer(direction=["v6", "v4"], TOS=184, label="caller",
                      flags=["trust-address", "strict-source"], replace=["username"],
                      ICE="default")
    assert reply["result"] == "ok"
    warning = str(reply["warning"])
    for word in ("TOS", "label", "strict-source", "username", "ICE=default"):
        assert word in warning


def test_kamailio_key_order_is_accepted() -> None:
    """Kamailio's module adds sdp first and command last: keys not sorted."""
    rig = Rig()
    body = (b"d3:sdp%d:%s5:flagsl13:trust-addresse7:replacel6:origin18:session-connectione"
            b"7:call-id2:c113:received-froml3:IP413:2001:db8:6::2e8:from-tag2:ft"
            b"14:address family3:IP47:command5:offere") % (len(V6_OFFER), V6_OFFER)
    reply = rig.raw(b"3171_9 " + body)
    assert reply is not None
    decoded = strings(fastbencode.bdecode(reply.partition(b" ")[2]))
    assert decoded["result"] == "ok", decoded
    assert relay_of(decoded["sdp"]).host == RELAY4


# ---- bencode -------------------------------------------------------------------------

_values = st.recursive(
    st.binary(max_size=20) | st.integers(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8).map(str.encode), inner, max_size=4),
    max_leaves=12,
)


def _str_keys(value: object) -> object:
    if isinstance(value, dict):
        return {k.decode(): _str_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_str_keys(v) for v in value]
    return value


@given(_values)
def test_decode_agrees_with_fastbencode(value: object) -> None:
    assert decode(bytes(fastbencode.bencode(value))) == _str_keys(value)


@pytest.mark.parametrize("data", [b"", b"i12", b"ixe", b"5:abc", b"l", b"d3:abc", b"di1ei2ee",
                                  b"le junk", b"x", b"99999999999999:a", b"l" * 40 + b"e" * 40])
def test_decode_rejects_malformed(data: bytes) -> None:
    with pytest.raises(BencodeError):
        decode(data)


def test_encode_is_canonical_bencode() -> None:
    assert encode({"sdp": b"v=0", "result": "ok", "n": [1, "x"]}) == \
        b"d1:nli1e1:xe6:result2:ok3:sdp3:v=0e"


# ---- asyncio edge --------------------------------------------------------------------


def test_start_ng_answers_over_udp(run_loop: Callable[..., Any]) -> None:
    async def scenario() -> bytes:
        server = await start_ng(Rig().core, Endpoint.parse("127.0.0.1:0"))
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(
            Client, remote_addr=(str(server.address.host), server.address.port))
        try:
            transport.sendto(b"5323_1 d7:command4:pinge")
            return await asyncio.wait_for(got, 5.0)
        finally:
            transport.close()
            server.close()

    assert run_loop(scenario()) == b"5323_1 d6:result4:ponge"


def test_a_burst_of_requests_gets_every_reply(run_loop: Callable[..., Any]) -> None:
    """More requests than one wake-up reads (READ_BATCH) arrive at once: each is
    answered, in order, and a later request still gets its reply."""

    async def scenario() -> list[bytes]:
        server = await start_ng(Rig().core, Endpoint.parse("127.0.0.1:0"))
        loop = asyncio.get_running_loop()
        replies: list[bytes] = []
        done = loop.create_future()
        total = READ_BATCH * 2 + 5

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                replies.append(data)
                if len(replies) == total and not done.done():
                    done.set_result(None)

        transport, _ = await loop.create_datagram_endpoint(
            Client, remote_addr=(str(server.address.host), server.address.port))
        try:
            for i in range(total - 1):
                transport.sendto(f"b{i} d7:command4:pinge".encode())
            await asyncio.sleep(0.05)
            transport.sendto(b"late d7:command4:pinge")
            await asyncio.wait_for(done, 5.0)
            return replies
        finally:
            transport.close()
            server.close()

    replies = run_loop(scenario())
    assert [r.split(b" ")[0] for r in replies] == [
        *(f"b{i}".encode() for i in range(READ_BATCH * 2 + 4)), b"late"]
    assert all(r.endswith(b" d6:result4:ponge") for r in replies)


# ---- across a daemon crash (xlat/state.py) ---------------------------------------------------


def test_ng_call_survives_a_restart_and_its_delete_works_after() -> None:
    from xlat.state import Journal, replay

    rig = Rig()
    to_callee = relay_of(rig.offer(direction=["v6", "v4"])["sdp"])
    to_caller = relay_of(rig.answer()["sdp"])
    rig.datapath.stats[to_caller].packets = 7  # the kernel counted media before the crash
    journal = Journal()
    for sid, record in rig.manager.drain_records():
        assert record is not None
        journal.put("session", sid, record)
    # kill -9: a new daemon, the same kernel (its flows outlive the process)
    again = Rig()
    again.datapath = rig.datapath
    flows = again.manager.restore(replay(journal.pending()).table("session").values(),
                                  again.now)
    assert {f.match for f in flows} == rig.datapath.flows.keys()
    # Kamailio retransmits an offer, then re-offers: same ports, nothing new allocated
    assert relay_of(again.offer(direction=["v6", "v4"])["sdp"]) == to_callee
    assert again.manager.pools[4][0].in_use == 1 and again.manager.pools[6][0].in_use == 1
    query = again.send({"command": "query", "call-id": "c1"})
    assert query["result"] == "ok" and set(query["tags"]) == {"ft", "tt"}
    deleted = again.send({"command": "delete", "call-id": "c1", "from-tag": "ft",
                          "delete-delay": 0})
    assert deleted["result"] == "ok" and deleted["totals"]["RTP"]["packets"] == 7
    assert again.manager.sessions() == [] and again.datapath.flows == {}
    assert again.manager.pools[4][0].in_use == 0 and again.manager.pools[6][0].in_use == 0
