"""Transport addresses as xlat writes them everywhere: ``192.0.2.1:30000`` and
``[2001:db8::1]:30000``."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

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
