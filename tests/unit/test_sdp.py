"""xlat.sdp: parsing, stream specs and byte-preserving rewriting (RFC 8866, 3264, 3605, 5761)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlat.addr import Endpoint
from xlat.media.negotiate import stream_specs
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager, StreamSpec
from xlat.sdp import (
    ICE_ATTRIBUTES,
    MAX_SDP_SIZE,
    SdpError,
    SdpMedia,
    is_sdp_type,
    parse_sdp,
    rewrite_sdp,
)

FIXTURES = Path(__file__).parent / "sdp_fixtures"
RELAY4 = Endpoint(IPv4Address("203.0.113.1"), 30000)
RELAY6 = Endpoint(IPv6Address("2001:db8:6::1"), 30002)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def lines_of(body: bytes) -> list[bytes]:
    """Lines with their endings; a last line without newline is kept too."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", body)


def relays_for(body: bytes, relay: Endpoint) -> list[Endpoint | None]:
    """One relay per live stream, None per rejected one (what SessionManager returns)."""
    return [None if m.port == 0 else relay for m in parse_sdp(body).media]


def is_ice(line: bytes) -> bool:
    name = line[2:].split(b":")[0].rstrip(b"\r\n").decode("latin-1")
    return line.startswith(b"a=") and name in ICE_ATTRIBUTES


ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.sdp"))


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/sdp", True),
        ("Application/SDP", True),
        ("application/sdp; charset=utf-8", True),
        (" application/sdp ;x=1", True),
        ("application/sdp-extra", False),
        ("multipart/mixed;boundary=unique", False),
        ("text/plain", False),
        ("", False),
        (None, False),
    ],
)
def test_sdp_content_type_is_recognised_case_and_parameters_aside(
    content_type: str | None, expected: bool
) -> None:
    assert is_sdp_type(content_type) is expected


# --- parse_sdp -----------------------------------------------------------------------


def media(
    kind: str,
    port: int,
    address: str | None,
    rtcp: str | None = None,
    mux: bool = False,
    direction: str = "sendrecv",
    proto: str = "RTP/AVP",
) -> SdpMedia:
    """An expected SdpMedia, addresses as text."""
    addr = None if address is None else ip_address(address)
    return SdpMedia(
        kind=kind,
        port=port,
        proto=proto,
        address=addr,
        rtcp=None if rtcp is None else Endpoint.parse(rtcp),
        rtcp_mux=mux,
        direction=direction,
    )


PARSED = {
    "polycom_vvx.sdp": ("192.0.2.10", [media("audio", 2222, "192.0.2.10")]),
    "yealink_ipv6.sdp": ("2001:db8:6::2", [media("audio", 11800, "2001:db8:6::2")]),
    "linphone_ice.sdp": (
        "192.168.1.20",
        [media("audio", 7078, "198.51.100.7", rtcp="198.51.100.7:7079")],
    ),
    "freeswitch.sdp": (
        "203.0.113.50",
        [media("audio", 16384, "203.0.113.50", rtcp="203.0.113.50:16385")],
    ),
    "chrome_webrtc.sdp": (
        "127.0.0.1",
        [
            media("audio", 54321, "198.51.100.20", "0.0.0.0:9", True, proto="UDP/TLS/RTP/SAVPF"),
            media("video", 54321, "198.51.100.20", "0.0.0.0:9", True, proto="UDP/TLS/RTP/SAVPF"),
        ],
    ),
    "asterisk.sdp": ("192.0.2.60", [media("audio", 10010, "192.0.2.60")]),
    "audio_video_ipv6.sdp": (
        "2001:db8:6::3",
        [
            media("audio", 5004, "2001:db8:6::3", rtcp="[2001:db8:6::3]:5005"),
            media("video", 5006, "2001:db8:6::3"),
        ],
    ),
    "rejected_video_answer.sdp": (
        "198.51.100.30",
        [media("audio", 49172, "198.51.100.30"), media("video", 0, None)],
    ),
    "hold_rfc2543.sdp": ("192.0.2.10", [media("audio", 2222, "0.0.0.0", direction="sendonly")]),
    "hold_sendonly.sdp": (
        "192.0.2.60",
        [media("audio", 10010, "192.0.2.60", direction="sendonly")],
    ),
    "hold_inactive_ipv6.sdp": (
        "2001:db8:6::2",
        [media("audio", 11800, "::", direction="inactive")],
    ),
    "snom_latin1.sdp": ("192.0.2.70", [media("audio", 63538, "192.0.2.70", proto="RTP/SAVP")]),
}


