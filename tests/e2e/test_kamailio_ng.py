"""Interop with the real thing: Debian's Kamailio (rtpengine module) drives xlat over
NG while SIPp places a call across families, and RTP crosses the kernel relay.

    SIPp (v6 host) --SIP--> Kamailio (gateway ns) --SIP--> SIPp (v4 host), and back
                               | NG udp:127.0.0.1:2223
                              xlat run --sip-listen none --ng-listen ...

The call must appear in ``xlat session list -j`` while it lasts, its kernel flows must
count the RTP we send through the relay ports the SDP advertised, and it must leave the
list after the BYE plus the delete delay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xlat.control.bencode import decode, encode

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent / "kamailio"
XLAT = str(Path(sys.executable).with_name("xlat"))
NG_LISTEN = "127.0.0.1:2223"
DELETE_DELAY = 2.0
CALL_MS = 8000  # how long the UAC holds the call before its BYE
RTP_PORT = 40000  # both SIPp parties advertise this media port
PACKETS = 10


def _require(ok: object, why: str) -> None:
    """Skip when the environment cannot run this; under CI a skip is a failure."""
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


def _wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a process we started (and the children in its session) by its pid."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass
class Gateway:
    lab: Any  # xlat.lab.Lab
    control: Path
    tmp: Path
    logs: dict[str, Path]

    def cli(self, *args: str) -> Any:
        out = subprocess.run([XLAT, "--control", str(self.control), *args, "-j"],
                             capture_output=True, text=True, timeout=15)
        assert out.returncode == 0, f"xlat {' '.join(args)}: {out.stderr}"
        return json.loads(out.stdout)

    def ng(self, fields: dict[str, Any]) -> Any:
        """One NG request from the gateway namespace, as Kamailio sends them."""
        with self.lab.in_netns(self.lab.gw):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(5.0)
            host, port = NG_LISTEN.split(":")
            sock.sendto(b"xg_1 " + encode(fields), (host, int(port)))
            cookie, _, reply = sock.recv(65535).partition(b" ")
        assert cookie == b"xg_1"
        return decode(reply)

    def udp_bound(self, ns: str, port: int) -> bool:
        return f":{port} " in self.lab.run(ns, ["ss", "-Hlun"])

    def start(self, ns: str, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as out:
            proc: subprocess.Popen[bytes] = self.lab.exec(
                ns, argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.tmp, start_new_session=True)
        return proc

    def tail(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    _require(os.geteuid() == 0, "needs root (network namespaces)")
    for tool in ("kamailio", "sipp", "ss"):
        _require(shutil.which(tool), f"{tool} is not installed")
    from xlat.lab import Lab

    suffix = uuid.uuid4().hex[:6]
    lab = Lab(f"xg-{suffix}")
    tmp = tmp_path_factory.mktemp("xg-kamailio")
    gw = Gateway(lab, tmp / "control.sock", tmp, {})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        lab.up()
        xlat = gw.start(lab.gw, "xlat", [
            XLAT, "--control", str(gw.control), "run", "--datapath", "ebpf",
            "--bpffs", str(lab.bpffs), "--sip-listen", "none", "--ng-listen", NG_LISTEN,
            "--media-v4", "203.0.113.1", "--media-v6", "2001:db8:6::1",
            "--interface", "gw6", "--interface", "gw4",
            "--delete-delay", str(DELETE_DELAY), "--log-level", "info",
            "--state-dir", str(tmp / "state")])
        procs.append(xlat)
        _wait("xlat's control socket", lambda: gw.control.exists() or xlat.poll() is not None,
              120)
        assert xlat.poll() is None, f"xlat exited:\n{gw.tail('xlat')}"
        run_dir = tmp / "kamailio-run"
        run_dir.mkdir()
        kamailio = gw.start(lab.gw, "kamailio", [
            "kamailio", "-DD", "-E", "-f", str(HERE / "kamailio.cfg"), "-Y", str(run_dir),
            "-m", "32", "-M", "8", "-A", f'NG_SOCK="udp:{NG_LISTEN}"'])
        procs.append(kamailio)
        _wait("Kamailio on port 5060",
              lambda: gw.udp_bound(lab.gw, 5060) or kamailio.poll() is not None, 30)
        assert kamailio.poll() is None, f"kamailio exited:\n{gw.tail('kamailio')}"
        yield gw
    finally:
        for proc in reversed(procs):
            _stop(proc)
        lab.down()


@dataclass(frozen=True)
class Party:
    ns: str  # "v6" or "v4": which lab namespace
    address: str
    af: str  # SDP addrtype
    sip: str  # SIPp's target when calling from here: Kamailio's address of this family

    @property
    def host(self) -> str:
        return f"[{self.address}]" if ":" in self.address else self.address

    def uri(self, user: str) -> str:
        return f"sip:{user}@{self.host}:5060"


V6 = Party("v6", "2001:db8:6::2", "IP6", "[2001:db8:6::1]:5060")
V4 = Party("v4", "203.0.113.2", "IP4", "203.0.113.1:5060")


def _socket(gw: Gateway, ns: str, party: Party) -> socket.socket:
    family = socket.AF_INET6 if party.af == "IP6" else socket.AF_INET
    with gw.lab.in_netns(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((party.address, RTP_PORT))
    sock.settimeout(2.0)
    return sock


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _relay(sender: socket.socket, receiver: socket.socket, relay: str, source: str) -> None:
    """Send PACKETS RTP packets to ``relay``; all must arrive from ``source``."""
    host, port = _host_port(relay)
    for seq in range(PACKETS):
        rtp = bytes([0x80, 0x00]) + seq.to_bytes(2, "big") + bytes(8) + bytes(160)
        sender.sendto(rtp, (host, port))
    for seq in range(PACKETS):
        data, addr = receiver.recvfrom(2048)
        assert data[2:4] == seq.to_bytes(2, "big") and len(data) == 172
        assert (addr[0], addr[1]) == _host_port(source)


@pytest.mark.parametrize(("caller", "callee"), [(V6, V4), (V4, V6)], ids=["v6-to-v4", "v4-to-v6"])
def test_call_through_kamailio(gateway: Gateway, caller: Party, callee: Party) -> None:
    gw, lab = gateway, gateway.lab
    caller_ns, callee_ns = getattr(lab, caller.ns), getattr(lab, callee.ns)
    common = ["-m", "1", "-nostdin", "-timeout", "30", "-timeout_error", "-trace_err",
              "-key", "rtp_port", str(RTP_PORT)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        uas = gw.start(callee_ns, "uas", [
            "sipp", "-sf", str(HERE / "uas.xml"), "-i", callee.address, "-p", "5060",
            "-key", "media_af", callee.af, "-key", "media_addr", callee.address, *common])
        procs.append(uas)
        _wait("the SIPp UAS", lambda: gw.udp_bound(callee_ns, 5060), 10)
        uac = gw.start(caller_ns, "uac", [
            "sipp", caller.sip, "-sf", str(HERE / "uac.xml"), "-i", caller.address,
            "-p", "5060", "-d", str(CALL_MS), "-key", "callee", callee.uri("callee"),
            "-key", "media_af", caller.af, "-key", "media_addr", caller.address, *common])
        procs.append(uac)

        def answered() -> dict[str, Any] | None:
            for s in gw.cli("session", "list"):
                if s["origin"] == "ng" and all(leg["peer"] for leg in s["legs"]):
                    return dict(s)
            return None

        session = _wait("the NG session of the answered call", answered, 10)
        to_caller, to_callee = session["legs"]
        assert to_caller["peer"] == f"{caller.host}:{RTP_PORT}"
        assert to_callee["peer"] == f"{callee.host}:{RTP_PORT}"
        # each party is served by a relay of its own family
        assert to_caller["relay"].startswith("[") == (caller.af == "IP6")
        assert to_callee["relay"].startswith("[") == (callee.af == "IP6")

        a, b = _socket(gw, caller_ns, caller), _socket(gw, callee_ns, callee)
        with a, b:
            _relay(a, b, to_caller["relay"], to_callee["relay"])  # caller -> callee
            _relay(b, a, to_callee["relay"], to_caller["relay"])  # and back
        flows = {f["match"]: f for f in gw.cli("flow", "list")}
        assert flows[to_caller["relay"]]["packets"] >= PACKETS
        assert flows[to_callee["relay"]]["packets"] >= PACKETS
        query = gw.ng({"command": "query", "call-id": session["call_id"]})
        assert query["result"] == b"ok", query
        assert set(query["tags"]) == set(session["tags"])
        assert query["totals"]["RTP"]["packets"] >= 2 * PACKETS

        assert uac.wait(timeout=CALL_MS / 1000 + 15) == 0, gw.tail("uac")
        assert uas.wait(timeout=10) == 0, gw.tail("uas")
        states = {s["id"]: s["state"] for s in gw.cli("session", "list")}
        assert states.get(session["id"]) == "deleting"  # Kamailio deleted it on the BYE
        _wait("the session to leave the list",
              lambda: session["id"] not in {s["id"] for s in gw.cli("session", "list")},
              DELETE_DELAY + 5)
    finally:
        for proc in procs:
            _stop(proc)
