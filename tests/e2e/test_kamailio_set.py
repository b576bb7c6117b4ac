"""Past one machine: Debian's Kamailio balances calls over two xlat nodes, one rtpengine
set holding both NG sockets (bench/rtpset.py draws the lab), and keeps placing calls when
one node is stopped.

    SIPp UAC (v6 host) --SIP--> Kamailio --SIP--> SIPp UAS (v4 host)
                                   | NG: udp:203.0.113.1:2223 udp:203.0.113.11:2223
                         xlat node 0          xlat node 1   (each in its own namespace)

Media goes through the relay ports each node advertised, in that node's kernel. A node
stopped with ``xlat stop --keep-datapath`` leaves its filters and flows in the kernel: its
live calls keep their media there, while Kamailio, getting no NG answer in
``rtpengine_tout_ms``, takes it out of the set and sends new calls to the other node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require

from bench.rtpset import (
    HOST4,
    HOST6,
    RTP_PORT,
    Node,
    RtpSet,
    end,
    uac_argv,
    uas_argv,
    udp_bound,
    wait,
)
from xlat.lab import in_netns

pytestmark = pytest.mark.e2e

PACKETS = 10


@pytest.fixture(scope="module")
def rtpset() -> Iterator[RtpSet]:
    require("root", os.geteuid() == 0)
    for tool in ("kamailio", "kamcmd", "sipp", "ss", "bpftool"):
        require(tool, shutil.which(tool) is not None)
    lab = RtpSet(2)
    try:
        lab.up("--delete-delay", "2", "--log-level", "info")
        lab.start_kamailio()
        yield lab
    finally:
        lab.down()


class Sipp:
    """The SIPp parties of these tests: a v4 UAS answering every call, v6 UACs."""

    def __init__(self, lab: RtpSet, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, ns: str, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc

    def uas(self) -> None:
        self._start(self.lab.h4, "uas", uas_argv())
        wait("the SIPp UAS", lambda: udp_bound(self.lab.h4, 5060), 10)

    def uac(self, name: str, port: int, calls: int, rate: float, hold_ms: int
            ) -> subprocess.Popen[bytes]:
        return self._start(self.lab.h6, name, uac_argv(port, calls, rate, hold_ms))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        for proc in self.procs:
            end(proc)


@pytest.fixture
def sipp(rtpset: RtpSet, tmp_path: Path) -> Iterator[Sipp]:
    parties = Sipp(rtpset, tmp_path)
    try:
        parties.uas()
        yield parties
    finally:
        parties.stop()


def _answered(nodes: list[Node], want: int, besides: frozenset[str] = frozenset()
              ) -> dict[str, Node] | None:
    """Call-ID -> node for every answered NG call (both peers known, not deleted yet)
    not in ``besides``, once there are ``want`` of them."""
    where = {cid: node for node in nodes for cid, s in node.ng_sessions().items()
             if cid not in besides and s["state"] != "deleting"
             and all(leg["peer"] for leg in s["legs"])}
    return where if len(where) >= want else None


class Media:
    """RTP sockets of both parties (the same for every call: both advertise RTP_PORT)."""

    def __init__(self, lab: RtpSet) -> None:
        with in_netns(lab.h6):
            self.caller = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with in_netns(lab.h4):
            self.callee = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.caller.bind((HOST6, RTP_PORT))
        self.callee.bind((HOST4, RTP_PORT))
        for s in (self.caller, self.callee):
            s.settimeout(2.0)
        self.marker = 0

    def close(self) -> None:
        self.caller.close()
        self.callee.close()

    def both_ways(self, session: dict[str, Any]) -> None:
        """PACKETS RTP packets each way through the call's relay ports; every one must
        arrive, from the relay port of the far leg."""
        to_caller, to_callee = session["legs"]
        self._one_way(self.caller, self.callee, to_caller["relay"], to_callee["relay"])
        self._one_way(self.callee, self.caller, to_callee["relay"], to_caller["relay"])

    def _one_way(self, tx: socket.socket, rx: socket.socket, relay: str, source: str) -> None:
        self.marker += 1
        ssrc = self.marker.to_bytes(4, "big")
        host, port = _host_port(relay)
        for seq in range(PACKETS):
            tx.sendto(bytes([0x80, 0x00]) + seq.to_bytes(2, "big") + bytes(4) + ssrc
                      + bytes(160), (host, port))
        got = []
        while len(got) < PACKETS:
            data, addr = rx.recvfrom(2048)
            if data[8:12] == ssrc:
                assert (addr[0], addr[1]) == _host_port(source)
                got.append(int.from_bytes(data[2:4], "big"))
        assert sorted(got) == list(range(PACKETS))


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def test_calls_spread_over_both_nodes(rtpset: RtpSet, sipp: Sipp) -> None:
    calls = 8
    uac = sipp.uac("uac", 5070, calls, rate=20, hold_ms=4000)
    where = wait("every call answered", lambda: _answered(rtpset.nodes, calls), 20)
    per_node = {node.ns: [cid for cid, n in where.items() if n is node] for node in rtpset.nodes}
    assert all(per_node.values()), f"a node got no call: {per_node}"
    media = Media(rtpset)
    try:
        for node in rtpset.nodes:
            session = node.ng_sessions()[per_node[node.ns][0]]
            before = node.kernel_forwarded()
            media.both_ways(session)
            flows = {f["match"]: f["packets"] for f in node.cli("flow", "list")}
            assert all(flows[leg["relay"]] >= PACKETS for leg in session["legs"])
            assert node.kernel_forwarded() >= before + 2 * PACKETS
    finally:
        media.close()
    assert uac.wait(timeout=30) == 0, sipp.log("uac")


def test_stopped_node_keeps_its_calls_new_calls_go_to_the_other(rtpset: RtpSet, sipp: Sipp
                                                                 ) -> None:
    keeper, victim = rtpset.nodes
    long_calls = 6
    first = sipp.uac("uac-long", 5070, long_calls, rate=20, hold_ms=15000)
    where = wait("the long calls answered", lambda: _answered(rtpset.nodes, long_calls), 20)
    live = sorted(cid for cid, node in where.items() if node is victim)
    assert live, f"no call on {victim.ns}: {where}"
    session = victim.ng_sessions()[live[0]]
    media = Media(rtpset)
    try:
        media.both_ways(session)
        forwarded = victim.kernel_forwarded()

        victim.cli("stop", "--keep-datapath")
        assert victim.proc is not None and victim.proc.wait(timeout=30) == 0, victim.tail()
        # no daemon there now: only the node's kernel path can translate these
        media.both_ways(session)
        assert victim.kernel_forwarded() >= forwarded + 2 * PACKETS

        new_calls = 6
        known = frozenset(where) | frozenset(keeper.ng_sessions())
        second = sipp.uac("uac-new", 5071, new_calls, rate=5, hold_ms=3000)
        fresh = wait("the new calls answered", lambda: _answered([keeper], new_calls, known), 30)
        assert len(fresh) == new_calls  # every one on the node still running
        assert second.wait(timeout=30) == 0, sipp.log("uac-new")
        state = rtpset.rtpengine_nodes()
        assert state == {f"udp:{keeper.ng}": False, f"udp:{victim.ng}": True}, state

        media.both_ways(session)  # the stopped node's call still has its media
    finally:
        media.close()
    assert first.wait(timeout=30) == 0, sipp.log("uac-long")  # and every call ended well