def test_every_fixture_has_expectations() -> None:
    assert sorted(PARSED) == ALL_FIXTURES


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_parse_fixture(name: str) -> None:
    origin, expected = PARSED[name]
    info = parse_sdp(fixture(name))
    assert info.origin_address == ip_address(origin)
    assert info.media == expected


def test_media_level_c_overrides_session_level() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    body += b"m=audio 4000 RTP/AVP 0\r\nc=IN IP4 192.0.2.9\r\nm=video 4002 RTP/AVP 96\r\n"
    audio, video = parse_sdp(body).media
    assert audio.address == IPv4Address("192.0.2.9")
    assert video.address == IPv4Address("192.0.2.1")


def test_media_level_direction_overrides_session_level() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    body += b"a=recvonly\r\nm=audio 4000 RTP/AVP 0\r\na=inactive\r\nm=video 4002 RTP/AVP 96\r\n"
    assert [m.direction for m in parse_sdp(body).media] == ["inactive", "recvonly"]


def test_attribute_names_with_trailing_blanks() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    body += b"m=audio 4000 RTP/AVP 0\r\na=sendonly \r\na=ice-lite\t\r\n"
    assert parse_sdp(body).media[0].direction == "sendonly"
    assert rewrite_sdp(body, [None]) == body.replace(b"a=ice-lite\t\r\n", b"")


def test_session_level_rtcp_and_mux_are_not_media_attributes() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    body += b"a=rtcp:5000\r\na=rtcp-mux\r\nm=audio 4000 RTP/AVP 0\r\n"
    (audio,) = parse_sdp(body).media
    assert audio.rtcp is None
    assert not audio.rtcp_mux


def test_origin_with_host_name_or_spaced_username() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 pbx.example.com\r\ns=-\r\nt=0 0\r\n"
    assert parse_sdp(body).origin_address is None
    body = b"v=0\r\no=Polycom IP 650 1 1 IN IP4 192.0.2.5\r\ns=-\r\nt=0 0\r\n"
    assert parse_sdp(body).origin_address == IPv4Address("192.0.2.5")


def test_multicast_ttl_and_port_count() -> None:
    body = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 224.2.1.1/127/3\r\nt=0 0\r\n"
    body += b"m=video 49170/2 RTP/AVP 31\r\n"
    (video,) = parse_sdp(body).media
    assert (video.address, video.port) == (IPv4Address("224.2.1.1"), 49170)
    out = rewrite_sdp(body, [RELAY4])
    assert b"c=IN IP4 203.0.113.1\r\n" in out
    assert b"m=video 30000 RTP/AVP 31\r\n" in out


def test_trailing_blank_line_is_tolerated_and_kept() -> None:
    body = fixture("asterisk.sdp") + b"\r\n"
    assert parse_sdp(body).media[0].port == 10010
    assert rewrite_sdp(body, [None]) == body
    assert rewrite_sdp(body, [RELAY4]).endswith(b"a=sendrecv\r\n\r\n")


# --- stream_specs --------------------------------------------------------------------


def test_stream_specs() -> None:
    specs = stream_specs(parse_sdp(fixture("audio_video_ipv6.sdp")))
    host = IPv6Address("2001:db8:6::3")
    assert specs == [
        StreamSpec(peer=Endpoint(host, 5004), rtcp=Endpoint(host, 5005), rtcp_mux=False),
        StreamSpec(peer=Endpoint(host, 5006), rtcp=None, rtcp_mux=False),
    ]


def test_stream_specs_rejected_stream_has_no_peer() -> None:
    specs = stream_specs(parse_sdp(fixture("rejected_video_answer.sdp")))
    assert specs == [StreamSpec(peer=Endpoint.parse("198.51.100.30:49172")), StreamSpec(None)]


def test_stream_specs_hold_keeps_null_peer() -> None:
    (spec,) = stream_specs(parse_sdp(fixture("hold_rfc2543.sdp")))
    assert spec.peer == Endpoint(IPv4Address("0.0.0.0"), 2222)


