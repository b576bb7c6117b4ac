"""SDP (RFC 8866, formerly RFC 4566) parsing and byte-preserving rewriting for the
RFC 3264 offer/answer model.

Sans-I/O: bytes in, values or bytes out. The rewriter never regenerates SDP from a model:
it splits the body into the session part and one section per ``m=`` line, edits the spans
of the few lines it must change and copies every other byte as it came, line endings
(CRLF or bare LF) and a missing final newline included.

Grammar this module relies on (RFC 8866 §9, abridged)::

    session-description = version-field origin-field session-name-field ...
                          *media-description
    version-field   = %s"v" "=" 1*DIGIT CRLF
    origin-field    = %s"o" "=" username SP sess-id SP sess-version SP
                      nettype SP addrtype SP unicast-address CRLF
    connection-field = %s"c" "=" nettype SP addrtype SP connection-address CRLF
    media-field     = %s"m" "=" media SP port ["/" integer] SP proto 1*(SP fmt) CRLF
    attribute-field = %s"a" "=" attribute CRLF      ; attribute = att-field [":" att-value]
    nettype = token ; "IN"      addrtype = token ; "IP4" / "IP6"

RFC 8866 §5: a parser SHOULD also accept lines ending in a bare LF; we do, and keep
whichever ending each line had. RFC 3605 (``a=rtcp``) and RFC 5761 (``a=rtcp-mux``) are
read at media level only, where those RFCs define them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from xlat.addr import Endpoint, IPAddress

SDP_CONTENT_TYPE = "application/sdp"


def is_sdp_type(content_type: str | None) -> bool:
    """Whether a Content-Type names SDP: the media type is case-insensitive and may
    carry parameters (RFC 3261 §20.15, RFC 2045 §5.1), e.g. ``Application/SDP;x=1``."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == SDP_CONTENT_TYPE

# Cap on the body we accept. SDP travels in one SIP message, and a SIP message over UDP
# is one datagram: at most 65,535 bytes (RFC 768 length field; RFC 3261 §18.1.1).
# Kamailio, our usual NG client, builds messages in a buffer of the same size
# (`kamailio -I`: BUF_SIZE=65535), so no valid peer hands us a bigger body.
MAX_SDP_SIZE = 65535
# Cap on m= lines. Each live stream takes a relay port per leg, so without it one
# 64 KB offer of ~2,600 "m=audio 9 RTP/AVP 0" lines takes 5,000 ports: a whole pool.
# A call has one to a few streams (audio, video, a BFCP or T.140 one); rtpengine's
# clients do not send more than a handful either.
MAX_STREAMS = 32

DIRECTIONS = frozenset({"sendrecv", "sendonly", "recvonly", "inactive"})

# RFC 8839 §5 (and §5.4/§5.5 for ice-pacing, RFC 8840 for end-of-candidates): every
# attribute that only means something to an ICE agent. We relay media on fixed
# addresses and are no ICE agent, so offering the peer's candidates (its real, other
# family addresses) to the other side would be wrong.
ICE_ATTRIBUTES = frozenset(
    {
        "candidate",
        "ice-ufrag",
        "ice-pwd",
        "ice-options",
        "ice-lite",
        "ice-mismatch",
        "ice-pacing",
        "end-of-candidates",
        "remote-candidates",
    }
)

# Lines that may carry addresses but are left alone on purpose:
# - a=candidate / a=remote-candidates: removed with the other ICE lines when remove_ice,
#   otherwise kept as the caller asked (they then still name the peer's own addresses).
# - a=rtcp at session level: RFC 3605 defines it for media level only.
# - a=source-filter (RFC 4570), a=alt and vendor a=x-... attributes: multicast filters and
#   private extensions whose semantics we do not know; rewriting them blindly could break
#   more than keeping them.
# - u=, e=, k=, b=, i=: URIs, e-mail, keys, bandwidth, text; no media transport address.


