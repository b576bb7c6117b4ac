"""What an operator sees of a running daemon: Prometheus metrics scraped over HTTP, the
log (one summary line per ended call, journald priorities, malformed SIP summarised,
the level changed at run time)."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import Gateway, start_gateway

from xlat.addr import Endpoint
from xlat.lab import GW4, V4_HOST, V6_HOST, Lab, in_netns

pytestmark = pytest.mark.netns

XLAT = [sys.executable, "-m", "xlat.cli"]
METRICS = Endpoint(GW4, 9260)  # the lab's gateway namespace is ours: fixed ports are free
NG = Endpoint.parse("127.0.0.1:2223")
A = Endpoint.parse(f"[{V6_HOST}]:40000")
B = Endpoint.parse(f"{V4_HOST}:50000")


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    d = start_gateway(lab, tmp_path, "--sip-listen", f"{GW4}:5060",
                      "--metrics-listen", str(METRICS), "--allow-remote-control",
                      "--ng-listen", str(NG), "--log-format", "json", "--log-level", "debug")
    try:
        yield d
    finally:
        d.stop()


def scrape(lab: Lab) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics from the gateway namespace, parsed by prometheus_client's parser:
    (sample name, sorted labels) -> value."""
    with in_netns(lab.gw):
        s = socket.create_connection((str(METRICS.host), METRICS.port), timeout=5)
    with s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"Content-Type: text/plain; version=0.0.4" in head
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def udp(ns: str, bind: Endpoint) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if bind.family == 6 else socket.AF_INET,
                          socket.SOCK_DGRAM)
    s.bind((str(bind.host), bind.port))
    s.settimeout(2.0)
    return s


def ng_ping(lab: Lab) -> bytes:
    with in_netns(lab.gw):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(2)
        s.sendto(b"c1 d7:command4:pinge", (str(NG.host), NG.port))
        return s.recv(4096)


def test_metrics_move_with_a_relayed_call(daemon: Gateway) -> None:
    lab = daemon.lab
    before = scrape(lab)
    assert before["xlat_info", (("datapath", "ebpf+nft"), ("version", "0.1.0"))] == 1
    assert before["xlat_sessions", (("origin", "manual"), ("state", "active"))] == 0
    assert before["xlat_relay_port_pairs", (("family", "ipv4"),)] == 50

    s = json.loads(daemon.cli("session", "add", "--peer-a", str(A), "--peer-b", str(B),
                               "-j").stdout)
    relay_a, relay_b = (Endpoint.parse(leg["relay"]) for leg in s["legs"])
    with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
        for _ in range(3):
            a.sendto(b"x" * 100, (str(relay_a.host), relay_a.port))
            assert b.recv(4096) == b"x" * 100
        for _ in range(2):
            b.sendto(b"y" * 50, (str(relay_b.host), relay_b.port))
            assert a.recv(4096) == b"y" * 50
        b.sendto(b"nobody", (str(relay_b.host), relay_b.port + 10))  # an unallocated port
    assert ng_ping(lab) == b"c1 d6:result4:ponge"
    during = scrape(lab)
    assert during["xlat_sessions", (("origin", "manual"), ("state", "active"))] == 1
    assert during["xlat_relay_port_pairs_in_use", (("family", "ipv6"),)] == 1
    assert during["xlat_flows", ()] == 4
    forwarded = (("datapath", "ebpf"),)
    assert during["xlat_forwarded_packets_total", forwarded] - \
        before["xlat_forwarded_packets_total", forwarded] == 5
    unallocated = (("datapath", "nft"), ("reason", "unallocated"))
    assert during["xlat_dropped_packets_total", unallocated] > \
        before["xlat_dropped_packets_total", unallocated]
    assert during["xlat_ng_requests_total", (("command", "ping"),)] == 1
    ping = (("command", "ping"),)
    assert during["xlat_ng_request_duration_seconds_count", ping] == 1
    assert during["xlat_ng_request_duration_seconds_bucket", (*ping, ("le", "+Inf"))] == 1
    assert 0 < during["xlat_ng_request_duration_seconds_sum", ping] < 1

    daemon.cli("session", "del", s["id"])
    after = scrape(lab)
    assert after["xlat_sessions_ended_total", (("reason", "removed"),)] == 1
    assert after["xlat_call_media_packets_total", (("direction", "v6->v4"),)] == 3
    assert after["xlat_call_media_bytes_total", (("direction", "v6->v4"),)] == 3 * (100 + 48)
    assert after["xlat_call_media_packets_total", (("direction", "v4->v6"),)] == 2
    assert after["xlat_relay_port_pairs_in_use", (("family", "ipv6"),)] == 0

    # the summary line: one JSON object, the call's numbers each way
    [summary] = [json.loads(line) for line in daemon.lines() if '"call"' in line]
    assert summary["session"] == s["id"] and summary["level"] == "info"
    assert summary["call"]["reason"] == "removed" and summary["call"]["origin"] == "manual"
    assert summary["call"]["a->b"] == {"packets": 3, "bytes": 3 * 148}
    assert summary["call"]["b->a"] == {"packets": 2, "bytes": 2 * (50 + 28)}
    assert summary["message"].startswith("manual session ended (removed) after ")


