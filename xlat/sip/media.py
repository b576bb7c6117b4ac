"""What SIP messages mean for media: RFC 3264 offer/answer as SIP carries it (RFC 3261
§13.2.1, RFC 6337 §2): an offer in an INVITE or UPDATE is answered in the 18x/2xx; an
INVITE without one gets the offer in its 2xx and the answer in the ACK; a BYE ends
the call. Every SDP goes through ``xlat.media.negotiate`` and is written as the
party the message goes to must see it (``AddressMap.view``).

Sans-I/O like the proxy that calls it: messages and ``now`` in, rewritten bodies out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from xlat.media import negotiate
from xlat.media.negotiate import NegotiationError
from xlat.media.session import SessionManager
from xlat.sdp import is_sdp_type
from xlat.sip.mapping import AddressMap, Hop
from xlat.sip.message import SipRequest, SipResponse
from xlat.sip.routing import Reject

log = logging.getLogger(__name__)

__all__ = ["SipMedia"]

_OFFERING = frozenset({"INVITE", "UPDATE"})  # requests whose SDP is an offer


class SipMedia:
    """The media side of the proxy over one ``SessionManager``. ``delete_delay``: how
    long a BYE leaves the relays forwarding (None: the manager's default);
    ``retry_after``: seconds, in the 503 when no relay ports are free."""

    def __init__(self, manager: SessionManager, addresses: AddressMap, *,
                 delete_delay: float | None = None, retry_after: int = 5) -> None:
        self.manager, self.addresses = manager, addresses
        self.delete_delay, self.retry_after = delete_delay, retry_after

    def request(self, request: SipRequest, incoming: Hop, targets: Sequence[Hop],
                now: float) -> list[bytes | None] | None:
        """A request forwarded to ``targets``: a BYE ends the call; an SDP offer gets
        relays facing the first target, and the offer each target is to get is
        returned (None for a target of another family: the media layer has one
        answerer side per offer). None: no offer. Raises Reject with nothing
        allocated."""
        if request.method == "BYE":
            self.manager.delete(request.call_id, request.from_.tag, request.to.tag,
                                now=now, delay=self.delete_delay)
        body = sdp_body(request)
        if body is None or request.method not in _OFFERING:
            return None
        family = targets[0].media_family
        try:
            written = iter(negotiate.offer(
                self.manager,
                negotiate.parse(body),
                call_id=request.call_id,
                from_tag=request.from_.tag or "",
                to_tag=request.to.tag,
                toward=family,
                views=[self.addresses.view(t) for t in targets if t.media_family == family],
                now=now,
                offerer_family=incoming.media_family,
            ))
        except NegotiationError as exc:
            headers = [("Retry-After", str(self.retry_after))] if exc.ports_exhausted else []
            raise Reject(exc.status, exc.reason, headers) from None
        return [next(written) if t.media_family == family else None for t in targets]

    def ack(self, ack: SipRequest, hop: Hop, now: float) -> bytes | None:
        """The answer to a late offer (offer in the 2xx, answer in the ACK) as ``hop``
        must see it; None: the ACK goes on as it is."""
        body = sdp_body(ack)
        if body is None:
            return None
        try:
            return negotiate.answer(self.manager, negotiate.parse(body), call_id=ack.call_id,
                                    from_tag=ack.to.tag or "", to_tag=ack.from_.tag or "",
                                    view=self.addresses.view(hop), now=now)
        except NegotiationError as exc:
            log.warning("call %s: SDP in ACK left as is: %s", ack.call_id, exc)
            return None

    def response(self, request: SipRequest, offered: bool, response: SipResponse,
                 hop: Hop, now: float) -> None:
        """Rewrite the SDP of an 18x/2xx going to ``hop``: the answer to the request's
        offer (``offered``), or, for an INVITE without SDP, the offer in the 2xx (late
        offer). An SDP the media layer cannot take is left as it is."""
        body = sdp_body(response)
        if body is None or response.status < 101 or response.status >= 300:
            return
        to_tag = response.to.tag
        if to_tag is None:
            return
        late_offer = request.method == "INVITE" and response.status >= 200
        if not (offered or late_offer):
            return
        try:
            sdp = negotiate.parse(body)
            if offered:
                response.body = negotiate.answer(
                    self.manager, sdp, call_id=request.call_id,
                    from_tag=request.from_.tag or "", to_tag=to_tag,
                    view=self.addresses.view(hop), now=now)
            else:
                (response.body,) = negotiate.offer(
                    self.manager, sdp, call_id=request.call_id, from_tag=to_tag,
                    to_tag=request.from_.tag, toward=hop.media_family,
                    views=[self.addresses.view(hop)], now=now)
        except NegotiationError as exc:
            log.warning("call %s: SDP in %d left as is: %s", request.call_id, response.status, exc)

    def release(self, request: SipRequest, now: float) -> None:
        """A new call that will not be set up (every branch failed, or its offer is
        to be made anew for another family): its relays go at once."""
        self.manager.delete(request.call_id, request.from_.tag, now=now, delay=0)


def sdp_body(message: SipRequest | SipResponse) -> bytes | None:
    """The body if it is a non-empty SDP."""
    if not is_sdp_type(message.content_type):
        return None
    return message.body if message.body.strip() else None
