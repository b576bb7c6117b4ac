"""Bencode (BEP 3) as the rtpengine NG protocol uses it.

Encoding is fastbencode's. Decoding is ours, for one reason: BEP 3 wants dictionary
keys sorted, fastbencode enforces it ("dict keys disordered"), and the NG peers we
serve do not sort — Kamailio's rtpengine module adds ``sdp`` first and ``command``
last, and rtpengine's own docs say it does not honour the order either
(docs/ng_control_protocol.md). Both directions work on bytes: strings stay ``bytes``
(an SDP body is not always valid UTF-8); only dictionary keys become ``str``.
"""

from __future__ import annotations

from collections.abc import Mapping

import fastbencode

# NG requests nest two levels deep at most (a dict of lists, e.g. ``flags``; ``codec``
# is a dict of lists). 16 leaves room for any extension while keeping a hostile
# ``llll...`` datagram from costing more than a short walk.
MAX_DEPTH = 16

Value = bytes | int | list["Value"] | dict[str, "Value"]


class BencodeError(ValueError):
    """Not a well-formed bencoded value; the message says what and at which offset."""


def decode(data: bytes, *, max_depth: int = MAX_DEPTH) -> Value:
    """Decode one value that spans all of ``data``. Dictionary keys must be UTF-8 and
    unique but may come in any order. Raises BencodeError."""
    value, end = _value(data, 0, max_depth)
    if end != len(data):
        raise BencodeError(f"{len(data) - end} bytes of junk after the value at offset {end}")
    return value


def encode(value: Mapping[str, object]) -> bytes:
    """Encode a reply: ``str`` keys, values ``str``/``bytes``/``int``/lists/dicts."""
    return bytes(fastbencode.bencode(_as_bytes(value)))


def _as_bytes(value: object) -> object:
    """Strings as UTF-8 bytes, here rather than by ``bencode_utf8``: Debian bookworm's
    fastbencode 0.2 has only ``bencode``."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, Mapping):
        return {k.encode(): _as_bytes(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_bytes(v) for v in value]
    return value


def _value(data: bytes, pos: int, depth: int) -> tuple[Value, int]:
    if pos >= len(data):
        raise BencodeError(f"truncated at offset {pos}")
    lead = data[pos]
    if 0x30 <= lead <= 0x39:  # 0-9: <length>:<bytes>
        return _string(data, pos)
    if lead == 0x69:  # i<integer>e
        end = data.find(b"e", pos + 1)
        if end < 0:
            raise BencodeError(f"unterminated integer at offset {pos}")
        try:
            return int(data[pos + 1 : end]), end + 1
        except ValueError:
            raise BencodeError(f"bad integer at offset {pos}") from None
    if lead not in (0x6C, 0x64):  # l, d
        raise BencodeError(f"unexpected byte {data[pos:pos + 1]!r} at offset {pos}")
    if depth <= 0:
        raise BencodeError(f"nested deeper than {MAX_DEPTH} at offset {pos}")
    pos += 1
    if lead == 0x6C:
        items: list[Value] = []
        while data[pos : pos + 1] != b"e":
            item, pos = _value(data, pos, depth - 1)
            items.append(item)
        return items, pos + 1
    result: dict[str, Value] = {}
    while data[pos : pos + 1] != b"e":
        if pos >= len(data):
            raise BencodeError(f"truncated dictionary at offset {pos}")
        raw, pos = _string(data, pos)
        try:
            key = raw.decode()
        except UnicodeDecodeError:
            raise BencodeError(f"dictionary key {raw[:40]!r} is not UTF-8") from None
        if key in result:
            raise BencodeError(f"duplicate dictionary key {key!r}")
        result[key], pos = _value(data, pos, depth - 1)
    return result, pos + 1


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    colon = data.find(b":", pos, pos + 12)  # a 10-digit length is already > any datagram
    if colon < 0 or not data[pos:colon].isdigit():
        raise BencodeError(f"bad string length at offset {pos}")
    start = colon + 1
    end = start + int(data[pos:colon])
    if end > len(data):
        raise BencodeError(f"string at offset {pos} runs past the end")
    return data[start:end], end
