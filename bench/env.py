"""What every figure stands on: the lab with the bench's extra addresses, processes in
namespaces, CPU accounting, the udpblast helper, and the xlat and rtpengine daemons."""

from __future__ import annotations

import contextlib
import json
import os
import pstats
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TextIO

from pyroute2 import NetNS

from xlat.lab import Lab, in_netns

ROOT = Path(__file__).resolve().parent.parent
BUILD = Path(__file__).resolve().parent / "build"  # git-ignored: compiled helpers
XLAT = ROOT / ".venv" / "bin" / "xlat"
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"  # from the dev extras
PY_SPY_RATE = 200  # samples/s: 5 ms resolution, little load with --nonblocking
PREFIX = "xb"
IFA_F_NODAD = 0x02

# Addresses of the three-namespace lab (common.md) and the bench's additions.
V6_HOST, GW6 = "2001:db8:6::2", "2001:db8:6::1"
V4_HOST, GW4 = "203.0.113.2", "203.0.113.1"
# Plain-forwarding baseline: a same-family path across the gateway for each direction.
FWD6_GW, FWD6_HOST = "2001:db8:4::1", "2001:db8:4::2"  # IPv6 subnet on the v4 host's link
FWD4_GW, FWD4_HOST = "198.51.100.1", "198.51.100.2"  # IPv4 subnet on the v6 host's link
# Extra media addresses on the gateway, for more than one pool per family (scale).
EXTRA_MEDIA = 12
PROFILE_LINES = 15  # functions shown per profiled daemon


def extra_media(family: int, n: int) -> list[str]:
    """The ``n`` extra gateway media addresses of one family (added on entering ``BenchLab``)."""
    if family == 4:
        return [f"203.0.113.{100 + i}" for i in range(n)]
    return [f"2001:db8:6::{0x100 + i:x}" for i in range(n)]


class BenchError(Exception):
    """A benchmark step that could not be done; the message says what failed."""


