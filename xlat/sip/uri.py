"""SIP and SIPS URIs (RFC 3261 §19.1, §25.1) with IPv6 references (RFC 5118).

A parsed URI keeps the text it came from: ``str(uri)`` gives that text back byte for byte
until a field changes; then the URI is rebuilt from its fields. Parameter names are
lower-cased in ``params`` (they compare case-insensitively, §19.1.4); values are kept
as written.

The RFC 3261 §25.1 ABNF encoded here::

    SIP-URI        = "sip:" [ userinfo ] hostport uri-parameters [ headers ]
    SIPS-URI       = "sips:" [ userinfo ] hostport uri-parameters [ headers ]
    userinfo       = ( user / telephone-subscriber ) [ ":" password ] "@"
    user           = 1*( unreserved / escaped / user-unreserved )
    user-unreserved = "&" / "=" / "+" / "$" / "," / ";" / "?" / "/"
    password       = *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
    hostport       = host [ ":" port ]
    host           = hostname / IPv4address / IPv6reference
    IPv6reference  = "[" IPv6address "]"
    uri-parameters = *( ";" uri-parameter )
    other-param    = pname [ "=" pvalue ]
    pname / pvalue = 1*paramchar
    paramchar      = param-unreserved / unreserved / escaped
    param-unreserved = "[" / "]" / "/" / ":" / "&" / "+" / "$"
    headers        = "?" header *( "&" header )
    header         = hname "=" hvalue
    hnv-unreserved = "[" / "]" / "/" / "?" / ":" / "+" / "$"
    absoluteURI    = scheme ":" ( hier-part / opaque-part )     (tel:, urn:, ... kept raw)
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache

from xlat.sip.errors import SipParseError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
_ESCAPED = r"%[0-9A-Fa-f]{2}"
# "#" is not in user-unreserved, but dial strings such as "*21#" arrive unescaped from
# many deployed phones; Kamailio and PJSIP accept it too.
_USER_RE = re.compile(rf"(?:[{_UNRESERVED}&=+$,;?/#]|{_ESCAPED})+")
_PASSWORD_RE = re.compile(rf"(?:[{_UNRESERVED}&=+$,]|{_ESCAPED})*")
_PARAMCHARS_RE = re.compile(rf"(?:[{_UNRESERVED}\[\]/:&+$]|{_ESCAPED})+")
_HEADERS_RE = re.compile(rf"(?:[{_UNRESERVED}\[\]/?:+$=&]|{_ESCAPED})*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*")
# opaque part of an absolute URI: anything printable but the characters that would end
# it inside a header (LWS, quotes, angle brackets).
_OPAQUE_RE = re.compile(r"[^\s\"<>\x00-\x1f\x7f]+")


@lru_cache(maxsize=1024)  # bounded: hosts come from the network; the few peers repeat
def parse_host(text: str) -> str:
    """Validate a host: hostname, IPv4 address or bracketed IPv6 reference; return it as
    written. An IPv6 address without brackets is an error (RFC 5118 §4.2, §4.10)."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise SipParseError(f"unterminated IPv6 reference: {text!r}")
        try:
            ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise SipParseError(f"bad IPv6 reference: {text!r}") from None
        return text
    if ":" in text:
        raise SipParseError(f"IPv6 address must be bracketed: {text!r}")
    if not _HOSTNAME_RE.fullmatch(text):
        raise SipParseError(f"bad host: {text!r}")
    return text


def parse_port(text: str) -> int:
    """A decimal port 0..65535."""
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise SipParseError(f"bad port: {text!r}")
    return int(text)


@lru_cache(maxsize=1024)
def host_ip(host: str) -> IPAddress | None:
    """The IP address a host names literally (brackets optional), or None for a domain."""
    raw = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        return None


@lru_cache(maxsize=1024)
def format_host(host: str | IPAddress) -> str:
    """A host as written in a URI or Via: IPv6 addresses get brackets (RFC 5118 §4.1)."""
    if isinstance(host, ipaddress.IPv6Address):
        return f"[{host}]"
    text = str(host)
    if ":" in text and not text.startswith("["):
        return f"[{text}]"
    return text