class SdpError(ValueError):
    """Malformed SDP; the message says what and where. Fails that one call only."""


@dataclass(frozen=True, slots=True)
class SdpMedia:
    """One ``m=`` section as parsed.

    ``address`` is the effective connection address (media-level ``c=`` overriding the
    session-level one), None only for a rejected stream (port 0) without any ``c=``.
    ``rtcp`` is the ``a=rtcp`` endpoint (its address defaults to ``address``), None when
    absent (RTCP then goes to port + 1). ``direction`` is media-level, else session-level,
    else ``sendrecv``.
    """

    kind: str
    port: int
    proto: str
    address: IPAddress | None
    rtcp: Endpoint | None
    rtcp_mux: bool
    direction: str


@dataclass(frozen=True, slots=True)
class SdpInfo:
    """A parsed body: the ``o=`` address (None if it is a host name) and the streams."""

    origin_address: IPAddress | None
    media: list[SdpMedia]


def parse_sdp(body: bytes) -> SdpInfo:
    """Parse an SDP body. Raises SdpError if it is malformed."""
    parsed = _parse(body)
    session_address = parsed.session_conn.address if parsed.session_conn else None
    media = []
    for section in parsed.media:
        address = section.conns[0].address if section.conns else session_address
        rtcp = None
        if section.rtcp is not None:
            rtcp_address = section.rtcp.conn.address if section.rtcp.conn else address
            if rtcp_address is not None:  # else a rejected stream without any c=
                rtcp = Endpoint(rtcp_address, section.rtcp.port)
        media.append(
            SdpMedia(
                kind=section.kind,
                port=section.port,
                proto=section.proto,
                address=address,
                rtcp=rtcp,
                rtcp_mux=section.rtcp_mux,
                direction=section.direction or parsed.direction or "sendrecv",
            )
        )
    origin_address = parsed.origin.address if parsed.origin else None
    return SdpInfo(origin_address=origin_address, media=media)


def rewrite_sdp(
    body: bytes, relays: Sequence[Endpoint | None], *, remove_ice: bool = True
) -> bytes:
    """Point each stream at its relay; keep every other byte.

    Per ``m=`` line i with ``relays[i]`` an Endpoint: the ``m=`` port becomes its port,
    media-level ``c=`` lines ``IN IP4|IP6 <host>``, ``a=rtcp`` port + 1 (and its address
    if it has one). A null connection address (0.0.0.0 or ::, i.e. hold) stays null, in the
    relay's family. A None relay leaves that section untouched, and so does port 0 whatever
    the relay: a rejected or disabled stream (RFC 3264 §6, §8.2) stays so. If any stream
    is rewritten, the session-level ``c=`` and the ``o=`` address become
    the relay host, which is therefore the same for every given relay (one media address
    per family; else ValueError). ``o=`` session id and version are kept: the same input
    with the same relays gives the same output, so RFC 3264 §8 versioning stays the UA's.
    With remove_ice, the ICE attributes (ICE_ATTRIBUTES) go, at both levels.
    ``len(relays)`` must equal the number of ``m=`` lines (else SdpError).
    """
    parsed = _parse(body)
    if len(relays) != len(parsed.media):
        raise SdpError(f"{len(relays)} relays given for {len(parsed.media)} m= lines")
    live = [None if s.port == 0 else relay for s, relay in zip(parsed.media, relays, strict=True)]
    hosts = {relay.host for relay in live if relay is not None}
    if len(hosts) > 1:
        raise ValueError(f"relays must share one host, got {sorted(map(str, hosts))}")

    edits: dict[int, list[_Edit]] = {}
    if hosts:
        (host,) = hosts
        if parsed.origin is not None:
            edits.setdefault(parsed.origin.line, []).append(
                _Edit(parsed.origin.span, _connection(host, hold=False))
            )
        if parsed.session_conn is not None:
            conn = parsed.session_conn
            edits.setdefault(conn.line, []).append(
                _Edit(conn.span, _connection(host, hold=_is_null(conn)))
            )
    for section, relay in zip(parsed.media, live, strict=True):
        if relay is not None:
            for number, edit in _section_edits(section, relay, parsed.session_conn):
                edits.setdefault(number, []).append(edit)
    ice = {number for number, name in parsed.attributes if name in ICE_ATTRIBUTES}
    drop = ice if remove_ice else set()

    out: list[bytes] = []
    for number, (text, eol) in enumerate(parsed.lines):
        if number in drop:
            continue
        line_edits = edits.get(number)
        out += (text if line_edits is None else _apply(text, line_edits), eol)
    return b"".join(out)


