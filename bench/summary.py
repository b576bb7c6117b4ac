"""Markdown from bench records (the dicts of bench/results.json): the per-figure tables of
bench/results.md, and the operator's summary that a full ``make bench`` writes into the
README between ``BEGIN`` and ``END``.

Pure functions: records in, markdown out; the caller supplies the date of the run."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
DIRECTIONS = ("v6->v4", "v4->v6")
MISSING = "not measured in this run"


class MarkerError(ValueError):
    """The README lacks the bench markers, or has them out of order."""


# ---- results.md: every record, one table per figure ---------------------------------------

SKIP = {"figure", "impl", "direction", "prog_ids", "trial_s"}


def markdown(results: Sequence[Record], *, quick: bool, when: str, seconds: float) -> str:
    """One table per figure: a row per record, a column per field it has."""
    out = [f"Results of `make bench{' QUICK=1' if quick else ''}` ({when}, {seconds:.0f} s, "
           "2 shared cores: compare ratios within a run).\n"]
    figures: dict[str, list[Record]] = {}
    for r in results:
        figures.setdefault(r["figure"], []).append(r)
    for fig, rows in figures.items():
        cols = ["impl", *(["direction"] if any("direction" in r for r in rows) else [])]
        for r in rows:
            cols += [k for k in r if k not in SKIP and k not in cols]
        out.append(f"\n### {fig}\n\n| " + " | ".join(cols) + " |\n|"
                   + "---|" * len(cols) + "\n")
        for r in rows:
            out.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |\n")
    return "".join(out)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "/")


# ---- the README summary: one row per headline figure ---------------------------------------


OPS = {"≥": operator.ge, "≤": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class Target:
    """An issue's bound (#6, #14) on a figure or a ratio: ``value op bound``."""

    op: str  # a key of OPS
    bound: float
    unit: str = "×"

    def met(self, value: float) -> bool:
        return OPS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.op} {num(self.bound)}{self.unit if self.unit == '×' else ' ' + self.unit}"


@dataclass(frozen=True)
class Row:
    """One line of the summary. ``met``: None when the issue sets no number (or a
    baseline is missing), else whether every target of the row holds."""

    figure: str
    xlat: str
    baseline: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: bool | None = None


def num(v: float) -> str:
    """A figure as an operator reads it: 174458 → 174k, 1131.4 → 1,131, 0.357 → 0.36."""
    if abs(v) >= 10_000:
        return f"{v / 1000:,.0f}k"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}".removesuffix(".0")
    return f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"


def times(ratio: float) -> str:
    """A ratio: 0.0228 → 0.023×, 1.008 → 1.01×, 12.4 → 12×."""
    if abs(ratio) < 0.1:
        return f"{ratio:.2g}×"
    return f"{ratio:.2f}×" if abs(ratio) < 10 else f"{ratio:.0f}×"


def find(records: Iterable[Record], figure: str, **fields: Any) -> Record | None:
    """The first measured record of ``figure`` whose ``fields`` have these values."""
    for r in records:
        if r.get("figure") == figure and "error" not in r \
                and all(r.get(k) == v for k, v in fields.items()):
            return r
    return None


def _arrow(direction: str) -> str:
    return direction.replace("<->", "↔").replace("->", "→")


def _verdict(checks: Sequence[bool | None]) -> bool | None:
    return None if not checks or None in checks else all(checks)


def _against(ours: float, baselines: Sequence[tuple[str, float | None, Target]]
             ) -> tuple[str, str, str, bool | None]:
    """Baseline, ratio and target cells for ``ours`` against named baselines of the run
    (value None: not measured), and whether every ratio meets its target."""
    names: list[str] = []
    ratios: list[str] = []
    targets: list[str] = []
    checks: list[bool | None] = []
    for name, theirs, target in baselines:
        targets.append(str(target))
        if theirs is None:
            names.append(f"{name} {MISSING}")
            ratios.append("—")
            checks.append(None)
        else:
            names.append(f"{name} {num(theirs)}")
            ratios.append(times(ours / theirs) if theirs else "—")
            checks.append(target.met(ours / theirs) if theirs else None)
    return " · ".join(names), " · ".join(ratios), " · ".join(targets), _verdict(checks)