def test_stream_specs_webrtc_dummy_rtcp_is_ignored() -> None:
    audio, video = stream_specs(parse_sdp(fixture("chrome_webrtc.sdp")))
    assert audio == StreamSpec(peer=Endpoint.parse("198.51.100.20:54321"), rtcp=None, rtcp_mux=True)
    assert video.rtcp_mux


# --- rewrite_sdp ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_round_trip_without_relays_is_identity(name: str) -> None:
    body = fixture(name)
    count = len(parse_sdp(body).media)
    assert rewrite_sdp(body, [None] * count, remove_ice=False) == body


@pytest.mark.parametrize("name", ALL_FIXTURES)
@pytest.mark.parametrize("relay", [RELAY4, RELAY6], ids=["to4", "to6"])
def test_byte_diff_only_edited_spans_change(name: str, relay: Endpoint) -> None:
    """Every line outside an edited span is identical and in order; edited lines change
    only the tokens they must, and keep their line ending."""
    body = fixture(name)
    out = rewrite_sdp(body, relays_for(body, relay))
    kept = [line for line in lines_of(body) if not is_ice(line)]
    produced = lines_of(out)
    assert len(produced) == len(kept)
    addrtype = f"IP{relay.family}".encode()
    for before, after in zip(kept, produced, strict=True):
        if before == after:
            continue
        assert before[-2:] == after[-2:]
        old, new = before.split(), after.split()
        assert len(old) == len(new)
        changed = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        if before.startswith(b"m="):
            assert changed == [1]
            assert new[1] == str(relay.port).encode()
        elif before.startswith(b"c="):
            on_hold = ip_address(old[2].decode()).is_unspecified
            host = null(relay) if on_hold else relay.host
            assert new == [old[0], addrtype, str(host).encode()]
        elif before.startswith(b"o="):
            assert new == [*old[:-2], addrtype, str(relay.host).encode()]
        else:
            assert before.startswith(b"a=rtcp:")
            assert new[0] == b"a=rtcp:%d" % (relay.port + 1)
            assert new[1:] in ([], [b"IN", addrtype, str(relay.host).encode()])


@pytest.mark.parametrize("name", ALL_FIXTURES)
@pytest.mark.parametrize("relay", [RELAY4, RELAY6], ids=["to4", "to6"])
def test_rewritten_sdp_parses_with_the_relay(name: str, relay: Endpoint) -> None:
    body = fixture(name)
    before = parse_sdp(body)
    after = parse_sdp(rewrite_sdp(body, relays_for(body, relay)))
    assert after.origin_address == relay.host
    for old, new in zip(before.media, after.media, strict=True):
        if old.port == 0:
            assert new == old
            continue
        assert old.address is not None
        assert new.port == relay.port
        assert new.address == (relay.host if not old.address.is_unspecified else null(relay))
        assert (new.kind, new.proto, new.rtcp_mux, new.direction) == (
            old.kind,
            old.proto,
            old.rtcp_mux,
            old.direction,
        )
        if old.rtcp is not None:
            assert new.rtcp == Endpoint(new.address, relay.port + 1)


def null(relay: Endpoint) -> IPv4Address | IPv6Address:
    return IPv4Address(0) if relay.family == 4 else IPv6Address(0)


def test_rewrite_polycom_to_ipv6() -> None:
    body = fixture("polycom_vvx.sdp")
    expected = body.replace(b"IN IP4 192.0.2.10", b"IN IP6 2001:db8:6::1").replace(
        b"m=audio 2222 ", b"m=audio 30002 "
    )
    assert rewrite_sdp(body, [RELAY6]) == expected


def test_rewrite_rtcp_port_and_address() -> None:
    out = rewrite_sdp(fixture("freeswitch.sdp"), [RELAY6])
    assert b"a=rtcp:30003 IN IP6 2001:db8:6::1\r\n" in out
    out = rewrite_sdp(fixture("linphone_ice.sdp"), [RELAY6])
    assert b"a=rtcp:30003\r\n" in out


