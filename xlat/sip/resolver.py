"""The DNS edge of the SIP proxy: one :class:`xlat.sip.dns.Query` in, its records out.

dnspython's asyncio resolver does the asking (no DNS code of our own). It is set up
from /etc/resolv.conf, which ``ip netns exec NS`` replaces with
/etc/netns/NS/resolv.conf, or from the servers given (``--dns-server``). Every lookup
is bounded by ``timeout`` and runs as its own task, so the event loop and every
other call go on meanwhile. The TTL handed back is the answer's; for a negative
answer (NXDOMAIN, or no records of that type) the SOA's negative TTL (RFC 2308 §5:
the smaller of the SOA record's TTL and its MINIMUM field).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.rdatatype
import dns.resolver

from xlat.addr import Endpoint
from xlat.sip import dns as sipdns

log = logging.getLogger(__name__)

__all__ = ["DNS_TIMEOUT", "DnsResolver"]

# Seconds one query may take, all retries and servers included: well inside Timer B/F
# (32 s) even for the three steps NAPTR, SRV, AAAA/A (dnspython's own default is 5 s).
DNS_TIMEOUT = 3.0


class DnsResolver:
    """Runs :class:`~xlat.sip.dns.Query` lookups. ``servers``: ask these (all on the
    port of the first) instead of resolv.conf's."""

    def __init__(self, servers: Sequence[Endpoint] = (), timeout: float = DNS_TIMEOUT) -> None:
        self.timeout = timeout
        if servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [str(ep.host) for ep in servers]
            self._resolver.port = servers[0].port
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                log.warning("no name server in /etc/resolv.conf: host names will not resolve "
                            "(give --dns-server)")
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = []
        self._resolver.lifetime = timeout

    @property
    def servers(self) -> list[str]:
        return [str(ns) for ns in self._resolver.nameservers]

    async def lookup(
        self, query: sipdns.Query
    ) -> tuple[list[sipdns.Record], float | None] | None:
        """The records of ``query`` and their TTL (empty: a negative answer, TTL from
        its SOA or None), or None when no answer came (timeout, SERVFAIL, refused)."""
        try:
            answer = await self._resolver.resolve(query.name + ".", query.rdtype, search=False,
                                                  raise_on_no_answer=False,
                                                  lifetime=self.timeout)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.responses().values())
            return [], _negative_ttl(responses[0]) if responses else None
        except (dns.exception.DNSException, OSError) as exc:  # Timeout, NoNameservers, ...
            log.info("DNS %s %s failed: %s", query.rdtype, query.name,
                     exc or type(exc).__name__)
            return None
        if answer.rrset is None:
            return [], _negative_ttl(answer.response)
        return [_record(rdata) for rdata in answer.rrset], float(answer.rrset.ttl)


def _record(rdata: object) -> sipdns.Record:
    rdtype = getattr(rdata, "rdtype", None)
    if rdtype == dns.rdatatype.NAPTR:
        return sipdns.Naptr(rdata.order, rdata.preference,  # type: ignore[attr-defined]
                            rdata.flags.decode("ascii", "replace"),  # type: ignore[attr-defined]
                            rdata.service.decode("ascii", "replace"),  # type: ignore[attr-defined]
                            rdata.replacement.to_text())  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.SRV:
        return sipdns.Srv(rdata.priority, rdata.weight, rdata.port,  # type: ignore[attr-defined]
                          rdata.target.to_text())  # type: ignore[attr-defined]
    return ipaddress.ip_address(rdata.address)  # type: ignore[attr-defined]


def _negative_ttl(response: dns.message.Message | None) -> float | None:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of the authority section's SOA."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, *(rdata.minimum for rdata in rrset)))
    return None
