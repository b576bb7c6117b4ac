"""SIP header values (RFC 3261 §7.3, §20, §25): header lines, lists, parameters,
Via and name-addr, parsed as written and written back as parsed.

``Header`` is one line with its raw bytes (a message keeps them: ``xlat.sip.message``);
``Via`` and ``NameAddr`` parse the values a proxy reads and edits, and print back the
text they came from while unchanged. Parsed values are cached by their text
(``parse_via``, ``parse_name_addr``): a call's From, To and Vias come back in every
message of it. The ABNF they encode is in ``xlat.sip.message``'s docstring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from xlat.compiled import mypyc_attr
from xlat.sip.errors import SipParseError
from xlat.sip.uri import IPAddress, SipUri, format_host, host_ip, parse_host, parse_port, parse_uri

__all__ = [
    "CALL_ID_RE",
    "CRLF",
    "CSEQ_RE",
    "LIST_HEADERS",
    "TOKEN",
    "TOKEN_RE",
    "WSP",
    "Header",
    "NameAddr",
    "Via",
    "canonical_name",
    "check_wildcard",
    "field_key",
    "has_control",
    "parse_name_addr",
    "parse_via",
    "split_list",
    "split_quoted",
]

# Compact forms (RFC 3261 §7.3.3 and the RFCs defining each header) -> canonical name.
_COMPACT = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Headers whose grammar is a comma-separated list (RFC 3261 §7.3.1: only these may be
# split or combined). Others may hold commas that are not separators (Date,
# Authorization, Subject, ...), so get_all() never splits them.
LIST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "alert-info",
        "allow",
        "allow-events",
        "call-info",
        "contact",
        "content-encoding",
        "content-language",
        "error-info",
        "history-info",
        "in-reply-to",
        "p-asserted-identity",
        "path",
        "proxy-require",
        "reason",
        "record-route",
        "require",
        "route",
        "service-route",
        "supported",
        "unsupported",
        "via",
        "warning",
    }
)

TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
TOKEN_RE = re.compile(TOKEN)
WORD_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+")
CALL_ID_RE = re.compile(rf"{WORD_RE.pattern}(?:@{WORD_RE.pattern})?")
CSEQ_RE = re.compile(rf"(\d+)[ \t]+({TOKEN})")
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_QUOTED_RE = re.compile(_QUOTED)
# gen-value = token / host / quoted-string; ":" admits an unbracketed IPv6 received=
# (RFC 5118 §4.5) and a bracketed one is a host.
_GEN_VALUE = rf"(?:[A-Za-z0-9\-.!%*_+`'~:]+|\[[0-9A-Fa-f:.]+\]|{_QUOTED})"
_PARAM_RE = re.compile(rf"[ \t]*;[ \t]*({TOKEN})(?:[ \t]*=[ \t]*({_GEN_VALUE}))?[ \t]*")
_VIA_RE = re.compile(
    rf"({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]*/[ \t]*({TOKEN})[ \t]+"
    r"(\[[^\]]*\]|[^\s:;\[]+)(?:[ \t]*:[ \t]*([^\s;]+))?"
)
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_QUOTED_PAIR_RE = re.compile(r"\\[\x00-\x09\x0b\x0c\x0e-\x7f]")
# A list value whose only brackets are <...> pairs, none nested, and a comma outside
# them (followed by no ">" before the next "<"): split_list's fast path.
_ANGLES_RE = re.compile(r"[^<>]*(?:<[^<>]*>[^<>]*)*")
_OUTSIDE_ANGLES_COMMA_RE = re.compile(r",(?=[^>]*(?:<|\Z))")
CRLF = "\r\n"
WSP = " \t"

def has_control(text: str) -> bool:
    """A control character other than HT, except as a quoted-pair (RFC 4475 §3.1.1.4:
    ``\\`` may escape any but CR and LF)."""
    return bool(_CONTROL_RE.search(text) and _CONTROL_RE.search(_QUOTED_PAIR_RE.sub("", text)))


@lru_cache(maxsize=512)  # bounded: names come from the network
def canonical_name(name: str) -> str:
    """The lower-case long form of a header name (compact forms expanded)."""
    lower = name.lower()
    return _COMPACT.get(lower, lower)


class _HeaderLine(NamedTuple):
    name: str
    value: str
    raw: bytes | None
    key: str  # canonical_name(name)


@mypyc_attr(native_class=False)  # mypyc: a NamedTuple subclass cannot be native
class Header(_HeaderLine):
    """One header line: `name` as written, `value` unfolded and stripped, `raw` the
    original line(s) including folding and line ending (None for a new line), `key` the
    canonical name. Immutable (a tuple, cheap to make) so a value cannot change under
    its raw bytes: edits replace the line (SipMessage.set)."""

    __slots__ = ()

    def __new__(cls, name: str, value: str, raw: bytes | None = None) -> Header:
        """A new line must be one well-formed line: no header injection through a value."""
        if raw is None and (not TOKEN_RE.fullmatch(name) or has_control(value)):
            raise ValueError(f"not a valid header line: {name!r}: {value!r}")
        return tuple.__new__(cls, (name, value, raw, canonical_name(name)))

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {self.value!r}, {self.raw!r})"

    def to_bytes(self, eol: str = CRLF) -> bytes:
        """The line as it goes out: raw if untouched, else ``name: value`` + eol."""
        if self.raw is not None:
            return self.raw
        return f"{self.name}: {self.value}{eol}".encode("utf-8", "surrogateescape")


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value at commas outside quoted strings and <...>;
    elements are stripped, empty ones dropped. Raises SipParseError on an unterminated
    quote or angle bracket."""
    if '"' in value or ("<" in value and not _ANGLES_RE.fullmatch(value)):
        parts = split_quoted(value)
    elif "," not in value:  # one element
        value = value.strip(WSP)
        return [value] if value else []
    elif "<" in value:  # <...> pairs, none nested: split at commas outside them
        parts = _OUTSIDE_ANGLES_COMMA_RE.split(value)
    else:
        parts = value.split(",")
    return [p for p in (part.strip(WSP) for part in parts) if p]


