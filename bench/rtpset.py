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

from xlat.lab import LAB_RUN_DIR, in_netns, write_sysctl
from xlat.media.ebpf import mount_bpffs

ROOT = Path(__file__).resolve().parent.parent
KAMAILIO_CFG = ROOT / "tests" / "e2e" / "kamailio" / "kamailio.cfg"
XLAT = str(Path(sys.executable).with_name("xlat"))
HOST6, HOST4 = "2001:db8:6::2", "203.0.113.2"
SIP6, SIP4 = "2001:db8:6::5", "203.0.113.5"
NG_PORT = 2223
NODE_ADDRESSES = (("2001:db8:6::1", "203.0.113.1"), ("2001:db8:6::11", "203.0.113.11"))
# How long Kamailio waits for a node's NG answer, and how often it retries, before it
# takes the node out of the set for rtpengine_disable_tout seconds and asks another one.
NG_TIMEOUT_MS = 300
NG_RETRIES = 1
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
                netns.create(ns)
                with in_netns(ns):
                    write_sysctl("net.ipv6.conf.all.accept_dad", 0)
                    write_sysctl("net.ipv6.conf.default.accept_dad", 0)
                    with IPRoute() as ipr:
                        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
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