def _field(record: Record | None, key: str) -> float | None:
    return None if record is None or record.get(key) is None else float(record[key])


def media_rows(records: Sequence[Record]) -> Iterator[Row]:
    """Zero-loss packets/s of eBPF against rtpengine and plain forwarding, per direction."""
    for d in DIRECTIONS:
        label = f"zero-loss packets/s {_arrow(d)}"
        ebpf = _field(find(records, "media_pps", impl="ebpf", direction=d), "pps")
        if ebpf is None:
            yield Row(label, MISSING)
            continue
        rtp = _field(find(records, "media_pps", impl="rtpengine", direction=d), "pps")
        fwd = _field(find(records, "media_pps", impl="forward", direction=d), "pps")
        yield Row(label, f"eBPF {num(ebpf)}", *_against(ebpf, [
            ("rtpengine", rtp, Target("≥", 5)), ("plain forwarding", fwd, Target("≥", 0.8))]))


def relay_rows(records: Sequence[Record]) -> Iterator[Row]:
    """Zero-loss packets/s of eBPF against plain forwarding with the relay on a core of
    its own and the frames sender (figure ``media_pps_relay``), per direction."""
    for d in DIRECTIONS:
        label = f"zero-loss packets/s {_arrow(d)}, relay on its own core"
        ebpf = _field(find(records, "media_pps_relay", impl="ebpf", direction=d), "pps")
        if ebpf is None:
            yield Row(label, MISSING)
            continue
        fwd = _field(find(records, "media_pps_relay", impl="forward", direction=d), "pps")
        yield Row(label, f"eBPF {num(ebpf)}",
                  *_against(ebpf, [("plain forwarding", fwd, Target("≥", 1))]))


def cpu_rows(records: Sequence[Record]) -> Iterator[Row]:
    """CPU the eBPF path adds per packet, against rtpengine's, per direction."""
    for d in DIRECTIONS:
        label = f"CPU per packet {_arrow(d)}"
        ebpf = _field(find(records, "media_pps", impl="ebpf", direction=d), "cpu_us_per_pkt")
        if ebpf is None:
            yield Row(label, MISSING)
            continue
        rtp = _field(find(records, "media_pps", impl="rtpengine", direction=d),
                     "cpu_us_per_pkt")
        base, ratio, target, met = _against(ebpf, [("rtpengine", rtp, Target("≤", 0.05))])
        yield Row(label, f"eBPF {num(ebpf)} µs", base + (" µs" if rtp is not None else ""),
                  ratio, target, met)


def bpf_rows(records: Sequence[Record]) -> Iterator[Row]:
    """The BPF program's own cost per translated packet (figure ``bpf_cost``): a row per
    record, as the figure gives them (per direction, and ``v6<->v4`` for both in turn)."""
    target = Target("≤", 150, "ns")  # issue #14
    costs = [r for r in records if r.get("figure") == "bpf_cost" and "error" not in r]
    for r in costs:
        ns = float(r["ns_per_packet"])
        yield Row(f"BPF program per packet {_arrow(r['direction'])}", f"{num(ns)} ns",
                  target=str(target), met=target.met(ns))
    if not costs:
        yield Row("BPF program per packet", MISSING, target=str(target))


def ng_rows(records: Sequence[Record]) -> Iterator[Row]:
    """NG offer + answer + delete per second against rtpengine, 1 and 16 in flight."""
    for in_flight in (1, 16):
        label = f"NG set-ups/s, {in_flight} in flight"
        ours = find(records, "ng_setup_rate", impl="xlat", in_flight=in_flight)
        rate = _field(ours, "calls_per_s")
        if ours is None or rate is None:
            yield Row(label, MISSING)
            continue
        rtp = _field(find(records, "ng_setup_rate", impl="rtpengine", in_flight=in_flight),
                     "calls_per_s")
        yield Row(label, f"{num(rate)} (p99 {num(ours['setup_ms_p99'])} ms)",
                  *_against(rate, [("rtpengine", rtp, Target("≥", 1))]))


