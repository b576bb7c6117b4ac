"""The bench's markdown: the README summary rows, the marker splice, results.md, and the
py-spy self-time count. Records are built here in the shapes bench/results.json holds."""

from typing import Any

import pytest

from bench.env import self_samples
from bench.summary import (
    BEGIN,
    END,
    MISSING,
    MarkerError,
    Row,
    markdown,
    num,
    replace_block,
    rows,
    summary,
    times,
)

Record = dict[str, Any]


def media(impl: str, direction: str, pps: float, cpu: float | None) -> Record:
    return {"figure": "media_pps", "impl": impl, "direction": direction, "trials": 8,
            "trial_s": 2.0, "pps": pps, "loss": 0.0, "bound": "sender core",
            "cpu_us_per_pkt": cpu, "cpu_us_range": "0..1"}


def full_run() -> list[Record]:
    """One record of every figure the summary reads (numbers of no particular run)."""
    return [
        {"figure": "sender_ceiling", "impl": "direct", "direction": "v6->v4", "pps": 220000},
        media("forward", "v6->v4", 180000, 1.2), media("forward", "v4->v6", 200000, 1.8),
        media("ebpf", "v6->v4", 180000, 0.4), media("ebpf", "v4->v6", 190000, 2.0),
        media("userspace", "v6->v4", 50000, 16.0),
        media("rtpengine", "v6->v4", 30000, 16.0), media("rtpengine", "v4->v6", 40000, 14.0),
        {"figure": "bpf_cost", "impl": "ebpf", "direction": "v6->v4", "ns_per_packet": 140.0},
        {"figure": "bpf_cost", "impl": "ebpf", "direction": "v4->v6", "ns_per_packet": 410.0},
        {"figure": "bpf_cost", "impl": "ebpf", "direction": "v6<->v4", "ns_per_packet": 180.0},
        {"figure": "ng_setup_rate", "impl": "xlat", "in_flight": 1, "calls_per_s": 1200.0,
         "setup_ms_p99": 2.0},
        {"figure": "ng_setup_rate", "impl": "xlat", "in_flight": 16, "calls_per_s": 5000.0,
         "setup_ms_p99": 9.0},
        {"figure": "ng_setup_rate", "impl": "rtpengine", "in_flight": 1, "calls_per_s": 1600.0,
         "setup_ms_p99": 0.5},
        {"figure": "ng_setup_rate", "impl": "rtpengine", "in_flight": 16,
         "calls_per_s": 4000.0, "setup_ms_p99": 5.0},
        {"figure": "sip_cps", "impl": "kamailio+rtpengine", "cps": 1000.0, "runs": 9,
         "cpu_ms_per_call": 2.0, "cpu_cps": 50},
        {"figure": "sip_cps", "impl": "xlat", "cps": 800.0, "runs": 9,
         "cpu_ms_per_call": 3.0, "cpu_cps": 50, "sip_rate": 1000000},
        {"figure": "sip_cps", "impl": "xlat (default sip_rate)", "cps": 100.0,
         "cpu_ms_per_call": 3.1},
        {"figure": "sip_dns_cps", "impl": "xlat, IP-literal route", "cps": 800.0,
         "cpu_ms_per_call": 3.0, "route": "*=sip:203.0.113.2:5080"},
        {"figure": "sip_dns_cps", "impl": "xlat, DNS-named route", "cps": 780.0,
         "cpu_ms_per_call": 3.06, "route": "*=sip:pbx.bench.test", "vs_literal": 0.975},
        {"figure": "sip_dns_core", "impl": "xlat", "calls": 2000, "literal_us_per_call": 850.0,
         "named_us_per_call": 870.0, "vs_literal": 0.977},
        {"figure": "sip_dns_setup", "impl": "xlat", "pairs": 30, "cold_ms_p50": 4.5,
         "warm_ms_p50": 2.5, "added_ms_p50": 2.0, "added_ms_max": 9.0},
        {"figure": "scale_latency", "impl": "ebpf", "sessions": 50000, "add_ms_p50": 0.2,
         "add_ms_p99": 2.0},
        {"figure": "scale_latency", "impl": "ebpf", "sessions": 0, "add_ms_p50": 0.2,
         "add_ms_p99": 1.0},
        {"figure": "scale_latency", "impl": "ebpf", "sessions": 100000, "add_ms_p50": 0.3,
         "add_ms_p99": 6.0},
        {"figure": "scale_sessions", "impl": "ebpf", "sessions": 100200, "flows": 400800,
         "rss_mib": 800.0, "rss_bytes_per_session": 900, "map_memlock_mib": 99.7,
         "map_bytes_per_session": 960},
        {"figure": "scale_expiry", "impl": "ebpf", "sessions": 10000, "left": 0,
         "baseline_sip_ms_p50": 0.5, "baseline_sip_ms_p99": 4.0, "baseline_sip_ms_max": 5.0,
         "sip_ms_p50": 0.6, "sip_ms_p99": 200.0, "sip_ms_max": 250.0, "sip_lost": 0,
         "stall_ms": 249.5, "stall_at_s": 0.4, "daemon_cpu_ms": 1000.0},
    ]


