"""SIP message parsing, byte-keeping edits, TCP framing and response building.

The torture fixtures in sip_torture/ are wire bytes (CRLF kept) in the spirit of RFC 4475
and RFC 5118: every valid one parses and serialises back byte for byte, every invalid one
raises SipParseError (with status 505 / 413 when the file name ends in _505 / _413).
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xlat.sip.headers import split_quoted as _split_quoted
from xlat.sip.malformed import error_response
from xlat.sip.message import (
    MAX_MESSAGE_SIZE,
    Header,
    NameAddr,
    SipParseError,
    SipRequest,
    SipResponse,
    StreamFramer,
    Via,
    make_response,
    parse_message,
    split_list,
)
from xlat.sip.uri import SipUri

TORTURE = Path(__file__).parent / "sip_torture"
VALID = sorted((TORTURE / "valid").glob("*.sip"))
INVALID = sorted((TORTURE / "invalid").glob("*.sip"))


def load(name: str) -> bytes:
    return (TORTURE / "valid" / f"{name}.sip").read_bytes()


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


# -- torture set --------------------------------------------------------------------------


def test_torture_set_is_large_enough() -> None:
    assert len(VALID) >= 20
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_message_parses_and_round_trips(path: Path) -> None:
    data = path.read_bytes()
    msg = parse_message(data)
    assert msg.to_bytes() == data
    assert msg.vias and msg.call_id and msg.cseq[0] >= 0


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_message_frames_the_same_over_a_stream(path: Path) -> None:
    data = path.read_bytes()
    msg = parse_message(data)
    if msg.get("Content-Length") is None:
        with pytest.raises(SipParseError, match="Content-Length"):
            StreamFramer().feed(data)
        return
    framed = StreamFramer().feed(b"\r\n\r\n" + data + data)
    assert [m.to_bytes() for m in framed] == [data, data]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_message_raises(path: Path) -> None:
    expected = int(path.stem[-3:]) if path.stem[-4] == "_" and path.stem[-3:].isdigit() else 400
    with pytest.raises(SipParseError) as info:
        parse_message(path.read_bytes())
    assert info.value.status == expected
    assert info.value.reason


def _error_reply(data: bytes) -> SipResponse | None:
    with pytest.raises(SipParseError) as info:
        parse_message(data)
    reply = error_response(data, info.value, "t0")
    if reply is None:
        return None
    parsed = parse_message(reply.to_bytes())  # the reply itself parses, with xlat's parser
    assert isinstance(parsed, SipResponse) and parsed.status == info.value.status
    assert parsed.to.tag is not None
    return parsed


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_the_reply_to_an_invalid_request_parses(path: Path) -> None:
    data = path.read_bytes()
    reply = _error_reply(data)
    assert (reply is None) == (path.stem in NOT_ANSWERED)
    if reply is not None:  # what it copied is what the request said
        assert str(reply.vias[0]).encode() in data
        cseq = reply.get("CSeq") or ""
        assert cseq.encode() in data or cseq == "0 " + data.split(b" ", 1)[0].decode()


# Not answered: responses, and requests with no valid top Via to send a reply to.
NOT_ANSWERED = {
    "bad_status_code", "status_code_out_of_range", "empty_message", "garbage_bytes",
    "missing_via", "received_not_an_address",
    "unbracketed_ipv6_via", "via_bad_protocol", "via_no_sent_by",
}


@pytest.mark.parametrize(
    ("spoil", "header", "copied"),
    [
        ("From: <sip:al ice@a.example>;tag=1", "From", "<sip:anonymous@anonymous.invalid>"),
        ("To: <sip:bob@2001:db8::1>", "To", "<sip:anonymous@anonymous.invalid>;tag=t0"),
        ("Call-ID: a b c", "Call-ID", "invalid"),
        ("Call-ID: ok\x01", "Call-ID", "invalid"),
        ("Call-ID: \udcff\udcfe@x", "Call-ID", "invalid"),  # bytes ff fe: not UTF-8
        ("From: \"\udcff\" <sip:a@a.example>;tag=1", "From", "<sip:anonymous@anonymous.invalid>"),
        ("To: <sip:bob@b.example>", "To", "<sip:bob@b.example>;tag=t0"),
        ("Max-Forwards: many", "From", "<sip:alice@a.example>;tag=1"),
        ("CSeq: x OPTIONS", "CSeq", "0 OPTIONS"),
        ("CSeq: 99999999999 OPTIONS", "CSeq", "0 OPTIONS"),
    ],
)
def test_the_reply_copies_only_valid_fields(spoil: str, header: str, copied: str) -> None:
    lines = {
        "Via": "Via: SIP/2.0/UDP [2001:db8::5]:5062;branch=z9hG4bK1, SIP/2.0/UDP 192.0.2.9:70000",
        "From": "From: <sip:alice@a.example>;tag=1",
        "To": "To: <sip:bob@b.example>;tag=2",
        "Call-ID": "Call-ID: c1@a.example",
        "CSeq": "CSeq: 4 OPTIONS",
        "Max-Forwards": "Max-Forwards: 70",
    }
    lines[spoil.split(":")[0]] = spoil
    data = ("OPTIONS sip:bob@b.example SIP/2.0\r\n" + "\r\n".join(lines.values())
            + "\r\nContent-Length: 0\r\n\r\n").encode("utf-8", "surrogateescape")
    reply = _error_reply(data)
    assert reply is not None and reply.get(header) == copied
    # the Via list is cut at the first value that does not parse (port 70000)
    assert [str(v) for v in reply.vias] == ["SIP/2.0/UDP [2001:db8::5]:5062;branch=z9hG4bK1"]
    assert reply.cseq[1] == "OPTIONS"


@pytest.mark.parametrize(
    "data",
    [
        b"SIP/2.0 200 OK\r\nVia: x\r\n\r\n",  # a response: never answered
        b"ACK sip:b@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCSeq: 1 ACK\r\n\r\n",
        b"OPTIONS sip:b@b SIP/2.0\r\nVia: SIP/2.0/UDP h:99999\r\nCSeq: 1 OPTIONS\r\n\r\n",
        b"\x00\x01 sip:b@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nCSeq: 1 OPTIONS\r\n\r\n",
    ],
)
def test_no_reply_without_a_valid_top_via(data: bytes) -> None:
    assert _error_reply(data) is None


# -- reading ------------------------------------------------------------------------------


def test_request_fields() -> None:
    msg = parse_message(load("basic_invite_sdp"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "INVITE"
    assert isinstance(msg.uri, SipUri) and msg.uri.host == "biloxi.example.com"
    assert msg.version == "SIP/2.0"
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert msg.cseq == (314159, "INVITE")
    assert msg.max_forwards == 70
    assert msg.from_.tag == "1928301774" and msg.to.tag is None
    assert msg.to.display == "Bob"
    assert msg.content_type == "application/sdp"
    assert msg.body.startswith(b"v=0\r\n") and len(msg.body) == int(msg.get("content-length") or 0)


def test_compact_forms_read_as_long_names() -> None:
    msg = parse_message(load("compact_forms"))
    assert msg.get("Via") == msg.get("v")
    assert msg.vias[0].transport == "TCP"
    assert msg.from_.tag == "9fxced76sl"
    assert msg.to.uri == SipUri.parse("sip:bob@biloxi.example.com")
    assert msg.call_id == "3848276298220188511@atlanta.example.com"
    assert msg.get_all("Supported") == ["timer", "100rel"]
    assert msg.get("Subject") == "Lunch?"
    assert msg.get("Event") == "presence"
    assert msg.get_all("Allow-Events") == ["talk", "hold"]
    assert msg.get("Session-Expires") == "1800;refresher=uac"
    assert msg.get("Refer-To") == "<sip:carol@chicago.example.com>"
    assert msg.get("Content-Encoding") == "gzip"
    assert msg.content_type == "application/sdp"
    assert msg.contacts[0].uri == SipUri.parse("sip:alice@client.atlanta.example.com;transport=tcp")


def test_folded_values_read_unfolded() -> None:
    msg = parse_message(load("folding"))
    assert msg.get("Subject") == "I know you're there, pick up the phone and talk to me!"
    assert msg.cseq == (63104, "OPTIONS")
    assert msg.vias[0].branch == "z9hG4bKhjhs8ass877"
    assert msg.from_.tag == "1928301774"
    assert msg.max_forwards == 70


def test_whitespace_everywhere_it_is_allowed() -> None:
    msg = parse_message(load("long_values"))
    assert msg.to.tag == "1918181833n" and not msg.to.angle
    assert msg.from_.display == '"J Rosenberg \\\\\\""'
    assert msg.max_forwards == 68
    assert msg.cseq == (9, "INVITE")
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.contacts[0].params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert msg.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.get("s") == ""


def test_case_insensitive_names_and_params() -> None:
    msg = parse_message(load("case_insensitive"))
    assert msg.get("via") == msg.get("VIA") == msg.get("v")
    assert msg.vias[0].branch == "z9hG4bKcase"
    assert msg.from_.tag == "c1"
    assert isinstance(msg, SipRequest) and isinstance(msg.uri, SipUri)
    assert msg.uri.transport == "udp"
    assert msg.max_forwards == 10


def test_lists_split_outside_quotes_and_angle_brackets() -> None:
    msg = parse_message(load("quoted_escapes"))
    contacts = msg.contacts
    assert [c.display for c in contacts] == ['"A, B"', '"C"']
    assert contacts[1].params == {"foo": '"bar, baz"'}
    assert msg.from_.tag == "real"
    assert msg.to.display == '"Bob, <the builder>"'
    unknown = parse_message(load("unknown_headers"))
    # not a list header: commas are not separators
    assert unknown.get_all("X-Commas") == ['a, b, "c, d", <e,f>']
    assert unknown.get_all("Date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]
    assert unknown.get("X-Empty") == ""
    assert split_list('a, b, "c, d", <e,f>') == ["a", "b", '"c, d"', "<e,f>"]


def test_many_vias_across_lines_and_commas() -> None:
    msg = parse_message(load("many_vias"))
    assert isinstance(msg, SipResponse) and (msg.status, msg.reason) == (180, "Ringing")
    vias = msg.vias
    assert len(vias) == 18
    assert [v.transport for v in vias[3:6]] == ["UDP", "TCP", "TLS"]
    assert vias[4].host == "[2001:db8::5]" and vias[4].port == 5061
    assert [str(r.uri) for r in msg.record_routes] == [
        "sip:p1.example.net;lr",
        "sip:p2.example.net;lr",
        "sip:[2001:db8::7];lr",
    ]


def test_tel_request_uri_is_raw_text() -> None:
    msg = parse_message(load("tel_ruri"))
    assert isinstance(msg, SipRequest)
    assert msg.uri == "tel:+1-212-555-0101;phone-context=example.com"
    assert msg.to.uri == "tel:+1-212-555-0101"


def test_contact_star() -> None:
    msg = parse_message(load("contact_star"))
    assert msg.wildcard_contact and msg.contacts == []
    assert not parse_message(load("basic_invite_sdp")).wildcard_contact


def test_max_forwards_defaults_to_70() -> None:
    msg = parse_message(load("max_forwards_zero_no_mf"))
    assert msg.get("Max-Forwards") is None and msg.max_forwards == 70


def test_unusual_tokens_rfc4475_intmeth() -> None:
    msg = parse_message(load("unusual_method_and_reason"))
    assert isinstance(msg, SipRequest)
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert isinstance(msg.uri, SipUri) and msg.uri.password is not None
    assert msg.call_id.startswith("intmeth.word%ZK")
    assert msg.from_.tag == "_token~1'+`*%!-."


def test_utf8_reason_and_empty_reason() -> None:
    msg = parse_message(load("utf8_reason"))
    assert isinstance(msg, SipResponse) and msg.reason.endswith("простое")
    empty = parse_message(load("empty_reason"))
    assert isinstance(empty, SipResponse) and (empty.status, empty.reason) == (100, "")


def test_lf_line_endings_and_no_content_length() -> None:
    data = load("lf_endings_no_content_length")
    msg = parse_message(data)
    assert msg.eol == "\n"
    assert msg.body == b"hi\n"
    msg.set("Subject", "x")
    assert msg.to_bytes() == data.replace(b"\n\nhi", b"\nSubject: x\n\nhi")


# -- RFC 5118 ------------------------------------------------------------------------------


def test_rfc5118_ipv6_references() -> None:
    good = parse_message(load("rfc5118_ipv6_good"))
    assert isinstance(good, SipRequest) and isinstance(good.uri, SipUri)
    assert good.uri.host_ip == IPv6Address("2001:db8::10")
    assert good.vias[0].host == "[2001:db8::9:1]" and good.vias[0].port is None
    assert good.contacts[0].uri == SipUri.parse("sip:caller@[2001:db8::1]")

    ambiguous = parse_message(load("rfc5118_port_ambiguous"))
    assert isinstance(ambiguous, SipRequest) and isinstance(ambiguous.uri, SipUri)
    assert (ambiguous.uri.host, ambiguous.uri.port) == ("[2001:db8::10:5070]", None)
    unambiguous = parse_message(load("rfc5118_port_unambiguous"))
    assert isinstance(unambiguous, SipRequest) and isinstance(unambiguous.uri, SipUri)
    assert (unambiguous.uri.host, unambiguous.uri.port) == ("[2001:db8::10]", 5070)


def test_rfc5118_received_with_and_without_brackets() -> None:
    delim = parse_message(load("rfc5118_via_received_delim")).vias[0]
    nodelim = parse_message(load("rfc5118_via_received_nodelim")).vias[0]
    assert delim.received == "[2001:db8::9:255]"
    assert nodelim.received == "2001:db8::9:255"


def test_rfc5118_mixed_families() -> None:
    msg = parse_message(load("rfc5118_mult_ip_in_header"))
    assert [(v.host_ip, v.received) for v in msg.vias] == [
        (IPv6Address("2001:db8::9:255"), "192.0.2.1"),
        (IPv4Address("192.0.2.1"), "[2001:db8::9:255]"),
    ]
    assert [str(c.uri) for c in msg.contacts] == ["sip:[2001:db8::9:1]", "sip:192.0.2.1"]
    mapped = parse_message(load("rfc5118_ipv4_mapped"))
    assert mapped.vias[0].host_ip == IPv6Address("::ffff:192.0.2.10")
    assert mapped.vias[0].port == 19823
    assert b"IN IP6 ::ffff:192.0.2.2" in mapped.body


def test_maddr_and_route_ipv6() -> None:
    msg = parse_message(load("maddr_ipv6"))
    assert isinstance(msg, SipRequest) and isinstance(msg.uri, SipUri)
    assert msg.uri.params["maddr"] == "[2001:db8::9:255]"
    assert msg.vias[0].rport == 5060
    assert [r.uri for r in msg.routes] == [
        SipUri.parse("sip:[2001:db8::2]:5060;lr"),
        SipUri.parse("sip:203.0.113.1;lr;transport=tcp"),
    ]


# -- edits change only the touched lines -----------------------------------------------------


def changed_lines(before: bytes, after: bytes) -> tuple[list[bytes], list[bytes]]:
    old, new = lines_of(before), lines_of(after)
    return [line for line in old if line not in new], [line for line in new if line not in old]


def test_set_changes_one_line() -> None:
    data = load("basic_invite_sdp")
    msg = parse_message(data)
    msg.set("Max-Forwards", str(msg.max_forwards - 1))
    out = msg.to_bytes()
    assert changed_lines(data, out) == ([b"Max-Forwards: 70"], [b"Max-Forwards: 69"])
    assert out.index(b"Max-Forwards: 69") == data.index(b"Max-Forwards: 70")


def test_set_keeps_compact_name_and_removes_repeats() -> None:
    data = load("compact_forms")
    msg = parse_message(data)
    msg.set("Subject", "Dinner?")
    assert changed_lines(data, msg.to_bytes()) == ([b"s: Lunch?"], [b"s: Dinner?"])
    many = parse_message(load("many_vias"))
    many.set("Via", "SIP/2.0/UDP only.example.com;branch=z9hG4bKonly")
    assert len(many.vias) == 1 and many.vias[0].host == "only.example.com"


def test_set_appends_when_absent() -> None:
    data = load("basic_invite_sdp")
    msg = parse_message(data)
    msg.set("X-Gateway", "xlat")
    assert changed_lines(data, msg.to_bytes()) == ([], [b"X-Gateway: xlat"])
    assert msg.headers[-1] == Header("X-Gateway", "xlat")


def test_insert_via_on_top() -> None:
    data = load("rfc5118_mult_ip_in_header")
    msg = parse_message(data)
    via = Via("UDP", "203.0.113.1", 5060, {"branch": "z9hG4bKgw1"})
    msg.insert("top", "Via", str(via))
    out = msg.to_bytes()
    assert changed_lines(data, out) == (
        [],
        [b"Via: SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKgw1"],
    )
    assert msg.vias[0] == via and len(msg.vias) == 3
    assert lines_of(out)[1].startswith(b"Via: SIP/2.0/UDP 203.0.113.1")


def test_pop_top_from_a_multi_value_line_changes_only_that_line() -> None:
    data = load("maddr_ipv6")
    msg = parse_message(data)
    assert msg.pop_top("Route") == "<sip:[2001:db8::2]:5060;lr>"
    assert changed_lines(data, msg.to_bytes()) == (
        [b"Route: <sip:[2001:db8::2]:5060;lr>,<sip:203.0.113.1;lr;transport=tcp>"],
        [b"Route: <sip:203.0.113.1;lr;transport=tcp>"],
    )
    assert msg.pop_top("Route") == "<sip:203.0.113.1;lr;transport=tcp>"
    assert msg.get("Route") is None and msg.pop_top("Route") is None


def test_pop_top_via_from_separate_lines_removes_one_line() -> None:
    data = load("response_200_rr")
    msg = parse_message(data)
    top = msg.pop_top("Via")
    assert top is not None and top.startswith("SIP/2.0/UDP server10")
    old, new = changed_lines(data, msg.to_bytes())
    assert len(old) == 1 and old[0].startswith(b"Via: SIP/2.0/UDP server10") and new == []


def test_replace_values_keeps_matching_lines() -> None:
    data = load("many_vias")
    msg = parse_message(data)
    values = msg.get_all("Via")
    # drop the middle element of the comma line, keep everything else
    msg.replace_values("Via", values[:4] + values[5:])
    old, new = changed_lines(data, msg.to_bytes())
    assert len(old) == 1 and old[0].count(b"SIP/2.0/") == 3
    assert new == [
        b"Via: SIP/2.0/UDP a.example.com;branch=z9hG4bKa, SIP/2.0/TLS b.example.com;branch=z9hG4bKc"
    ]
    assert msg.get_all("Via") == values[:4] + values[5:]
    msg.replace_values("Via", msg.get_all("Via"))
    assert msg.to_bytes().count(b"\r\n") == data.count(b"\r\n")


def test_replace_values_appends_after_the_last_line() -> None:
    msg = parse_message(load("response_200_rr"))
    rrs = msg.get_all("Record-Route")
    msg.replace_values("Record-Route", [*rrs, "<sip:extra.example.com;lr>"])
    assert msg.get_all("Record-Route") == [*rrs, "<sip:extra.example.com;lr>"]
    names = [h.name for h in msg.headers]
    assert names.index("Record-Route") + 1 == len(names) - names[::-1].index("Record-Route") - 1


def test_replace_values_prepending_goes_above_the_kept_lines() -> None:
    data = load("rfc5118_mult_ip_in_header")
    msg = parse_message(data)
    values = msg.get_all("Via")
    msg.replace_values("Via", ["SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKtop", *values])
    assert msg.get_all("Via") == ["SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKtop", *values]
    assert changed_lines(data, msg.to_bytes()) == (
        [],
        [b"Via: SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKtop"],
    )
    assert lines_of(msg.to_bytes())[1] == b"Via: SIP/2.0/UDP 203.0.113.1;branch=z9hG4bKtop"


def test_new_lines_cannot_inject_headers() -> None:
    msg = parse_message(load("basic_invite_sdp"))
    with pytest.raises(ValueError):
        msg.set("Subject", "hi\r\nVia: SIP/2.0/UDP evil")
    with pytest.raises(ValueError):
        msg.insert(0, "Bad Name", "x")
    assert isinstance(msg, SipRequest)
    msg.method = "INVITE\r\nX: y"
    with pytest.raises(ValueError):
        msg.to_bytes()


def test_remove() -> None:
    data = load("many_vias")
    msg = parse_message(data)
    assert msg.remove("record-route") == 2
    assert msg.get("Record-Route") is None
    assert msg.remove("Record-Route") == 0
    old, new = changed_lines(data, msg.to_bytes())
    assert len(old) == 2 and new == []


def test_changing_the_body_rewrites_content_length_only() -> None:
    data = load("compact_forms")
    msg = parse_message(data)
    msg.body = msg.body
    assert msg.to_bytes() == data
    msg.body = b"v=0\r\n"
    out = msg.to_bytes()
    old, new = changed_lines(data, out)
    assert new == [b"l: 5"] and b"l: " + str(len(data.split(b"\r\n\r\n", 1)[1])).encode() in old
    assert out.endswith(b"\r\n\r\nv=0\r\n")
    assert parse_message(out).body == b"v=0\r\n"


def test_request_uri_and_status_line_edits() -> None:
    data = load("basic_invite_sdp")
    msg = parse_message(data)
    assert isinstance(msg, SipRequest) and isinstance(msg.uri, SipUri)
    msg.uri = msg.uri.with_host(IPv6Address("2001:db8::4"), 5060)
    old, new = changed_lines(data, msg.to_bytes())
    assert new == [b"INVITE sip:bob@[2001:db8::4]:5060 SIP/2.0"] and len(old) == 1
    response = parse_message(load("response_200_rr"))
    assert isinstance(response, SipResponse)
    response.reason = "Fine"
    assert response.to_bytes().startswith(b"SIP/2.0 200 Fine\r\nVia: ")


def test_mutating_a_parsed_via_rebuilds_it() -> None:
    via = Via.parse("SIP/2.0/UDP [2001:db8::9:1]:5060 ; branch=z9hG4bK1;rport")
    assert str(via) == "SIP/2.0/UDP [2001:db8::9:1]:5060 ; branch=z9hG4bK1;rport"
    assert via.rport is None and "rport" in via.params
    via.params["received"] = "2001:db8::99"
    via.params["rport"] = "40000"
    assert (
        str(via)
        == "SIP/2.0/UDP [2001:db8::9:1]:5060;branch=z9hG4bK1;rport=40000;received=2001:db8::99"
    )
    assert Via.parse(str(via)).rport == 40000


def test_name_addr_forms() -> None:
    plain = NameAddr.parse("sip:bob@example.com;tag=1")
    assert not plain.angle and plain.tag == "1" and plain.uri == SipUri.parse("sip:bob@example.com")
    plain.params["tag"] = "2"
    assert str(plain) == "sip:bob@example.com;tag=2"
    named = NameAddr.parse('"Bob" <sip:bob@example.com;transport=tcp>;tag=9')
    assert named.display == '"Bob"' and named.uri == SipUri.parse(
        "sip:bob@example.com;transport=tcp"
    )
    named.params["expires"] = "60"
    assert str(named) == '"Bob" <sip:bob@example.com;transport=tcp>;tag=9;expires=60'
    # a URI with parameters cannot be written as an addr-spec: <> are added
    bare = NameAddr(SipUri.parse("sip:bob@example.com;lr"), angle=False)
    assert str(bare) == "<sip:bob@example.com;lr>"


def test_angle_brackets_inside_parameters() -> None:
    instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    bare = NameAddr.parse(f"sip:alice@192.0.2.1;{instance};reg-id=1")
    assert not bare.angle and bare.uri == SipUri.parse("sip:alice@192.0.2.1")
    assert bare.params["+sip.instance"] == '"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    msg = parse_message(load("basic_invite_sdp"))
    msg.set("Contact", f"<sip:alice@[2001:db8::1]>;{instance}, sip:b@192.0.2.2;{instance}")
    back = parse_message(msg.to_bytes())
    assert [c.params["+sip.instance"] for c in back.contacts] == [
        '"<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"'
    ] * 2


def test_copy_is_independent() -> None:
    data = load("maddr_ipv6")
    original = parse_message(data)
    assert isinstance(original, SipRequest) and isinstance(original.uri, SipUri)
    branch = original.copy()
    assert isinstance(branch, SipRequest) and isinstance(branch.uri, SipUri)
    branch.uri.params["maddr"] = "[2001:db8::1]"
    branch.pop_top("Route")
    branch.set("Max-Forwards", "69")
    assert original.to_bytes() == data
    assert branch.to_bytes() != data and parse_message(branch.to_bytes()).max_forwards == 69


@pytest.mark.parametrize(
    "value",
    [
        '"unterminated <sip:a@b>',
        "<sip:a@b",
        '"Bob" sip:a@b',
        "Bo@b <sip:a@b>",
        "sip:a@b;tag=a b",
        "<sip:a@b>;=x",
        "sip:a b@c",
        "<>",
    ],
)
def test_bad_name_addr(value: str) -> None:
    with pytest.raises(SipParseError):
        NameAddr.parse(value)


@pytest.mark.parametrize(
    "value",
    [
        "SIP/2.0/UDP",
        "SIP/2.0 UDP host",
        "SIP/2.0/UDP host:port",
        "SIP/2.0/UDP host;branch=a b",
        "SIP/2.0/UDP [2001:db8::1;branch=x",
        "SIP/2.0/UDP host;received=[2001:db8:::1]",
        "SIP/3.0/UDP host",
    ],
)
def test_bad_via(value: str) -> None:
    with pytest.raises(SipParseError):
        Via.parse(value)


# -- UDP body length and stream framing --------------------------------------------------------


def test_udp_body_longer_than_content_length_is_cut() -> None:
    data = load("basic_invite_sdp")
    msg = parse_message(data + b"trailing junk")
    assert msg.to_bytes() == data


def test_stream_framer_byte_by_byte_with_keepalives() -> None:
    first, second = load("basic_invite_sdp"), load("response_200_rr")
    stream = b"\r\n\r\n" + first + b"\r\n" + second + b"\r\n\r\n"
    framer = StreamFramer()
    got = []
    for i in range(len(stream)):
        got += framer.feed(stream[i : i + 1])
    assert [m.to_bytes() for m in got] == [first, second]


def test_stream_framer_errors_are_final() -> None:
    framer = StreamFramer()
    assert framer.feed(b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n") == []
    with pytest.raises(SipParseError, match="Content-Length"):
        framer.feed(b"From: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\ni: x\r\nCSeq: 1 OPTIONS\r\n\r\n")
    with pytest.raises(SipParseError, match="Content-Length"):
        framer.feed(load("basic_invite_sdp"))


def test_stream_framer_caps() -> None:
    framer = StreamFramer(max_size=1000)
    with pytest.raises(SipParseError) as info:
        framer.feed(b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X: y\r\n" * 200)
    assert info.value.status == 413
    big_body = re.sub(rb"Content-Length: \d+", b"Content-Length: 900", load("basic_invite_sdp"))
    with pytest.raises(SipParseError) as info:
        StreamFramer(max_size=1000).feed(big_body)
    assert info.value.status == 413


def test_datagram_cap() -> None:
    assert MAX_MESSAGE_SIZE == 65535
    with pytest.raises(SipParseError) as info:
        parse_message(b"x" * (MAX_MESSAGE_SIZE + 1))
    assert info.value.status == 413


# -- responses (§8.2.6, §16.7) ----------------------------------------------------------------


def test_make_response_copies_bytes_and_adds_tag() -> None:
    data = load("rfc5118_mult_ip_in_header")
    req = parse_message(data)
    assert isinstance(req, SipRequest)
    resp = make_response(req, 200, to_tag="ignored", extra_headers=[("Server", "xlat")])
    out = resp.to_bytes()
    assert out.startswith(b"SIP/2.0 200 OK\r\n")
    for name in (b"Via: ", b"From: ", b"To: ", b"Call-ID: ", b"CSeq: "):
        for line in lines_of(data):
            if line.startswith(name):
                assert line in lines_of(out)
    assert resp.to.tag == "ddsew3"  # had one already
    back = parse_message(out)
    assert isinstance(back, SipResponse) and back.status == 200
    assert back.get("Server") == "xlat" and back.get("Content-Length") == "0"
    assert back.get("Contact") is None and back.get("Max-Forwards") is None


def test_make_response_to_tag_and_timestamp() -> None:
    data = load("basic_invite_sdp").replace(b"CSeq: 314159", b"Timestamp: 54\r\nCSeq: 314159")
    req = parse_message(data)
    assert isinstance(req, SipRequest)
    trying = make_response(req, 100)
    assert trying.get("Timestamp") == "54" and trying.to.tag is None
    ringing = make_response(req, 180, to_tag="a6c85cf")
    assert ringing.get("Timestamp") is None
    assert str(ringing.to) == "Bob <sip:bob@biloxi.example.com>;tag=a6c85cf"
    busy = make_response(req, 486, "Not Now")
    assert busy.to_bytes().startswith(b"SIP/2.0 486 Not Now\r\n")
    assert make_response(req, 499).reason == ""


def test_make_response_keeps_escaped_controls_in_to() -> None:
    req = parse_message(load("unusual_method_and_reason"))
    assert isinstance(req, SipRequest)
    resp = make_response(req, 404, to_tag="t404")
    back = parse_message(resp.to_bytes())
    assert back.to.tag == "t404" and back.to.display == req.to.display


def test_hosts_get_brackets_when_built() -> None:
    via = Via("UDP", "2001:db8::1", 5060, {"branch": "z9hG4bK1"})
    assert via.host == "[2001:db8::1]"
    assert str(via) == "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1"
    assert SipUri(host="2001:db8::1").host == "[2001:db8::1]"


def test_built_request_serialises_and_parses() -> None:
    req = SipRequest(
        "OPTIONS",
        SipUri.parse("sip:[2001:db8::1]"),
        [
            ("Via", "SIP/2.0/UDP [2001:db8::2];branch=z9hG4bKb"),
            ("From", "<sip:gw@[2001:db8::2]>;tag=g"),
            ("To", "<sip:[2001:db8::1]>"),
            ("Call-ID", "opt-1"),
            ("CSeq", "1 OPTIONS"),
        ],
        body=b"",
    )
    out = req.to_bytes()
    assert out.endswith(b"Content-Length: 0\r\n\r\n")
    assert parse_message(out).to_bytes() == out


# -- properties ---------------------------------------------------------------------------------

_VALUE_CHARS = st.characters(
    min_codepoint=0x20,
    max_codepoint=0x2FF,
    blacklist_characters="\x7f",
)
_values = st.text(_VALUE_CHARS, max_size=80).map(lambda s: s.strip(" \t"))
_names = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=2, max_size=20
).map(lambda s: "X-" + s)


@given(_names, _values)
def test_random_header_value_round_trips(name: str, value: str) -> None:
    data = load("basic_invite_sdp")
    msg = parse_message(data)
    msg.set(name, value)
    out = msg.to_bytes()
    back = parse_message(out)
    assert back.get(name) == value
    assert back.to_bytes() == out
    assert changed_lines(data, out)[0] == []


@given(st.binary(max_size=400))
def test_random_bytes_only_raise_sip_parse_error(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipParseError:
        return
    assert msg.to_bytes() == data[: len(msg.to_bytes())]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_messages_only_raise_sip_parse_error(
    path: Path, edits: list[tuple[int, int]]
) -> None:
    data = bytearray(path.read_bytes())
    for pos, byte in edits:
        data[pos % len(data)] = byte
    try:
        msg = parse_message(bytes(data))
    except SipParseError:
        return
    # whatever parses reads without surprises and writes back what it read
    _ = (msg.vias, msg.from_, msg.to, msg.cseq, msg.contacts, msg.routes, msg.max_forwards)
    assert bytes(data).startswith(msg.to_bytes())


@given(st.sampled_from(VALID), st.lists(st.integers(1, 200), min_size=1, max_size=30))
def test_stream_framer_chunking_does_not_matter(path: Path, cuts: list[int]) -> None:
    data = path.read_bytes()
    if parse_message(data).get("Content-Length") is None:
        return
    stream = data * 2
    framer = StreamFramer()
    got = []
    pos = 0
    for cut in cuts:
        got += framer.feed(stream[pos : pos + cut])
        pos += cut
    got += framer.feed(stream[pos:])
    assert [m.to_bytes() for m in got] == [data, data]


@given(st.binary(max_size=300), st.integers(1, 50))
def test_stream_framer_garbage_only_raises_sip_parse_error(data: bytes, step: int) -> None:
    framer = StreamFramer()
    try:
        for i in range(0, len(data), step):
            framer.feed(data[i : i + step])
    except SipParseError:
        pass


_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.sampled_from(["proxy.example.net", "gw", "a-b.example.com."]),
)
_routes = st.builds(
    lambda host, port: f"<sip:{host}{'' if port is None else f':{port}'};lr>",
    _hosts,
    st.one_of(st.none(), st.integers(1, 65535)),
)


@given(st.lists(_routes, min_size=1, max_size=6), st.data())
def test_route_lists_pop_in_order_whatever_the_line_grouping(
    routes: list[str], data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, len(routes) - 1))) if len(routes) > 1 else [])
    groups = [routes[a:b] for a, b in zip([0, *cuts], [*cuts, len(routes)], strict=True)]
    route_lines = "".join(f"Route: {', '.join(g)}\r\n" for g in groups).encode()
    base = load("basic_invite_sdp")
    at = base.index(b"Max-Forwards")
    msg = parse_message(base[:at] + route_lines + base[at:])
    assert [str(r) for r in msg.routes] == routes
    for expected in routes:
        assert msg.pop_top("Route") == expected
        msg = parse_message(msg.to_bytes())
    assert msg.to_bytes() == base


@given(st.text('<>,ab ;"\\', max_size=16))
def test_split_list_fast_paths_agree_with_the_character_walk(value: str) -> None:
    """split_list skips the walk when it can; what it returns (or raises) is the same."""
    try:
        walked: list[str] | type[Exception] = [
            p for p in (part.strip(" \t") for part in _split_quoted(value)) if p]
    except SipParseError:
        walked = SipParseError
    try:
        got: list[str] | type[Exception] = split_list(value)
    except SipParseError:
        got = SipParseError
    assert got == walked


def test_messages_parsed_from_the_same_bytes_do_not_share_values() -> None:
    """Parsed header values come from shared templates (Via, name-addr, URI caches):
    editing one message's values must reach neither the other message nor a later
    parse."""
    data = load("maddr_ipv6")
    first, second = parse_message(data), parse_message(data)
    first.vias[0].params["x-edit"] = "1"
    first.from_.params["tag"] = "changed"
    assert isinstance(first.from_.uri, SipUri)
    first.from_.uri.params["x"] = "y"
    first.routes[0].params["x-edit"] = "1"
    for msg in (second, parse_message(data)):
        assert "x-edit" not in msg.vias[0].params
        uri = msg.from_.uri
        assert msg.from_.tag != "changed" and isinstance(uri, SipUri) and "x" not in uri.params
        assert "x-edit" not in msg.routes[0].params
        assert msg.to_bytes() == data


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("Contact", "*, <sip:a@192.0.2.1>", "Contact: \\* mixed"),
        ("Route", "<sip:192.0.2.1;lr", "unterminated <"),
        ("Record-Route", "<sip:[2001:db8::1;lr>", "IPv6"),
        ("Via", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1, bogus", "bad Via"),
    ],
)
def test_every_list_header_is_validated_at_parse(name: str, value: str, error: str) -> None:
    data = parse_message(load("maddr_ipv6")).to_bytes()
    bad = data.replace(b"\r\n\r\n", f"\r\n{name}: {value}\r\n\r\n".encode(), 1)
    with pytest.raises(SipParseError, match=error):
        parse_message(bad)