# ---- processes in namespaces -------------------------------------------------------------


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run_in(ns: str, argv: Sequence[str], timeout: float = 60.0) -> str:
    """Run a command in namespace ``ns``; return stdout. Raises BenchError on failure."""
    done = subprocess.run(in_ns(ns, argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} in {ns}: {done.stderr.strip()[-300:]}")
    return done.stdout


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a process we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- CPU accounting ------------------------------------------------------------------------


def task_schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for a CPU) of every live thread of ``pid``
    (the first two fields of /proc/PID/task/TID/schedstat)."""
    run = wait = 0
    with contextlib.suppress(FileNotFoundError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
                run, wait = run + int(fields[0]), wait + int(fields[1])
    return run, wait


def task_cpu_ns(pid: int) -> int:
    """CPU time of every live thread of ``pid`` (scheduler's sum_exec_runtime, ns)."""
    return task_schedstat(pid)[0]


def ksoftirqd_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().startswith("ksoftirqd/"):
                    pids.append(int(entry))
    return pids


class CpuMeter:
    """CPU used by a set of processes (every thread) between start and stop.

    For packet work, meter the ksoftirqd threads too (``ksoftirqd_pids()``). Why not
    /proc/stat: the machine is shared, and other users' work would dominate a
    machine-wide delta. Packet work on veth runs as softirq in the context of the task
    that sends (tick accounting, no IRQ time accounting: it is charged to that task), or
    in ksoftirqd when deferred; so our processes + ksoftirqd hold nearly all of it."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = 0

    def __enter__(self) -> CpuMeter:
        self._start = sum(task_cpu_ns(p) for p in self.pids)
        self.used_ns = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.used_ns = sum(task_cpu_ns(p) for p in self.pids) - self._start


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# ---- the lab ---------------------------------------------------------------------------------


def add_addresses(ns: str, ifname: str, cidrs: Sequence[str]) -> None:
    with NetNS(ns) as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        for cidr in cidrs:
            addr, plen = cidr.split("/")
            ipr.addr("add", index=index, address=addr, prefixlen=int(plen), flags=IFA_F_NODAD)
        ipr.link("set", index=index, state="up")


def link_of(ns: str, address: str) -> str:
    """The name of the interface holding ``address`` in ``ns``."""
    with NetNS(ns) as ipr:
        for a in ipr.get_addr():
            if a.get("IFA_ADDRESS") == address:
                return str(ipr.get_links(a["index"])[0].get("IFLA_IFNAME"))
    raise BenchError(f"no interface with {address} in {ns}")


class BenchLab:
    """The lab plus what benchmarks add: a same-family path each way through the gateway
    (plain forwarding baseline) and extra media addresses; a scratch directory."""

    def __init__(self, profile: Path | None = None, pyspy: Path | None = None) -> None:
        self.profile = profile  # where xlat daemons write cProfile stats, if anywhere
        self.pyspy = pyspy  # where py-spy keeps each xlat daemon's stacks, if anywhere
        tag = f"{PREFIX}-{uuid.uuid4().hex[:5]}"
        self.lab = Lab(tag)
        self.exe = build_udpblast()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.v6, self.gw, self.v4, self.bpffs = (self.lab.v6, self.lab.gw, self.lab.v4,
                                                 self.lab.bpffs)

    def __enter__(self) -> BenchLab:
        try:
            self.lab.up()
            self._extras()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.down()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _extras(self) -> None:
        gw6, gw4 = link_of(self.gw, GW6), link_of(self.gw, GW4)
        host6, host4 = link_of(self.v6, V6_HOST), link_of(self.v4, V4_HOST)
        add_addresses(self.gw, gw4, [f"{FWD6_GW}/64"] + [f"{a}/32" for a in
                                                          extra_media(4, EXTRA_MEDIA)])
        add_addresses(self.gw, gw6, [f"{FWD4_GW}/24"] + [f"{a}/128" for a in
                                                          extra_media(6, EXTRA_MEDIA)])
        add_addresses(self.v4, host4, [f"{FWD6_HOST}/64"])
        add_addresses(self.v6, host6, [f"{FWD4_HOST}/24"])
        with NetNS(self.v6) as ipr:
            ipr.route("replace", dst="203.0.113.0/24", gateway=FWD4_GW)
            ipr.route("replace", dst="2001:db8:4::/64", gateway=GW6)
        with NetNS(self.v4) as ipr:
            ipr.route("replace", dst="198.51.100.0/24", gateway=GW4)
            ipr.route("replace", dst="2001:db8:6::/64", gateway=FWD6_GW)


# ---- udpblast ----------------------------------------------------------------------------------


def build_udpblast() -> Path:
    """Compile bench/udpblast.c into bench/build/ (again only when the source is newer)."""
    return build_c("udpblast")


def build_c(name: str) -> Path:
    """Compile bench/NAME.c into bench/build/NAME (again only when the source is newer)."""
    src = Path(__file__).resolve().parent / f"{name}.c"
    exe = BUILD / name
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        done = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"gcc {name}.c: {done.stderr.strip()[-300:]}")
    return exe


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    """``argv`` run on one CPU (taskset), or anywhere."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


class Sink:
    """A udpblast sink in a namespace (on one CPU, if given); ``stop()`` returns its JSON
    report."""

    def __init__(self, exe: Path, ns: str, host: str, port: int, cpu: int | None = None) -> None:
        self.proc = subprocess.Popen(in_ns(ns, pinned(cpu, [str(exe), "sink", host, str(port)])),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            _, err = self.proc.communicate(timeout=5)
            raise BenchError(f"udpblast sink on {host}:{port}: {err.strip()}")

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=10)
        if self.proc.returncode != 0:
            raise BenchError(f"udpblast sink: {err.strip()}")
        return dict(json.loads(out))


def _checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src: str, sport: int, dst: str, dport: int,
              size: int) -> bytes:
    """Ethernet + IPv4 (no options) or IPv6 + UDP with complete checksums, and ``size``
    zero bytes of payload (where udpblast frames writes its header)."""
    s, d = ip_address(src), ip_address(dst)
    length = 8 + size
    udp = struct.pack("!HHHH", sport, dport, length, 0) + bytes(size)
    if s.version == 6 and d.version == 6:
        pseudo = s.packed + d.packed + struct.pack("!I3xB", length, socket.IPPROTO_UDP)
        ip = struct.pack("!IHBB", 6 << 28, length, socket.IPPROTO_UDP, 64) + s.packed + d.packed
        ethertype = 0x86DD
    elif s.version == 4 and d.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!xBH", socket.IPPROTO_UDP, length)
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + length, 0, 0x4000, 64, socket.IPPROTO_UDP,
                         0) + s.packed + d.packed
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        raise BenchError(f"{src} and {dst} are not of one family")
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    return (bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
            + struct.pack("!H", ethertype) + ip + udp)


