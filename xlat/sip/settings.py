"""What the SIP proxy is told about the gateway (built from xlat/config.py's settings,
or by a test): its endpoints, names, routes, NAT64 prefixes, timers and registrar."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from netaddr import IPNetwork

from xlat.addr import Endpoint, IPAddress
from xlat.sip.auth import Credentials
from xlat.sip.transaction import Timers
from xlat.sip.uri import SipUri

__all__ = ["KNOWN_TRANSPORTS", "TRANSPORTS", "ProxyConfig"]

TRANSPORTS = ("udp", "tcp")  # what the gateway listens with by default
KNOWN_TRANSPORTS = ("udp", "tcp", "tls")


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy needs to know about the gateway.

    ``sip``: the gateway's own SIP endpoint per family (4, 6), used in Via,
    Record-Route and mapped URIs and listened on with every transport of
    ``transports`` but TLS; ``tls``: its TLS endpoint per family (RFC 3261 §26: a
    port of its own, 5061 by default), when it has one. ``aliases``: further
    addresses that are ours (the media addresses). ``domains``: host names that are
    ours. ``routes``: (domain or "*", next-hop URI), see ``SipProxy``.
    ``prefer_family``: of a name with both AAAA and A records, the family tried
    first. ``delete_delay``: passed to the media layer when a BYE ends a call (None:
    its default). ``register_expires``: the registrar's default, minimum and maximum
    binding lifetimes (seconds). The registrar is off unless one of two is given:
    ``users`` (the current `Credentials`, e.g. a `UsersFile`): REGISTER is
    authenticated with Digest and bound here, and requests for a user of our domains
    from a source that is not a route's next hop are challenged (407) before anything
    tells whether that user exists; ``registrar_upstream``: REGISTER is forwarded
    there with a Path header (RFC 3327) and nothing is bound here. ``auth_secret``
    keys the Digest nonces."""

    sip: Mapping[int, Endpoint]
    transports: tuple[str, ...] = TRANSPORTS
    tls: Mapping[int, Endpoint] = field(default_factory=dict)
    prefer_family: int = 6
    aliases: tuple[IPAddress, ...] = ()
    domains: tuple[str, ...] = ()
    routes: tuple[tuple[str, SipUri], ...] = ()
    nat64_prefixes: tuple[IPNetwork, ...] = (IPNetwork("64:ff9b::/96"),)
    map_contact: bool = True
    map_from_to: bool = False
    delete_delay: float | None = None
    timers: Timers = field(default_factory=Timers)
    timer_c: float = 180.0  # §16.8: proxy INVITE timer, > 3 minutes
    retry_after: int = 5  # seconds, in 503 when no relay ports are free
    register_expires: tuple[int, int, int] = (3600, 60, 86400)  # default, minimum, maximum
    users: Callable[[], Credentials] | None = None
    registrar_upstream: SipUri | None = None
    auth_secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)

    def __post_init__(self) -> None:
        for family, ep in self.sip.items():
            if ep.family != family:
                raise ValueError(f"sip[{family}] is {ep}, not an IPv{family} endpoint")
        for family, ep in self.tls.items():
            if ep.family != family:
                raise ValueError(f"tls[{family}] is {ep}, not an IPv{family} endpoint")
        for transport in self.transports:
            if transport not in KNOWN_TRANSPORTS:
                raise ValueError(f"unsupported SIP transport {transport!r}")
        if self.prefer_family not in (4, 6):
            raise ValueError(f"prefer_family must be 4 or 6, not {self.prefer_family!r}")
        if self.users is not None and self.registrar_upstream is not None:
            raise ValueError("a local registrar (users) or an upstream one, not both")

    @property
    def usable_transports(self) -> tuple[str, ...]:
        """What requests may be sent with: TLS needs a TLS endpoint of ours (its
        Record-Route names it)."""
        return (*(t for t in self.transports if t != "tls"), *(("tls",) if self.tls else ()))

    def listen(self) -> list[tuple[str, Endpoint]]:
        """Every (transport, endpoint) the proxy expects to receive on."""
        out = [(t, ep) for ep in self.sip.values() for t in self.transports if t != "tls"]
        return out + [("tls", ep) for ep in self.tls.values()]
