"""The one error type of the SIP parser."""

from __future__ import annotations

# Reasons quote the offending text; a garbage datagram must not make a 64 KiB log line.
_MAX_REASON = 200


class SipParseError(ValueError):
    """Bytes that are not a well-formed SIP message, URI or header value (remote's fault).

    `reason` says what is wrong; `status` is the status code to answer with when the bad
    thing was a request: 400 by default, 505 for an unsupported SIP version, 413 for a
    message over the size cap (the h11 ``error_status_hint`` habit).
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 3] + "..."
        super().__init__(reason)
        self.reason = reason
        self.status = status
