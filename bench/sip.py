"""SIP figure: calls/s with no failed call, v6 SIPp UAC → proxy → v4 SIPp UAS, each call
with an SDP offer/answer (so media relays are allocated) and an immediate BYE; xlat's
own proxy against Kamailio + rtpengine in the same namespaces. CPU per call is the
proxy side's (xlat; or Kamailio's processes + rtpengine) at a fixed call rate."""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.env import (
    GW4,
    GW6,
    V4_HOST,
    V6_HOST,
    BenchError,
    BenchLab,
    CpuMeter,
    Rtpengine,
    Xlat,
    free_udp_port,
    in_ns,
    process_in,
)
from xlat.lab import in_netns

HERE = Path(__file__).resolve().parent / "sip"
UAS_PORT = 5080
PROXY = f"[{GW6}]:5060"
KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
CPU_CPS = 50  # fixed call rate of the CPU runs
UAC = ("-sf", str(HERE / "uac.xml"))  # the caller's scenario (SIPp options)
UNLIMITED_SIP_RATE = 1_000_000  # xlat's per-source SIP packets/s cap, lifted


def sipp_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp ``-stf`` statistics file."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if not rows:
        raise BenchError(f"SIPp wrote no statistics to {path.name}")
    return rows[-1]


@contextlib.contextmanager
def uas(lab: BenchLab, trace: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """The v4 UAS: answers every INVITE with 200 + an IPv4 SDP, then takes the BYE.
    With ``trace``, SIPp writes the messages it sees there."""
    argv = ["sipp", "-sf", str(HERE / "uas.xml"), "-i", V4_HOST, "-p", str(UAS_PORT),
            "-mi", V4_HOST, "-mp", "7000", "-nostdin", "-l", "100000"]
    if trace is not None:
        argv += ["-trace_msg", "-message_file", str(trace)]
    with process_in(lab.v4, argv, lab.tmp / "uas.log", "SIPp UAS", settle=0.3) as proc:
        yield proc


def calls(lab: BenchLab, rate: float, seconds: float, cpu_pids: list[int],
          uac: Sequence[str] = UAC) -> dict[str, Any]:
    """``rate`` calls/s for ``seconds`` from the v6 UAC (``uac``: its scenario, as
    SIPp options); the outcome and proxy CPU."""
    n = max(1, round(rate * seconds))
    stats = lab.tmp / f"uac-{time.monotonic_ns()}.csv"
    argv = ["sipp", PROXY, *uac, "-i", V6_HOST, "-p", "5070",
            "-mi", V6_HOST, "-mp", "6000", "-r", f"{rate:.0f}", "-m", str(n),
            "-l", "100000", "-nostdin", "-recv_timeout", "5000",
            "-timeout", f"{seconds + 20:.0f}s", "-trace_stat", "-stf", str(stats)]
    with CpuMeter(cpu_pids) as cpu:
        t0 = time.monotonic()
        done = subprocess.run(in_ns(lab.v6, argv), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=seconds + 40)
        elapsed = time.monotonic() - t0
    if done.returncode not in (0, 1) or not stats.exists():
        raise BenchError(f"SIPp UAC exited {done.returncode}: {done.stderr.strip()[-300:]}")
    row = sipp_stats(stats)
    stats.unlink()
    ok, failed = int(row["SuccessfulCall(C)"]), int(row["FailedCall(C)"])
    return {"calls": n, "ok": ok, "failed": failed, "elapsed": elapsed,
            "cpu_ns": cpu.used_ns}


def max_cps(lab: BenchLab, cpu_pids: list[int], quick: bool, precision: float | None = None,
            uac: Sequence[str] = UAC) -> dict[str, Any]:
    """Highest call rate whose every call succeeds and completes in time: double from
    25 cps (quick: 50) until a run fails, then bisect to within ``precision`` (a
    factor; default 1.2, quick 2) (one SIPp run per rate)."""
    seconds, default_precision = (0.5, 2.0) if quick else (3.0, 1.2)
    precision = precision or default_precision
    results: dict[float, dict[str, Any]] = {}

    def ok(rate: float) -> bool:
        r = results[rate] = calls(lab, rate, seconds, cpu_pids, uac)
        return r["failed"] == 0 and r["ok"] == r["calls"] and r["elapsed"] < seconds * 1.5 + 1

    low, high = 0.0, 0.0
    rate = 50.0 if quick else 25.0
    while ok(rate):
        low, rate = rate, rate * 2
        if rate > 4000:
            break
    high = rate
    while low and high / low > precision:
        mid = (low * high) ** 0.5
        if ok(mid):
            low = mid
        else:
            high = mid
    if not low:
        bad = results[high]
        return {"error": f"calls fail even at {high:.0f} cps "
                         f"({bad['failed']} of {bad['calls']} failed)"}
    fail = results.get(high)
    if fail is None:
        bound = "search cap"
    elif fail["failed"]:
        bound = f"{fail['failed']} failed of {fail['calls']} at {high:.0f} cps"
    else:
        bound = f"slower than asked at {high:.0f} cps"
    return {"cps": round(low, 1), "runs": len(results), "run_s": seconds, "bound": bound}


def relayed_sdp(lab: BenchLab, uac: Sequence[str] = UAC) -> None:
    """One call; raises BenchError unless the INVITE reached the UAS with its SDP
    rewritten to the gateway's IPv4 media address (so media was really allocated)."""
    trace = lab.tmp / "uas-trace.log"
    with uas(lab, trace):
        r = calls(lab, 1, 1, [], uac)
    text = trace.read_text(errors="replace")
    trace.unlink()
    if r["ok"] != 1:
        raise BenchError(f"a single call failed: {r}")
    if f"c=IN IP4 {GW4}" not in text:
        raise BenchError("the UAS got an SDP without the gateway's media address")


def measure(impl: str, lab: BenchLab, cpu_pids: Callable[[], list[int]], quick: bool,
            precision: float | None = None, uac: Sequence[str] = UAC) -> dict[str, Any]:
    relayed_sdp(lab, uac)
    with uas(lab):
        found = max_cps(lab, cpu_pids(), quick, precision, uac)
        fixed = calls(lab, CPU_CPS, 1.0 if quick else 4.0, cpu_pids(), uac)
    out = {"figure": "sip_cps", "impl": impl, **found}
    if fixed["failed"] == 0:
        out["cpu_ms_per_call"] = round(fixed["cpu_ns"] / fixed["calls"] / 1e6, 3)
        out["cpu_cps"] = CPU_CPS
    return out


class SipPing:
    """OPTIONS from a host in namespace ``ns`` to the proxy's own URI (no user part),
    one at a time. xlat answers it itself with a 200: the request is parsed, gets a
    server transaction and goes through routing, but is not forwarded. Each has its own
    branch and Call-ID, so none is taken for a retransmission."""

    def __init__(self, ns: str, host: str, proxy: str, port: int = 5060,
                 timeout: float = 5.0) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(timeout)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        self.proxy = (proxy, port)
        self.tag = uuid.uuid4().hex[:8]
        self.seq = 0

    def __enter__(self) -> SipPing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def options(self, branch: str) -> bytes:
        proxy = f"[{self.proxy[0]}]:{self.proxy[1]}"
        return (f"OPTIONS sip:{proxy} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP [{self.host}]:{self.port};branch={branch};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:probe@[{self.host}]>;tag={self.tag}\r\n"
                f"To: <sip:{proxy}>\r\n"
                f"Call-ID: {self.tag}-{self.seq}@bench\r\n"
                f"CSeq: {self.seq} OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n").encode()

    def rtt(self) -> float | None:
        """Seconds from sending one OPTIONS to its response; None if none came within
        the timeout. Raises BenchError if the proxy answers anything but 200."""
        self.seq += 1
        branch = f"z9hG4bK-{self.tag}-{self.seq:08d}"  # fixed width: no branch prefixes another
        t0 = time.perf_counter()
        self.sock.sendto(self.options(branch), self.proxy)
        while True:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                return None
            if branch.encode() in data:  # else a late answer to an earlier probe
                break
        took = time.perf_counter() - t0
        status = data.split(b"\r\n", 1)[0]
        if not status.startswith(b"SIP/2.0 200 "):
            raise BenchError(f"OPTIONS to the proxy answered {status.decode(errors='replace')}")
        return took


# ---- Kamailio + rtpengine ---------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Kamailio forks its workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    found, todo = [pid], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        todo += kids
    return found


@contextlib.contextmanager
def kamailio(lab: BenchLab, ng_port: int) -> Iterator[subprocess.Popen[str]]:
    cfg = lab.tmp / "kamailio.cfg"
    cfg.write_text((HERE / "kamailio.cfg").read_text()
                   .replace("@NG_PORT@", str(ng_port)).replace("@UAS@", f"{V4_HOST}:{UAS_PORT}")
                   .replace("@WORKERS@", "2").replace("@MPATH@", KAMAILIO_MODULES))
    rundir = lab.tmp / "kamailio"
    rundir.mkdir(exist_ok=True)
    argv = ["kamailio", "-f", str(cfg), "-DD", "-E", "-Y", str(rundir), "-m", "128", "-M", "16"]
    with process_in(lab.gw, argv, lab.tmp / "kamailio.log", "kamailio", settle=1.0) as proc:
        yield proc


def figures(lab: BenchLab, quick: bool) -> Iterator[dict[str, Any]]:
    try:
        ng_port = free_udp_port(lab.gw)
        with Rtpengine(lab, ng_port) as rtp, kamailio(lab, ng_port) as kam:
            yield measure("kamailio+rtpengine", lab,
                          lambda: [*descendants(kam.pid), rtp.pid], quick)
    except BenchError as e:
        yield {"figure": "sip_cps", "impl": "kamailio+rtpengine", "error": str(e)}
    # xlat rate-limits SIP per source address (200 packets/s by default); SIPp is one
    # source, as a front proxy would be: the limit is lifted to measure the proxy, and
    # (full runs) also kept, to show what it does to a single upstream.
    for sip_rate in (UNLIMITED_SIP_RATE,) if quick else (UNLIMITED_SIP_RATE, None):
        yield from _xlat(lab, quick, sip_rate)


def _xlat(lab: BenchLab, quick: bool, sip_rate: int | None) -> Iterator[dict[str, Any]]:
    impl = "xlat" if sip_rate else "xlat (default sip_rate)"
    extra = ["--route", f"*=sip:{V4_HOST}:{UAS_PORT}", "--delete-delay", "0",
             "--ports", "20000-59999"]
    if sip_rate:
        config = lab.tmp / "sip-bench.toml"
        config.write_text(f"sip-rate = {sip_rate}\n")
        extra = ["-c", str(config), *extra]
    try:
        with Xlat(lab, sip_listen=(), extra=extra) as daemon:
            out = measure(impl, lab, lambda: [daemon.pid], quick)
            drops = daemon.call("stats")["drops"]
            out["sip_rate"] = sip_rate or "default"
            out["sip_rate_limited"] = drops.get("sip_rate_limited", {}).get("packets")
            yield out
    except BenchError as e:
        yield {"figure": "sip_cps", "impl": impl, "error": str(e)}