@dataclass(frozen=True)
class RawSender:
    """``udpblast frames``: the lane's datagrams as ready-made Ethernet frames out of the
    sender's interface (AF_PACKET, qdisc bypassed) to the gateway's MAC; sender and sink
    both on CPU ``cpu``."""

    ifname: str
    src_mac: str
    dst_mac: str
    cpu: int

    def argv(self, exe: Path, lane: Lane, rate: float, duration: float, size: int
             ) -> list[str]:
        if len(lane.dest_ports) != 1:
            raise BenchError("udpblast frames sends one stream")
        frame = udp_frame(self.src_mac, self.dst_mac, lane.source,
                          lane.source_port or RAW_SOURCE_PORT, lane.dest, lane.dest_ports[0],
                          size)
        return pinned(self.cpu, [str(exe), "frames", self.ifname, f"{rate:.0f}", str(duration),
                                 frame.hex()])


RAW_SOURCE_PORT = 9000  # the frames' UDP source port when the lane leaves it to the kernel


@dataclass(frozen=True)
class Lane:
    """One way through (or around) the gateway: who sends from where to where."""

    send_ns: str
    source: str  # sender's bind address
    source_port: int
    dest: str  # address the sender aims at
    dest_ports: tuple[int, ...]  # one stream per port
    sink_ns: str
    sink: str  # the sink's bind address
    sink_port: int


def blast(exe: Path, lane: Lane, rate: float, duration: float, size: int = 172,
          cpu_pids: Sequence[int] = (), raw: RawSender | None = None) -> dict[str, Any]:
    """Send ``rate`` pps for ``duration`` s along ``lane`` (from a UDP socket, or with
    ``raw`` as frames); returns the sender's and the sink's reports merged, ``loss``
    (fraction), ``relay_cpu_ns`` of ``cpu_pids``, ``ksoftirqd_cpu_ns`` and
    ``total_cpu_ns`` (all four) over the run."""
    sink = Sink(exe, lane.sink_ns, lane.sink, lane.sink_port, None if raw is None else raw.cpu)
    try:
        argv = [str(exe), "send", lane.source, str(lane.source_port), f"{rate:.0f}",
                str(duration), str(size), lane.dest, ",".join(map(str, lane.dest_ports))] \
            if raw is None else raw.argv(exe, lane, rate, duration, size)
        with CpuMeter(cpu_pids) as daemon, CpuMeter(ksoftirqd_pids()) as softirqd:
            sent = subprocess.run(in_ns(lane.send_ns, argv), capture_output=True, text=True,
                                  timeout=duration + 30)
            time.sleep(0.3)  # what is in flight lands
        if sent.returncode != 0:
            raise BenchError(f"udpblast send: {sent.stderr.strip()}")
    finally:
        got = sink.stop()
    report = json.loads(sent.stdout)
    return {
        "sent": report["sent"], "elapsed": report["elapsed"],
        "sender_cpu_ns": report["cpu_ns"], "send_errors": report["send_errors"],
        "received": got["received"], "reordered": got["reordered"],
        "streams": got["streams"], "jitter_us": got["jitter_us"],
        "transit_us_p50": got["transit_us_p50"], "transit_us_p99": got["transit_us_p99"],
        "sink_cpu_ns": got["cpu_ns"], "relay_cpu_ns": daemon.used_ns,
        "ksoftirqd_cpu_ns": softirqd.used_ns,
        "total_cpu_ns": report["cpu_ns"] + got["cpu_ns"] + daemon.used_ns + softirqd.used_ns,
        "loss": 1.0 - got["received"] / report["sent"] if report["sent"] else 1.0,
    }


