"""Answering what did not parse (RFC 3261 §8.2, §16.3): a request too broken for
``parse_message`` still gets its 400 (or 413, 505) when enough of it is readable to
send one back, built from the parts that are valid on their own."""

from __future__ import annotations

from collections.abc import Callable

from xlat.sip.errors import SipParseError
from xlat.sip.headers import (
    CALL_ID_RE,
    CSEQ_RE,
    TOKEN_RE,
    WSP,
    Header,
    NameAddr,
    field_key,
    has_control,
    parse_name_addr,
    parse_via,
    split_list,
)
from xlat.sip.message import BLANK_LINE_RE, MAX_MESSAGE_SIZE, SipResponse

__all__ = ["error_response"]

# RFC 2606 §2: ".invalid" names nothing; it stands in for a From or To the request
# spoiled, so that the reply carries every mandatory header (§8.1.1) and parses.
_PLACEHOLDER_URI = "<sip:anonymous@anonymous.invalid>"
_PLACEHOLDER_CALL_ID = "invalid"


def error_response(data: bytes, error: SipParseError, to_tag: str) -> SipResponse | None:
    """The reply to a request that did not parse, built only from what did: the Via
    values up to the first one that does not parse, and From, To, Call-ID and CSeq
    when each is valid on its own. A spoiled From/To/Call-ID becomes a ``.invalid``
    placeholder, a spoiled CSeq ``0 METHOD`` with the request line's method: the
    client matches a reply by its top Via branch and CSeq method only (§17.1.3), so
    it still stops retransmitting. The status is the error's hint (400, 413, 505).
    None when there is nothing to answer: a response, an ACK (§17.2.1: never
    answered), no request line with a method, or no valid top Via (no way back,
    §18.2.2). The reply parses with `parse_message` whatever the input."""
    head = data[:MAX_MESSAGE_SIZE]
    blank = BLANK_LINE_RE.search(head)
    text = head[: blank.start() + 1 if blank else len(head)].decode("utf-8", "surrogateescape")
    lines: list[str] = []
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip(WSP)  # folding (§7.3.1)
        else:
            lines.append(line)
    method = lines[0].split(" ", 1)[0] if lines else ""
    if not TOKEN_RE.fullmatch(method) or method.upper().startswith("SIP/") or method == "ACK":
        return None
    vias: list[str] = []
    found: dict[str, str] = {}
    vias_done = False
    for line in lines[1:]:
        name, colon, raw_value = line.partition(":")
        key = field_key(name) if colon else None
        value = raw_value.strip(WSP)
        if key == "via" and not vias_done:
            for element in _valid_list(value):
                if not _valid(parse_via, element):
                    vias_done = True  # below a broken Via the path back is unknown
                    break
                vias.append(element)
        elif key in ("from", "to", "call-id", "cseq") and key not in found:
            found[key] = value if _valid_copy(key, value) else ""
    if not vias:
        return None
    to = found.get("to") or _PLACEHOLDER_URI
    parsed_to = NameAddr.parse(to)
    if parsed_to.tag is None:
        parsed_to.params["tag"] = to_tag
        to = str(parsed_to)
    phrase = "".join(c if " " <= c <= "~" and c != '"' else "?" for c in error.reason)[:120]
    headers = [Header("Via", v) for v in vias] + [
        Header("From", found.get("from") or _PLACEHOLDER_URI),
        Header("To", to),
        Header("Call-ID", found.get("call-id") or _PLACEHOLDER_CALL_ID),
        Header("CSeq", found.get("cseq") or f"0 {method}"),
        Header("Content-Length", "0"),
    ]
    return SipResponse(error.status, phrase, headers)


def _valid_list(value: str) -> list[str]:
    """The elements of a list header value; [""] (one invalid element) when it does
    not split (an unterminated quote or <) or holds a control character."""
    if has_control(value):
        return [""]
    try:
        return split_list(value)
    except SipParseError:
        return [""]


def _valid(parse: Callable[[str], object], value: str) -> bool:
    try:
        parse(value)
    except SipParseError:
        return False
    return True


def _is_utf8(text: str) -> bool:
    """No surrogate-escaped byte: the text was valid UTF-8 on the wire."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _valid_copy(key: str, value: str) -> bool:
    """A From, To, Call-ID or CSeq value that may be copied into a reply as it is."""
    if has_control(value) or not _is_utf8(value):
        return False
    if key == "call-id":
        return CALL_ID_RE.fullmatch(value) is not None
    if key == "cseq":
        m = CSEQ_RE.fullmatch(value)
        return m is not None and len(m.group(1)) <= 10 and int(m.group(1)) < 2**31
    return _valid(parse_name_addr, value)