def by_figure(records: list[Record]) -> dict[str, Row]:
    return {row.figure: row for row in rows(records)}


def test_media_rows_ratio_against_each_baseline_and_check_each_target() -> None:
    got = by_figure(full_run())
    v6 = got["zero-loss packets/s v6→v4"]
    assert v6.xlat == "eBPF 180k"
    assert v6.baseline == "rtpengine 30k · plain forwarding 180k"
    assert v6.ratio == "6.00× · 1.00×"  # 180k / 30k, 180k / 180k
    assert v6.target == "≥ 5× · ≥ 0.8×"
    assert v6.met is True
    v4 = got["zero-loss packets/s v4→v6"]
    assert v4.ratio == "4.75× · 0.95×"  # 190k / 40k, 190k / 200k
    assert v4.met is False  # 4.75× rtpengine is under 5×


def test_cpu_rows_are_lower_is_better() -> None:
    got = by_figure(full_run())
    assert got["CPU per packet v6→v4"].ratio == "0.025×"  # 0.4 / 16
    assert got["CPU per packet v6→v4"].met is True
    assert got["CPU per packet v4→v6"].baseline == "rtpengine 14 µs"
    assert got["CPU per packet v4→v6"].met is False  # 2.0 / 14 > 1/20


def test_a_missing_baseline_leaves_the_verdict_open() -> None:
    records = [r for r in full_run() if r.get("impl") != "rtpengine"]
    row = by_figure(records)["zero-loss packets/s v6→v4"]
    assert row.baseline == f"rtpengine {MISSING} · plain forwarding 180k"
    assert row.ratio == "— · 1.00×"
    assert row.met is None


def test_bpf_cost_rows_one_per_record_and_one_when_absent() -> None:
    got = by_figure(full_run())
    assert (got["BPF program per packet v6→v4"].xlat, got["BPF program per packet v6→v4"].met) \
        == ("140 ns", True)
    assert got["BPF program per packet v4→v6"].met is False
    assert got["BPF program per packet v4→v6"].target == "≤ 150 ns"
    assert got["BPF program per packet v6↔v4"].xlat == "180 ns"
    without = [row for row in rows([r for r in full_run() if r["figure"] != "bpf_cost"])
               if row.figure.startswith("BPF program")]
    assert without == [Row("BPF program per packet", MISSING, target="≤ 150 ns")]


def test_ng_and_sip_rows_compare_with_rtpengine_and_kamailio() -> None:
    got = by_figure(full_run())
    one, sixteen = got["NG set-ups/s, 1 in flight"], got["NG set-ups/s, 16 in flight"]
    assert (one.xlat, one.baseline, one.ratio, one.met) == \
        ("1,200 (p99 2 ms)", "rtpengine 1,600", "0.75×", False)
    assert (sixteen.ratio, sixteen.met) == ("1.25×", True)
    sip = got["SIP calls/s, 0 failed (CPU per call)"]
    assert sip.xlat == "800 (3 ms)"  # the row with sip_rate lifted, not the default one
    assert sip.baseline == "Kamailio + rtpengine 1,000 (2 ms)"
    assert sip.ratio == "0.80× (CPU 1.50×)"
    assert sip.met is False