# --- rewriting helpers ---------------------------------------------------------------


class _Edit(NamedTuple):
    span: tuple[int, int]  # [start, end) in the line text, without its line ending
    text: bytes


def _section_edits(
    section: _Section, relay: Endpoint, session_conn: _Conn | None
) -> Iterator[tuple[int, _Edit]]:
    """The edits that point one media section at `relay`.

    The a=rtcp address follows the stream's hold state, not its own value: WebRTC writes
    the dummy ``a=rtcp:9 IN IP4 0.0.0.0`` (RFC 8829 §5.2.1) on live streams, and our relay
    does listen for RTCP on port + 1.
    """
    yield section.m_line, _Edit(section.port_span, str(relay.port).encode())
    for conn in section.conns:
        yield conn.line, _Edit(conn.span, _connection(relay.host, hold=_is_null(conn)))
    if section.rtcp is not None:
        rtcp = section.rtcp
        yield rtcp.line, _Edit(rtcp.port_span, str(relay.port + 1).encode())
        if rtcp.conn is not None:
            effective = section.conns[0] if section.conns else session_conn
            hold = _is_null(effective)
            yield rtcp.line, _Edit(rtcp.conn.span, _connection(relay.host, hold=hold))


def _apply(text: bytes, edits: Sequence[_Edit]) -> bytes:
    """Replace the (non-overlapping) spans of `text`."""
    for edit in sorted(edits, key=lambda e: e.span, reverse=True):
        start, end = edit.span
        text = text[:start] + edit.text + text[end:]
    return text


@functools.lru_cache(maxsize=256)  # our few relay addresses
def _connection(host: IPAddress, *, hold: bool) -> bytes:
    """``IP4 <host>`` / ``IP6 <host>``: the part after ``IN``. On hold, the null address
    of `host`'s family instead (RFC 3264 §8.4 still lets an old UA signal hold that way)."""
    if hold:
        host = IPv4Address(0) if host.version == 4 else IPv6Address(0)
    return f"IP{host.version} {host}".encode()


def _is_null(conn: _Conn | None) -> bool:
    """Whether a connection address is 0.0.0.0 or :: (hold, RFC 2543 style)."""
    return conn is not None and conn.address is not None and conn.address.is_unspecified


# --- parsing -------------------------------------------------------------------------


class _Line(NamedTuple):  # a tuple: one is made per line of every body
    text: bytes  # the line without its ending
    eol: bytes  # b"\r\n", b"\n" or b"" (last line without newline)


@dataclass(frozen=True, slots=True)
class _Conn:
    """An ``<nettype> <addrtype> <address>`` triple on a c=, o= or a=rtcp line."""

    line: int  # index into _Parsed.lines
    span: tuple[int, int]  # from addrtype to the end of the address: what a rewrite replaces
    address: IPAddress | None  # None: a host name (allowed in o= only)


@dataclass(frozen=True, slots=True)
class _Rtcp:
    line: int
    port: int
    port_span: tuple[int, int]
    conn: _Conn | None


@dataclass(slots=True)
class _Section:
    m_line: int
    kind: str
    port: int
    port_span: tuple[int, int]
    proto: str
    conns: list[_Conn] = field(default_factory=list)
    rtcp: _Rtcp | None = None
    rtcp_mux: bool = False
    direction: str | None = None