def test_rewrite_webrtc_dummy_rtcp_gets_the_relay_and_mux_is_kept() -> None:
    body = fixture("chrome_webrtc.sdp")
    out = rewrite_sdp(body, [RELAY4, RELAY4])
    assert out.count(b"a=rtcp:30001 IN IP4 203.0.113.1\r\n") == 2
    assert out.count(b"a=rtcp-mux\r\n") == 2
    assert b"a=group:BUNDLE 0 1\r\n" in out


def test_rewrite_removes_ice_at_both_levels() -> None:
    body = fixture("linphone_ice.sdp")
    out = rewrite_sdp(body, [RELAY4])
    assert b"candidate" not in out
    assert b"ice-" not in out
    assert b"a=rtcp-xr:" in out  # a look-alike that is not ICE stays
    chrome = rewrite_sdp(fixture("chrome_webrtc.sdp"), [RELAY6, RELAY6])
    assert b"a=end-of-candidates" not in chrome
    assert b"a=ice-options" not in chrome


def test_rewrite_keeps_ice_when_asked() -> None:
    body = fixture("linphone_ice.sdp")
    out = rewrite_sdp(body, [RELAY4], remove_ice=False)
    assert out.count(b"a=candidate:") == 4
    assert b"a=ice-ufrag:0e8b6a21\r\n" in out


def test_rewrite_rejected_stream_untouched() -> None:
    body = fixture("rejected_video_answer.sdp")
    out = rewrite_sdp(body, [RELAY6, None])
    video = body.split(b"m=video")[1]
    assert out.endswith(b"m=video" + video)
    assert b"m=audio 30002 RTP/AVP 0\r\nc=IN IP6 2001:db8:6::1\r\n" in out
    assert b"c=" not in out.split(b"m=audio")[0]  # no session-level c= appears


@pytest.mark.parametrize(
    ("name", "relay", "expected"),
    [
        ("hold_rfc2543.sdp", RELAY6, b"c=IN IP6 ::\r\n"),
        ("hold_rfc2543.sdp", RELAY4, b"c=IN IP4 0.0.0.0\r\n"),
        ("hold_inactive_ipv6.sdp", RELAY4, b"c=IN IP4 0.0.0.0\r\n"),
        ("hold_inactive_ipv6.sdp", RELAY6, b"c=IN IP6 ::\r\n"),
        ("hold_sendonly.sdp", RELAY6, b"c=IN IP6 2001:db8:6::1\r\n"),
    ],
)
def test_rewrite_hold(name: str, relay: Endpoint, expected: bytes) -> None:
    body = fixture(name)
    out = rewrite_sdp(body, [relay])
    assert expected in out
    assert b"m=audio %d " % relay.port in out
    assert parse_sdp(out).media[0].direction == parse_sdp(body).media[0].direction


def test_rewrite_hold_rtcp_address_follows_the_stream() -> None:
    body = HEAD + b"c=IN IP4 0.0.0.0\r\nm=audio 2222 RTP/AVP 0\r\na=rtcp:2223 IN IP4 192.0.2.1\r\n"
    out = rewrite_sdp(body, [RELAY6])
    assert out.endswith(b"c=IN IP6 ::\r\nm=audio 30002 RTP/AVP 0\r\na=rtcp:30003 IN IP6 ::\r\n")
    (spec,) = stream_specs(parse_sdp(out))
    assert spec == StreamSpec(peer=Endpoint(IPv6Address(0), 30002), rtcp=None)


def test_rewrite_origin_host_name() -> None:
    body = b"v=0\r\no=user 1 2 IN IP4 pbx.example.com\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    body += b"m=audio 4000 RTP/AVP 0\r\n"
    out = rewrite_sdp(body, [RELAY6])
    assert out.startswith(b"v=0\r\no=user 1 2 IN IP6 2001:db8:6::1\r\n")


def test_line_endings_lf_and_missing_final_newline() -> None:
    crlf = fixture("linphone_ice.sdp")
    expected = rewrite_sdp(crlf, [RELAY6])
    lf = crlf.replace(b"\r\n", b"\n")
    assert rewrite_sdp(lf, [RELAY6]) == expected.replace(b"\r\n", b"\n")
    assert rewrite_sdp(crlf[:-2], [RELAY6]) == expected[:-2]
    assert rewrite_sdp(lf[:-1], [None], remove_ice=False) == lf[:-1]