def split_quoted(value: str) -> list[str]:
    """The slow path of split_list: walk the characters, tracking quotes and <>."""
    parts = []
    start = 0
    in_quote = in_angle = False
    i = 0
    while i < len(value):
        ch = value[i]
        if in_quote:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            parts.append(value[start:i])
            start = i + 1
        i += 1
    if in_quote:
        raise SipParseError(f"unterminated quoted string: {value!r}")
    if in_angle:
        raise SipParseError(f"unterminated <: {value!r}")
    parts.append(value[start:])
    return parts


def _parse_params(text: str, what: str) -> dict[str, str | None]:
    """``*( SEMI generic-param )`` -> ordered dict, names lower-cased."""
    params: dict[str, str | None] = {}
    pos = 0
    while pos < len(text):
        m = _PARAM_RE.match(text, pos)
        if not m:
            raise SipParseError(f"bad {what} parameter: {text[pos:]!r}")
        params[m.group(1).lower()] = m.group(2)
        pos = m.end()
    return params


def _find_or_len(text: str, sub: str) -> int:
    at = text.find(sub)
    return len(text) if at < 0 else at


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


@dataclass(slots=True)
class Via:
    """One via-parm. `host` keeps IPv6 brackets (RFC 5118); `params` are ordered, names
    lower-cased. ``str()`` gives the parsed text back until a field changes."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    _text: str | None = field(default=None, init=False, repr=False, compare=False)
    _snapshot: tuple[object, ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.host = format_host(self.host)

    @classmethod
    def parse(cls, value: str) -> Via:
        """Parse one via-parm (not a comma list). Raises SipParseError."""
        return parse_via(value).copy()

    def copy(self) -> Via:
        """An independent copy (its own params), still writing the parsed text back."""
        clone = Via.__new__(Via)
        clone.transport, clone.host, clone.port = self.transport, self.host, self.port
        clone.params = dict(self.params)
        clone._text, clone._snapshot = self._text, self._snapshot
        return clone

    @staticmethod
    def _parse(value: str) -> Via:
        text = value.strip(" \t")
        m = _VIA_RE.match(text)
        if not m:
            raise SipParseError(f"bad Via: {value!r}")
        name, version, transport, host, port = m.groups()
        if port is not None and ":" in port:
            raise SipParseError(f"IPv6 address must be bracketed: {value!r}")
        if name.upper() != "SIP" or version != "2.0":
            raise SipParseError(f"bad Via protocol: {value!r}")
        via = Via(
            transport=transport,
            host=parse_host(host),
            port=None if port is None else parse_port(port),
            params=_parse_params(text[m.end() :], "Via"),
        )
        if via.received is not None and host_ip(via.received) is None:
            raise SipParseError(f"bad Via received: {value!r}")
        via._text = text
        via._snapshot = via._key()
        return via

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        """The received= value as written (IPv6 with or without brackets, RFC 5118 §4.5)."""
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The rport= value (RFC 3581); None when absent or present without a value."""
        value = self.params.get("rport")
        return int(value) if value and value.isdigit() else None

    @property
    def host_ip(self) -> IPAddress | None:
        """The sent-by host as an IP address; None for a domain name."""
        return host_ip(self.host)

    def _key(self) -> tuple[object, ...]:
        return (self.transport, self.host, self.port, tuple(self.params.items()))

    def __str__(self) -> str:
        if self._text is not None and self._key() == self._snapshot:
            return self._text
        port = "" if self.port is None else f":{self.port}"
        host = format_host(self.host)
        return f"SIP/2.0/{self.transport} {host}{port}{_format_params(self.params)}"


