"""SIP messages (RFC 3261 §7, §20, §25) that keep their bytes.

A parsed message remembers the raw bytes of its start line, of every header line
(including folding) and of the blank line; ``to_bytes()`` writes those back, so a message
parsed and serialised with no change equals its input exactly, and an edit changes only
the header lines it touches. Header values are read unfolded (§7.3.1); compact forms
(``v:``, ``f:``, ...) and names compare case-insensitively.

The RFC 3261 §25 ABNF encoded here::

    generic-message = start-line *message-header CRLF [ message-body ]
    Request-Line    = Method SP Request-URI SP SIP-Version CRLF
    Status-Line     = SIP-Version SP Status-Code SP Reason-Phrase CRLF
    SIP-Version     = "SIP" "/" 1*DIGIT "." 1*DIGIT
    message-header  = field-name HCOLON field-value CRLF      ; HCOLON = *( SP / HTAB ) ":" SWS
    LWS             = [*WSP CRLF] 1*WSP                       ; folding, read as one SP
    token           = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" )
    word            = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" /
                         "(" / ")" / "<" / ">" / ":" / "\\" / DQUOTE / "/" / "[" / "]" / "?" /
                         "{" / "}" )
    Call-ID         = ( "Call-ID" / "i" ) HCOLON word [ "@" word ]
    CSeq            = "CSeq" HCOLON 1*DIGIT LWS Method
    Max-Forwards    = "Max-Forwards" HCOLON 1*DIGIT
    Content-Length  = ( "Content-Length" / "l" ) HCOLON 1*DIGIT
    Via             = ( "Via" / "v" ) HCOLON via-parm *(COMMA via-parm)
    via-parm        = sent-protocol LWS sent-by *( SEMI via-params )
    sent-protocol   = protocol-name SLASH protocol-version SLASH transport
    sent-by         = host [ COLON port ]
    via-received    = "received" EQUAL (IPv4address / IPv6address)   ; RFC 5118 §4.5: or
                                                                     ; an IPv6reference
    name-addr       = [ display-name ] LAQUOT addr-spec RAQUOT
    display-name    = *(token LWS) / quoted-string
    quoted-string   = SWS DQUOTE *(qdtext / quoted-pair ) DQUOTE
    Contact         = ("Contact" / "m" ) HCOLON ( STAR / (contact-param *(COMMA contact-param)))
    contact-param   = (name-addr / addr-spec) *( SEMI contact-params )
    generic-param   = token [ EQUAL gen-value ]
    gen-value       = token / host / quoted-string
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Literal, Self, TypeVar

from xlat.sip.errors import SipParseError
from xlat.sip.headers import (
    CALL_ID_RE,
    CRLF,
    CSEQ_RE,
    LIST_HEADERS,
    TOKEN_RE,
    WSP,
    Header,
    NameAddr,
    Via,
    canonical_name,
    check_wildcard,
    field_key,
    has_control,
    parse_name_addr,
    parse_via,
    split_list,
)
from xlat.sip.status import REASONS
from xlat.sip.uri import SipUri, parse_uri

__all__ = [
    "MAX_MESSAGE_SIZE",
    "REASONS",
    "Header",
    "NameAddr",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "StreamFramer",
    "Via",
    "canonical_name",
    "derived_request",
    "make_response",
    "parse_message",
    "split_list",
]

# Cap on one message (start line + headers + body). A UDP datagram cannot carry more
# (16-bit length, RFC 768), and it is Kamailio's receive buffer (BUF_SIZE 65535); over TCP
# it bounds what one connection may make us buffer (h11's HTTP_DEFAULT_MAX_BUFFER_SIZE
# habit: every buffer has a cap).
MAX_MESSAGE_SIZE = 65535

_VERSION_RE = re.compile(r"SIP/(\d+)\.(\d+)", re.IGNORECASE)
BLANK_LINE_RE = re.compile(rb"\n\r?\n")
# The bytes header lines may hold and still go to the fast parser: printable ASCII, HT,
# CR and LF (see _is_plain); any other (a control character, non-ASCII) needs the general
# one.
_PLAIN_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F)])
_EOL_RE = re.compile(rb"\r?\n\Z")

# Mandatory in every request and response (§8.1.1; Max-Forwards may be absent, §16.6).
_REQUIRED = ("via", "from", "to", "call-id", "cseq")
_REQUIRED_KEYS = frozenset(_REQUIRED)
_SINGLE = ("from", "to", "call-id", "cseq", "max-forwards", "content-type")
_SPELLING = {
    "via": "Via",
    "from": "From",
    "to": "To",
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "max-forwards": "Max-Forwards",
    "content-type": "Content-Type",
}



class SipMessage(ABC):
    """Start line, headers in order, body. Base of SipRequest and SipResponse.

    Parsed header values (Via, From, To, CSeq, ...) are parsed once and kept until an edit
    of that header (set, insert, remove, replace_values, pop_top); the objects returned
    are the message's own: change one only to write it back with those methods. Edit
    `headers` directly only on a message whose parsed values were never read."""

    __slots__ = ("_blank", "_body", "_parsed", "_start_key", "_start_raw", "eol", "headers")

    headers: list[Header]

    def __init__(self, headers: Iterable[Header | tuple[str, str]] = (), body: bytes = b"") -> None:
        self.headers = [h if isinstance(h, Header) else Header(*h) for h in headers]
        self.eol = CRLF
        self._body = body
        self._blank: bytes | None = None
        self._start_raw: bytes | None = None
        self._start_key: tuple[object, ...] | None = None
        self._parsed: dict[str, object] = {}
        if self.get("content-length") is None:
            self.headers.append(Header("Content-Length", str(len(body))))

    def copy(self) -> Self:
        """An independent copy to edit (§16.6 step 1: one copy per forwarded target).
        Header lines are immutable and shared; parsed values are not."""
        clone = self._clone_start()
        clone.headers = list(self.headers)
        clone.eol = self.eol
        clone._body = self._body
        clone._blank = self._blank
        clone._start_raw = self._start_raw
        clone._start_key = self._start_key
        clone._parsed = {}
        return clone

    def compact(self) -> None:
        """Forget the parsed header values (parsed again when read): a message kept for
        long, such as a transaction's request, then holds fewer objects for the garbage
        collector to walk."""
        self._parsed = {}

    @abstractmethod
    def _clone_start(self) -> Self:
        """A new message of this kind with copies of the start line fields only."""

    # -- reading -------------------------------------------------------------------------

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        """Setting a different body rewrites Content-Length (and only then)."""
        if value != self._body:
            self._body = value
            self.set("Content-Length", str(len(value)))

    def get(self, name: str) -> str | None:
        """The first value of a header (the whole line; compact forms understood)."""
        key = canonical_name(name)
        for h in self.headers:
            if h.key == key:
                return h.value
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of a header across its lines; list headers (Via, Route, Contact,
        ...) split at commas outside quotes and <>."""
        key = canonical_name(name)
        values: list[str] = []
        if key in LIST_HEADERS:
            for h in self.headers:
                if h.key == key:
                    values += split_list(h.value)
        else:
            values = [h.value for h in self.headers if h.key == key]
        return values

    def _require(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise SipParseError(f"missing {name}")
        return value

    @property
    def call_id(self) -> str:
        return self._require("Call-ID")

    @property
    def cseq(self) -> tuple[int, str]:
        """(sequence number, method)."""
        cached = self._parsed.get("cseq")
        if cached is None:
            value = self._require("CSeq")
            m = CSEQ_RE.fullmatch(value)
            if not m or len(m.group(1)) > 10 or int(m.group(1)) >= 2**31:
                raise SipParseError(f"bad CSeq: {value!r}")
            cached = self._parsed["cseq"] = (int(m.group(1)), m.group(2))
        return cached  # type: ignore[return-value]

    @property
    def vias(self) -> list[Via]:
        cached = self._parsed.get("via")
        if cached is None:
            cached = self._parsed["via"] = [Via.parse(v) for v in self.get_all("Via")]
        return cached  # type: ignore[return-value]

    @property
    def from_(self) -> NameAddr:
        return self._name_addr("from", "From")

    @property
    def to(self) -> NameAddr:
        return self._name_addr("to", "To")

    def _name_addr(self, key: str, name: str) -> NameAddr:
        cached = self._parsed.get(key)
        if cached is None:
            cached = self._parsed[key] = NameAddr.parse(self._require(name))
        return cached  # type: ignore[return-value]

    @property
    def max_forwards(self) -> int:
        """Max-Forwards, 70 when absent (§8.1.1.6)."""
        value = self.get("Max-Forwards")
        if value is None:
            return 70
        if not value.isascii() or not value.isdigit() or int(value) > 255:
            raise SipParseError(f"bad Max-Forwards: {value!r}")
        return int(value)

    @property
    def content_type(self) -> str | None:
        return self.get("Content-Type")

    @property
    def wildcard_contact(self) -> bool:
        """``Contact: *`` (REGISTER removing every binding, §10.2.2)."""
        return self.get_all("Contact") == ["*"]

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact entries in order; empty for ``Contact: *``."""
        cached = self._parsed.get("contact")
        if cached is None:
            values = self.get_all("Contact")
            if "*" in values:
                check_wildcard(values)
                values = []
            cached = self._parsed["contact"] = [NameAddr.parse(v) for v in values]
        return cached  # type: ignore[return-value]

    @property
    def routes(self) -> list[NameAddr]:
        return self._name_addrs("route", "Route")

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._name_addrs("record-route", "Record-Route")

    def _name_addrs(self, key: str, name: str) -> list[NameAddr]:
        cached = self._parsed.get(key)
        if cached is None:
            cached = self._parsed[key] = [NameAddr.parse(v) for v in self.get_all(name)]
        return cached  # type: ignore[return-value]

    # -- editing: only the touched header lines change -----------------------------------

    def _indexes(self, key: str) -> list[int]:
        """Where the lines of canonical header `key` are; forgets its parsed value (the
        caller is about to edit them)."""
        self._parsed.pop(key, None)
        return [i for i, h in enumerate(self.headers) if h.key == key]

    def set(self, name: str, value: str) -> None:
        """Give a header exactly this one value: the first line of that name is rewritten
        (keeping its name as written), further lines removed; appended when absent."""
        idx = self._indexes(canonical_name(name))
        if not idx:
            self.headers.append(Header(name, value))
            return
        first = self.headers[idx[0]]
        if first.value != value:
            self.headers[idx[0]] = Header(first.name, value)
        for i in reversed(idx[1:]):
            del self.headers[i]

    def insert(self, index: int | Literal["top"], name: str, value: str) -> None:
        """Insert a new header line at `index` of `headers`, or "top": just above the
        first line of that name (index 0 when there is none)."""
        header = Header(name, value)
        self._parsed.pop(header.key, None)
        at = index if index != "top" else next(
            (i for i, h in enumerate(self.headers) if h.key == header.key), 0)
        self.headers.insert(at, header)

    def remove(self, name: str) -> int:
        """Remove every line of a header; return how many went."""
        idx = self._indexes(canonical_name(name))
        for i in reversed(idx):
            del self.headers[i]
        return len(idx)

    def replace_values(self, name: str, values: Sequence[str]) -> None:
        """Make a list header hold `values` in order. Leading and trailing lines whose
        values already match stay untouched; the lines between are replaced by one line
        (at the first replaced position) holding the remaining values, or removed."""
        idx = self._indexes(canonical_name(name))
        lines = [split_list(self.headers[i].value) for i in idx]
        values = list(values)
        head = 0
        while head < len(lines) and values[: len(lines[head])] == lines[head]:
            values = values[len(lines[head]) :]
            head += 1
        tail = len(lines)
        while (
            tail > head and lines[tail - 1] and values[-len(lines[tail - 1]) :] == lines[tail - 1]
        ):
            values = values[: -len(lines[tail - 1])]
            tail -= 1
        touched = idx[head:tail]
        if not touched and not values:
            return
        if touched:
            first = self.headers[touched[0]]
            at, written = touched[0], first.name
        else:
            # nothing replaced: the new values go between the kept head and tail lines
            at = len(self.headers) if not idx else idx[head] if head < len(idx) else idx[-1] + 1
            written = name
        for i in reversed(touched):
            del self.headers[i]
        if values:
            self.headers.insert(at, Header(written, ", ".join(values)))

    def pop_top(self, name: str) -> str | None:
        """Remove and return the first value of a list header (None when absent)."""
        key = canonical_name(name)
        for i, h in enumerate(self.headers):
            if h.key == key:
                first = split_list(h.value)
                if len(first) == 1:  # the usual line of one value: it goes, as it is
                    self._parsed.pop(key, None)
                    del self.headers[i]
                    return first[0]
                break
        values = self.get_all(name)
        if not values:
            return None
        self.replace_values(name, values[1:])
        return values[0]

    # -- writing -------------------------------------------------------------------------

    @abstractmethod
    def _start_line(self) -> tuple[tuple[object, ...], str]:
        """(the fields the start line is made of, the line as they write it)."""

    def to_bytes(self) -> bytes:
        """The message on the wire: untouched parts as they came in."""
        key, text = self._start_line()
        if self._start_raw is not None and key == self._start_key:
            out = [self._start_raw]
        else:
            if has_control(text):
                raise ValueError(f"not a valid start line: {text!r}")
            out = [(text + self.eol).encode("utf-8", "surrogateescape")]
        out += [h.to_bytes(self.eol) for h in self.headers]
        out.append(self._blank if self._blank is not None else self.eol.encode())
        out.append(self._body)
        return b"".join(out)

    def _validate(self) -> None:
        """Check what a proxy relies on (§8.1.1, §8.2.2.x); raises SipParseError(400)."""
        lines: dict[str, list[str]] = {}  # one pass over the headers: values by key
        for h in self.headers:
            if h.key in lines:
                lines[h.key].append(h.value)
            else:
                lines[h.key] = [h.value]
        if not lines.keys() >= _REQUIRED_KEYS:
            missing = next(name for name in _REQUIRED if name not in lines)
            raise SipParseError(f"missing {_SPELLING[missing]} header")
        for name in _SINGLE:
            if len(lines.get(name, ())) > 1:
                raise SipParseError(f"more than one {_SPELLING[name]} header")
        call_id = lines["call-id"][0]
        if not CALL_ID_RE.fullmatch(call_id):
            raise SipParseError(f"bad Call-ID: {call_id!r}")
        # Parsing each is the check. The parsers' shared templates are enough for it:
        # the message's own copies are made when a reader asks.
        _ = self.cseq
        parse_name_addr(lines["from"][0])
        parse_name_addr(lines["to"][0])
        _ = self.max_forwards
        contacts = _split_lines(lines.get("contact"))
        if "*" in contacts:
            check_wildcard(contacts)
            contacts = []
        for name in ("route", "record-route"):
            contacts += _split_lines(lines.get(name))
        for value in contacts:
            parse_name_addr(value)
        vias = _split_lines(lines["via"])
        if not vias:
            raise SipParseError("empty Via")
        for value in vias:
            parse_via(value)
        expires = lines.get("expires", (None,))[0]
        if expires is not None and not (
            expires.isascii() and expires.isdigit() and int(expires) < 2**32
        ):
            raise SipParseError(f"bad Expires: {expires!r}")


def _split_lines(values: list[str] | None) -> list[str]:
    """The elements of the lines of one list header (split_list of each)."""
    if not values:
        return []
    if len(values) == 1:
        return split_list(values[0])
    return [element for value in values for element in split_list(value)]


class SipRequest(SipMessage):
    """A request. `uri` is a SipUri for sip:/sips:, the raw text for other schemes."""

    __slots__ = ("method", "uri", "version")

    def __init__(
        self,
        method: str,
        uri: SipUri | str,
        headers: Iterable[Header | tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        self.method = method
        self.uri = uri
        self.version = version
        super().__init__(headers, body)

    def _clone_start(self) -> SipRequest:
        uri = self.uri.copy() if isinstance(self.uri, SipUri) else self.uri
        return SipRequest(self.method, uri, version=self.version)  # copy() sets the rest

    def _start_line(self) -> tuple[tuple[object, ...], str]:
        key = (self.method, str(self.uri), self.version)
        return key, f"{self.method} {key[1]} {self.version}"

    def _validate(self) -> None:
        super()._validate()
        if self.cseq[1] != self.method:
            raise SipParseError(f"CSeq method {self.cseq[1]} does not match {self.method}")

    def __repr__(self) -> str:
        return f"<SipRequest {self.method} {self.uri}>"


class SipResponse(SipMessage):
    """A response."""

    __slots__ = ("reason", "status", "version")

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Iterable[Header | tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "SIP/2.0",
    ) -> None:
        self.status = status
        self.reason = REASONS.get(status, "") if reason is None else reason
        self.version = version
        super().__init__(headers, body)

    def _clone_start(self) -> SipResponse:
        return SipResponse(self.status, self.reason, version=self.version)  # copy() sets the rest

    def _start_line(self) -> tuple[tuple[object, ...], str]:
        key = (self.version, self.status, self.reason)
        return key, f"{self.version} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<SipResponse {self.status} {self.reason}>"


# -- parsing ---------------------------------------------------------------------------


def parse_message(data: bytes) -> SipRequest | SipResponse:
    """Parse one message from a datagram. A body longer than Content-Length is cut to it,
    a shorter one is an error (§18.3); with no Content-Length the body is the rest.
    Raises SipParseError."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise SipParseError(f"message of {len(data)} bytes over {MAX_MESSAGE_SIZE}", 413)
    split = _split_head(data)
    if split is None:
        raise SipParseError("no blank line after the headers")
    head, blank, body_at = split
    msg = _parse_head(head, blank)
    rest = data[body_at:]
    length = _content_length(msg)
    if length is not None:
        if len(rest) < length:
            raise SipParseError(f"body of {len(rest)} bytes shorter than Content-Length")
        rest = rest[:length]
    msg._body = rest
    return msg


class StreamFramer:
    """Cuts a TCP/TLS byte stream into messages (§18.3: Content-Length mandatory). CRLFs
    between messages (RFC 5626 keep-alives) are skipped. Any error is final: the stream
    cannot be re-synchronised, so every later feed() raises it again. Work per byte fed is
    bounded: the blank-line search resumes where it stopped and a parsed head waits for
    its body without being parsed again."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._scanned = 0  # no blank line ends before this offset of _buf
        self._head: tuple[SipRequest | SipResponse, int, int] | None = None  # msg, at, len
        self._error: SipParseError | None = None

    def feed(self, data: bytes) -> list[SipRequest | SipResponse]:
        """Append bytes; return the messages completed. Raises SipParseError."""
        if self._error is not None:
            raise self._error
        self._buf += data
        try:
            return self._drain()
        except SipParseError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def _drain(self) -> list[SipRequest | SipResponse]:
        out: list[SipRequest | SipResponse] = []
        while True:
            if self._head is None:
                self._head = self._next_head()
                if self._head is None:
                    return out
            msg, body_at, length = self._head
            if len(self._buf) < body_at + length:
                return out
            msg._body = bytes(self._buf[body_at : body_at + length])
            del self._buf[: body_at + length]
            self._head = None
            self._scanned = 0
            out.append(msg)

    def _next_head(self) -> tuple[SipRequest | SipResponse, int, int] | None:
        """Parse the next head once its blank line is in; None while it is not."""
        if self._scanned == 0:
            keepalive = len(self._buf) - len(self._buf.lstrip(b"\r\n"))
            del self._buf[:keepalive]
        split = _split_head(self._buf, max(0, self._scanned - 2))
        if split is None:
            self._scanned = len(self._buf)
            if len(self._buf) > self.max_size:
                raise SipParseError(f"headers over {self.max_size} bytes", 413)
            return None
        head, blank, body_at = split
        msg = _parse_head(head, blank)
        length = _content_length(msg)
        if length is None:
            raise SipParseError("missing Content-Length on a stream transport")
        if body_at + length > self.max_size:
            raise SipParseError(f"message over {self.max_size} bytes", 413)
        return msg, body_at, length


def _split_head(data: bytes | bytearray, start: int = 0) -> tuple[bytes, bytes, int] | None:
    """(start line + header lines, blank line, body offset), None without a blank line
    (searched from `start`)."""
    m = BLANK_LINE_RE.search(data, start)
    if m is None:
        return None
    return bytes(data[: m.start() + 1]), bytes(data[m.start() + 1 : m.end()]), m.end()


def _lines(head: bytes) -> list[bytes]:
    """Lines with their line endings; a bare CR is left inside a line (and rejected)."""
    return [line for line in re.split(rb"(?<=\n)", head) if line]


def _text(raw: bytes, what: str) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    text = text[: -2 if text.endswith("\r\n") else -1]
    if has_control(text):
        raise SipParseError(f"control character in {what}: {text!r}")
    return text


def _parse_head(head: bytes, blank: bytes) -> SipRequest | SipResponse:
    start_raw = head[: head.index(b"\n") + 1]
    msg = _parse_start_line(_text(start_raw, "start line"))
    msg.eol = "\r\n" if start_raw.endswith(b"\r\n") else "\n"
    msg._start_raw = start_raw
    msg._start_key = msg._start_line()[0]
    msg._blank = blank
    block = head[len(start_raw) :]
    msg.headers = _parse_headers(block)
    msg._validate()
    return msg


def _is_plain(block: bytes) -> bool:
    """Header lines with no folding, no control character but their line endings (no
    bare CR) and only ASCII: one line per header, and text and bytes split alike."""
    return (
        block[:1] not in (b" ", b"\t")
        and b"\n " not in block
        and b"\n\t" not in block
        and block.count(b"\r") == block.count(b"\r\n")
        and not block.translate(None, _PLAIN_BYTES)
    )


def _parse_headers(block: bytes) -> list[Header]:
    """The header fields of a head's header lines: one ``Header`` per field, its value
    unfolded (§7.3.1: each continuation line joins with one SP) and its raw bytes the
    lines as they came. A block ``_is_plain`` accepts (the usual: no folding, ASCII)
    is decoded once as a whole, one field per line; any other line by line, each
    checked for control characters and joined with its continuation lines."""
    if _is_plain(block):
        fields: Iterable[tuple[bytes, str]] = zip(
            block.splitlines(keepends=True), block.decode().splitlines(), strict=True)
    else:
        fields = [(b"".join(group), " ".join(part for line in group
                                             if (part := _text(line, "header").strip(WSP))))
                  for group in _folded(block)]
    headers = []
    new = tuple.__new__
    for raw, line in fields:
        name, colon, value = line.partition(":")
        key = field_key(name) if colon else None
        if key is None:
            raise SipParseError(f"bad header line: {line.rstrip(WSP)!r}")
        # Header(name, value, raw) without its checks, which only apply to new lines
        headers.append(new(Header, (name.rstrip(WSP), value.strip(WSP), raw, key)))
    return headers


def _folded(block: bytes) -> list[list[bytes]]:
    """Header lines grouped by field: a line starting with SP or HTAB continues the
    field above (§7.3.1)."""
    groups: list[list[bytes]] = []
    for line in _lines(block):
        if line[:1] in (b" ", b"\t"):
            if not groups:
                raise SipParseError("continuation line before any header")
            groups[-1].append(line)
        else:
            groups.append([line])
    return groups


_M = TypeVar("_M", bound=SipMessage)


def _parse_start_line(line: str) -> SipRequest | SipResponse:
    """Request-Line or Status-Line -> an empty message of the right kind."""
    parts = line.split(" ", 2)
    if len(parts) != 3:
        raise SipParseError(f"bad start line: {line!r}")
    if parts[0].upper().startswith("SIP/"):
        version, code, reason = parts
        _check_version(version)
        if len(code) != 3 or not code.isascii() or not code.isdigit() or code[0] not in "123456":
            raise SipParseError(f"bad status code: {line!r}")
        return _empty(SipResponse(int(code), reason, version=version))
    method, uri_text, version = parts
    if not TOKEN_RE.fullmatch(method) or not uri_text or " " in version:
        raise SipParseError(f"bad request line: {line!r}")
    _check_version(version)
    uri = parse_uri(uri_text)
    if isinstance(uri, SipUri) and uri.headers is not None:
        raise SipParseError(f"headers in a Request-URI (§19.1.1): {uri_text!r}")
    return _empty(SipRequest(method, uri, version=version))


def _check_version(version: str) -> None:
    m = _VERSION_RE.fullmatch(version)
    if not m:
        raise SipParseError(f"bad SIP version: {version!r}")
    if (int(m.group(1)), int(m.group(2))) != (2, 0):
        raise SipParseError(f"unsupported SIP version: {version!r}", 505)


def _empty(msg: _M) -> _M:
    """`msg` (just made) with no header lines at all, not even Content-Length."""
    msg.headers = []
    msg.eol = CRLF
    msg._body = b""
    msg._blank = None
    msg._start_raw = None
    msg._start_key = None
    msg._parsed = {}
    return msg


def _content_length(msg: SipMessage) -> int | None:
    values = {v.strip() for v in msg.get_all("Content-Length")}
    if not values:
        return None
    if len(values) > 1:
        raise SipParseError("conflicting Content-Length headers")
    (value,) = values
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise SipParseError(f"bad Content-Length: {value!r}")
    return int(value)


# -- building responses (§8.2.6, §16.7) ---------------------------------------------------

_RESPONSE_COPIES = frozenset({"via", "from", "to", "call-id", "cseq"})


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    to_tag: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> SipResponse:
    """A response to `request`: Via (every line), From, Call-ID and CSeq copied byte for
    byte, To copied with `to_tag` added when it has none (§8.2.6.2), Timestamp copied into
    a 100 (§8.2.6.1), then `extra_headers`, then Content-Length: 0."""
    headers: list[Header] = []
    for h in request.headers:
        name = h.key
        if name == "to" and to_tag is not None:
            to = NameAddr.parse(h.value)
            if to.tag is None:
                to.params["tag"] = to_tag
                h = Header(h.name, str(to))
        if name in _RESPONSE_COPIES or (name == "timestamp" and status == 100):
            headers.append(h)  # immutable: shared with the request
    headers += [Header(name, value) for name, value in extra_headers]
    response = SipResponse(status, reason, headers)
    response.eol = request.eol
    return response


def derived_request(invite: SipRequest, method: str, response: SipMessage | None = None
                    ) -> SipRequest:
    """A request of the INVITE's own client transaction: the CANCEL (§9.1) or the ACK
    of a failure response (§17.1.1.3). Request-URI, top Via, Route set, From, Call-ID
    and CSeq number are the INVITE's; To is ``response``'s when given (the ACK's: it
    carries the to-tag), else the INVITE's."""
    to = invite if response is None else response
    headers = [("Via", str(invite.vias[0]))]
    headers += [("Route", value) for value in invite.get_all("Route")]
    headers += [
        ("From", invite.get("From") or ""),
        ("To", to.get("To") or ""),
        ("Call-ID", invite.call_id),
        ("CSeq", f"{invite.cseq[0]} {method}"),
        ("Max-Forwards", "70"),
    ]
    return SipRequest(method, invite.uri, headers)
