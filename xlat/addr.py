"""Transport addresses as xlat writes them everywhere: ``192.0.2.1:30000`` and
``[2001:db8::1]:30000``; and the IPv4-embedded IPv6 addresses of NAT64 (RFC 6052)."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from netaddr import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressError(ValueError):
    """A host or host:port string that is not a valid IP transport address."""


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IPAddress:
    """Parse an IP literal; IPv6 may be bracketed. Raises AddressError. Addresses repeat
    (a phone's calls, a proxy's requests): the same text gives the same object."""
    raw = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        raise AddressError(f"not an IP address: {text!r}") from None


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """An IP address and a UDP/TCP port."""

    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise AddressError(f"port out of range: {self.port}")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``a.b.c.d:port`` or ``[v6]:port``. Raises AddressError."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise AddressError(f"expected ADDR:PORT, got {text!r}")
        if ":" in host and not host.startswith("["):
            raise AddressError(f"IPv6 addresses must be bracketed: {text!r}")
        return cls(parse_ip(host), int(port))

    def __hash__(self) -> int:
        # ipaddress hashes via hex(); endpoints key every flow and session table
        return hash((int(self.host), self.port))

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.host.version

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


# ---- RFC 6052 address embedding -------------------------------------------------------


def _v4_bit_positions(prefix_len: int) -> Iterator[int]:
    """Where the 32 IPv4 bits go in an RFC 6052 §2.2 address: from the end of the
    prefix on, skipping bits 64-71 (the "u" octet, zero)."""
    pos = prefix_len
    for _ in range(32):
        if 64 <= pos < 72:
            pos = 72
        yield pos
        pos += 1


def nat64_synthesize(prefix: IPNetwork, v4: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """The IPv4-embedded IPv6 address of ``v4`` under ``prefix`` (RFC 6052 §2.2;
    prefix lengths 32, 40, 48, 56, 64, 96)."""
    value = int(prefix.network)
    for i, pos in enumerate(_v4_bit_positions(prefix.prefixlen)):
        if int(v4) >> (31 - i) & 1:
            value |= 1 << (127 - pos)
    return ipaddress.IPv6Address(value)


def nat64_embedded(
    prefixes: Sequence[IPNetwork], v6: ipaddress.IPv6Address
) -> ipaddress.IPv4Address | None:
    """The IPv4 address embedded in ``v6`` if it lies in one of ``prefixes``, else None."""
    for prefix in prefixes:
        if prefix.version == 6 and prefix.first <= int(v6) <= prefix.last:
            bits = 0
            for pos in _v4_bit_positions(prefix.prefixlen):
                bits = bits << 1 | (int(v6) >> (127 - pos) & 1)
            return ipaddress.IPv4Address(bits)
    return None
