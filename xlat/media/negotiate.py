"""The offer/answer seam (RFC 3264): SDP in, SDP out, for every control protocol.

The SIP proxy (an SDP in an INVITE, UPDATE, 18x/2xx or ACK) and the NG server
(``offer``/``answer`` commands) both come here, as rtpengine's control protocols all
come to its ``monologue_offer_answer``. One step per box:

1. ``parse``: the body as SDP (``xlat.sdp``) and the streams it describes
   (``stream_specs``: what the media layer needs per ``m=`` line);
2. ``offer`` / ``answer``: the session update (``SessionManager``), which allocates
   relay ports and queues the kernel flows;
3. the view each party gets (``View``): the relays as that party must address them
   (NAT64: an IPv4 relay shown to an IPv6 party is its RFC 6052 synthetic address);
4. the rewrite (``xlat.sdp.rewrite_sdp``): each stream pointed at its relay, every
   other byte kept, ICE attributes removed.

Whatever goes wrong is one :class:`NegotiationError`, which carries both the SIP
response it means and the NG ``error-reason``; nothing is left allocated by an offer
that failed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from netaddr import IPNetwork

from xlat.addr import Endpoint, nat64_synthesize
from xlat.media.session import (
    PortsExhausted,
    SessionManager,
    SessionNotFound,
    StreamMismatch,
    StreamSpec,
)
from xlat.sdp import SdpError, SdpInfo, parse_sdp, rewrite_sdp

log = logging.getLogger(__name__)

__all__ = ["Description", "NegotiationError", "View", "answer", "offer", "parse",
           "stream_specs"]


class NegotiationError(Exception):
    """An offer or answer that cannot be taken. ``str()`` is the NG ``error-reason``;
    ``status`` and ``reason`` the SIP response a request carrying it gets (``reason``
    None: the status's own phrase)."""

    def __init__(self, ng_reason: str, status: int, reason: str | None = None) -> None:
        super().__init__(ng_reason)
        self.status, self.reason = status, reason

    @property
    def ports_exhausted(self) -> bool:
        """No relay ports free: worth retrying later (SIP: 503 with Retry-After)."""
        return self.status == 503


@dataclass(frozen=True, slots=True)
class View:
    """How a party sees media addresses: ``family`` is the one it uses in SDP;
    ``nat64`` the prefix through which it reaches IPv4 hosts (None: it is shown
    relays as they are)."""

    family: int
    nat64: IPNetwork | None = None

    def present(self, relays: Sequence[Endpoint | None]) -> tuple[Endpoint | None, ...]:
        """``relays`` as this party must address them: an IPv4 relay shown to an IPv6
        party becomes its synthetic IPv6 address (RFC 6052 §2.2)."""
        if self.family != 6 or self.nat64 is None:
            return tuple(relays)
        out: list[Endpoint | None] = []
        for relay in relays:
            if relay is not None and isinstance(relay.host, ipaddress.IPv4Address):
                relay = Endpoint(nat64_synthesize(self.nat64, relay.host), relay.port)
            out.append(relay)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Description:
    """One party's SDP: the body as received, parsed, and its streams (which a control
    protocol may adjust before the session update, e.g. NG's ``media-address``)."""

    body: bytes
    info: SdpInfo
    specs: list[StreamSpec]


def stream_specs(info: SdpInfo) -> list[StreamSpec]:
    """What the media layer needs per ``m=`` line: port 0 gives ``peer=None``.

    An ``a=rtcp`` with a null address is no place to send RTCP: on a live stream it is
    WebRTC's dummy (RFC 8829 §5.2.1: ``a=rtcp:9 IN IP4 0.0.0.0``), on a held one it adds
    nothing to the null peer. It gives ``rtcp=None``.
    """
    specs = []
    for media in info.media:
        if media.port == 0 or media.address is None:
            specs.append(StreamSpec(peer=None))
            continue
        rtcp = media.rtcp
        if rtcp is not None and rtcp.host.is_unspecified:
            rtcp = None
        peer = Endpoint(media.address, media.port)
        specs.append(StreamSpec(peer=peer, rtcp=rtcp, rtcp_mux=media.rtcp_mux))
    return specs


def parse(body: bytes) -> Description:
    """Step 1. Raises NegotiationError (488) for a body that is no SDP we can relay."""
    try:
        info = parse_sdp(body)
    except SdpError as exc:
        raise NegotiationError(f"bad SDP: {exc}", 488, f"Bad SDP: {exc}"[:100]) from None
    return Description(body, info, stream_specs(info))


def offer(
    media: SessionManager,
    sdp: Description,
    *,
    call_id: str,
    from_tag: str,
    to_tag: str | None = None,
    toward: int,
    views: Sequence[View | None],
    now: float,
    offerer_family: int | None = None,
    origin: str = "sip",
) -> list[bytes]:
    """Steps 2-4 for an offer of ``from_tag`` to answerers of family ``toward``: the
    offer each of ``views`` is to get (a party seeing relays as they are: None), one
    rewrite per distinct view. Raises NegotiationError; an offer that opened a new call
    (no ``to_tag``) leaves nothing behind."""
    try:
        relays = media.offer(call_id, from_tag, sdp.specs, toward=toward, now=now,
                             offerer_family=offerer_family, origin=origin, to_tag=to_tag)
    except PortsExhausted as exc:
        raise NegotiationError(str(exc), 503, "No Media Ports") from None
    written: dict[tuple[Endpoint | None, ...], bytes] = {}
    out: list[bytes] = []
    try:
        for view in views:
            shown = tuple(relays) if view is None else view.present(relays)
            if shown not in written:
                written[shown] = rewrite_sdp(sdp.body, shown)
            out.append(written[shown])
    except ValueError as exc:  # relays on several addresses of one family
        log.error("call %s: cannot write the relays into the SDP: %s", call_id, exc)
        if to_tag is None:
            media.delete(call_id, from_tag, now=now, delay=0)
        raise NegotiationError(f"cannot rewrite SDP: {exc}", 500) from None
    return out


def answer(
    media: SessionManager,
    sdp: Description,
    *,
    call_id: str,
    from_tag: str,
    to_tag: str,
    view: View | None,
    now: float,
) -> bytes:
    """Steps 2-4 for the answer of ``to_tag`` to the offer of ``from_tag``: the answer
    the offerer, seeing addresses as ``view`` says, is to get. Raises NegotiationError
    (no offer, streams that do not match it, no ports for a fork's legs)."""
    try:
        relays = media.answer(call_id, from_tag, to_tag, sdp.specs, now=now)
    except SessionNotFound as exc:
        raise NegotiationError(str(exc), 481) from None
    except StreamMismatch as exc:
        raise NegotiationError(str(exc), 488) from None
    except PortsExhausted as exc:
        raise NegotiationError(str(exc), 503, "No Media Ports") from None
    try:
        return rewrite_sdp(sdp.body, relays if view is None else view.present(relays))
    except ValueError as exc:
        raise NegotiationError(f"cannot rewrite SDP: {exc}", 500) from None
