"""DNS figures (issue #10): SIP calls/s through xlat to a route target named by DNS
(NAPTR → SRV → A, warm cache) against the same target as an IP literal, in the same
run; and the call set-up time that a cold lookup adds.

dnsmasq (``xlat.labdns``) runs in the v4 host's namespace on 203.0.113.3:53,
authoritative for ``bench.test`` with a TTL of one hour (negative answers too: the
zone's SOA comes with them), and the gateway namespace's resolv.conf names it, so
``xlat run`` finds it through /etc/resolv.conf as a daemon does. Every name of the
zone has the full RFC 3263 chain: NAPTR ``SIP+D2U`` → SRV ``_sip._udp`` → a host
with an A record (and no AAAA) → the SIPp UAS on 203.0.113.2:5080.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import sipcore
from bench.env import V4_HOST, V6_HOST, BenchError, BenchLab, Xlat, in_ns
from bench.sip import HERE, PROXY, UAS_PORT, UNLIMITED_SIP_RATE, measure, uas
from xlat.addr import Endpoint, parse_ip
from xlat.demo import read_trace
from xlat.lab import in_netns
from xlat.labdns import Dnsmasq, resolv_conf
from xlat.sip.dns import AAAA, NAPTR, SRV, A, Query, Record
from xlat.sip.resolver import DnsResolver

ZONE = "bench.test"
DNS_SERVER = parse_ip("203.0.113.3")  # the v4 host's second address (xlat.lab.V4_HOST2)
TTL = 3600  # seconds: the cache stays warm for the whole figure
PBX = f"pbx.{ZONE}"  # the DNS-named route target
LITERAL = f"{V4_HOST}:{UAS_PORT}"  # ... and the same as an IP literal
PRECISION = 1.05  # the calls/s search bisects to 5 % (sip_cps: 20 %): the ratio is the figure
COLD_RATE = 5  # calls/s of the set-up latency run, one at a time
# (impl, the route's domain: the Request-URI host the caller uses, its target)
TARGETS = (("IP-literal route", f"literal.{ZONE}", LITERAL),
           ("DNS-named route", f"named.{ZONE}", PBX))


def records(names: Sequence[str]) -> list[str]:
    """dnsmasq options: for each name, NAPTR → SRV (port 5080) → A of ``uas.<name>``."""
    out = []
    for name in names:
        out += [f"--naptr-record={name},10,10,S,SIP+D2U,,_sip._udp.{name}",
                f"--srv-host=_sip._udp.{name},uas.{name},{UAS_PORT},10,0",
                f"--host-record=uas.{name},{V4_HOST}"]
    return out


def figures(lab: BenchLab, quick: bool) -> Iterator[dict[str, Any]]:
    if shutil.which("dnsmasq") is None:
        raise BenchError("dnsmasq not found (Debian package dnsmasq)")
    cold = [f"c{i}.{ZONE}" for i in range(10 if quick else 30)]
    with Dnsmasq(lab.v4, DNS_SERVER, records([PBX, *cold]), lab.tmp / "dnsmasq.log",
                 zone=ZONE, ttl=TTL) as dns, resolv_conf(lab.gw, DNS_SERVER):
        yield from routed_cps(lab, quick, dns)
        for name, figure in (("sip_dns_core", lambda: proxy_core(lab, quick)),
                             ("sip_dns_setup", lambda: cold_setup(lab, cold, dns))):
            try:
                yield figure()
            except BenchError as e:
                yield {"figure": name, "impl": "xlat", "error": str(e)}


def routed_cps(lab: BenchLab, quick: bool, dns: Dnsmasq) -> Iterator[dict[str, Any]]:
    """``sip_cps``'s xlat row (same caller, callee, options and search) to a route
    target by IP literal and to the same target by DNS name, in one daemon: two domain
    routes, picked by the Request-URI's host, searched in turn (three times each in a
    full run, once quick) so that both see the same background load; each keeps its
    best search and the median of its CPU runs."""
    config = lab.tmp / "sip-dns-bench.toml"
    config.write_text(f"sip-rate = {UNLIMITED_SIP_RATE}\n")
    extra = ["-c", str(config), "--delete-delay", "0", "--ports", "20000-59999"]
    for _, domain, target in TARGETS:
        extra += ["--route", f"{domain}=sip:{target}"]
    runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl, _, _ in TARGETS}
    try:
        with Xlat(lab, sip_listen=(), extra=extra) as daemon:
            for _ in range(1 if quick else 3):
                for impl, domain, _ in TARGETS:
                    asked = dns.queries()
                    got = measure(impl, lab, lambda: [daemon.pid], quick, PRECISION,
                                  caller(lab, domain))
                    runs[impl].append({**got, "dns_queries": dns.queries() - asked})
    except BenchError as e:
        for impl, _, _ in TARGETS:
            runs[impl].append({"error": str(e)})
    best: dict[str, dict[str, Any]] = {}
    for impl, domain, target in TARGETS:
        measured = [r for r in runs[impl] if "error" not in r]
        pick = max(measured, key=lambda r: float(r["cps"])) if measured else runs[impl][-1]
        cpu = [float(r["cpu_ms_per_call"]) for r in measured if "cpu_ms_per_call" in r]
        best[impl] = {**pick, "figure": "sip_dns_cps", "impl": f"xlat, {impl}",
                      "route": f"{domain}=sip:{target}",
                      "searches": [r.get("cps") for r in runs[impl]],
                      "dns_queries": sum(r.get("dns_queries", 0) for r in runs[impl])}
        if cpu:
            best[impl]["cpu_ms_per_call"] = round(statistics.median(cpu), 3)
    literal, named = (best[impl] for impl, _, _ in TARGETS)
    if literal.get("cps") and named.get("cps"):
        named["vs_literal"] = round(float(named["cps"]) / float(literal["cps"]), 3)
    yield literal
    yield named


def caller(lab: BenchLab, domain: str) -> list[str]:
    """SIPp options of a caller whose every call is to ``sip:bench@DOMAIN``."""
    inf = lab.tmp / f"{domain}.csv"
    inf.write_text(f"SEQUENTIAL\n{domain};\n")
    return ["-sf", str(HERE / "uac_named.xml"), "-inf", str(inf)]


def cold_setup(lab: BenchLab, names: Sequence[str], dns: Dnsmasq) -> dict[str, Any]:
    """INVITE sent → 200 received at the v6 caller, for a call to ``sip:bench@NAME``
    whose host xlat has never looked up (cold: NAPTR, SRV, then AAAA and A) and for
    the next call to the same host (warm), pair by pair, one call at a time. xlat runs
    with its defaults and no route: the Request-URI's host is the next hop."""
    inf = lab.tmp / "names.csv"
    inf.write_text("SEQUENTIAL\n" + "".join(f"{n};\n{n};\n" for n in names))
    trace = lab.tmp / "named-uac.msg"
    calls = 2 * len(names)
    argv = ["sipp", PROXY, "-sf", str(HERE / "uac_named.xml"), "-inf", str(inf),
            "-i", V6_HOST, "-p", "5070", "-mi", V6_HOST, "-mp", "6000",
            "-r", str(COLD_RATE), "-l", "1", "-m", str(calls), "-nostdin",
            "-recv_timeout", "5000", "-timeout", f"{calls / COLD_RATE + 30:.0f}s",
            "-trace_msg", "-message_file", str(trace)]
    with Xlat(lab, sip_listen=()) as daemon, uas(lab):
        asked = dns.queries()
        done = subprocess.run(in_ns(lab.v6, argv), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=calls / COLD_RATE + 60)
        queries = dns.queries() - asked
        drops = daemon.call("stats")["drops"]
    if done.returncode != 0:
        raise BenchError(f"SIPp UAC exited {done.returncode}: {done.stderr.strip()[-300:]}")
    delays = setup_delays(trace)
    cold, warm = [], []
    for name in names:
        first, second = delays.get(name, [])[:2] or (None, None)
        if first is None or second is None:
            raise BenchError(f"no two answered calls to {name} in the caller's trace")
        cold.append(first)
        warm.append(second)
    added = [c - w for c, w in zip(cold, warm, strict=True)]
    return {
        "figure": "sip_dns_setup", "impl": "xlat", "pairs": len(names),
        "cold_ms_p50": round(statistics.median(cold) * 1e3, 3),
        "warm_ms_p50": round(statistics.median(warm) * 1e3, 3),
        "added_ms_p50": round(statistics.median(added) * 1e3, 3),
        "added_ms_max": round(max(added) * 1e3, 3),
        "resolver_ms_p50": round(statistics.median(t for t, _ in lookups(lab, names)) * 1e3, 3),
        "lookups": "NAPTR, SRV, AAAA+A", "dns_queries": queries,
        "sip_rate_limited": drops.get("sip_rate_limited", {}).get("packets"),
    }