def test_dns_rows_compare_a_named_route_with_a_literal_one_and_show_the_cold_lookup() -> None:
    got = by_figure(full_run())
    named = got["SIP calls/s to a DNS-named route target, warm cache (issue #10)"]
    assert (named.xlat, named.baseline) == ("780 (3.06 ms)", "by IP literal 800 (3 ms)")
    assert (named.ratio, named.target, named.met) == ("0.97× (CPU 1.02×)", "≥ 0.95×", True)
    core = got["SIP proxy core, same route by DNS name, warm cache: CPU per call (in process)"]
    assert (core.xlat, core.baseline, core.ratio, core.met) == (
        "870 µs", "by IP literal 850 µs", "0.98×", True)
    cold = got["call set-up time a cold DNS lookup adds (NAPTR, SRV, AAAA+A), p50 (issue #10)"]
    assert (cold.xlat, cold.baseline, cold.met) == (
        "+2 ms (INVITE→200 4.5 ms)", "warm cache 2.5 ms", None)
    slow = [{**r, "cps": 700.0} if r.get("impl") == "xlat, DNS-named route" else r
            for r in full_run()]
    assert by_figure(slow)[named.figure].met is False  # 0.875× is under 0.95×
    gone = [r for r in full_run() if not r["figure"].startswith("sip_dns")]
    assert {by_figure(gone)[f].xlat for f in (named.figure, core.figure, cold.figure)} == {
        MISSING}


def test_scale_rows_in_checkpoint_order_against_the_first() -> None:
    got = rows(full_run())
    adds = [r for r in got if r.figure.startswith("session add p99")]
    assert [r.figure for r in adds] == [f"session add p99 at {n} sessions"
                                        for n in ("0", "50,000", "100,000")]
    assert adds[0].ratio == "—"
    assert adds[1].ratio == "2.00× of p99 at 0"
    assert [r.met for r in adds] == [True, True, False]  # 6 ms is over 5 ms
    rss = by_figure(full_run())["daemon RSS per session"]
    assert rss.xlat.startswith("900 B (100,200 sessions")
    assert rss.met is True


def test_expiry_rows_show_sip_latency_during_and_before() -> None:
    got = by_figure(full_run())
    stall = got["10,000 idle sessions expiring at once: longest stall"]
    assert stall.xlat.startswith("250 ms, 0.4 s after the timeout")
    sip = got["SIP OPTIONS latency during that expiry, p50 / p99 / max"]
    assert sip.xlat == "0.6 / 200 / 250 ms"
    assert sip.baseline == "before it: 0.5 / 4 / 5 ms"
    assert sip.ratio == "p99 50×"
    assert sip.met is None  # the issue gives no number
    early = [{**r, "stall_at_s": -0.06} if r["figure"] == "scale_expiry" else r
             for r in full_run()]
    assert by_figure(early)[stall.figure].xlat.startswith("250 ms, 0.06 s before the timeout")
    old = [{k: v for k, v in r.items() if "sip_" not in k} for r in full_run()]
    row = by_figure(old)["SIP OPTIONS latency during that expiry, p50 / p99 / max"]
    assert row.xlat == MISSING


def test_summary_has_the_date_a_line_per_row_and_the_failed_figures() -> None:
    records = [*full_run(), {"figure": "media", "impl": "-", "error": "OSError: a|b"}]
    text = summary(records, when="2026-01-02 03:04 UTC")
    assert "2026-01-02 03:04 UTC" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows(records))  # the header, then the rows
    assert all(line.count(" | ") == 5 for line in table)
    assert "Not measured: `media` - (OSError: a/b)." in text
    assert "| **no** |" in text and "| yes |" in text


