"""The pure parts of ``xlat monitor`` and the CLI's tables: columns sized to what they
show (long IPv6 addresses included), rates from two samples, a screen that fits."""

from __future__ import annotations

from typing import Any

import pytest

from xlat.cli import _flows_table, _sessions_table
from xlat.monitor import Sample, as_json, line, screen, view
from xlat.tables import si, table

LONG = "[2001:db8:1234:5678:9abc:def0:1234:5678]:65535"  # the longest addr:port there is


def test_columns_are_as_wide_as_their_widest_cell() -> None:
    lines = table(("ID", "PEER", "N"), [("a", "192.0.2.1:4", "7"), ("bb", LONG, "12")],
                  right={2})
    assert lines == [
        "ID  PEER" + " " * (len(LONG) - 4) + "   N",
        "a   192.0.2.1:4" + " " * (len(LONG) - 11) + "   7",
        f"bb  {LONG}  12",
    ]


def test_last_column_is_not_padded_and_short_rows_are_refused() -> None:
    assert table(("A", "B"), [("x", "long text"), ("y", "z")]) == ["A  B", "x  long text",
                                                                  "y  z"]
    with pytest.raises(ValueError, match="row of 1 cells under a header of 2"):
        table(("A", "B"), [("x",)])


@pytest.mark.parametrize("value, text", [(0, "0"), (950, "950"), (999.4, "999"),
                                         (999.6, "1.0k"), (1234, "1.2k"), (56_789, "57k"),
                                         (3_400_000, "3.4M"), (5e12, "5000G")])
def test_si(value: float, text: str) -> None:
    assert si(value) == text
    assert si(value, " bit/s") == text + " bit/s"


def session(sid: str, packets: int, *, bytes_: int = 0, peer_a: str = "192.0.2.2:5000",
            peer_b: str | None = LONG, call_id: str | None = "c1@x") -> dict[str, Any]:
    return {"id": sid, "state": "active", "origin": "ng", "call_id": call_id,
            "packets": packets, "bytes": bytes_,
            "legs": [{"peer": peer_a, "relay": "192.0.2.1:30000"},
                     {"peer": peer_b, "relay": "[2001:db8::1]:30000"}]}


def stats(uptime: float, fwd: int, unallocated: int, sessions: int = 2) -> dict[str, Any]:
    return {"uptime": uptime, "sessions": sessions, "deleting": 0, "flows": 8,
            "ports": {"ipv4": {"in_use": 2, "capacity": 50},
                      "ipv6": {"in_use": 2, "capacity": 50}},
            "forwarded": {"ebpf": {"packets": fwd, "bytes": fwd * 200}},
            "drops": {"unallocated": {"packets": unallocated, "bytes": unallocated * 100},
                      "expired": {"packets": 0, "bytes": 0}}}


def test_rates_come_from_two_samples() -> None:
    first = Sample(10.0, stats(5.0, 1000, 10), [session("s1", 100, bytes_=20_000)])
    second = Sample(12.0, stats(7.0, 3000, 14), [session("s1", 300, bytes_=60_000),
                                                 session("s2", 50)])
    v = view(first, second)
    assert v.forwarded["ebpf"].pps == 1000 and v.forwarded["ebpf"].bps == 1000 * 200 * 8
    assert v.drops["unallocated"].pps == 2 and v.drops["expired"].pps == 0
    # busiest first; a session the earlier sample did not have has no rate yet
    assert [(c.id, c.rate.pps, c.rate.bps) for c in v.calls] == [("s1", 100, 160_000),
                                                                 ("s2", None, None)]
    assert v.calls[0].peers == ("192.0.2.2:5000", LONG)


def test_first_sample_and_a_restarted_daemon_have_no_rates() -> None:
    assert view(None, Sample(1.0, stats(5.0, 10, 0), [])).forwarded["ebpf"].pps is None
    before = Sample(10.0, stats(500.0, 1000, 10), [session("s1", 100)])
    after = Sample(11.0, stats(1.0, 5, 0), [session("s1", 900)])  # uptime went down
    v = view(before, after)
    assert v.forwarded["ebpf"].pps is None and v.calls[0].rate.pps is None


def test_a_counter_that_went_backwards_has_no_rate() -> None:
    v = view(Sample(1.0, stats(5.0, 1000, 0), [session("s1", 100)]),
             Sample(2.0, stats(6.0, 400, 0), [session("s1", 50)]))
    assert v.forwarded["ebpf"].pps is None and v.calls[0].rate.pps is None


