"""Calls kept across a crash: ``kill -9`` of ``xlat run`` and a new ``xlat run`` with the
same control socket and state directory, in the lab's gateway namespace, real kernel.

The new daemon adopts every journaled session and its kernel flows as they are (their
counters and the address latching learnt carry on), removes flows no session explains,
hands out no port a live session holds, and ``session del`` / ``xlat stop`` work on
what it adopted. Media keeps flowing meanwhile: the kernel path needs no daemon.
"""

from __future__ import annotations

import itertools
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_daemon import XLAT, A, B, Gateway, recv_from, silent, start_gateway, udp

from xlat.addr import Endpoint
from xlat.control.api import call
from xlat.lab import GW4, GW6, Lab

pytestmark = pytest.mark.netns

STREAM_PPS = 100
# asm-generic/socket.h; Python's socket module names it from 3.14 on
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def kill9(gw: Gateway) -> None:
    """``kill -9``; the dead daemon's socket file stays, so remove it: the test waits for
    the next daemon to create its own (it does so once ready)."""
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    gw.control.unlink()


def flows_by_match(gw: Gateway) -> dict[str, dict[str, object]]:
    flows = gw.json("flow", "list")
    assert isinstance(flows, list)
    return {f["match"]: f for f in flows}


def test_sigkill_and_restart_adopt_sessions_and_flows_untouched(lab: Lab, tmp_path: Path) -> None:
    gw = start_gateway(lab, tmp_path)
    try:
        relay_a, relay_b, sid = gw.add(str(A), str(B))
        latched = Endpoint(B.host, B.port + 10)  # B's media really comes from here (NAT)
        with udp(lab.v6, A) as a, udp(lab.v4, latched) as b_real, udp(lab.v4, B) as b_sdp:
            for i in range(3):
                a.sendto(b"before %d" % i, (str(relay_a.host), relay_a.port))
                assert recv_from(b_sdp)[0] == b"before %d" % i
            b_real.sendto(b"from nat", (str(relay_b.host), relay_b.port))
            assert recv_from(a)[0] == b"from nat"
            a.sendto(b"latched", (str(relay_a.host), relay_a.port))
            assert recv_from(b_real)[0] == b"latched"  # A -> B now goes where B really is
            before = flows_by_match(gw)
            assert before[str(relay_a)]["packets"] == 4

            kill9(gw)
            a.sendto(b"no daemon", (str(relay_a.host), relay_a.port))
            assert recv_from(b_real)[0] == b"no daemon"  # the kernel needs no daemon

            gw = start_gateway(lab, tmp_path)
            (s,) = gw.json("session", "list")  # type: ignore[misc]
            assert s["id"] == sid and s["state"] == "active"
            after = flows_by_match(gw)
            assert after.keys() == before.keys()
            # not reinstalled: the counters went on, and latching kept what it learnt
            assert after[str(relay_a)]["packets"] == 5
            assert after[str(relay_a)]["to"] == str(latched)
            a.sendto(b"after", (str(relay_a.host), relay_a.port))
            assert recv_from(b_real)[0] == b"after"
            assert silent(b_sdp, 0.2)
            assert "4 flow(s) adopted as they are, 0 installed, 0 stale removed" in \
                gw.log.read_text()

            # no port a live session holds is handed out again
            other_a, other_b, _ = gw.add(str(Endpoint(A.host, 41000)), str(B))
            assert {other_a.port, other_b.port}.isdisjoint({relay_a.port, relay_b.port})

            gw.cli("session", "del", sid)
            a.sendto(b"deleted", (str(relay_a.host), relay_a.port))
            assert silent(b_real)
        stats = gw.json("stats")
        assert isinstance(stats, dict)
        assert stats["ports"]["ipv6"]["in_use"] == 1  # only the new session's pair
    finally:
        gw.stop()