def sip_rows(records: Sequence[Record]) -> Iterator[Row]:
    """Clean SIP calls/s and proxy CPU per call against Kamailio + rtpengine."""
    yield _cps_row("SIP calls/s, 0 failed (CPU per call)", find(records, "sip_cps", impl="xlat"),
                   "Kamailio + rtpengine", find(records, "sip_cps", impl="kamailio+rtpengine"),
                   Target("≥", 1))


def _cps_row(label: str, ours: Record | None, name: str, theirs: Record | None,
             target: Target) -> Row:
    """Calls/s and CPU per call of ``ours`` against the baseline ``theirs``."""
    if ours is None:
        return Row(label, MISSING)
    base, ratio, targets, met = _against(float(ours["cps"]), [(name, _field(theirs, "cps"),
                                                               target)])
    cpu, their_cpu = _field(ours, "cpu_ms_per_call"), _field(theirs, "cpu_ms_per_call")
    xlat = num(ours["cps"]) + ("" if cpu is None else f" ({num(cpu)} ms)")
    if their_cpu is not None:
        base += f" ({num(their_cpu)} ms)"
        if cpu is not None:
            ratio += f" (CPU {times(cpu / their_cpu)})"
    return Row(label, xlat, base, ratio, targets, met)


def dns_rows(records: Sequence[Record]) -> Iterator[Row]:
    """Issue #10: calls/s to a ``*`` route target named by DNS (warm cache) against the
    same target as an IP literal, and the call set-up time a cold lookup adds."""
    yield _cps_row("SIP calls/s to a DNS-named route target, warm cache (issue #10)",
                   find(records, "sip_dns_cps", impl="xlat, DNS-named route"),
                   "by IP literal", find(records, "sip_dns_cps", impl="xlat, IP-literal route"),
                   Target("≥", 0.95))
    core = find(records, "sip_dns_core")
    label = "SIP proxy core, same route by DNS name, warm cache: CPU per call (in process)"
    target = Target("≥", 0.95)
    if core is None:
        yield Row(label, MISSING, target=f"{target} (literal ÷ named)")
    else:
        ratio = float(core["vs_literal"])
        yield Row(label, f"{num(core['named_us_per_call'])} µs",
                  f"by IP literal {num(core['literal_us_per_call'])} µs", times(ratio),
                  f"{target} (literal ÷ named)", target.met(ratio))
    label = "call set-up time a cold DNS lookup adds (NAPTR, SRV, AAAA+A), p50 (issue #10)"
    setup = find(records, "sip_dns_setup")
    if setup is None:
        yield Row(label, MISSING)
        return
    yield Row(label, f"+{num(setup['added_ms_p50'])} ms (INVITE→200 "
                     f"{num(setup['cold_ms_p50'])} ms)",
              f"warm cache {num(setup['warm_ms_p50'])} ms",
              target="none given")


def scale_rows(records: Sequence[Record]) -> Iterator[Row]:
    """Install latency at each checkpoint, memory per session, and the 10k expiry."""
    flat = Target("<", 5, "ms")  # and flat: the ratio column compares with the first
    checkpoints = sorted((r for r in records
                          if r.get("figure") == "scale_latency" and "error" not in r),
                         key=lambda r: int(r["sessions"]))
    for r in checkpoints:
        p99 = float(r["add_ms_p99"])
        first = checkpoints[0]
        ratio = "—" if r is first else \
            f"{times(p99 / float(first['add_ms_p99']))} of p99 at {int(first['sessions']):,}"
        yield Row(f"session add p99 at {int(r['sessions']):,} sessions",
                  f"{num(p99)} ms (p50 {num(r['add_ms_p50'])})", ratio=ratio,
                  target=f"{flat}, flat (the ratio)", met=flat.met(p99))
    if not checkpoints:
        yield Row("session add p99", MISSING, target=f"{flat}, flat (the ratio)")
    held = find(records, "scale_sessions")
    rss = Target("≤", 1024, "B")
    if held is None:
        yield Row("daemon RSS per session", MISSING, target=str(rss))
    else:
        per = float(held["rss_bytes_per_session"])
        yield Row("daemon RSS per session",
                  f"{num(per)} B ({int(held['sessions']):,} sessions: {num(held['rss_mib'])} MiB)",
                  target=str(rss), met=rss.met(per))
        yield Row("BPF map memory per session",
                  f"{num(held['map_bytes_per_session'])} B ({num(held['map_memlock_mib'])} MiB)")
    yield from expiry_rows(find(records, "scale_expiry"))