OPTIONS = (
    "OPTIONS sip:{user}{gw} SIP/2.0\r\nVia: SIP/2.0/UDP {me}:5062;branch=z9hG4bK{n}\r\n"
    "Max-Forwards: 70\r\nFrom: <sip:mon@{me}>;tag=1\r\nTo: <sip:{gw}>\r\n"
    "Call-ID: ping-{n}@{me}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
)


def test_sip_counters_and_malformed_sip_summarised(daemon: Gateway) -> None:
    lab = daemon.lab
    with udp(lab.v4, Endpoint(V4_HOST, 5062)) as phone:
        phone.sendto(OPTIONS.format(user="", gw=GW4, me=V4_HOST, n=1).encode(),
                     (str(GW4), 5060))
        assert phone.recv(4096).startswith(b"SIP/2.0 200 ")
        phone.sendto(OPTIONS.format(user="nobody@", gw=GW4, me=V4_HOST, n=2).encode(),
                     (str(GW4), 5060))
        assert phone.recv(4096).startswith(b"SIP/2.0 404 ")
        for i in range(10):  # dropped, no reply; paced under the per-source SIP rate
            phone.sendto(b"SIP/2.0 999 garbage %d\r\n\r\n" % i, (str(GW4), 5060))
            time.sleep(0.05)
        time.sleep(0.3)
    m = scrape(lab)
    assert m["xlat_sip_requests_received_total", (("method", "OPTIONS"),)] == 2
    assert m["xlat_sip_responses_sent_total", (("code", "200"), ("method", "OPTIONS"))] == 1
    assert m["xlat_sip_responses_sent_total", (("code", "404"), ("method", "OPTIONS"))] == 1
    assert m["xlat_sip_malformed_total", ()] == 10
    assert m["xlat_sip_transactions", ()] >= 0
    malformed = [line for line in daemon.lines() if "malformed" in line]
    assert len(malformed) == 1, malformed  # 10 packets, one line in the 10 s window
    # a line about a call carries its Call-ID (the 404 is logged)
    lines = [json.loads(line) for line in daemon.lines() if line.startswith("{")]
    [rejected] = [r for r in lines if r["message"].startswith("OPTIONS sip:nobody@")]
    assert rejected["call_id"] == f"ping-2@{V4_HOST}", rejected


def test_log_level_changes_in_a_running_daemon(daemon: Gateway) -> None:
    assert daemon.cli("log", "level").stdout == "debug\n"
    assert daemon.cli("log", "level", "warning").stdout == "log level warning (was debug)\n"
    assert json.loads(daemon.cli("-j", "log", "level").stdout) == {"level": "warning"}
    mark = len(daemon.lines())
    s = json.loads(daemon.cli("session", "add", "--peer-a", str(A), "--peer-b", str(B),
                               "-j").stdout)
    daemon.cli("session", "del", s["id"])
    assert not [line for line in daemon.lines()[mark:] if '"level": "info"' in line]
    daemon.cli("log", "level", "info")
    daemon.cli("session", "add", "--peer-a", str(A), "--peer-b", str(B))
    daemon.cli("session", "flush")
    assert any('"flushed 1 session(s)"' in line for line in daemon.lines())


def test_under_journald_lines_carry_priorities_and_no_timestamps(lab: Lab,
                                                                 tmp_path: Path) -> None:
    log = tmp_path / "xlat.log"
    log.touch()
    st = log.stat()
    d = start_gateway(lab, tmp_path, "--sip-listen", f"{GW4}:5060", "--log-level", "debug",
                      env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    try:
        d.cli("log", "level", "error")  # logged at priority 3: the new level's own
    finally:
        d.stop()
    lines = d.lines()
    assert any(line.startswith("<6>INFO xlat: xlat ready") for line in lines), lines
    assert any(line.startswith("<7>DEBUG ") for line in lines)
    assert "<3>ERROR xlat: log level error (was debug), set through the control socket" \
        in lines
    assert all(line[:1] == "<" and line[2] == ">" for line in lines), lines
