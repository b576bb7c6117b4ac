"""Why a packet was (or was not) forwarded: the one list, ``bpf/reasons.h``, read once.

Each entry of its ``XLAT_REASONS`` X-macro names a reason and says, per datapath, what
that datapath does with a packet it counts under it: ``sent``, ``stack`` (passed to the
kernel stack untouched), ``drop``, or ``None`` (that datapath never counts it). The C enum
(the slot of the eBPF program's per-CPU ``reasons`` counters), the eBPF verdict, the
userspace relay's :class:`~xlat.media.userspace.DropReason`, the nftables drop counters
and the meaning ``xlat stats`` prints all come from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REASONS_H = Path(str(resources.files("xlat") / "bpf" / "reasons.h"))
DATAPATHS = ("ebpf", "userspace", "nft")  # the list's columns, in order
ACTIONS = ("sent", "stack", "drop")


@dataclass(frozen=True, slots=True)
class Reason:
    """One entry: ``name`` in Python form (``no_flow``); each datapath's action or None."""

    name: str
    ebpf: str | None
    userspace: str | None
    nft: str | None
    text: str

    def action(self, datapath: str) -> str | None:
        """What ``datapath`` (one of :data:`DATAPATHS`) does with a packet it counts here."""
        action: str | None = getattr(self, datapath)
        return action

    @property
    def meaning(self) -> str:
        """One line for ``xlat stats``: the eBPF action if eBPF counts it, else the others'."""
        action = self.ebpf or self.userspace or self.nft
        return f"({action}) {self.text}"


class ReasonsError(ValueError):
    """``bpf/reasons.h`` does not read as the list its comment describes."""


_ENTRY = re.compile(r'^\s*X\(\s*([A-Z0-9_]+)\s*,\s*(\w+)\s*,\s*(\w+)\s*,\s*(\w+)\s*,'
                    r'\s*"([^"]*)"\s*\)', re.M)


def parse(text: str) -> tuple[Reason, ...]:
    """The entries of ``text`` (the contents of a reasons.h) in list order."""
    out = []
    for m in _ENTRY.finditer(text):
        actions = [None if a == "none" else a for a in m.group(2, 3, 4)]
        if any(a is not None and a not in ACTIONS for a in actions):
            raise ReasonsError(f"reasons.h: {m[1]}: an action is not one of {ACTIONS} or none")
        out.append(Reason(m[1].lower(), actions[0], actions[1], actions[2], m[5]))
    if len(out) != len(re.findall(r"^\s*X\(", text, re.M)):
        raise ReasonsError('reasons.h: an X( line is not X(NAME, ebpf, userspace, nft, "meaning")')
    if not out or out[0].name != "forwarded" or out[0].ebpf is None:
        raise ReasonsError("reasons.h: FORWARDED must be the first entry (eBPF counter slot 0)")
    return tuple(out)


ALL = parse(REASONS_H.read_text())


def counted_by(datapath: str) -> tuple[Reason, ...]:
    """The reasons ``datapath`` counts, in list order: for ``ebpf``, index = counter slot."""
    return tuple(r for r in ALL if r.action(datapath) is not None)


def meanings() -> dict[str, str]:
    """Reason name -> its line for ``xlat stats``."""
    return {r.name: r.meaning for r in ALL}
