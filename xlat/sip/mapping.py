"""What is ours, and how each side of a call is shown addresses (RFC 3261 §16.6
items 4-6 applied per address family).

An IP literal that a party of the other family would have to use (Contact; From and
To when configured) becomes the gateway's own address of that party's family, with
the original encoded in a ``;xlat=`` URI parameter (base32) and restored on the way
back; Record-Route names the gateway once per family it is addressed in (RFC 5658);
an IPv6 party behind NAT64 is shown the gateway's synthetic IPv6 address (RFC 6052),
in SIP and, through ``view``, in SDP. Sans-I/O: an ``AddressMap`` is built from the
gateway's configuration and keeps only bounded caches.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from netaddr import IPNetwork

from xlat.addr import Endpoint, IPAddress, nat64_synthesize
from xlat.media.negotiate import View
from xlat.sip.message import NameAddr, SipRequest, SipResponse, Via
from xlat.sip.uri import SipUri, format_host, host_ip

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PORT", "XLAT_PARAM", "AddressMap", "Hop", "host_key"]

XLAT_PARAM = "xlat"  # URI parameter holding the address we mapped away (base32)
DEFAULT_PORT = 5060
# Hosts as written (Via, URIs) whose classification is kept: the few peers of a gateway
# repeat in every message; bounded, since any host can be written.
_HOST_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Hop:
    """One side of a message: where it goes (transport level) and how that party sees
    addresses: ``family`` is the family it uses in SIP and SDP; ``nat64`` the prefix
    through which it reaches IPv4 hosts when it sits behind NAT64."""

    dest: Endpoint
    transport: str
    local: Endpoint | None
    family: int
    nat64: IPNetwork | None = None
    server_name: str | None = None  # TLS: the name its certificate must show

    @property
    def media_family(self) -> int:
        """The family of our relay leg facing it (NAT64: our IPv4 side)."""
        return 4 if self.nat64 is not None else self.family


class AddressMap:
    """The gateway's addresses as the proxy's configuration gives them: ``sip`` and
    ``tls`` endpoints per family, further ``aliases`` (media addresses), ``domains``,
    the NAT64 prefixes; ``map_contact`` and ``map_from_to`` say which headers are
    mapped for a party of the other family."""

    def __init__(
        self,
        sip: Mapping[int, Endpoint],
        tls: Mapping[int, Endpoint],
        *,
        aliases: Sequence[IPAddress] = (),
        domains: Sequence[str] = (),
        nat64_prefixes: Sequence[IPNetwork] = (),
        map_contact: bool = True,
        map_from_to: bool = False,
    ) -> None:
        self.sip, self.tls, self.aliases = sip, tls, tuple(aliases)
        self.nat64_prefixes = tuple(nat64_prefixes)
        self.nat64_prefix = self.nat64_prefixes[0] if self.nat64_prefixes else None
        self.map_contact, self.map_from_to = map_contact, map_from_to
        self.our_ips = self._own_addresses()
        self.our_ports = frozenset(ep.port for ep in (*sip.values(), *tls.values()))
        self._our_domains = frozenset(host_key(d) for d in domains)
        self._ours: dict[str, bool] = {}  # is_ours by host as written
        self._contacts: dict[tuple[str, int, IPNetwork | None], str] = {}  # _mapped_contact

    def _own_addresses(self) -> frozenset[IPAddress]:
        mine: set[IPAddress] = {ep.host for ep in (*self.sip.values(),
                                                   *self.tls.values())}
        mine |= set(self.aliases)
        for prefix in self.nat64_prefixes:
            mine |= {nat64_synthesize(prefix, ip) for ip in list(mine)
                     if isinstance(ip, ipaddress.IPv4Address)}
        return frozenset(mine)

    def is_ours(self, host: str) -> bool:
        ours = self._ours.get(host)
        if ours is None:
            ip = host_ip(host)
            ours = ip in self.our_ips if ip is not None else \
                host_key(host) in self._our_domains
            if len(self._ours) >= _HOST_CACHE_SIZE:  # hosts come from the network
                self._ours.clear()
            self._ours[host] = ours
        return ours

    def names_us(self, uri: SipUri | str) -> bool:
        """A Route/Record-Route URI naming this gateway (host and port)."""
        if not isinstance(uri, SipUri) or not self.is_ours(uri.host):
            return False
        return (uri.port or DEFAULT_PORT) in self.our_ports

    def names_us_via(self, via: Via) -> bool:
        return self.is_ours(via.host) and (via.port or DEFAULT_PORT) in self.our_ports

    def our_endpoint(self, hop: Hop, *, transport: bool = False) -> Endpoint:
        """The gateway's SIP endpoint as ``hop``'s party must address it; with
        ``transport``, the one of the hop's transport (Via, Record-Route: TLS has its
        own port), else the UDP/TCP one (mapped URIs, which carry no transport)."""
        if transport and hop.transport == "tls" and hop.family in self.tls:
            return self.tls[hop.family]
        if hop.nat64 is not None:
            v4 = self.sip[4]
            assert isinstance(v4.host, ipaddress.IPv4Address)
            return Endpoint(nat64_synthesize(hop.nat64, v4.host), v4.port)
        return self.sip[hop.family]

    def record_route(self, request: SipRequest, incoming: Hop, outgoing: Hop) -> None:
        """§16.6 item 4, RFC 5658: one entry, or two when the two sides address the
        gateway differently (family, NAT64 or transport). The top entry faces the
        next hop, the one below faces the previous hop."""
        facing_in = self._rr_uri(incoming)
        facing_out = self._rr_uri(outgoing)
        if facing_in == facing_out:
            request.insert("top", "Record-Route", f"<{facing_out}>")
            return
        request.insert("top", "Record-Route", f"<{facing_in};r2=on>")
        request.insert("top", "Record-Route", f"<{facing_out};r2=on>")

    def _rr_uri(self, hop: Hop) -> str:
        ep = self.our_endpoint(hop, transport=True)
        transport = f";transport={hop.transport}" if hop.transport != "udp" else ""
        return f"sip:{format_host(ep.host)}:{ep.port}{transport};lr"

    def map_addresses(self, message: SipRequest | SipResponse, hop: Hop) -> None:
        """Contact (and From/To when configured) as ``hop``'s party must see them."""
        if self.map_contact:
            values = message.get_all("Contact")
            if values and values != ["*"]:
                shown = [self._mapped_contact(value, hop) for value in values]
                if shown != values:
                    message.replace_values("Contact", shown)
        if self.map_from_to:
            for name, addr in (("From", message.from_), ("To", message.to)):
                mapped = self._mapped(addr.uri, hop)
                if mapped is not None:
                    addr.uri = mapped
                    message.set(name, str(addr))

    def _mapped_contact(self, value: str, hop: Hop) -> str:
        """A Contact value as ``hop``'s party must see it. A phone writes the same
        Contact in every message: the result is kept per (value, how the party sees
        addresses)."""
        key = (value, hop.family, hop.nat64)
        mapped = self._contacts.get(key)
        if mapped is None:
            contact = NameAddr.parse(value)
            uri = self._mapped(contact.uri, hop)
            if uri is not None:
                contact.uri = uri
            mapped = str(contact)
            if len(self._contacts) >= _HOST_CACHE_SIZE:  # values come from the network
                self._contacts.clear()
            self._contacts[key] = mapped
        return mapped

    def _mapped(self, uri: SipUri | str, hop: Hop) -> SipUri | None:
        """``uri`` as ``hop``'s party must see it, or None when it can use it as is."""
        if not isinstance(uri, SipUri):
            return None
        original = self.unmapped(uri)
        if original is not None:
            ip = original.host_ip
            return original if ip is None or _usable(ip, hop) else None
        ip = uri.host_ip
        if ip is None or _usable(ip, hop) or ip in self.our_ips:
            return None
        ours = self.our_endpoint(hop)
        mapped = uri.with_host(ours.host, ours.port)
        hostport = uri.host if uri.port is None else f"{uri.host}:{uri.port}"
        mapped.params[XLAT_PARAM] = _encode_hostport(hostport)
        return mapped

    def unmapped(self, uri: SipUri) -> SipUri | None:
        """The original of a URI we mapped (host ours, ``;xlat=`` present), else None."""
        encoded = uri.params.get(XLAT_PARAM)
        if not encoded or not self.is_ours(uri.host):
            return None
        try:
            host, port = _decode_hostport(encoded)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            log.info("bad %s parameter in %s", XLAT_PARAM, uri)
            return None
        original = uri.with_host(host, port)
        del original.params[XLAT_PARAM]
        return original

    def view(self, hop: Hop) -> View:
        """How ``hop``'s party sees media addresses: an IPv6 party is shown an IPv4
        relay under its own NAT64 prefix, else under our first one."""
        return View(hop.family, hop.nat64 or self.nat64_prefix)


def _usable(ip: IPAddress, hop: Hop) -> bool:
    return ip.version == hop.family


@functools.lru_cache(maxsize=_HOST_CACHE_SIZE)
def host_key(host: str) -> str:
    ip = host_ip(host)
    return str(ip) if ip is not None else host.lower().rstrip(".")


# The few addresses a gateway maps come back in every message of every call.
@functools.lru_cache(maxsize=1024)
def _encode_hostport(hostport: str) -> str:
    """An address as the ``;xlat=`` value: base32, lower case, no padding."""
    return base64.b32encode(hostport.encode()).decode().rstrip("=").lower()


@functools.lru_cache(maxsize=1024)
def _decode_hostport(encoded: str) -> tuple[str, int | None]:
    """(host, port) from an ``;xlat=`` value. Raises ValueError (binascii.Error,
    UnicodeDecodeError) when it is not one of ours."""
    padded = encoded.upper() + "=" * (-len(encoded) % 8)
    return _split_hostport(base64.b32decode(padded).decode())


def _split_hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    if host_ip(host) is None:
        raise ValueError(f"not an IP literal: {host!r}")
    return host, int(port) if port else None