def test_replace_block_keeps_everything_outside_the_markers() -> None:
    before = "# T\r\n\nintro text\n" + BEGIN + "\nold table\n\n" + END + "\ntail  \n"
    after = replace_block(before, "new\ntable\n")
    assert after == "# T\r\n\nintro text\n" + BEGIN + "\nnew\ntable\n" + END + "\ntail  \n"
    assert replace_block(after, "new\ntable\n") == after


@pytest.mark.parametrize("text", ["no markers", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{END}\n"])
def test_replace_block_refuses_missing_misordered_or_repeated_markers(text: str) -> None:
    with pytest.raises(MarkerError):
        replace_block(text, "x")


def test_number_and_ratio_formats() -> None:
    assert [num(v) for v in (174458, 1131.4, 99.7, 12.0, 0.357, 0.0)] == \
        ["174k", "1,131", "99.7", "12", "0.36", "0"]
    assert [times(v) for v in (0.0228, 1.008, 3.667, 12.4)] == \
        ["0.023×", "1.01×", "3.67×", "12×"]


def test_results_markdown_has_a_table_per_figure_with_every_field() -> None:
    records = full_run()
    text = markdown(records, quick=True, when="2026-01-02 03:04 UTC", seconds=61.4)
    assert text.startswith("Results of `make bench QUICK=1` (2026-01-02 03:04 UTC, 61 s")
    figures = {r["figure"] for r in records}
    assert {line[4:] for line in text.splitlines() if line.startswith("### ")} == figures
    assert "| impl | direction | trials | pps | loss | bound | cpu_us_per_pkt |" in text


def test_self_samples_counts_the_top_frame_of_each_stack() -> None:
    collapsed = ("<module> (a.py:1);run (a.py:5);parse (sip.py:10) 7\n"
                 "<module> (a.py:1);run (a.py:5) 2\n"
                 "<module> (a.py:1);tick (b.py:3);parse (sip.py:10) 5\n")
    assert self_samples(collapsed) == {"parse (sip.py:10)": 12, "run (a.py:5)": 2}


def test_set_row_compares_two_nodes_with_one_and_is_open_without_two() -> None:
    def ng_set(nodes: int, rate: int, cpu: float) -> Record:
        return {"figure": "ng_set", "impl": f"kamailio + {nodes} xlat nodes", "nodes": nodes,
                "calls_per_s": rate, "cpu_ms_per_call": cpu, "bound": "at 800 calls/s"}

    label = "calls/s through Kamailio's rtpengine set (CPU per call)"
    row = by_figure([ng_set(1, 200, 1.7), ng_set(2, 400, 1.4)])[label]
    assert (row.xlat, row.baseline, row.ratio, row.met) == \
        ("2 nodes 400 (1.4 ms)", "1 node 200 (1.7 ms)", "2.00×", True)
    assert by_figure([ng_set(1, 400, 1.0), ng_set(2, 300, 1.0)])[label].met is False
    assert by_figure([ng_set(1, 200, 1.7)])[label].xlat == MISSING


def test_relay_bound_rows_compare_ebpf_with_forwarding_in_each_direction() -> None:
    def relay(impl: str, direction: str, pps: int) -> Record:
        return {"figure": "media_pps_relay", "impl": impl, "direction": direction,
                "sender": "udpblast frames", "pps": pps, "bound": "loss 1% at 400000"}

    got = by_figure([relay("forward", "v6->v4", 300_000), relay("ebpf", "v6->v4", 330_000),
                     relay("ebpf", "v4->v6", 200_000)])
    six = got["zero-loss packets/s v6→v4, relay on its own core"]
    assert (six.xlat, six.baseline, six.ratio, six.met) == \
        ("eBPF 330k", "plain forwarding 300k", "1.10×", True)
    four = got["zero-loss packets/s v4→v6, relay on its own core"]
    assert (four.baseline, four.met) == (f"plain forwarding {MISSING}", None)
