"""The CLI's conveniences against a real daemon in the lab: ``session show|del
--call-id`` over a forked NG call with media relayed in the kernel, and ``xlat
monitor`` on a real pseudo-terminal (quit with q) and on a pipe."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import XLAT, Gateway, recv_from, silent, start_gateway, udp

from xlat.addr import Endpoint
from xlat.control.bencode import decode, encode
from xlat.lab import V4_HOST, V6_HOST, Lab, in_netns
from xlat.monitor import LEAVE
from xlat.sdp import parse_sdp

pytestmark = pytest.mark.netns

NG = Endpoint.parse("127.0.0.1:2223")
CALL = "fork-call@[2001:db8:6::2]"
OFFER = (b"v=0\r\no=- 1 1 IN IP6 %s\r\ns=-\r\nc=IN IP6 %s\r\nt=0 0\r\n"
         b"m=audio 40000 RTP/AVP 0\r\n" % (str(V6_HOST).encode(), str(V6_HOST).encode()))


def answer_sdp(port: int) -> bytes:
    return (b"v=0\r\no=- 2 2 IN IP4 %s\r\ns=-\r\nc=IN IP4 %s\r\nt=0 0\r\n"
            b"m=audio %d RTP/AVP 0\r\n" % (str(V4_HOST).encode(), str(V4_HOST).encode(), port))


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(lab, tmp_path, "--ng-listen", str(NG))
    try:
        yield gw
    finally:
        gw.stop()


def ng(lab: Lab, **fields: object) -> dict[str, object]:
    with in_netns(lab.gw):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(5)
        s.sendto(b"k%d " % time.monotonic_ns() + encode(fields), (str(NG.host), NG.port))
        reply = decode(s.recv(65536).partition(b" ")[2])
    assert isinstance(reply, dict) and reply["result"] == b"ok", reply
    return reply


def relay(sdp: object) -> Endpoint:
    assert isinstance(sdp, bytes)
    media = parse_sdp(sdp).media[0]
    assert media.address is not None
    return Endpoint(media.address, media.port)


def test_show_and_del_by_call_id_cover_every_fork(gateway: Gateway) -> None:
    lab = gateway.lab
    ng(lab, command="offer", **{"call-id": CALL, "from-tag": "ft", "sdp": OFFER,
                                "direction": ["v6", "v4"]})
    forks = {tag: relay(ng(lab, command="answer", **{"call-id": CALL, "from-tag": "ft",
                                                       "to-tag": tag,
                                                       "sdp": answer_sdp(port)})["sdp"])
             for tag, port in (("t1", 50000), ("t2", 50002))}
    _, _, other = gateway.add(f"[{V6_HOST}]:41000", f"{V4_HOST}:51000")

    shown = gateway.json("session", "show", "--call-id", CALL)
    assert isinstance(shown, list) and len(shown) == 2
    assert {s["call_id"] for s in shown} == {CALL}
    assert sorted(s["tags"][1] for s in shown) == ["t1", "t2"]
    # RTP and RTCP into each fork's own caller-facing relay, and the callee-facing
    # relay the forks share (its flows belong to the latest answer): 2 + 4
    assert sorted(len(s["flows"]) for s in shown) == [2, 4]
    assert all(f["session"] == s["id"] for s in shown for f in s["flows"])
    text = gateway.cli("session", "show", "--call-id", CALL).stdout
    assert all(s["id"] in text for s in shown) and other not in text
    assert text.splitlines()[0].split()[-1] == "CALL-ID"

    # each fork relays the caller's media to its own callee, in the kernel
    with udp(lab.v6, Endpoint(V6_HOST, 40000)) as a, \
            udp(lab.v4, Endpoint(V4_HOST, 50000)) as b1, \
            udp(lab.v4, Endpoint(V4_HOST, 50002)) as b2:
        for tag, callee in (("t1", b1), ("t2", b2)):
            a.sendto(tag.encode(), (str(forks[tag].host), forks[tag].port))
            assert recv_from(callee)[0] == tag.encode()
        deleted = gateway.json("session", "del", "--call-id", CALL)
        assert deleted == {"call_id": CALL, "deleted": [s["id"] for s in shown]}
        for tag, callee in (("t1", b1), ("t2", b2)):
            a.sendto(tag.encode(), (str(forks[tag].host), forks[tag].port))
            assert silent(callee)
    listed = gateway.json("session", "list")
    assert isinstance(listed, list) and [s["id"] for s in listed] == [other]

    for verb in ("show", "del"):
        r = gateway.cli("session", verb, "--call-id", CALL, check=False)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.splitlines() == [f"xlat: no session has call-id {CALL}"]
    r = gateway.cli("session", "show", other, "--call-id", CALL, check=False)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


class Stream:
    """RTP-sized datagrams from the IPv6 peer to its relay, 100 per second, in a
    thread, for as long as the ``with`` block lasts."""

    def __init__(self, lab: Lab, peer: Endpoint, to: Endpoint) -> None:
        self.sock = udp(lab.v6, peer)
        self.to, self.sent, self._stop = to, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.sock.sendto(b"\x80" + bytes(171), (str(self.to.host), self.to.port))
            self.sent += 1

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def controlling_terminal() -> None:
    """In the child: a session of its own whose controlling terminal is the pty on
    stdin, so a typed Ctrl-C reaches it as SIGINT, as in a shell."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_monitor_on_a_terminal_shows_the_call_and_quits_on_q(gateway: Gateway,
                                                             key: bytes) -> None:
    peer = Endpoint.parse(f"[{V6_HOST}]:42000")
    relay_a, _, sid = gateway.add(str(peer), f"{V4_HOST}:52000")
    with Stream(gateway.lab, peer, relay_a):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))
        os.set_blocking(master, False)
        proc = subprocess.Popen([*XLAT, "--control", str(gateway.control), "monitor"],
                                stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                preexec_fn=controlling_terminal)
        os.close(slave)
        screen = b""
        try:
            deadline = time.monotonic() + 15
            # a frame with the call's rate (the second refresh onwards has one)
            while time.monotonic() < deadline:
                select.select([master], [], [], 0.5)
                try:
                    screen += os.read(master, 65536)
                except BlockingIOError:
                    continue
                frame = screen.rpartition(b"\x1b[H\x1b[J")[2].decode(errors="replace")
                row = next((ln for ln in frame.splitlines() if ln.startswith(sid)), "")
                if row and row.split()[3] not in ("-", "0"):
                    break
            else:
                raise AssertionError(f"no frame with a rate for {sid}:\n{screen[-3000:]!r}")
            assert "forwarded  ebpf" in frame and frame.splitlines()[-1] == "q quits"
            assert 50 <= float(row.split()[3]) <= 150, row  # 100 packets/s, one direction
            os.write(master, key)  # Ctrl-C: the terminal's SIGINT, as a user types it
            assert proc.wait(timeout=5) == 0
            with contextlib.suppress(OSError):  # EIO once the child closed its side
                while select.select([master], [], [], 0.5)[0]:
                    screen += os.read(master, 65536)
            assert screen.endswith(LEAVE.encode())  # the terminal given back
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)


