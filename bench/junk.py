"""SIP junk flood figure: ``sipjunk`` (bench/sipjunk.c, sendmmsg) sends junk datagrams
to xlat's IPv4 SIP port at RATE/s for SECONDS from SOURCES addresses of the IPv4 host,
while a SIPp UAC places real calls with media (tests/e2e/sipp/uac.xml -> uas.xml, IPv6
caller, IPv4 callee whose replies share the flooded socket) at CPS calls/s. xlat runs
with its defaults (200 SIP packets/s per source, nftables meter).

``python -m bench.junk [--rate R] [--seconds S] [--sources N] [--cps C]`` prints one
JSON line per variant (``"figure": "sip_junk_flood"``): one source (the meter drops
almost all of it in the kernel) and N sources (each under or near the meter's budget: all strangers
together are held to 10x the per-source rate, so the rest is dropped in the kernel too),
with the rate the sender achieved, the calls placed and completed, the kernel's
``sip_rate_limited`` and ``sip_strangers_limited`` drops, the daemon's ``malformed``
count and its CPU time and RSS. Exit 0 when >= 99 % of the calls completed in every
variant. The test tests/e2e/test_floods_defaults.py runs a few seconds of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from bench.env import build_c, rss_kib, task_cpu_ns
from bench.sip import sipp_stats
from bench.soakcalls import metrics
from xlat.demo import GW_SIP, SIPP_DIR, TONE, Gateway, start_gateway, write_tone
from xlat.lab import HOST_IF, PREFIX4, V4_HOST, V6_HOST, Lab, in_netns

FIRST_SOURCE = IPv4Address("203.0.113.20")  # sources .20 up: the lab's hosts are .1-.3
METRICS = "127.0.0.1:9108"


def add_sources(lab: Lab, n: int) -> list[str]:
    """``n`` more addresses on the IPv4 host, from FIRST_SOURCE up."""
    addrs = [str(FIRST_SOURCE + i) for i in range(n)]
    with in_netns(lab.v4), IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname=HOST_IF)
        existing = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
        for a in addrs:
            if a not in existing:
                ipr.addr("add", index=idx, address=a, prefixlen=PREFIX4)
    return addrs


def start_junk(lab: Lab, rate: float, seconds: float, sources: list[str]
               ) -> subprocess.Popen[str]:
    """sipjunk in the IPv4 host, aimed at the gateway's IPv4 SIP port."""
    argv = [str(build_c("sipjunk")), f"{rate:.0f}", f"{seconds:g}", str(GW_SIP[4].host),
            str(GW_SIP[4].port), ",".join(sources)]
    return lab.exec(lab.v4, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def junk_report(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"sipjunk: {err.strip()}")
    return dict(json.loads(out))


@dataclass
class Phones:
    """The SIPp UAS (IPv4 host, port 5060) for good calls; ``calls`` runs the UAC."""

    lab: Lab
    work: Path

    def __post_init__(self) -> None:
        if not (self.work / TONE).exists():
            write_tone(self.work / TONE)
        argv = ["sipp", "-sf", str(SIPP_DIR / "uas.xml"), "-s", "bob", "-i", str(V4_HOST),
                "-p", "5060", "-mi", str(V4_HOST), "-mp", "7000", "-t", "u1",
                "-l", "10000", "-nostdin"]
        with (self.work / "uas.log").open("wb") as log:
            self.uas = self.lab.exec(self.lab.v4, argv, cwd=self.work,
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        time.sleep(0.3)

    def calls(self, cps: float, seconds: float, name: str) -> tuple[int, int]:
        """``cps`` calls/s for ``seconds`` (each 500 ms of media), IPv6 -> IPv4:
        (placed, completed)."""
        n = max(1, round(cps * seconds))
        stats = self.work / f"{name}.csv"
        argv = ["sipp", "-sf", str(SIPP_DIR / "uac.xml"), "-s", "alice", "-i", str(V6_HOST),
                "-p", "5070", "-mi", str(V6_HOST), "-mp", "6000", "-t", "u1",
                "-key", "ruri", f"sip:bob@{V4_HOST}", "-r", f"{cps:g}", "-m", str(n),
                "-d", "500", "-nostdin", "-recv_timeout", "10000",
                "-timeout", f"{seconds + 40:.0f}s", "-trace_stat", "-stf", str(stats),
                "-trace_err", "-error_file", str(self.work / f"{name}.err"), str(GW_SIP[6])]
        with (self.work / f"{name}.log").open("wb") as log:
            self.lab.exec(self.lab.v6, argv, cwd=self.work, stdin=subprocess.DEVNULL,
                          stdout=log, stderr=subprocess.STDOUT).wait(timeout=seconds + 60)
        row = sipp_stats(stats)
        return n, int(row["SuccessfulCall(C)"])

    def stop(self) -> None:
        self.uas.terminate()
        self.uas.wait(timeout=10)


def flood_with_calls(lab: Lab, gw: Gateway, phones: Phones, *, rate: float, seconds: float,
                     sources: list[str], cps: float, name: str,
                     metrics_at: str = METRICS) -> dict[str, Any]:
    """One variant: junk from ``sources`` while good calls go on; the figure's record.
    ``metrics_at``: the daemon's --metrics-listen."""
    pid = gw.pid()
    assert pid is not None
    def dropped() -> dict[str, int]:
        drops = gw.json("stats")["drops"]
        return {r: int(drops.get(r, {}).get("packets", 0))
                for r in ("sip_rate_limited", "sip_strangers_limited")}

    before = dropped()
    malformed0 = metrics(lab, metrics_at).get("xlat_sip_malformed_total", 0.0)
    cpu0, rss0 = task_cpu_ns(pid), rss_kib(pid)
    junk = start_junk(lab, rate, seconds, sources)
    placed, ok = phones.calls(cps, seconds, name)
    sent = junk_report(junk, timeout=60)
    after = dropped()
    return {
        "figure": "sip_junk_flood", "impl": "xlat", "variant": name,
        "rate_asked": rate, "seconds": seconds, "sources": len(sources),
        "sent": sent["sent"], "achieved_rate": round(sent["sent"] / sent["elapsed"]),
        "send_errors": sent["send_errors"], "sender_cpu_s": round(sent["cpu_ns"] / 1e9, 2),
        "calls": placed, "calls_ok": ok, "ok_pct": round(100 * ok / placed, 2),
        "sip_rate_limited": after["sip_rate_limited"] - before["sip_rate_limited"],
        "sip_strangers_limited": after["sip_strangers_limited"] - before["sip_strangers_limited"],
        "malformed": int(metrics(lab, metrics_at).get("xlat_sip_malformed_total", 0.0)
                         - malformed0),
        "daemon_cpu_s": round((task_cpu_ns(pid) - cpu0) / 1e9, 2),
        "rss_kib_before": rss0, "rss_kib_after": rss_kib(pid),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.junk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50_000, help="junk datagrams/s")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--cps", type=float, default=10.0, help="good calls/s")
    args = parser.parse_args(argv)
    lab = Lab(f"xjk-{os.urandom(3).hex()}")
    work = Path(tempfile.mkdtemp(prefix=f"{lab.tag}-"))  # kept: SIPp's logs
    print(f"bench.junk: logs in {work}", file=sys.stderr)
    records = []
    try:
        lab.up()
        many = add_sources(lab, args.sources)
        gw = start_gateway(lab, "--metrics-listen", METRICS, "--log-level", "warning",
                           directory=work / "gw")
        phones = Phones(lab, work)
        try:
            for name, sources in (("one_source", many[:1]), ("many_sources", many)):
                record = flood_with_calls(lab, gw, phones, rate=args.rate,
                                          seconds=args.seconds, sources=sources,
                                          cps=args.cps, name=name)
                records.append(record)
                print(json.dumps(record), flush=True)
        finally:
            phones.stop()
            gw.stop()
    finally:
        lab.down()
    return 0 if all(r["ok_pct"] >= 99 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