def two_seconds(calls: int) -> Any:
    return view(Sample(0.0, stats(1.0, 0, 0), [session(f"s{i}", 0) for i in range(calls)]),
                Sample(1.0, stats(2.0, 500, 3),
                       [session(f"s{i}", i * 10) for i in range(calls)]))


def test_screen_shows_the_busiest_calls_that_fit() -> None:
    lines = screen(two_seconds(30), "xlat monitor", width=200, height=12)
    assert len(lines) == 12 and lines[-1] == "q quits"
    assert lines[0] == "xlat monitor"
    assert lines[1] == "sessions 2 (0 deleting)   flows 8   ports ipv4 2/50  ipv6 2/50"
    assert lines[2] == "forwarded  ebpf 500 pkt/s 800k bit/s"
    assert lines[3] == "drops      unallocated 3 pkt/s"  # only reasons that moved
    assert lines[5].split() == ["ID", "STATE", "ORIGIN", "PKT/S", "BIT/S", "PACKETS",
                                "PEER", "A", "PEER", "B", "CALL-ID"]
    assert [row.split()[0] for row in lines[6:10]] == ["s29", "s28", "s27", "s26"]
    assert lines[10] == "... and 26 more"
    # the long IPv6 peer fits its column: every call row has its CALL-ID at one offset
    assert {row.index("c1@x") for row in lines[6:10]} == {lines[5].index("CALL-ID")}
    assert all(LONG in row for row in lines[6:10])


def test_screen_cuts_lines_at_the_terminal_width_and_says_when_idle() -> None:
    lines = screen(two_seconds(3), "t", width=40, height=40)
    assert max(map(len, lines)) == 40
    assert len(lines) == 4 + 1 + 1 + 3 + 1  # headline, blank, header, calls, q quits
    quiet = view(None, Sample(1.0, stats(1.0, 0, 0, sessions=0), []))
    assert screen(quiet, "t", 80, 24)[1:] == [
        "sessions 0 (0 deleting)   flows 8   ports ipv4 2/50  ipv6 2/50",
        "forwarded  ebpf - pkt/s - bit/s", "drops      -", "", "no sessions", "q quits"]


def test_one_line_and_json_per_refresh() -> None:
    v = two_seconds(2)
    assert line(v, "20:45:01") == (
        "20:45:01  sessions 2 (0 deleting) flows 8 ports ipv4 2/50 ipv6 2/50   "
        "forwarded ebpf 500 pkt/s 800k bit/s   drops unallocated 3 pkt/s")
    j = as_json(v, "20:45:01")
    assert j["forwarded"] == {"ebpf": {"pps": 500.0, "bps": 800_000.0}}
    assert j["drops"]["unallocated"] == {"pps": 3.0, "bps": 2400.0}
    assert j["calls"][0] == {"id": "s1", "state": "active", "origin": "ng",
                             "call_id": "c1@x", "peers": ["192.0.2.2:5000", LONG],
                             "packets": 10, "pps": 10.0, "bps": 0.0}


def test_session_and_flow_tables_fit_long_ipv6_addresses() -> None:
    manual = session("m1", 7, call_id=None, peer_b=None)
    lines = _sessions_table([session("s1", 123456, peer_a=LONG), manual]).splitlines()
    assert lines[0].split() == ["ID", "STATE", "ORIGIN", "PACKETS", "PEER", "A", "RELAY",
                                "A", "RELAY", "B", "PEER", "B", "CALL-ID"]
    assert lines[1].index("c1@x") == lines[2].index("-", len(lines[2]) - 1)
    assert lines[2].split()[-2:] == ["?", "-"]  # no peer learnt yet, no Call-ID
    flows = _flows_table([{"session": "s1", "match": LONG, "to": LONG, "packets": 5,
                           "bytes": 1000},
                          {"session": "s2", "match": "192.0.2.1:30000", "to": None,
                           "packets": 0, "bytes": 0}]).splitlines()
    assert flows[1] == f"s1       {LONG}  {LONG}        5   1000"
    assert flows[2].split() == ["s2", "192.0.2.1:30000", "(learning)", "0", "0"]
    assert len({len(f) for f in flows}) == 1  # numbers right-aligned, last column too
    assert _sessions_table([]) == "no sessions" and _flows_table([]) == "no flows"


def test_calls_not_listed_are_said_so() -> None:
    unlisted = view(None, Sample(1.0, stats(1.0, 0, 0, sessions=5000), None))
    assert unlisted.calls is None
    assert screen(unlisted, "t", 200, 24)[5] == (
        "5000 sessions: over --max-calls, so not listed (listing costs the daemon about "
        "0.15 ms per session)")
    assert as_json(unlisted, "20:45:01")["calls"] is None
