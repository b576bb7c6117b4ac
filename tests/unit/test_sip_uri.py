"""SIP URI parsing and rebuilding (RFC 3261 §19.1, RFC 5118)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xlat.sip.errors import SipParseError
from xlat.sip.uri import SipUri, format_host, parse_uri


def test_full_uri_fields() -> None:
    uri = SipUri.parse(
        "sips:alice:secret@Example.COM:5061;Transport=TLS;lr;maddr=[2001:db8::1]"
        "?subject=project%20x&priority=urgent"
    )
    assert uri.scheme == "sips"
    assert (uri.user, uri.password) == ("alice", "secret")
    assert (uri.host, uri.port) == ("Example.COM", 5061)
    assert uri.params == {"transport": "TLS", "lr": None, "maddr": "[2001:db8::1]"}
    assert uri.transport == "tls"
    assert uri.headers == "subject=project%20x&priority=urgent"
    assert uri.host_ip is None


@pytest.mark.parametrize(
    ("text", "host", "port", "ip"),
    [
        ("sip:[2001:db8::10]", "[2001:db8::10]", None, IPv6Address("2001:db8::10")),
        # RFC 5118 §4.3: inside the brackets, so part of the address, not a port
        ("sip:[2001:db8::10:5070]", "[2001:db8::10:5070]", None, IPv6Address("2001:db8::10:5070")),
        ("sip:[2001:db8::10]:5070", "[2001:db8::10]", 5070, IPv6Address("2001:db8::10")),
        ("sip:u@[::ffff:192.0.2.2]", "[::ffff:192.0.2.2]", None, IPv6Address("::ffff:192.0.2.2")),
        (
            "sip:u@[2001:db8::192.0.2.1]",
            "[2001:db8::192.0.2.1]",
            None,
            IPv6Address("2001:db8::c000:201"),
        ),
        ("sip:192.0.2.1:5060", "192.0.2.1", 5060, IPv4Address("192.0.2.1")),
        ("sip:host.example.com.", "host.example.com.", None, None),
    ],
)
def test_hosts(text: str, host: str, port: int | None, ip: object) -> None:
    uri = SipUri.parse(text)
    assert (uri.host, uri.port, uri.host_ip) == (host, port, ip)
    assert str(uri) == text


@pytest.mark.parametrize(
    "text",
    [
        "sip:2001:db8::10",  # RFC 5118 §4.2: unbracketed
        "sip:user@2001:db8::10:5060",
        "sip:[2001:db8:::192.0.2.1]",  # RFC 5118 §4.10: three colons
        "sip:[2001:db8::10",
        "sip:[2001:db8::10]x",
        "sip:[192.0.2.1]",
        "sip:host:99999",
        "sip:host:",
        "sip:host:5060x",
        "sip:",
        "sip:@host",
        "sip:us er@host",
        "sip:user@ho_st",
        "sip:user@-host",
        "sip:host;maddr=2001:db8::1",
        "sip:host;p=a b",
        "sip:host;=v",
        'sip:host;x="y"',
        "sip:host?h=<x>",
        "sip:user:p@ss@host",
        "http//example.com",
        "mailto:",
        "tel:+1 234",
    ],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(SipParseError):
        parse_uri(text)


def test_escapes_and_odd_user_parts_kept_as_written() -> None:
    text = "sip:sips%3Auser%40example.com;par=u%40example.net@example.net;%6C%72"
    uri = SipUri.parse(text)
    assert uri.user == "sips%3Auser%40example.com;par=u%40example.net"
    assert uri.params == {"%6c%72": None}
    assert str(uri) == text


def test_other_schemes_are_raw_text() -> None:
    assert parse_uri("tel:+1-212-555-0101;phone-context=example.com") == (
        "tel:+1-212-555-0101;phone-context=example.com"
    )
    assert parse_uri("urn:service:sos") == "urn:service:sos"
    assert isinstance(parse_uri("SIP:bob@example.com"), SipUri)


def test_unchanged_uri_gives_its_text_back_changed_one_is_rebuilt() -> None:
    uri = SipUri.parse("SIP:Bob@Example.com;Transport=UDP;LR")
    assert str(uri) == "SIP:Bob@Example.com;Transport=UDP;LR"
    uri.params["maddr"] = "192.0.2.9"
    assert str(uri) == "sip:Bob@Example.com;transport=UDP;lr;maddr=192.0.2.9"
    del uri.params["maddr"]
    assert str(uri) == "SIP:Bob@Example.com;Transport=UDP;LR"


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        (IPv6Address("2001:db8::1"), 5060, "sip:bob@[2001:db8::1]:5060;lr"),
        ("2001:db8::1", None, "sip:bob@[2001:db8::1];lr"),
        ("[2001:db8::1]", None, "sip:bob@[2001:db8::1];lr"),
        (IPv4Address("203.0.113.1"), 5080, "sip:bob@203.0.113.1:5080;lr"),
        ("gw.example.net", None, "sip:bob@gw.example.net;lr"),
    ],
)
def test_with_host(host: str | IPv4Address | IPv6Address, port: int | None, expected: str) -> None:
    original = SipUri.parse("sip:bob@192.0.2.1:5060;lr")
    moved = original.with_host(host, port)
    assert str(moved) == expected
    assert str(original) == "sip:bob@192.0.2.1:5060;lr"
    assert SipUri.parse(expected) == moved


def test_format_host() -> None:
    assert format_host(IPv6Address("::1")) == "[::1]"
    assert format_host("::1") == "[::1]"
    assert format_host(IPv4Address("192.0.2.1")) == "192.0.2.1"


# -- properties ---------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_label = st.text(_ALNUM, min_size=1, max_size=8)
_hostname = st.lists(_label, min_size=1, max_size=4).map(".".join)
_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
_escaped = st.sampled_from(["%20", "%40", "%3A", "%25"])
_user = st.lists(
    st.one_of(st.text(_ALNUM + "-_.!~*'()&=+$,;?/", min_size=1, max_size=5), _escaped),
    min_size=1,
    max_size=4,
).map("".join)
_pchar = st.text(_ALNUM + "-_.!~*'()[]/:&+$", min_size=1, max_size=8)
_params = st.dictionaries(
    st.text(_ALNUM + "-_.", min_size=1, max_size=8).map(str.lower),
    st.one_of(st.none(), _pchar),
    max_size=4,
)


@st.composite
def sip_uris(draw: st.DrawFn) -> SipUri:
    return SipUri(
        host=draw(st.one_of(_hostname, _ipv4, _ipv6)),
        scheme=draw(st.sampled_from(["sip", "sips"])),
        user=draw(st.one_of(st.none(), _user)),
        port=draw(st.one_of(st.none(), st.integers(0, 65535))),
        params=draw(_params),
        headers=draw(st.one_of(st.none(), st.just("subject=hi&x=y%20z"))),
    )


@given(sip_uris())
def test_built_uri_round_trips(uri: SipUri) -> None:
    text = str(uri)
    parsed = SipUri.parse(text)
    assert parsed == uri
    assert str(parsed) == text


@given(st.text(max_size=60))
def test_random_text_only_raises_sip_parse_error(text: str) -> None:
    try:
        uri = parse_uri(text)
    except SipParseError:
        return
    assert str(uri) == text