def test_flows_no_journal_explains_are_removed(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"  # start_gateway's --state-dir
    gw = start_gateway(lab, tmp_path)
    try:
        relay_a, _, _ = gw.add(str(A), str(B))
        kill9(gw)
        for leftover in state.iterdir():  # the journal is lost: nothing explains the flows
            leftover.unlink()
        gw = start_gateway(lab, tmp_path)
        assert gw.json("session", "list") == [] and gw.json("flow", "list") == []
        assert "4 stale removed" in gw.log.read_text()
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            a.sendto(b"x", (str(relay_a.host), relay_a.port))
            assert silent(b)
    finally:
        gw.stop()


def test_xlat_stop_keep_datapath_hands_calls_over_and_plain_stop_ends_them(
        lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(lab, tmp_path)
    try:
        relay_a, _, sid = gw.add(str(A), str(B))
        gw.cli("stop", "--keep-datapath")
        assert gw.proc.wait(timeout=5) == 0  # `xlat stop` returned once the daemon was done
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            a.sendto(b"between", (str(relay_a.host), relay_a.port))
            assert recv_from(b)[0] == b"between"
            gw = start_gateway(lab, tmp_path)
            assert [s["id"] for s in gw.json("session", "list")] == [sid]  # type: ignore[union-attr]
            gw.cli("stop")
            assert gw.proc.wait(timeout=5) == 0
            a.sendto(b"torn down", (str(relay_a.host), relay_a.port))
            assert silent(b)
        assert list(state.iterdir()) == []  # nothing left worth journaling
        r = gw.cli("stop", check=False)
        assert r.returncode == 1 and "cannot reach xlat" in r.stderr
    finally:
        gw.stop()


def test_an_unusable_state_dir_stops_the_start_before_the_kernel_is_touched(
        lab: Lab, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = lab.exec(lab.gw, [*XLAT, "--control", str(tmp_path / "c.sock"), "run",
                             "--media-v4", str(GW4), "--bpffs", str(lab.bpffs),
                             "--sip-listen", "none", "--state-dir", str(not_a_dir / "state")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    (line,) = [ln for ln in err.decode().splitlines() if " ERROR " in ln]
    assert f"state directory {not_a_dir / 'state'}: Not a directory" in line, line
    assert not (lab.bpffs / "flows").exists()  # no map pinned: no program was loaded


def test_a_start_that_fails_after_adopting_leaves_the_calls_to_the_next(
        lab: Lab, tmp_path: Path) -> None:
    gw = start_gateway(lab, tmp_path)
    try:
        relay_a, _, sid = gw.add(str(A), str(B))
        kill9(gw)
        # adopts, then cannot listen for SIP on an address that is not the gateway's
        failed = start_gateway_failing(lab, tmp_path, "--sip-listen", "192.0.2.99:5060")
        assert failed.returncode != 0
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            a.sendto(b"still", (str(relay_a.host), relay_a.port))
            assert recv_from(b)[0] == b"still"
        gw = start_gateway(lab, tmp_path)
        assert [s["id"] for s in gw.json("session", "list")] == [sid]  # type: ignore[union-attr]
        assert "4 flow(s) adopted as they are, 0 installed" in gw.log.read_text()
    finally:
        gw.stop()


def start_gateway_failing(lab: Lab, tmp_path: Path, *extra: str
                          ) -> subprocess.CompletedProcess[bytes]:
    """``xlat run`` as ``start_gateway`` runs it, expected to exit by itself."""
    argv = [*XLAT, "--control", str(tmp_path / "xlat.sock"), "run", "--media-v4", str(GW4),
            "--media-v6", str(GW6), "--bpffs", str(lab.bpffs), "--state-dir",
            str(tmp_path / "state"), "--ports", "30000-30099", *extra]
    proc = lab.exec(lab.gw, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, b"", err)


# ---- measured: media across kill -9 and a restart -------------------------------------------


@dataclass
class Stream:
    """A 100 pps RTP-like stream A -> relay: each packet carries its sequence number and
    when it was sent; B notes when the kernel queued it to B's socket (SO_TIMESTAMPNS),
    so the figures are the datapath's, not how this busy test process was scheduled."""

    sender: socket.socket
    receiver: socket.socket
    to: Endpoint
    sent: int = 0
    got: list[tuple[int, int, int]] = field(default_factory=list)  # seq, sent, arrived (ns)
    stop: threading.Event = field(default_factory=threading.Event)

    def send(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            payload = self.sent.to_bytes(4, "big") + time.time_ns().to_bytes(8, "big")
            self.sender.sendto(payload, (str(self.to.host), self.to.port))
            self.sent += 1
            time.sleep(max(0.0, start + self.sent / STREAM_PPS - time.monotonic()))

    def receive(self) -> None:
        self.receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.receiver.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data, ancillary, _, _ = self.receiver.recvmsg(64, 64)
            except TimeoutError:
                continue
            (_, _, stamp), = ancillary  # struct timespec: seconds, nanoseconds
            sec, nsec = struct.unpack("qq", stamp[:16])
            self.got.append((int.from_bytes(data[:4], "big"), int.from_bytes(data[4:12], "big"),
                             sec * 1_000_000_000 + nsec))


def test_media_across_sigkill_and_restart_loses_nothing(lab: Lab, tmp_path: Path) -> None:
    """The figure of the README's crash-safety section (run with ``-s`` to see it)."""
    gw = start_gateway(lab, tmp_path)
    try:
        relay_a, _, sid = gw.add(str(A), str(B))
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b:
            stream = Stream(a, b, relay_a)
            threads = [threading.Thread(target=f) for f in (stream.send, stream.receive)]
            for t in threads:
                t.start()
            try:
                time.sleep(1.0)
                kill9(gw)
                started = time.monotonic()
                gw = start_gateway(lab, tmp_path)
                ready = time.monotonic() - started
                time.sleep(1.0)
            finally:
                stream.stop.set()
                for t in threads:
                    t.join()
        lost = stream.sent - len({seq for seq, _, _ in stream.got})
        arrivals = sorted(arrived for _, _, arrived in stream.got)
        gap = max(b - a for a, b in itertools.pairwise(arrivals)) / 1e6
        delay = max(arrived - sent for _, sent, arrived in stream.got) / 1e6
        print(f"\n{STREAM_PPS} pps across kill -9 + restart: sent {stream.sent}, lost {lost}, "
              f"longest gap between arrivals {gap:.1f} ms, longest one-way delay "
              f"{delay:.1f} ms; restart to ready {ready:.2f} s")
        assert [s["id"] for s in gw.json("session", "list")] == [sid]  # type: ignore[union-attr]
        assert lost <= 1  # the last one may still be in flight when the stream stops
        assert delay < 50  # no packet waited for a daemon (a gap can be the sender's)
    finally:
        gw.stop()


MANY = 5000  # sessions: 20000 kernel flows


def test_restart_with_many_calls_adopts_every_one(lab: Lab, tmp_path: Path) -> None:
    """Restart time to ready with MANY live sessions (run with ``-s`` to see it)."""
    gw = start_gateway(lab, tmp_path, "--ports", "20000-59999", "--log-level", "info")
    try:
        for i in range(MANY):  # over the control socket: a CLI process each would be slow
            port = 10000 + 2 * (i % 20000)
            call(gw.control, "session.add", {"peer_a": f"[{A.host}]:{port}",
                                             "peer_b": f"{B.host}:{port}"})
        kill9(gw)
        started = time.monotonic()
        gw = start_gateway(lab, tmp_path, "--ports", "20000-59999", "--log-level", "info")
        ready = time.monotonic() - started
        print(f"\nrestart to ready with {MANY} sessions: {ready:.2f} s")
        stats = gw.json("stats")
        assert isinstance(stats, dict)
        assert stats["sessions"] == MANY and stats["flows"] == 4 * MANY
        assert f"{4 * MANY} flow(s) adopted as they are, 0 installed" in gw.log.read_text()
    finally:
        gw.stop()