# ---- daemons -------------------------------------------------------------------------------------


def wait_for(check: Callable[[], bool], what: str, timeout: float,
             proc: subprocess.Popen[Any], log: TextIO) -> None:
    """Poll ``check`` until true; raise with the tail of ``log`` if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}): {tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.05)


@contextlib.contextmanager
def process_in(ns: str, argv: Sequence[str], log_path: Path, what: str,
               settle: float) -> Iterator[subprocess.Popen[str]]:
    """Run ``argv`` in namespace ``ns`` (stderr to ``log_path``) for the ``with`` block;
    raise with the log's tail if it has died after ``settle`` seconds; stop it after."""
    log = log_path.open("w+")
    proc = subprocess.Popen(in_ns(ns, argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        time.sleep(settle)
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}): {tail(log)}")
        yield proc
    finally:
        stop(proc)
        log.close()


def tail(log: TextIO, lines: int = 3) -> str:
    """The last lines of a daemon's log file, on one line."""
    log.flush()
    log.seek(0)
    return " | ".join(log.read().strip().splitlines()[-lines:])


class Xlat:
    """``xlat run`` in the gateway namespace, started as a user would; ``call`` talks to
    its control socket."""

    def __init__(self, lab: BenchLab, *, datapath: str = "ebpf", extra: Sequence[str] = (),
                 media_v4: Sequence[str] = (GW4,), media_v6: Sequence[str] = (GW6,),
                 sip_listen: Sequence[str] = ("none",)) -> None:
        self.lab = lab
        self.control = lab.tmp / f"c-{uuid.uuid4().hex[:6]}.sock"
        self.datapath = datapath
        argv = [str(XLAT), "--control", str(self.control), "run",
                *(a for m in media_v4 for a in ("--media-v4", m)),
                *(a for m in media_v6 for a in ("--media-v6", m)),
                *(a for listen in sip_listen for a in ("--sip-listen", listen)),
                "--bpffs", str(lab.bpffs), "--datapath", datapath,
                "--rate-limit", "0", "--log-level", "warning", *extra]
        self.argv_tail = [datapath, *extra]
        self.stats: Path | None = None
        if lab.profile is not None:
            lab.profile.mkdir(parents=True, exist_ok=True)
            self.stats = lab.profile / f"xlat-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"
            argv = [sys.executable, "-m", "cProfile", "-o", str(self.stats), *argv]
        self.log = (lab.tmp / f"xlat-{uuid.uuid4().hex[:6]}.log").open("w+")
        self.proc = subprocess.Popen(in_ns(lab.gw, argv), stdout=subprocess.DEVNULL,
                                     stderr=self.log, text=True)
        self.spy: PySpy | None = None

    def __enter__(self) -> Xlat:
        try:
            wait_for(self.control.exists, "xlat", 60, self.proc, self.log)
            got = self.call("stats")["datapath"]
            if self.datapath not in got:
                raise BenchError(f"asked for the {self.datapath} datapath, xlat runs {got}")
            if self.lab.pyspy is not None:
                self.lab.pyspy.mkdir(parents=True, exist_ok=True)
                self.spy = PySpy(self.pid, self.lab.pyspy / f"xlat-{time.strftime('%H%M%S')}-"
                                 f"{uuid.uuid4().hex[:4]}.txt")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.spy is not None:  # before the daemon stops: its shutdown is not the figure
                self.spy.stop()
                self.spy.report(f"xlat {' '.join(self.argv_tail)}", sys.stderr)
        finally:
            stop(self.proc, timeout=20)
            self.log.close()
        if self.stats is not None and self.stats.exists():
            print(f"\n---- profile of xlat {' '.join(self.argv_tail)} ({self.stats})",
                  file=sys.stderr)
            pstats.Stats(str(self.stats), stream=sys.stderr).sort_stats("tottime") \
                .print_stats(PROFILE_LINES)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, cmd: str, **args: Any) -> Any:
        from xlat.control.api import ControlError, call

        try:
            return call(self.control, cmd, args)
        except ControlError as e:
            raise BenchError(f"xlat {cmd}: {e}") from None


