"""Plain-text tables for the CLI: each column as wide as its widest cell.

Addresses vary from ``192.0.2.1:4`` to
``[2001:db8:1234:5678:9abc:def0:1234:5678]:65535`` (47 characters): fixed widths
either waste a line on the short ones or break the columns on the long ones, so every
table is sized from what it shows. Pure functions: cells in, lines out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

GAP = "  "


def table(header: Sequence[str], rows: Iterable[Sequence[str]],
          right: Collection[int] = ()) -> list[str]:
    """``header`` and ``rows`` as aligned lines; columns whose index is in ``right``
    (numbers) are right-aligned. The last column is not padded (no trailing blanks)."""
    lines = [list(header), *(list(r) for r in rows)]
    for line in lines:
        if len(line) != len(header):
            raise ValueError(f"row of {len(line)} cells under a header of {len(header)}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    last = len(header) - 1

    def cell(i: int, text: str) -> str:
        if i in right:
            return text.rjust(widths[i])
        return text if i == last else text.ljust(widths[i])

    return [GAP.join(cell(i, text) for i, text in enumerate(line)).rstrip() for line in lines]


def si(value: float, unit: str = "") -> str:
    """A rate as people read it: ``950``, ``1.2k``, ``34M`` (powers of 1000, three
    significant digits at most), then ``unit``."""
    for prefix in ("", "k", "M", "G"):
        if abs(value) < 999.5 or prefix == "G":
            break
        value /= 1000
    text = f"{value:.0f}" if abs(value) >= 9.95 or prefix == "" else f"{value:.1f}"
    return f"{text}{prefix}{unit}"