def test_mixed_line_endings_stay_per_line() -> None:
    body = b"v=0\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\nc=IN IP4 192.0.2.1\r\nt=0 0\n"
    body += b"m=audio 4000 RTP/AVP 0\r\na=rtcp:4001\n"
    out = rewrite_sdp(body, [RELAY4])
    assert out == (
        b"v=0\no=- 1 1 IN IP4 203.0.113.1\r\ns=-\nc=IN IP4 203.0.113.1\r\nt=0 0\n"
        b"m=audio 30000 RTP/AVP 0\r\na=rtcp:30001\n"
    )


def test_non_utf8_outside_parsed_lines_is_kept() -> None:
    body = fixture("snom_latin1.sdp")
    assert b"M\xfcller" in body
    out = rewrite_sdp(body, [RELAY6])
    assert b"i=Anruf von M\xfcller\r\n" in out
    assert b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" in out


def test_port_zero_stays_rejected_whatever_the_relay() -> None:
    body = fixture("rejected_video_answer.sdp")
    assert rewrite_sdp(body, [RELAY6, RELAY6]) == rewrite_sdp(body, [RELAY6, None])
    only_rejected = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\nm=video 0 RTP/AVP 31\r\n"
    assert rewrite_sdp(only_rejected, [RELAY4]) == only_rejected


def test_relay_count_must_match_m_lines() -> None:
    with pytest.raises(SdpError, match="2 relays given for 1 m= lines"):
        rewrite_sdp(fixture("asterisk.sdp"), [RELAY4, RELAY4])


def test_relays_must_share_one_host() -> None:
    with pytest.raises(ValueError, match="one host"):
        rewrite_sdp(fixture("audio_video_ipv6.sdp"), [RELAY4, RELAY6])


def test_offer_answer_through_the_session_manager() -> None:
    """IPv6 phone offers audio+video to an IPv4 phone that rejects video: each side gets
    SDP naming relays of its own family, and the rejected stream stays port 0."""
    manager = SessionManager(
        pools={
            4: RelayPortPool(IPv4Address("203.0.113.1"), 30000, 30999),
            6: RelayPortPool(IPv6Address("2001:db8:6::1"), 30000, 30999),
        },
        idle_timeout=60.0,
        delete_delay=10.0,
    )
    offer = fixture("audio_video_ipv6.sdp")
    specs = stream_specs(parse_sdp(offer))
    relays = manager.offer("call-1", "tag-a", specs, toward=4, now=0.0)
    sent_offer = parse_sdp(rewrite_sdp(offer, relays))
    assert {m.address for m in sent_offer.media} == {IPv4Address("203.0.113.1")}
    assert [m.port for m in sent_offer.media] == [r.port for r in relays if r is not None]

    answer = fixture("rejected_video_answer.sdp")
    back = manager.answer("call-1", "tag-a", "tag-b", stream_specs(parse_sdp(answer)), now=0.1)
    assert back[0] is not None and back[0].host == IPv6Address("2001:db8:6::1")
    sent_answer = parse_sdp(rewrite_sdp(answer, back))
    assert sent_answer.media[0].address == IPv6Address("2001:db8:6::1")
    assert sent_answer.media[0].port == back[0].port
    assert sent_answer.media[1].port == 0


# --- malformed SDP -------------------------------------------------------------------