@dataclass(slots=True)
class _Parsed:
    lines: list[_Line]
    origin: _Conn | None = None
    session_conn: _Conn | None = None
    direction: str | None = None
    media: list[_Section] = field(default_factory=list)
    attributes: list[tuple[int, str]] = field(default_factory=list)  # (line, att-field)


_TOKEN = re.compile(rb"[^ \t]+")
_TYPE_VALUE = re.compile(rb"[a-zA-Z]=")


def _split_lines(body: bytes) -> list[_Line]:
    """Split at LF, keeping each line's own ending (CRLF, LF, or none at the very end)."""
    lines = []
    *ended, last = body.split(b"\n")  # last: what follows the final LF (b"" if it ends so)
    for raw in ended:
        if raw.endswith(b"\r"):
            lines.append(_Line(raw[:-1], b"\r\n"))
        else:
            lines.append(_Line(raw, b"\n"))
    if last:  # kept whole: a CR there ends no line (found by tests/fuzz, target sdp)
        lines.append(_Line(last, b""))
    return lines


@functools.lru_cache(maxsize=32)  # parse_sdp then rewrite_sdp of the same body: parse once
def _parse(body: bytes) -> _Parsed:
    """Read-only result: callers must not change it (it is shared through the cache)."""
    if len(body) > MAX_SDP_SIZE:
        raise SdpError(f"SDP body of {len(body)} bytes exceeds {MAX_SDP_SIZE}")
    parsed = _Parsed(lines=_split_lines(body))
    lines = parsed.lines
    # Some stacks end the body with an extra empty line: tolerate (and keep) blank lines
    # at the end only.
    while lines and not lines[-1].text.strip():
        lines = lines[:-1]
    if not lines or lines[0].text != b"v=0":
        raise SdpError("SDP must start with a v=0 line")
    section: _Section | None = None
    for number, line in enumerate(lines):
        if not _TYPE_VALUE.match(line.text):
            raise SdpError(f"line {number + 1}: not a <type>=<value> line: {line.text[:40]!r}")
        kind = line.text[:1]
        if kind == b"m":
            section = _parse_m(number, line.text)
            parsed.media.append(section)
            if len(parsed.media) > MAX_STREAMS:
                raise SdpError(f"line {number + 1}: more than {MAX_STREAMS} m= lines")
        elif kind == b"c":
            conn = _parse_conn(number, line.text, 2, "c=")
            if section is None:
                parsed.session_conn = conn
            else:
                section.conns.append(conn)
        elif kind == b"o" and section is None:
            parsed.origin = _parse_origin(number, line.text)
        elif kind == b"a":
            _parse_attribute(parsed, section, number, line.text)
    for section in parsed.media:
        if section.port != 0 and not section.conns and parsed.session_conn is None:
            raise SdpError(f"line {section.m_line + 1}: m= line without any c= address")
    return parsed


def _ascii(number: int, text: bytes) -> str:
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise SdpError(f"line {number + 1}: non-ASCII bytes in {text[:2]!r} line") from None


def _parse_port(number: int, token: str, what: str) -> int:
    if not token.isdigit() or int(token) > 65535:
        raise SdpError(f"line {number + 1}: bad {what} port {token!r}")
    return int(token)


_M_LINE = re.compile(rb"m=[ \t]*([^ \t]+)[ \t]+([^ \t]+)[ \t]+([^ \t]+)[ \t]+[^ \t]")


def _parse_m(number: int, text: bytes) -> _Section:
    """``m=<media> <port>[/<count>] <proto> <fmt> ...``."""
    _ascii(number, text)
    m = _M_LINE.match(text)
    if m is None:
        raise SdpError(f"line {number + 1}: bad m= line {text[:80]!r}")
    kind, port_text, proto = (group.decode() for group in m.groups())
    port = _parse_port(number, port_text.partition("/")[0], "m=")
    # The whole "port/count" token is the span: one relay pair replaces a port range.
    return _Section(m_line=number, kind=kind, port=port, port_span=m.span(2), proto=proto)