def expiry_rows(expiry: Record | None) -> Iterator[Row]:
    """How long the daemon stalls while sessions expire together, and what SIP sees."""
    target = "no stall of signalling (no number given)"
    if expiry is None:
        yield Row("idle sessions expiring at once", MISSING, target=target)
        return
    n, at = int(expiry["sessions"]), float(expiry["stall_at_s"])
    when = f"{num(abs(at))} s {'after' if at >= 0 else 'before'} the timeout"
    yield Row(f"{n:,} idle sessions expiring at once: longest stall",
              f"{num(expiry['stall_ms'])} ms, {when} "
              f"({num(expiry['daemon_cpu_ms'])} ms daemon CPU)", target=target)
    label = "SIP OPTIONS latency during that expiry, p50 / p99 / max"
    if "sip_ms_p99" not in expiry:
        yield Row(label, MISSING, target=target)
        return
    during = [float(expiry[f"sip_ms_{q}"]) for q in ("p50", "p99", "max")]
    before = [float(expiry[f"baseline_sip_ms_{q}"]) for q in ("p50", "p99", "max")]
    yield Row(label, " / ".join(num(v) for v in during) + " ms",
              "before it: " + " / ".join(num(v) for v in before) + " ms",
              f"p99 {times(during[1] / before[1])}" if before[1] else "—", target)


def set_rows(records: Sequence[Record]) -> Iterator[Row]:
    """Clean calls/s through Kamailio's rtpengine set of two xlat nodes against one
    (figure ``ng_set``): two nodes on two cores should not be slower than one."""
    label = "calls/s through Kamailio's rtpengine set (CPU per call)"
    two, one = find(records, "ng_set", nodes=2), find(records, "ng_set", nodes=1)
    if two is None:
        yield Row(label, MISSING)
        return
    base, ratio, target, met = _against(float(two["calls_per_s"]), [
        ("1 node", _field(one, "calls_per_s"), Target("≥", 1))])
    cpu = f" ({num(two['cpu_ms_per_call'])} ms)"
    if one is not None:
        base += f" ({num(one['cpu_ms_per_call'])} ms)"
    yield Row(label, f"2 nodes {num(two['calls_per_s'])}{cpu}", base, ratio, target, met)


SECTIONS = (media_rows, relay_rows, cpu_rows, bpf_rows, ng_rows, sip_rows, dns_rows, set_rows,
            scale_rows)


def rows(records: Sequence[Record]) -> list[Row]:
    return [row for section in SECTIONS for row in section(records)]


def summary(records: Sequence[Record], *, when: str) -> str:
    """The README's performance table for one full run finished at ``when``, plus a line
    naming each figure that failed to be measured."""
    out = [f"Summary of the `make bench` run of {when} (all of it in `bench/results.md`); "
           "a ratio is xlat ÷ the baseline measured in the same run.\n\n",
           "| figure | xlat | baseline, same run | ratio | target (issues #6, #14) | met |\n",
           "|---|---|---|---|---|---|\n"]
    for row in rows(records):
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        out.append(f"| {row.figure} | {row.xlat} | {row.baseline} | {row.ratio} | "
                   f"{row.target} | {met} |\n")
    for r in records:
        if "error" in r:
            out.append(f"\nNot measured: `{r['figure']}` {r.get('impl', '')} "
                       f"({_cell(r['error'])[:200]}).\n")
    return "".join(out)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between its BEGIN and END marker lines replaced by
    ``block``; everything else (markers included) is kept byte for byte."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise MarkerError(f"need one {BEGIN} line followed by one {END} line")
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise MarkerError(f"{BEGIN} and {END} must appear exactly once each")
    body_start = start + len(BEGIN)
    return text[:body_start] + "\n" + block.rstrip("\n") + "\n" + text[end:]