HEAD = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "must start with a v=0"),
        (b"o=- 1 1 IN IP4 192.0.2.1\r\nv=0\r\n", "must start with a v=0"),
        (b"v=1\r\n", "must start with a v=0"),
        (HEAD + b"\r\nm=audio 4000 RTP/AVP 0\r\n", r"line 5: not a <type>=<value>"),
        (HEAD + b"hello\r\n", "not a <type>=<value>"),
        (HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP\r\n", "bad m= line"),
        (HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio x RTP/AVP 0\r\n", "bad m= port 'x'"),
        (HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio 70000 RTP/AVP 0\r\n", "bad m= port"),
        (HEAD + b"c=IN IP4 2001:db8::1\r\n", "bad c= address"),
        (HEAD + b"c=IN IP6 192.0.2.1\r\n", "bad c= address"),
        (HEAD + b"c=IN IP4 pbx.example.com\r\n", "bad c= address"),
        (HEAD + b"c=ATM NSAP 47.0091\r\n", "bad c= address"),
        (HEAD + b"c=IN IP4\r\n", "bad c= address"),
        (HEAD + b"c=IN IP4 192.0.2.\xff\r\n", "non-ASCII"),
        (b"v=0\r\no=- 1 IN IP4 192.0.2.1\r\n", "bad o= line"),
        (HEAD + b"m=audio 4000 RTP/AVP 0\r\n", "m= line without any c= address"),
        (HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:x\r\n", "bad a=rtcp port"),
        (HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:\r\n", "bad a=rtcp line"),
        (
            HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0\r\na=rtcp:4001 IN IP4 ::1\r\n",
            "bad a=rtcp address",
        ),
    ],
)
def test_malformed(body: bytes, message: str) -> None:
    with pytest.raises(SdpError, match=message):
        parse_sdp(body)
    with pytest.raises(SdpError, match=message):
        rewrite_sdp(body, [])  # rewrite validates before counting relays


def test_oversize_body() -> None:
    body = HEAD + b"a=x-pad:" + b"x" * MAX_SDP_SIZE + b"\r\n"
    with pytest.raises(SdpError, match="exceeds 65535"):
        parse_sdp(body)


def test_body_at_the_cap_is_accepted() -> None:
    pad = MAX_SDP_SIZE - len(HEAD) - len(b"a=x-pad:\r\n")
    body = HEAD + b"a=x-pad:" + b"x" * pad + b"\r\n"
    assert len(body) == MAX_SDP_SIZE
    assert rewrite_sdp(body, []) == body


# --- property test -------------------------------------------------------------------

EOL = st.sampled_from([b"\r\n", b"\n"])
V4 = st.ip_addresses(v=4)
V6 = st.ip_addresses(v=6)
OTHER_ATTRIBUTES = [b"a=rtpmap:0 PCMU/8000", b"a=ptime:20", b"a=x-custom:1.2.3.4", b"b=AS:64"]
ICE_LINES = [
    b"a=candidate:1 1 UDP 2130706303 192.168.1.20 7078 typ host",
    b"a=ice-ufrag:abcd",
    b"a=ice-pwd:0123456789abcdef012345",
    b"a=end-of-candidates",
]


@st.composite
def connection(draw: st.DrawFn) -> bytes:
    """``IN IP4|IP6 <address>``, null (hold) addresses included."""
    address = draw(st.one_of(V4, V6, st.sampled_from([IPv4Address(0), IPv6Address(0)])))
    return b"IN IP%d %s" % (address.version, str(address).encode())


@st.composite
def sdp_bodies(draw: st.DrawFn) -> bytes:
    """Valid SDP as UAs write it: random streams, c= placement, rtcp, ICE, hold, endings."""
    lines = [b"v=0", b"o=- 1 2 " + draw(connection()), b"s=-"]
    session_c = draw(st.booleans())
    if session_c:
        lines.append(b"c=" + draw(connection()))
    lines.append(b"t=0 0")
    lines += draw(st.lists(st.sampled_from([*ICE_LINES, b"a=sendonly"]), max_size=2))
    for _ in range(draw(st.integers(1, 4))):
        port = draw(st.one_of(st.just(0), st.integers(1, 65535)))
        lines.append(b"m=%s %d RTP/AVP 0 8" % (draw(st.sampled_from([b"audio", b"video"])), port))
        if port and (not session_c or draw(st.booleans())):
            lines.append(b"c=" + draw(connection()))
        if draw(st.booleans()):
            rtcp = b"a=rtcp:%d" % draw(st.integers(0, 65535))
            if draw(st.booleans()):
                rtcp += b" " + draw(connection())
            lines.append(rtcp)
        extra = st.sampled_from([*OTHER_ATTRIBUTES, *ICE_LINES, b"a=rtcp-mux", b"a=inactive"])
        lines += draw(st.lists(extra, max_size=4))
    body = b"".join(line + draw(EOL) for line in lines)
    return body.rstrip(b"\r\n") if draw(st.booleans()) else body


@settings(max_examples=200, deadline=None)
@given(body=sdp_bodies(), family=st.sampled_from([4, 6]), data=st.data())
def test_rewrite_property(body: bytes, family: int, data: st.DataObject) -> None:
    before = parse_sdp(body)
    host = IPv4Address("203.0.113.1") if family == 4 else IPv6Address("2001:db8:6::1")
    relay_strategy = st.integers(1024, 65534).map(lambda port: Endpoint(host, port))
    relays = [data.draw(st.none() | relay_strategy) for _ in before.media]
    out = rewrite_sdp(body, relays)
    after = parse_sdp(out)
    assert not any(is_ice(line) for line in lines_of(out))
    assert len(after.media) == len(before.media)
    for old, new, relay in zip(before.media, after.media, relays, strict=True):
        if relay is None or old.port == 0:
            assert (new.port, new.kind, new.rtcp_mux) == (old.port, old.kind, old.rtcp_mux)
            continue
        assert new.port == relay.port
        assert old.address is not None and new.address is not None
        assert new.address == (null(relay) if old.address.is_unspecified else relay.host)
        if old.rtcp is not None:
            assert new.rtcp == Endpoint(new.address, relay.port + 1)
    if any(relay and old.port for relay, old in zip(relays, before.media, strict=True)):
        assert after.origin_address == host
    else:
        assert out == b"".join(line for line in lines_of(body) if not is_ice(line))


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(ALL_FIXTURES),
    cut=st.integers(0, 4000),
    junk=st.binary(max_size=12),
)
def test_damaged_sdp_fails_only_with_sdp_error(name: str, cut: int, junk: bytes) -> None:
    """Bytes spliced into a real body either still parse or raise SdpError, nothing else."""
    body = fixture(name)
    damaged = body[:cut] + junk + body[cut:]
    try:
        info = parse_sdp(damaged)
    except SdpError:
        return
    relays: list[Endpoint | None] = [RELAY6] * len(info.media)
    parse_sdp(rewrite_sdp(damaged, relays))


@pytest.mark.parametrize(
    "origin",
    [
        b"o=- 7 7 IN IP6 2001:db8::5",
        b"o=a b  c\t7 7 IN\tIP6   2001:db8::5 ",
        b"o=-\t7\t7\tIN IP6 2001:db8::5",
    ],
)
def test_origin_blanks_anywhere_only_its_address_is_rewritten(origin: bytes) -> None:
    body = b"v=0\r\n" + origin + b"\r\ns=-\r\nc=IN IP6 2001:db8::5\r\nt=0 0\r\n"
    body += b"m=audio 4000 RTP/AVP 0\r\n"
    assert parse_sdp(body).origin_address == IPv6Address("2001:db8::5")
    out = lines_of(rewrite_sdp(body, [RELAY4]))[1]
    head, _, _ = origin.rpartition(b"IP6")
    assert out == head + b"IP4 203.0.113.1" + origin[len(origin.rstrip()) :] + b"\r\n"


def test_a_bad_line_is_reported_at_its_own_line_whatever_came_before() -> None:
    """Parsed connection data is shared between bodies: the line number is not."""
    bad = b"c=IN IP4 pbx.example.com\r\n"
    for extra in (0, 3):
        body = HEAD + b"a=x:1\r\n" * extra + bad
        with pytest.raises(SdpError, match=f"line {5 + extra}: bad c= address"):
            parse_sdp(body)


@pytest.mark.parametrize(
    ("m_line", "port"), [(b"m=audio 4000 RTP/AVP 0", 4000), (b"m= audio\t4002  RTP/AVP 0 8", 4002)]
)
def test_m_line_blanks(m_line: bytes, port: int) -> None:
    body = HEAD + b"c=IN IP4 192.0.2.1\r\n" + m_line + b"\r\n"
    (media,) = parse_sdp(body).media
    assert media.port == port and media.kind == "audio" and media.proto == "RTP/AVP"
    out = rewrite_sdp(body, [RELAY4])
    assert lines_of(out)[-1] == m_line.replace(str(port).encode(), b"30000") + b"\r\n"


def test_non_ascii_m_line_is_an_sdp_error() -> None:
    with pytest.raises(SdpError, match="line 6: non-ASCII"):
        parse_sdp(HEAD + b"c=IN IP4 192.0.2.1\r\nm=audio 4000 RTP/AVP 0 \xe9\r\n")