def test_monitor_on_a_pipe_prints_one_line_or_object_per_refresh(gateway: Gateway) -> None:
    peer = Endpoint.parse(f"[{V6_HOST}]:43000")
    relay_a, _, sid = gateway.add(str(peer), f"{V4_HOST}:53000")
    with Stream(gateway.lab, peer, relay_a):
        started = time.monotonic()
        lines = gateway.cli("monitor", "--count", "3").stdout.splitlines()
        took = time.monotonic() - started
        objects = [json.loads(o) for o in
                   gateway.cli("monitor", "-j", "--count", "2", "--interval", "0.5")
                   .stdout.splitlines()]
        unlisted = json.loads(gateway.cli("monitor", "-j", "--count", "1", "--max-calls",
                                          "0").stdout)
        # a reader that goes away (`xlat monitor | head -1`) ends it quietly
        head = subprocess.Popen([*XLAT, "--control", str(gateway.control), "monitor"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert head.stdout is not None and head.stderr is not None
        assert b" sessions 1 " in head.stdout.readline()
        head.stdout.close()
        assert head.wait(timeout=10) == 0
        assert head.stderr.read() == b""
    assert len(lines) == 3 and 2.0 <= took < 6, (lines, took)
    assert all(" sessions 1 (0 deleting) flows 4 " in ln for ln in lines), lines
    assert "forwarded ebpf - pkt/s" in lines[0] and "pkt/s" in lines[2]
    assert len(objects) == 2
    (first,), (second,) = objects[0]["calls"], objects[1]["calls"]
    assert first["id"] == second["id"] == sid and first["pps"] is None
    assert 25 <= second["pps"] <= 200, second  # 100 packets/s, over half a second
    assert objects[1]["forwarded"]["ebpf"]["pps"] >= 25
    assert unlisted["calls"] is None and unlisted["sessions"] == 1
