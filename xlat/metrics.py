"""Prometheus metrics: ``--metrics-listen ADDR:PORT`` serves ``/metrics``.

Nothing is counted for metrics on a hot path. A custom collector reads, at scrape
time, the counters the daemon keeps anyway: the session manager's sessions, pools and
ended-session counts, each datapath's forwarded and drop counters (the eBPF reason
map, nftables' named counters), the SIP proxy's and the NG core's per-message counts
(one dict increment each) and the NG edge's latency histogram (fixed buckets, one
bisect per request). Names follow the Prometheus conventions: the ``xlat_`` prefix,
``_total`` on counters, base units (seconds, bytes).

The HTTP side runs on the daemon's event loop, not in prometheus_client's server
thread: the collector then reads the daemon's dicts between two loop callbacks, never
while signalling changes them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from xlat.addr import Endpoint

log = logging.getLogger(__name__)

# NG requests take 0.1-1 ms in process (bench/README.md); the tail reaches 10s of ms
# when an nft or map batch runs in the same loop turn
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 1.0)
MAX_REQUEST_HEAD = 8192  # bytes of an HTTP request head we read before answering
READ_TIMEOUT = 5.0  # seconds a scraper may take to send its request


class LatencyHistogram:
    """Observations by label into LATENCY_BUCKETS (upper bounds, seconds)."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # label -> per bucket, the last is +Inf
        self.sums: dict[str, float] = {}

    def observe(self, label: str, seconds: float) -> None:
        counts = self.counts.get(label)
        if counts is None:
            counts = self.counts[label] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.sums[label] = 0.0
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[label] += seconds

    def cumulative(self, label: str) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, observations <= le), ending with +Inf."""
        out, total = [], 0
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts[label],
                                strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class DaemonCollector(Collector):
    """Reads a running ``xlat.daemon.Daemon`` at scrape time."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon

    def describe(self) -> list[Metric]:
        return []  # collected afresh each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        info = InfoMetricFamily("xlat", "Version and datapath of this xlat")
        info.add_metric([], {"version": d.version, "datapath": "+".join(p.name for p in d.parts)})
        yield info
        yield from self._sessions()
        yield from self._media()
        if d.sip is not None:
            yield from self._sip(d.sip.proxy)
        if d.ng is not None:
            yield from self._ng(d.ng)

    def _sessions(self) -> Iterator[Metric]:
        manager = self.daemon.manager
        sessions = GaugeMetricFamily("xlat_sessions", "Media sessions now, by origin "
                                     "(sip, ng, manual) and state (active, deleting)",
                                     labels=["origin", "state"])
        by = manager.census()
        for origin in ("sip", "ng", "manual"):
            for state in ("active", "deleting"):
                sessions.add_metric([origin, state], by[origin, state])
        yield sessions
        yield _by_label("xlat_sessions_ended", "Sessions ended, by why", "reason",
                        manager.ended)
        flows = GaugeMetricFamily("xlat_flows", "Flows the datapath holds (one per direction "
                                  "of each RTP and RTCP stream)")
        flows.add_metric([], manager.flow_count)
        yield flows
        in_use = GaugeMetricFamily("xlat_relay_port_pairs_in_use", "Relay RTP/RTCP port "
                                   "pairs held by sessions", labels=["family"])
        capacity = GaugeMetricFamily("xlat_relay_port_pairs", "Relay RTP/RTCP port pairs "
                                     "on the media addresses", labels=["family"])
        for family, pools in sorted(manager.pools.items()):
            in_use.add_metric([f"ipv{family}"], sum(p.in_use for p in pools))
            capacity.add_metric([f"ipv{family}"], sum(p.capacity for p in pools))
        yield in_use
        yield capacity

    def _media(self) -> Iterator[Metric]:
        d = self.daemon
        packets = CounterMetricFamily("xlat_forwarded_packets", "Media packets relayed, "
                                      "by datapath", labels=["datapath"])
        octets = CounterMetricFamily("xlat_forwarded_bytes", "Media bytes relayed (L3, "
                                     "as received), by datapath", labels=["datapath"])
        for part in d.forwarders:
            total = part.forwarded()
            packets.add_metric([part.name], total.packets)
            octets.add_metric([part.name], total.bytes)
        yield packets
        yield octets
        ended_p = CounterMetricFamily("xlat_call_media_packets", "Media packets of ended "
                                      "sessions, by direction (counted when a session "
                                      "ends)", labels=["direction"])
        ended_b = CounterMetricFamily("xlat_call_media_bytes", "Media bytes of ended "
                                      "sessions, by direction (counted when a session "
                                      "ends)", labels=["direction"])
        for direction, (p, b) in sorted(d.ended_media.items()):
            ended_p.add_metric([direction], p)
            ended_b.add_metric([direction], b)
        yield ended_p
        yield ended_b
        dropped_p = CounterMetricFamily("xlat_dropped_packets", "Packets not forwarded, by "
                                        "datapath and reason (`xlat stats` explains each)",
                                        labels=["datapath", "reason"])
        dropped_b = CounterMetricFamily("xlat_dropped_bytes", "Bytes not forwarded, by "
                                        "datapath and reason", labels=["datapath", "reason"])
        for part in d.parts:
            try:
                drops = part.drops()
            except Exception as e:  # one unreadable datapath must not fail the scrape
                log.warning("metrics: drops of %s unreadable: %s", part.name, e)
                continue
            for reason, c in sorted(drops.items()):
                dropped_p.add_metric([part.name, reason], c.packets)
                dropped_b.add_metric([part.name, reason], c.bytes)
        yield dropped_p
        yield dropped_b

    def _sip(self, proxy: Any) -> Iterator[Metric]:
        yield _by_label("xlat_sip_requests_received", "SIP requests received, by method",
                        "method", proxy.requests_received)
        for name, doc, counts in (
            ("xlat_sip_responses_received", "SIP responses received, by CSeq method and "
             "status code", proxy.responses_received),
            ("xlat_sip_responses_sent", "SIP responses the gateway made itself (not "
             "forwarded), by method and status code", proxy.responses_sent),
        ):
            family = CounterMetricFamily(name, doc, labels=["method", "code"])
            for (method, code), n in sorted(counts.items()):
                family.add_metric([method, str(code)], n)
            yield family
        malformed = CounterMetricFamily("xlat_sip_malformed", "SIP messages that did "
                                        "not parse")
        malformed.add_metric([], proxy.malformed)
        yield malformed
        transactions = GaugeMetricFamily("xlat_sip_transactions", "Live SIP transactions "
                                         "(server and client)")
        transactions.add_metric([], proxy.transactions)
        yield transactions

    def _ng(self, ng: Any) -> Iterator[Metric]:
        core = ng.core
        yield _by_label("xlat_ng_requests", "NG requests handled, by command", "command",
                        core.requests)
        retransmits = CounterMetricFamily("xlat_ng_retransmits", "NG requests answered "
                                          "from the reply cache")
        retransmits.add_metric([], core.retransmits)
        yield retransmits
        latency = HistogramMetricFamily("xlat_ng_request_duration_seconds", "Time to "
                                        "answer an NG request, by command",
                                        labels=["command"])
        for command in sorted(ng.latency.counts):
            latency.add_metric([command], ng.latency.cumulative(command),
                               sum_value=ng.latency.sums[command])
        yield latency


class MetricsServer:
    """HTTP/1.x on the event loop: GET /metrics answers the exposition text, then closes."""

    def __init__(self, registry: CollectorRegistry, server: asyncio.Server) -> None:
        self.registry = registry
        self._server = server
        host, port = server.sockets[0].getsockname()[:2]
        self.address = Endpoint.parse(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def start_metrics(daemon: Any, listen: Endpoint) -> MetricsServer:
    """Serve the daemon's metrics on TCP ``listen`` (port 0: any free port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that sent no request head in time, or went away
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, str(listen.host), listen.port,
                                        limit=MAX_REQUEST_HEAD)
    return MetricsServer(registry, server)


def _by_label(name: str, doc: str, label: str, counts: dict[str, int]) -> Metric:
    """A counter family with one sample per key of ``counts``, in key order."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in sorted(counts.items()):
        family.add_metric([key], n)
    return family