Answers = dict[Query, tuple[list[Record], float | None] | None]


async def _chain(resolver: DnsResolver, name: str) -> Answers:
    """The lookups of a cold call to ``name``, as the proxy asks them: NAPTR, then SRV,
    then AAAA and A together (``xlat.sip.dns.locate``'s steps for this zone)."""
    answers: Answers = {}

    async def ask(query: Query) -> None:
        answers[query] = await resolver.lookup(query)

    await ask(Query(name, NAPTR))
    await ask(Query(f"_sip._udp.{name}", SRV))
    await asyncio.gather(ask(Query(f"uas.{name}", AAAA)), ask(Query(f"uas.{name}", A)))
    return answers


def lookups(lab: BenchLab, names: Sequence[str]) -> list[tuple[float, Answers]]:
    """For each name, the seconds xlat's resolver edge (``DnsResolver``: dnspython's
    asyncio resolver) takes for ``_chain`` and the answers, asked from the gateway's
    namespace by this process, one name after the other."""
    resolver = DnsResolver([Endpoint(DNS_SERVER, 53)])

    async def each() -> list[tuple[float, Answers]]:
        out = []
        for name in names:
            started = time.perf_counter()
            answers = await _chain(resolver, name)
            out.append((time.perf_counter() - started, answers))
        return out

    with in_netns(lab.gw):  # dnspython opens its sockets in this thread, so in there
        return asyncio.run(each())


