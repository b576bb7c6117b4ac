"""Past one machine: Debian's Kamailio balancing calls over a set of xlat nodes with its
``rtpengine`` module (one set, one NG socket per node), as DESIGN.md "Control" has it.
The lab, the nodes and Kamailio, for tests/e2e/test_kamailio_set.py and the ``ng_set``
figure (set-ups/s through the set with one node and with two).

::

    xlat-{tag}-h6              xlat-{tag}-n0, -n1 (xlat nodes)             xlat-{tag}-h4
    br0 2001:db8:6::2 ──┬── gw6 2001:db8:6::1 / ::11   gw4 203.0.113.1 / .11 ──┬── br0 203.0.113.2
                        └── sip6 2001:db8:6::5  xlat-{tag}-sip  sip4 203.0.113.5 ──┘
                                              (Kamailio)

Each host namespace bridges one veth per node and one to Kamailio, so every party is one
hop from every relay. Kamailio reaches each node's NG socket on the node's IPv4 address
(``--ng-listen ADDR:2223 --allow-remote-control``: what a set spread over machines needs).
Kamailio runs tests/e2e/kamailio/kamailio.cfg, told its addresses, the set and its
failover timing with ``-A`` defines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

from xlat.lab import LAB_RUN_DIR, in_netns, new_namespace, write_sysctl
from xlat.media.ebpf import mount_bpffs

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "e2e" / "kamailio"  # Kamailio's config and the SIPp parties
KAMAILIO_CFG = SCENARIOS / "kamailio.cfg"
XLAT = str(Path(sys.executable).with_name("xlat"))
HOST6, HOST4 = "2001:db8:6::2", "203.0.113.2"
SIP6, SIP4 = "2001:db8:6::5", "203.0.113.5"
NG_PORT = 2223
NODE_ADDRESSES = (("2001:db8:6::1", "203.0.113.1"), ("2001:db8:6::11", "203.0.113.11"))
# How long Kamailio waits for a node's NG answer, and how often it retries, before it
# takes the node out of the set for rtpengine_disable_tout seconds and asks another one.
NG_TIMEOUT_MS = 300
NG_RETRIES = 1
RTP_PORT = 40000  # every SIPp party advertises this media port
START_TIMEOUT = 120.0  # compiling the eBPF program takes a while on a busy machine
MNT_DETACH = 2


class SetError(RuntimeError):
    """A part of the set could not be brought up; the message says which and why."""


def wait(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Poll ``check`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SetError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def end(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """End a process we started (and its session's children) by its pid."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def udp_bound(ns: str, port: int) -> bool:
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hlun"], capture_output=True,
                         text=True, timeout=10).stdout
    return f":{port} " in out


def uas_argv() -> list[str]:
    """SIPp on the v4 host answering every call (180, 200 with an IPv4 SDP, the BYE)."""
    return ["sipp", "-sf", str(SCENARIOS / "uas.xml"), "-i", HOST4, "-p", "5060",
            "-key", "media_af", "IP4", "-key", "media_addr", HOST4,
            "-key", "rtp_port", str(RTP_PORT), "-nostdin", "-l", "100000", "-trace_err"]


def uac_argv(port: int, calls: int, rate: float, hold_ms: int) -> list[str]:
    """SIPp on the v6 host placing ``calls`` calls at ``rate``/s through Kamailio to the
    UAS, each held ``hold_ms`` before its BYE."""
    return ["sipp", f"[{SIP6}]:5060", "-sf", str(SCENARIOS / "uac.xml"), "-i", HOST6,
            "-p", str(port), "-m", str(calls), "-r", f"{rate:g}", "-d", str(hold_ms),
            "-l", "100000", "-key", "callee", f"sip:callee@{HOST4}:5060",
            "-key", "media_af", "IP6", "-key", "media_addr", HOST6,
            "-key", "rtp_port", str(RTP_PORT), "-nostdin", "-timeout", "90",
            "-timeout_error", "-trace_err"]