class PySpy:
    """``py-spy record`` of a running process until ``stop()``: its stacks, collapsed
    (``--format raw``: one ``frame;frame;... count`` line per distinct stack, frames named
    ``function (file:first line)``; flamegraph.pl and speedscope.app read it) in ``out``.
    ``--nonblocking`` reads the process without pausing it, so the figure moves little.
    py-spy leaves out threads it sees idle (sleeping in epoll), but counts a runnable
    thread that waits for a CPU as busy: a daemon preempted by the peer its ``sendto``
    just woke shows ``sendto`` on top. So the report also gives, from schedstat, how
    long the daemon really ran and how long it waited to run. py-spy's own messages go
    to ``out`` with the suffix ``.log``."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.pid = pid
        self.started = task_schedstat(pid)
        self.ran_ns = self.waited_ns = 0
        self.log = out.with_suffix(".log").open("w+")
        self.proc = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--function",
             "--nonblocking", "--rate", str(PY_SPY_RATE), "--output", str(out)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, text=True)

    def stop(self) -> None:
        """Stop sampling (SIGINT makes py-spy write ``out``); raise if it wrote nothing."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        ran, waited = task_schedstat(self.pid)
        self.ran_ns, self.waited_ns = ran - self.started[0], waited - self.started[1]
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        try:
            if not self.out.exists():
                raise BenchError(f"py-spy wrote no {self.out.name}: {tail(self.log)}")
        finally:
            self.log.close()

    def report(self, what: str, out: TextIO, lines: int = PROFILE_LINES) -> None:
        """The functions with the most self time (top of the stack) in the recording."""
        counts = self_samples(self.out.read_text())
        total = sum(counts.values())
        print(f"\n---- py-spy of {what} ({self.out}): {total} busy samples at {PY_SPY_RATE}/s "
              f"(≈ {total / PY_SPY_RATE:.1f} s); the daemon ran {self.ran_ns / 1e9:.1f} s and "
              f"waited {self.waited_ns / 1e9:.1f} s for a CPU\n  self%  samples  function",
              file=out)
        for function, n in counts.most_common(lines):
            print(f"{100 * n / total:7.1f} {n:8d}  {function}", file=out)


def self_samples(collapsed: str) -> Counter[str]:
    """Samples per function at the top of the stack (its self time), summed over the
    stacks of py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[stack.rpartition(";")[2]] += int(n)
    return counts


class Rtpengine:
    """Debian's rtpengine in the gateway namespace: userspace forwarding (no kernel
    module here), interfaces named v4/v6 like xlat's NG, NG on 127.0.0.1:``ng_port``."""

    def __init__(self, lab: BenchLab, ng_port: int, *, port_min: int = 40000,
                 port_max: int = 59999, threads: int = 2) -> None:
        self.lab = lab
        self.ng_port = ng_port
        argv = ["rtpengine", "--config-file=none", "--foreground", "--log-stderr",
                "--log-level=3", "--table=-1", "--delete-delay=0",
                f"--interface=v4/{GW4}", f"--interface=v6/{GW6}",
                f"--listen-ng=127.0.0.1:{ng_port}", f"--port-min={port_min}",
                f"--port-max={port_max}", f"--num-threads={threads}",
                f"--pidfile={lab.tmp / f'rtpengine-{ng_port}.pid'}"]
        self.log = (lab.tmp / f"rtpengine-{ng_port}.log").open("w+")
        self.proc = subprocess.Popen(in_ns(lab.gw, argv), stdout=subprocess.DEVNULL,
                                     stderr=self.log, text=True)

    def __enter__(self) -> Rtpengine:
        from bench.ngclient import NgClient

        try:
            with NgClient(self.lab.gw, ("127.0.0.1", self.ng_port), timeout=0.2) as ng:
                wait_for(ng.ping, "rtpengine", 20, self.proc, self.log)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)
        self.log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_udp_port(ns: str) -> int:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