def _parse_conn(
    number: int, text: bytes, start: int, what: str, *, allow_name: bool = False
) -> _Conn:
    """``<nettype> <addrtype> <address>`` from text[start:] (the whole rest of the line).

    The address of a c= line may carry ``/ttl[/count]`` (multicast, RFC 8866 §5.7); the
    span covers it, since a unicast relay address replaces it.
    """
    _ascii(number, text)
    found = _conn_fields(text[start:], allow_name)
    if found is None:
        raise SdpError(f"line {number + 1}: bad {what} address {text[:80]!r}")
    (first, end), address = found
    return _Conn(line=number, span=(start + first, start + end), address=address)


# A peer writes the same connection data in every body (and o= lines differ only before
# it): its parse is kept. Bounded: the bytes come from the network.
@functools.lru_cache(maxsize=4096)
def _conn_fields(
    rest: bytes, allow_name: bool
) -> tuple[tuple[int, int], IPAddress | None] | None:
    """(span from addrtype to the end of the address, address) of the connection data
    ``rest`` (ASCII), None when malformed; the address is None for a host name."""
    tokens = [(m.group().decode(), m.span()) for m in _TOKEN.finditer(rest)]
    if len(tokens) != 3:
        return None
    (nettype, _), (addrtype, type_span), (address_text, address_span) = tokens
    address_text = address_text.partition("/")[0]
    version = {"IP4": 4, "IP6": 6}.get(addrtype)
    address: IPAddress | None
    try:
        address = IPv4Address(address_text) if version == 4 else IPv6Address(address_text)
    except ValueError:
        address = None
    if nettype != "IN" or version is None or (address is None and not allow_name):
        return None
    return (type_span[0], address_span[1]), address


def _parse_origin(number: int, text: bytes) -> _Conn:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <address>``.

    Read from the right: some UAs put spaces in the username. The address may be a host
    name (RFC 8866 §5.2).
    """
    _ascii(number, text)
    starts = [match.start() for match in _TOKEN.finditer(text, 2)]
    if len(starts) < 6:
        raise SdpError(f"line {number + 1}: bad o= line {text[:80]!r}")
    return _parse_conn(number, text, starts[-3], "o=", allow_name=True)


def _parse_attribute(parsed: _Parsed, section: _Section | None, number: int, text: bytes) -> None:
    """Record the attributes we act on; any other a= line needs no parsing at all."""
    name_bytes, colon, _ = text[2:].partition(b":")
    try:
        name = name_bytes.rstrip(b" \t").decode("ascii")  # "a=sendonly " occurs in the wild
    except UnicodeDecodeError:
        return  # not an attribute of ours; kept byte for byte
    parsed.attributes.append((number, name))
    if name in DIRECTIONS and not colon:
        if section is None:
            parsed.direction = name
        else:
            section.direction = name
    elif section is None:
        return
    elif name == "rtcp-mux" and not colon:
        section.rtcp_mux = True
    elif name == "rtcp" and colon:
        section.rtcp = _parse_rtcp(number, text)


def _parse_rtcp(number: int, text: bytes) -> _Rtcp:
    """``a=rtcp:<port> [<nettype> <addrtype> <connection-address>]`` (RFC 3605 §2.1)."""
    start = len(b"a=rtcp:")
    match = _TOKEN.match(text, start)
    if match is None:
        raise SdpError(f"line {number + 1}: bad a=rtcp line {text[:80]!r}")
    port = _parse_port(number, _ascii(number, match.group()), "a=rtcp")
    conn = None
    if text[match.end() :].strip():
        conn = _parse_conn(number, text, match.end(), "a=rtcp")
    return _Rtcp(line=number, port=port, port_span=match.span(), conn=conn)