@dataclass
class Node:
    """One ``xlat run`` in its own gateway namespace, serving NG on its IPv4 address."""

    ns: str
    addr6: str
    addr4: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def ng(self) -> str:
        return f"{self.addr4}:{NG_PORT}"

    @property
    def control(self) -> Path:
        return self.dir / "control.sock"

    @property
    def bpffs(self) -> Path:
        return self.dir / "bpf"

    @property
    def log(self) -> Path:
        return self.dir / "xlat.log"

    def start(self, *options: str) -> None:
        argv = [XLAT, "--control", str(self.control), "run", "--datapath", "ebpf",
                "--bpffs", str(self.bpffs), "--state-dir", str(self.dir / "state"),
                "--sip-listen", "none", "--ng-listen", self.ng, "--allow-remote-control",
                "--media-v4", self.addr4, "--media-v6", self.addr6,
                "--interface", "gw6", "--interface", "gw4", *options]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def ready(self) -> None:
        proc = self.proc
        assert proc is not None
        wait(f"xlat in {self.ns}", lambda: self.control.exists() or proc.poll() is not None,
             START_TIMEOUT)
        if proc.poll() is not None:
            raise SetError(f"xlat in {self.ns} exited {proc.returncode}: {self.tail()}")

    def cli(self, *args: str) -> Any:
        out = subprocess.run([XLAT, "--control", str(self.control), "-j", *args],
                             capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise SetError(f"xlat {' '.join(args)} ({self.ns}): {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def ng_sessions(self) -> dict[str, dict[str, Any]]:
        """The node's NG sessions by Call-ID."""
        return {s["call_id"]: s for s in self.cli("session", "list") if s["origin"] == "ng"}

    def kernel_forwarded(self) -> int:
        """Packets the node's kernel path redirected, read from its pinned ``reasons``
        map (index 0, per CPU) with bpftool: works with the daemon gone."""
        out = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned",
                              str(self.bpffs / "reasons"), "key", "0", "0", "0", "0"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise SetError(f"bpftool map lookup ({self.ns}): {out.stderr.strip()}")
        total = 0
        for cpu in json.loads(out.stdout)["values"]:
            raw = cpu["value"]  # struct reason_counter {u64 packets; u64 bytes} as hex bytes
            total += int.from_bytes(bytes(int(b, 16) for b in raw[:8]), "little")
        return total

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            end(self.proc, timeout=30)


@dataclass
class RtpSet:
    """The lab of the module docstring with ``nodes`` xlat nodes; ``up()`` builds it and
    starts them, ``start_kamailio()`` puts Kamailio in front, ``down()`` removes all."""

    nodes_wanted: int = 2
    tag: str = field(default_factory=lambda: f"xr-{uuid.uuid4().hex[:5]}")
    nodes: list[Node] = field(default_factory=list)
    kamailio: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.dir = LAB_RUN_DIR / self.tag
        self.h6, self.h4, self.sip = (f"xlat-{self.tag}-h6", f"xlat-{self.tag}-h4",
                                     f"xlat-{self.tag}-sip")
        self.nodes = [Node(f"xlat-{self.tag}-n{i}", a6, a4, self.dir / f"n{i}")
                      for i, (a6, a4) in enumerate(NODE_ADDRESSES[:self.nodes_wanted])]

    @property
    def namespaces(self) -> list[str]:
        return [self.h6, self.h4, self.sip, *(n.ns for n in self.nodes)]

    # ---- building ---------------------------------------------------------------------

    def up(self, *node_options: str) -> None:
        try:
            for ns in self.namespaces:
                new_namespace(ns)
            self._host(self.h6, HOST6, 64)
            self._host(self.h4, HOST4, 24)
            self._member(self.sip, "sip", SIP6, SIP4)
            for i, node in enumerate(self.nodes):
                self._member(node.ns, f"n{i}", node.addr6, node.addr4, forward=True)
                node.dir.mkdir(parents=True, exist_ok=True)
                mount_bpffs(node.bpffs)
                node.start(*node_options)
            for node in self.nodes:
                node.ready()
        except BaseException:
            self.down()
            raise

    def _host(self, ns: str, address: str, prefix: int) -> None:
        with in_netns(ns), IPRoute() as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            (idx,) = ipr.link_lookup(ifname="br0")
            ipr.addr("add", index=idx, address=address, prefixlen=prefix)
            ipr.link("set", index=idx, state="up")

    def _member(self, ns: str, name: str, addr6: str, addr4: str, forward: bool = False) -> None:
        """Wire ``ns`` to both hosts' bridges: its ``{prefix}6``/``{prefix}4`` veths
        (gw6/gw4 on a node, as xlat's --interface options name them)."""
        prefix = "gw" if forward else name
        for host, family, address, plen in ((self.h6, 6, addr6, 64), (self.h4, 4, addr4, 24)):
            port = f"{name}{family}"
            with in_netns(host), IPRoute() as ipr:
                ipr.link("add", ifname=port, kind="veth", peer=f"{self.tag}{family}")
                (bridge,) = ipr.link_lookup(ifname="br0")
                (idx,) = ipr.link_lookup(ifname=port)
                ipr.link("set", index=idx, master=bridge, state="up")
                (peer,) = ipr.link_lookup(ifname=f"{self.tag}{family}")
                ipr.link("set", index=peer, net_ns_fd=ns, ifname=f"{prefix}{family}")
            with in_netns(ns), IPRoute() as ipr:
                write_sysctl(f"net.ipv6.conf.{prefix}{family}.accept_dad", 0)
                (idx,) = ipr.link_lookup(ifname=f"{prefix}{family}")
                ipr.addr("add", index=idx, address=address, prefixlen=plen)
                ipr.link("set", index=idx, state="up")
        if forward:  # bpf_fib_lookup needs forwarding on; as xlat.lab's gateway
            with in_netns(ns):
                write_sysctl("net.ipv4.ip_forward", 1)
                write_sysctl("net.ipv6.conf.all.forwarding", 1)

    def start_kamailio(self, nodes: Sequence[Node] | None = None) -> None:
        """Kamailio in its namespace with one rtpengine set of ``nodes`` (all by default)
        and a binrpc control socket for kamcmd."""
        socks = " ".join(f"udp:{n.ng}" for n in (self.nodes if nodes is None else nodes))
        run_dir = self.dir / "kamailio"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = ["kamailio", "-DD", "-E", "-f", str(KAMAILIO_CFG), "-Y", str(run_dir),
                "-m", "64", "-M", "8", "-A", f'NG_SOCK="{socks}"',
                "-A", f"SIP6={SIP6}", "-A", f"SIP4={SIP4}",
                "-A", f"NG_TIMEOUT_MS={NG_TIMEOUT_MS}", "-A", f"NG_RETRIES={NG_RETRIES}",
                "-A", f'CTL_SOCK="unix:{self.ctl}"']
        with (self.dir / "kamailio.log").open("ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.sip, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.kamailio = proc
        wait("Kamailio on port 5060", lambda: udp_bound(self.sip, 5060) or proc.poll() is not None,
             30)
        if proc.poll() is not None:
            raise SetError(f"kamailio exited {proc.returncode}: {self.kamailio_log()}")

    def stop_kamailio(self) -> None:
        if self.kamailio is not None:
            end(self.kamailio)
            self.kamailio = None

    @property
    def ctl(self) -> Path:
        return self.dir / "kamailio.ctl"

    def kamailio_log(self) -> str:
        log = self.dir / "kamailio.log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def rtpengine_nodes(self) -> dict[str, bool]:
        """Kamailio's view of its set: NG URL -> disabled (``kamcmd rtpengine.show all``)."""
        out = subprocess.run(["kamcmd", "-s", f"unix:{self.ctl}", "rtpengine.show", "all"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise SetError(f"kamcmd rtpengine.show: {out.stderr.strip() or out.stdout.strip()}")
        found: dict[str, bool] = {}
        url = ""
        for line in out.stdout.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "url":
                url = value.strip()
            elif key == "disabled" and url:
                found[url] = value.strip() != "0"
        return found

    # ---- teardown ---------------------------------------------------------------------

    def down(self) -> None:
        """Stop what runs, remove the namespaces (a node stopped with --keep-datapath
        leaves its filters and nft table there: they go with it), unmount the bpffs."""
        self.stop_kamailio()
        for node in self.nodes:
            node.stop()
        for ns in self.namespaces:
            with contextlib.suppress(OSError):
                netns.remove(ns)
        for node in self.nodes:
            if node.bpffs.is_mount():
                _umount(node.bpffs)
        shutil.rmtree(self.dir, ignore_errors=True)


def _umount(path: Path) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).umount2(str(path).encode(), MNT_DETACH)


# ---- the ng_set figure ----------------------------------------------------------------


QUICK_STEPS, QUICK_HOLD_S = (25, 50, 100, 200, 400, 800), 2.0
FULL_STEPS, FULL_HOLD_S = (25, 50, 100, 200, 300, 400, 600, 800, 1000, 1200, 1600), 10.0
CALL_MS = 1000  # each call is held this long before its BYE
MAX_RETRANS = 0.01  # a clean rate has fewer retransmissions than this share of messages
UAC_MESSAGES = 3  # INVITE, ACK, BYE: what the UAC sends per call


def figures(lab: Any, quick: bool) -> Iterator[dict[str, Any]]:
    """``ng_set``: clean calls/s through Kamailio's rtpengine set of one xlat node and
    of two (``lab``, the bench's own lab, only lends its scratch directory)."""
    for count in (1, 2):
        impl = f"kamailio + {count} xlat node{'s' if count > 1 else ''}"
        try:
            yield {"figure": "ng_set", "impl": impl, "nodes": count,
                   **_clean_rate(lab.tmp, count, quick)}
        except (SetError, OSError) as e:
            yield {"figure": "ng_set", "impl": impl, "error": f"{type(e).__name__}: {e}"}


def _clean_rate(tmp: Path, count: int, quick: bool) -> dict[str, Any]:
    """Climb the rate steps, each held for the whole hold time, until one is not clean;
    the last clean one, its CPU per call, and what ended the climb."""
    from bench.env import CpuMeter
    from bench.sip import descendants, sipp_stats

    steps, hold = (QUICK_STEPS, QUICK_HOLD_S) if quick else (FULL_STEPS, FULL_HOLD_S)
    lab = RtpSet(count)
    best: dict[str, Any] = {}
    bound = "search cap"
    try:
        lab.up("--log-level", "warning")
        lab.start_kamailio()
        assert lab.kamailio is not None
        uas = subprocess.Popen(["ip", "netns", "exec", lab.h4, *uas_argv()],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=True, cwd=tmp)
        try:
            wait("the SIPp UAS", lambda: udp_bound(lab.h4, 5060), 10)
            pids = [*descendants(lab.kamailio.pid), *(n.proc.pid for n in lab.nodes if n.proc)]
            for rate in steps:
                calls = round(rate * hold)
                stats = tmp / f"ng-set-{count}-{rate}.csv"
                argv = [*uac_argv(5070, calls, rate, CALL_MS), "-trace_stat", "-stf", str(stats)]
                with CpuMeter(pids) as cpu:
                    t0 = time.monotonic()
                    done = subprocess.run(["ip", "netns", "exec", lab.h6, *argv],
                                          stdin=subprocess.DEVNULL, capture_output=True,
                                          timeout=hold + 120, cwd=tmp)
                    elapsed = time.monotonic() - t0
                if not stats.exists():
                    raise SetError(f"SIPp wrote no statistics (exit {done.returncode})")
                row = sipp_stats(stats)
                ok, failed = int(row["SuccessfulCall(C)"]), int(row["FailedCall(C)"])
                retrans = int(row["Retransmissions(C)"])
                late = elapsed > hold + CALL_MS / 1000 + 3
                if ok < calls or failed or retrans > MAX_RETRANS * UAC_MESSAGES * calls or late:
                    bound = (f"at {rate} calls/s: {failed} failed, {calls - ok - failed} "
                             f"unfinished, {retrans} retransmissions of {calls} calls"
                             + (f", {elapsed:.1f} s for a {hold:g} s step" if late else "")
                             + f"; IPv4 relay port pairs in use: {_ports_in_use(lab.nodes)}")
                    break
                best = {"calls_per_s": rate, "calls": calls, "hold_s": hold,
                        "cpu_ms_per_call": round(cpu.used_ns / calls / 1e6, 3),
                        "retransmissions": retrans}
            share = [_handled(n.cli("stats")) for n in lab.nodes]
        finally:
            end(uas)
    finally:
        lab.down()
    if not best:
        return {"error": f"no clean rate: {bound}"}
    return {**best, "bound": bound, "calls_per_node": share}


def _ports_in_use(nodes: Sequence[Node]) -> str:
    """Each node's IPv4 relay port pairs in use of its pool (a call holds its pair until
    its delete delay is over), e.g. ``2,500/5,000``."""
    pools = [n.cli("stats")["ports"].get("ipv4", {}) for n in nodes]
    return ", ".join(f"{p.get('in_use', 0):,}/{p.get('capacity', 0):,}" for p in pools)


def _handled(stats: dict[str, Any]) -> int:
    """Calls a node has seen: the ones that ended and the ones it still holds."""
    return int(sum(stats["ended"].values())) + int(stats["sessions"])