def proxy_core(lab: BenchLab, quick: bool) -> dict[str, Any]:
    """``bench.sipcore``'s calls (the proxy in process, this thread's CPU time) with the
    ``*`` route to 203.0.113.2:5080 and to ``pbx.bench.test``, its cache holding what
    dnsmasq answered for that chain: two gateways taking turns call by call, so the
    machine's other load weighs on both alike; three runs in a full run (one quick),
    medians."""
    ((_, answers),) = lookups(lab, [PBX])
    calls = 500 if quick else sipcore.CALLS
    us: dict[str, list[float]] = {LITERAL: [], PBX: []}
    for _ in range(1 if quick else 3):
        benches = [sipcore.Bench(replace(sipcore.DOC_LAB, target=None)),
                   sipcore.Bench(replace(sipcore.DOC_LAB, target=f"sip:{PBX}"))]
        for query, answer in answers.items():
            if answer is None:
                raise BenchError(f"dnsmasq did not answer {query.rdtype} {query.name}")
            benches[1].proxy.dns.store(query, answer[0], answer[1], benches[1].now)
        sipcore.timed_calls(benches, calls)
        for runs, bench in zip(us.values(), benches, strict=True):
            runs.append(bench.spent / calls * 1e6)
    literal, named = (statistics.median(runs) for runs in us.values())
    return {"figure": "sip_dns_core", "impl": "xlat", "calls": calls,
            "literal_us_per_call": round(literal, 1), "named_us_per_call": round(named, 1),
            "vs_literal": round(literal / named, 3),
            "us_per_call_each": {k: [round(v, 1) for v in runs] for k, runs in us.items()}}


def setup_delays(trace: Path) -> dict[str, list[float]]:
    """Per Request-URI host, in call order: seconds from the INVITE the caller sent to
    the 200 it received for it (SIPp's ``-trace_msg`` log, microsecond stamps)."""
    sent: dict[str, tuple[str, float]] = {}  # Call-ID -> (host, INVITE sent at)
    out: dict[str, list[float]] = {}
    for msg in read_trace(trace):
        call_id = msg.values("call-id")[0]
        if msg.sent and msg.is_request and msg.method == "INVITE" and call_id not in sent:
            sent[call_id] = (msg.start.split()[1].partition("@")[2], msg.at)
        elif not msg.sent and msg.status == 200 and msg.method == "INVITE" \
                and call_id in sent:
            host, at = sent.pop(call_id)
            out.setdefault(host, []).append(msg.at - at)
    return out