@dataclass(slots=True)
class NameAddr:
    """``[display] <uri>;params`` or ``uri;params`` (From, To, Contact, Route, ...).
    `display` is as written (quotes kept); `uri` is a SipUri for sip:/sips: and the raw
    text for other schemes (tel:, ...); `angle` says whether <> were used. ``str()`` gives
    the parsed text back until a field changes."""

    uri: SipUri | str
    display: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    angle: bool = True
    _text: str | None = field(default=None, init=False, repr=False, compare=False)
    _snapshot: tuple[object, ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        """Parse one name-addr or addr-spec with its header parameters."""
        return parse_name_addr(value).copy()

    def copy(self) -> NameAddr:
        """An independent copy (its own uri and params), still writing the parsed text
        back."""
        clone = NameAddr.__new__(NameAddr)
        clone.uri = self.uri.copy() if isinstance(self.uri, SipUri) else self.uri
        clone.display, clone.params, clone.angle = self.display, dict(self.params), self.angle
        clone._text, clone._snapshot = self._text, self._snapshot
        return clone

    @staticmethod
    def _parse(value: str) -> NameAddr:
        text = value.strip(" \t")
        display: str | None = None
        rest = text
        if text.startswith('"'):
            m = _QUOTED_RE.match(text)
            if not m:
                raise SipParseError(f"unterminated quoted string: {value!r}")
            display, rest = m.group(0), text[m.end() :].lstrip(" \t")
            if not rest.startswith("<"):
                raise SipParseError(f"quoted display name without <uri>: {value!r}")
        elif 0 <= (lt := text.find("<")) < _find_or_len(text, ";"):
            # a "<" after the first ";" belongs to a parameter of an addr-spec
            words = text[:lt].split()
            if not all(TOKEN_RE.fullmatch(w) or not w.isascii() for w in words):
                raise SipParseError(f"bad display name: {value!r}")
            display, rest = text[:lt].strip(" \t") or None, text[lt:]
        if rest.startswith("<"):
            gt = rest.find(">")
            if gt < 0:
                raise SipParseError(f"unterminated <: {value!r}")
            uri_text, params_text, angle = rest[1:gt], rest[gt + 1 :], True
        else:
            uri_text, semi, params_text = rest.partition(";")
            uri_text, params_text, angle = uri_text.rstrip(" \t"), semi + params_text, False
            if any(c in uri_text for c in ' \t,?"'):
                raise SipParseError(f"bad addr-spec: {value!r}")
        addr = NameAddr(
            uri=parse_uri(uri_text),
            display=display,
            params=_parse_params(params_text, "header"),
            angle=angle,
        )
        addr._text = text
        # addr._key(), knowing that a parsed URI writes uri_text back
        addr._snapshot = (display, uri_text, tuple(addr.params.items()), angle)
        return addr

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def _key(self) -> tuple[object, ...]:
        return (self.display, str(self.uri), tuple(self.params.items()), self.angle)

    def __str__(self) -> str:
        if self._text is not None and self._key() == self._snapshot:
            return self._text
        uri = str(self.uri)
        # An addr-spec cannot hold ",", ";" or "?" (§20.10): such a URI needs <>.
        if self.angle or self.display or any(c in uri for c in ",;?"):
            uri = f"<{uri}>" if not self.display else f"{self.display} <{uri}>"
        return uri + _format_params(self.params)


# Parsed Via and name-addr values by their text: a call's From, To and Vias come back in
# every message of it, the gateway's own Record-Route in every call. The cached objects
# are templates: callers get copies. Bounded: the texts come from the network.
parse_via = lru_cache(maxsize=4096)(Via._parse)
parse_name_addr = lru_cache(maxsize=4096)(NameAddr._parse)


def check_wildcard(contacts: list[str]) -> None:
    """Contact values holding ``*``: it must be the only one (§10.2.2)."""
    if len(contacts) > 1:
        raise SipParseError("Contact: * mixed with other contacts")


@lru_cache(maxsize=512)  # bounded: names come from the network; a few dozen recur
def field_key(name: str) -> str | None:
    """canonical_name of a field name as written before the colon (trailing blanks
    allowed), None when it is not a token."""
    name = name.rstrip(WSP)
    return canonical_name(name) if TOKEN_RE.fullmatch(name) else None