@dataclass(slots=True)
class SipUri:
    """A sip: or sips: URI. `user`, `password`, param values and `headers` stay escaped
    as written; `host` keeps IPv6 brackets."""

    host: str
    scheme: str = "sip"
    user: str | None = None
    password: str | None = None
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str | None = None
    _text: str | None = field(default=None, init=False, repr=False, compare=False)
    _snapshot: tuple[object, ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.host = format_host(self.host)

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse a sip:/sips: URI. Raises SipParseError."""
        scheme, colon, rest = text.partition(":")
        scheme = scheme.lower()
        if not colon or scheme not in ("sip", "sips"):
            raise SipParseError(f"not a sip: or sips: URI: {text!r}")
        # user may hold ";", "?" and "," but no "@": the last "@" ends userinfo.
        userinfo, at, hostpart = rest.rpartition("@")
        hostpart, qmark, headers = hostpart.partition("?")
        if qmark and not _HEADERS_RE.fullmatch(headers):
            raise SipParseError(f"bad URI headers: {text!r}")
        user = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            if not _USER_RE.fullmatch(user):
                raise SipParseError(f"bad user part: {text!r}")
            if colon:
                if not _PASSWORD_RE.fullmatch(pw):
                    raise SipParseError(f"bad password: {text!r}")
                password = pw
        hostport, *param_texts = hostpart.split(";")
        host, port = _split_hostport(hostport)
        uri = cls(
            host=host,
            scheme=scheme,
            user=user,
            password=password,
            port=port,
            params=_parse_uri_params(param_texts),
            headers=headers if qmark else None,
        )
        uri._text = text
        uri._snapshot = uri._key()
        return uri

    def copy(self) -> SipUri:
        """An independent copy (its own params), still writing the parsed text back."""
        clone = SipUri.__new__(SipUri)
        clone.host, clone.scheme, clone.user, clone.password = (
            self.host, self.scheme, self.user, self.password)
        clone.port, clone.params, clone.headers = self.port, dict(self.params), self.headers
        clone._text, clone._snapshot = self._text, self._snapshot
        return clone

    @property
    def host_ip(self) -> IPAddress | None:
        """The host as an IP address; None for a domain name."""
        return host_ip(self.host)

    @property
    def transport(self) -> str | None:
        """The transport parameter, lower-cased (None when absent)."""
        value = self.params.get("transport")
        return value.lower() if value else None

    def with_host(self, host: str | IPAddress, port: int | None) -> SipUri:
        """A copy naming another host and port (None: no port); IPv6 gets brackets."""
        return SipUri(
            host=format_host(host),
            scheme=self.scheme,
            user=self.user,
            password=self.password,
            port=port,
            params=dict(self.params),
            headers=self.headers,
        )

    def _key(self) -> tuple[object, ...]:
        return (
            self.scheme,
            self.user,
            self.password,
            self.host,
            self.port,
            tuple(self.params.items()),
            self.headers,
        )

    def __str__(self) -> str:
        if self._text is not None and self._key() == self._snapshot:
            return self._text
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(format_host(self.host))
        if self.port is not None:
            out += [":", str(self.port)]
        for name, value in self.params.items():
            out += [";", name] if value is None else [";", name, "=", value]
        if self.headers is not None:
            out += ["?", self.headers]
        return "".join(out)


def parse_uri(text: str) -> SipUri | str:
    """A sip:/sips: URI as a SipUri; any other absolute URI (tel:, urn:, ...) checked for
    shape and returned as the text itself. Raises SipParseError."""
    uri = _parse_uri(text)
    return uri.copy() if isinstance(uri, SipUri) else uri


@lru_cache(maxsize=4096)  # a call's URIs come back in each of its messages: templates
def _parse_uri(text: str) -> SipUri | str:
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME_RE.fullmatch(scheme):
        raise SipParseError(f"not an absolute URI: {text!r}")
    if scheme.lower() in ("sip", "sips"):
        return SipUri.parse(text)
    if not _OPAQUE_RE.fullmatch(rest):
        raise SipParseError(f"bad URI: {text!r}")
    return text


def _split_hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"unterminated IPv6 reference: {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SipParseError(f"bad host: {text!r}")
        port_text = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise SipParseError(f"IPv6 address must be bracketed: {text!r}")
        host, colon, port_text_ = text.partition(":")
        port_text = port_text_ if colon else None
    return parse_host(host), None if port_text is None else parse_port(port_text)


def _parse_uri_params(texts: list[str]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for text in texts:
        name, eq, value = text.partition("=")
        if not _PARAMCHARS_RE.fullmatch(name) or (eq and not _PARAMCHARS_RE.fullmatch(value)):
            raise SipParseError(f"bad URI parameter: {text!r}")
        params[name.lower()] = value if eq else None
    if "maddr" in params and params["maddr"] is not None:
        parse_host(params["maddr"])
    return params
