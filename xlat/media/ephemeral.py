"""Keep the kernel's ephemeral ports out of the relay range.

The relay range (default 30000-39999) overlaps Linux's ephemeral ports (32768-60999):
a socket that binds port 0 or connects unbound on a media address — a DNS query, any
client xlat or the host opens — may get a relay port, and table ``inet xlat`` drops its
replies as unallocated. ``net.ipv4.ip_local_reserved_ports`` (per network namespace;
it covers IPv6 too) takes ports out of the automatic choice without touching explicit
binds, so the relay sockets still bind them. ``ReservedPorts`` adds the relay range
while xlat runs and, on a clean stop, takes out exactly what it added: ports an admin
had reserved stay reserved.

``reserve``/``release`` are the pure part: text in the sysctl's format
(``"8080,30000-39999"``) in, text out.
"""

from __future__ import annotations

from pathlib import Path

SYSCTL = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")

Ranges = list[tuple[int, int]]


def parse_ranges(text: str) -> Ranges:
    """``"8080,30000-39999"`` -> [(8080, 8080), (30000, 39999)]. Raises ValueError."""
    out = []
    for item in text.replace("\n", "").split(","):
        item = item.strip()
        if not item:
            continue
        lo, _, hi = item.partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def _merge(ranges: Ranges) -> Ranges:
    merged: Ranges = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(ranges: Ranges, cut: Ranges) -> Ranges:
    out = _merge(ranges)
    for c_lo, c_hi in cut:
        rest: Ranges = []
        for lo, hi in out:
            if hi < c_lo or lo > c_hi:
                rest.append((lo, hi))
                continue
            if lo < c_lo:
                rest.append((lo, c_lo - 1))
            if hi > c_hi:
                rest.append((c_hi + 1, hi))
        out = rest
    return out


def format_ranges(ranges: Ranges) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in _merge(ranges))


def reserve(current: str, lo: int, hi: int) -> tuple[str, Ranges]:
    """The sysctl text with ``lo-hi`` reserved too, and the ports that were not
    reserved before (what ``release`` must take out again)."""
    have = parse_ranges(current)
    added = _subtract([(lo, hi)], have)
    return format_ranges([*have, (lo, hi)]), added


def release(current: str, added: Ranges) -> str:
    """The sysctl text without ``added``."""
    return format_ranges(_subtract(parse_ranges(current), added))


class ReservedPorts:
    """The relay range reserved from ephemeral use in this network namespace until
    ``close()``. Raises OSError if the sysctl cannot be read or written."""

    def __init__(self, lo: int, hi: int, sysctl: Path = SYSCTL) -> None:
        self.sysctl = sysctl
        text, self.added = reserve(sysctl.read_text(), lo, hi)
        if self.added:
            sysctl.write_text(text + "\n")

    def close(self) -> None:
        if self.added:
            self.sysctl.write_text(release(self.sysctl.read_text(), self.added) + "\n")
            self.added = []
