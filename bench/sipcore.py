"""SIP core figure: microseconds of proxy work per call, in process, with no sockets.

The sans-I/O proxy (``xlat.sip.proxy.SipProxy``) with a real ``SessionManager`` over a
``FakeDatapath`` is driven through complete calls shaped like the ``sip_cps`` bench
(``bench/sip/uac.xml`` -> gateway -> ``bench/sip/uas.xml``): a v6 caller sends an INVITE
with an IPv6 SDP offer; the gateway answers 100 and forwards it to the v4 callee, which
sends 180 and a 200 with an IPv4 SDP answer; the caller ACKs along the route set and
hangs up with a BYE that the callee answers 200. Each message is handed over as the
bytes a SIPp peer would send; the peers' own work (building messages from what they
received) is not timed.

Time is simulated: calls start ``STEP`` seconds apart (the CPU rate of ``sip_cps``) and
transaction timers and media expiry run as the clock passes their deadlines, so the
measured calls pay for the transactions and sessions they leave behind. A warm-up of
more than the longest transaction timer (Timer L/M, 32 s) runs first, untimed.

``python -m bench.sipcore [--calls N] [--runs R] [--profile [TOP]] [--edge]`` prints one
JSON line ``{"figure": "sip_core", "impl": "xlat", "us_per_call": ..., "calls": N, ...}``:
the median over R runs of the CPU time spent in the gateway per call (this thread's CPU
clock around each call into it, so other processes' load does not count; about 10 us
of it is the clock reads), with ``process_us_per_call``, the process CPU time of the
timed calls, harness included. Bodies differ per call (the media port), so nothing is
served from a cache a real call would miss. SIP's share of the machine is noisy: compare
runs made one after the other. ``--profile`` runs once under cProfile instead and prints
the TOP functions by own and by cumulative time on stderr. ``--edge`` adds a
``sip_edge`` line: the same calls over loopback UDP through ``xlat.sip.transport``
(see ``_edge``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import json
import pstats
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from netaddr import IPNetwork

from xlat import eventloop
from xlat.addr import Endpoint
from xlat.media.datapath import CompositeDatapath, FakeDatapath
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager
from xlat.sip.proxy import ProxyConfig, Send, SipProxy
from xlat.sip.transport import start_sip
from xlat.sip.uri import SipUri

STEP = 0.02  # seconds between calls: 50 calls/s, the CPU rate of bench/sip.py
INTRA = 0.001  # seconds between the messages of one call
WARMUP = 1700  # calls before timing: 34 s simulated, past Timer L/M (32 s)
CALLS = 2000
EDGE_CALLS = 1000
PID = 4321  # what SIPp puts in its branches and Call-IDs

_CRLF = b"\r\n"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Lab:
    """The gateway's SIP endpoints and the two SIPp peers; ``target``: the ``*`` route's
    next hop, if not the UAS's address (a name that must lead there: bench/dns.py)."""

    gw4: Endpoint
    gw6: Endpoint
    uac: Endpoint  # v6
    uas: Endpoint  # v4
    target: str | None = None

    @classmethod
    def make(cls, gw4: str, gw6: str, uac: str, uas: str) -> Lab:
        return cls(Endpoint.parse(gw4), Endpoint.parse(gw6), Endpoint.parse(uac),
                   Endpoint.parse(uas))

    def proxy(self, media: SessionManager) -> SipProxy:
        """The gateway's proxy: requests for its own domain go to the UAS."""
        config = ProxyConfig(sip={4: self.gw4, 6: self.gw6},
                             nat64_prefixes=(IPNetwork("64:ff9b::/96"),),
                             routes=(("*", SipUri.parse(self.target or f"sip:{self.uas}")),))
        return SipProxy(config, media, random.Random(42))


DOC_LAB = Lab.make("203.0.113.1:5060", "[2001:db8:6::1]:5060", "[2001:db8:6::2]:5070",
                   "203.0.113.2:5080")


def media_manager(lab: Lab) -> SessionManager:
    return SessionManager(pools={4: RelayPortPool(lab.gw4.host, 30000, 39999),
                                 6: RelayPortPool(lab.gw6.host, 30000, 39999)},
                          rng=random.Random(7))


def _message(start: str, headers: Sequence[str | bytes], body: bytes = b"") -> bytes:
    lines = [start.encode(), *(h if isinstance(h, bytes) else h.encode() for h in headers)]
    lines.append(f"Content-Length: {len(body)}".encode())
    return _CRLF.join(lines) + _CRLF + _CRLF + body


def _sdp(family: int, host: str, port: int) -> bytes:
    return (f"v=0\r\no=- 1 1 IN IP{family} {host}\r\ns=-\r\nc=IN IP{family} {host}\r\n"
            f"t=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()


def _lines(data: bytes, *names: bytes) -> list[bytes]:
    """The header lines of ``data`` whose name (lower case, with the colon) is one of
    ``names``, in order."""
    head = data.split(_CRLF + _CRLF, 1)[0].split(_CRLF)[1:]
    return [line for line in head if line.split(b":", 1)[0].lower() + b":" in names]


def _only(sends: list[Send], dest: Endpoint) -> bytes:
    data = [s.data for s in sends if s.dest == dest]
    if len(data) != 1:
        raise AssertionError(f"expected one message to {dest}, got {len(data)}: {sends}")
    return data[0]


class Uac:
    """What the SIPp UAC of bench/sip/uac.xml sends in call ``n``."""

    def __init__(self, lab: Lab, n: int) -> None:
        self.n = n
        self.uac = str(lab.uac)
        self.call_id = f"{n}-{PID}@{lab.uac.host}"
        self.from_ = f"From: <sip:caller@{self.uac}>;tag={n}"
        self.to = f"To: <sip:bench@{lab.gw6}>"
        self.uri = f"sip:bench@{lab.gw6}"
        self.host = str(lab.uac.host)
        self.to_tag = ""
        self.next_url = ""
        self.routes: list[bytes] = []

    def _via(self, index: int) -> str:
        return f"Via: SIP/2.0/UDP {self.uac};branch=z9hG4bK-{PID}-{self.n}-{index}"

    def invite(self) -> bytes:
        return _message(
            f"INVITE {self.uri} SIP/2.0",
            [self._via(0), self.from_, self.to, f"Call-ID: {self.call_id}", "CSeq: 1 INVITE",
             f"Contact: <sip:caller@{self.uac}>", "Max-Forwards: 70",
             "Content-Type: application/sdp"],
            _sdp(6, self.host, 6000 + 2 * (self.n % 1000)),
        )

    def answered(self, ok: bytes) -> None:
        """Learn the dialog from the 200 (SIPp's rrs, next_url, peer_tag_param)."""
        if b"c=IN IP6 " not in ok:
            raise AssertionError(f"200 of call {self.n} has no IPv6 relay: {ok!r}")
        (to,) = _lines(ok, b"to:")
        self.to_tag = to[to.index(b";tag=") :].decode()
        (contact,) = _lines(ok, b"contact:")
        self.next_url = contact[contact.index(b"<") + 1 : contact.index(b">")].decode()
        self.routes = [b"Route:" + rr.split(b":", 1)[1]
                       for rr in reversed(_lines(ok, b"record-route:"))]

    def in_dialog(self, method: str, cseq: int, index: int) -> bytes:
        return _message(
            f"{method} {self.next_url} SIP/2.0",
            [self._via(index), self.from_, self.to + self.to_tag, f"Call-ID: {self.call_id}",
             f"CSeq: {cseq} {method}", *self.routes, "Max-Forwards: 70"],
        )


def uas_response(lab: Lab, request: bytes, status: str, n: int, sdp: bool) -> bytes:
    """The SIPp UAS's response: [last_Via:] ... [last_Record-Route:] copied."""
    to_tag = f";tag={PID}-{n}".encode()
    copied = _lines(request, b"via:", b"from:", b"to:", b"call-id:", b"cseq:")
    if sdp or status.startswith("18"):
        copied = [line + to_tag if line.lower().startswith(b"to:") else line
                  for line in copied]
        copied += _lines(request, b"record-route:")
        copied += [f"Contact: <sip:bench@{lab.uas}>".encode()]
    if not sdp:
        return _message(f"SIP/2.0 {status}", copied)
    copied.append(b"Content-Type: application/sdp")
    body = _sdp(4, str(lab.uas.host), 7000 + 2 * (n % 1000))
    return _message(f"SIP/2.0 {status}", copied, body)


class Bench:
    """One gateway (proxy + media + fake datapath), its clock, and the time spent in it."""

    def __init__(self, lab: Lab = DOC_LAB) -> None:
        self.lab = lab
        self.media = media_manager(lab)
        self.datapath = FakeDatapath()
        self.composite = CompositeDatapath([self.datapath])  # as the daemon drives it
        self.media.on_change = self._flush
        self.proxy = lab.proxy(self.media)
        self.now = 0.0
        self.spent = 0.0  # seconds of CPU time inside the gateway

    def _flush(self) -> None:
        self.composite.apply(self.media.drain())

    def _timed_call(self, work: Callable[..., _T], *args: Any) -> _T:
        return self._timed(functools.partial(work, *args))

    def _timed(self, work: Callable[[], _T]) -> _T:
        t0 = time.thread_time()
        out = work()
        self.spent += time.thread_time() - t0
        return out

    def advance(self, seconds: float) -> None:
        """Move the clock; run what falls due (the daemon's SIP and media timers)."""
        self.now += seconds
        due = self.proxy.next_deadline()
        if due is not None and due <= self.now:
            self._timed(lambda: self.proxy.handle_timer(self.now))
        due = self.media.next_deadline()
        if due is not None and due <= self.now:
            self._timed(lambda: self.media.expire(self.now, self.composite.counters))

    def send(self, data: bytes, source: Endpoint) -> list[Send]:
        local = self.lab.gw6 if source.family == 6 else self.lab.gw4
        out = self._timed(lambda: self.proxy.receive(data, source, local, "udp", self.now))
        self.advance(INTRA)
        return out

    def call(self, n: int) -> None:
        """One complete call; raises AssertionError if it does not go through."""
        lab, uac = self.lab, Uac(self.lab, n)
        sends = self.send(uac.invite(), lab.uac)
        if not any(s.data.startswith(b"SIP/2.0 100 ") for s in sends if s.dest == lab.uac):
            raise AssertionError(f"no 100 Trying for call {n}: {sends}")
        invite = _only(sends, lab.uas)
        _only(self.send(uas_response(lab, invite, "180 Ringing", n, sdp=False), lab.uas),
              lab.uac)
        uac.answered(_only(self.send(uas_response(lab, invite, "200 OK", n, sdp=True), lab.uas),
                           lab.uac))
        _only(self.send(uac.in_dialog("ACK", 1, 2), lab.uac), lab.uas)
        bye = _only(self.send(uac.in_dialog("BYE", 2, 3), lab.uac), lab.uas)
        _only(self.send(uas_response(lab, bye, "200 OK", n, sdp=False), lab.uas), lab.uac)
        self.advance(STEP - 6 * INTRA)  # six messages, INTRA apart: calls start STEP apart


@contextlib.contextmanager
def _daemon_gc() -> Iterator[None]:
    """The garbage collector as the daemon sets it after start-up (xlat/daemon.py):
    what exists is frozen, young objects are collected less often."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def timed_calls(benches: Sequence[Bench], calls: int,
                profile: cProfile.Profile | None = None) -> float:
    """Warm each of ``benches`` up, then time ``calls`` calls on each, taking turns call by
    call (so that they share whatever else the machine does meanwhile); each bench's
    ``spent`` is its own. Returns the process CPU seconds of the timed part."""
    with _daemon_gc():
        for n in range(WARMUP):
            for bench in benches:
                bench.call(n)
        for bench in benches:
            bench.spent = 0.0
        cpu0 = time.process_time()
        if profile is not None:
            profile.enable()
        for n in range(WARMUP, WARMUP + calls):
            turn = n % len(benches)  # who goes first changes: the first pays more
            for bench in [*benches[turn:], *benches[:turn]]:
                bench.call(n)
        if profile is not None:
            profile.disable()
        return time.process_time() - cpu0


def run(calls: int, profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """Warm up, then time ``calls`` calls; the figure's fields."""
    bench = Bench()
    cpu = timed_calls([bench], calls, profile)
    return {"us_per_call": bench.spent / calls * 1e6, "process_us_per_call": cpu / calls * 1e6,
            "transactions": bench.proxy.transactions, "sessions": len(bench.media.sessions())}


class _Peer(asyncio.DatagramProtocol):
    """A SIPp peer's socket: what arrives is queued."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.inbox.put_nowait(data)


async def _expect(peer: _Peer, start: bytes) -> bytes:
    """The next message ``peer`` receives that starts with ``start`` (others skipped)."""
    while True:
        data = await asyncio.wait_for(peer.inbox.get(), 2.0)
        if data.startswith(start):
            return data


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _edge(calls: int) -> dict[str, Any]:
    """``calls`` calls through the asyncio edge (``xlat.sip.transport``) on loopback,
    one at a time, after a warm-up of a fifth as many; CPU time inside the edge's
    entry points (parse, proxy, sendto) per call. The calls take about a second of real
    time, so transaction timers do not fire (``sip_core`` counts them). The peers share
    the process: ``process_us_per_call`` counts them and the event loop too."""
    loop = asyncio.get_running_loop()
    ports = [_free_port(host) for host in ("127.0.0.1", "::1", "::1", "127.0.0.1")]
    lab = Lab.make(f"127.0.0.1:{ports[0]}", f"[::1]:{ports[1]}", f"[::1]:{ports[2]}",
                   f"127.0.0.1:{ports[3]}")
    bench = Bench(lab)
    server = await start_sip(bench.proxy, [lab.gw4, lab.gw6], ("udp",))
    for name in ("received", "_on_timer"):  # the edge's entry points, timed
        entry = getattr(server, name)
        setattr(server, name, functools.partial(bench._timed_call, entry))
    peers = []
    try:
        for ep in (lab.uac, lab.uas):
            transport, peer = await loop.create_datagram_endpoint(
                _Peer, local_addr=(str(ep.host), ep.port))
            peers.append((transport, peer))
        (uac_t, uac_p), (uas_t, uas_p) = peers
        gw4, gw6 = (str(lab.gw4.host), lab.gw4.port), (str(lab.gw6.host), lab.gw6.port)
        cpu0 = 0.0
        warmup = calls // 5
        for n in range(warmup + calls):
            if n == warmup:
                bench.spent, cpu0 = 0.0, time.process_time()
            uac = Uac(lab, n)
            uac_t.sendto(uac.invite(), gw6)
            invite = await _expect(uas_p, b"INVITE ")
            uas_t.sendto(uas_response(lab, invite, "180 Ringing", n, sdp=False), gw4)
            uas_t.sendto(uas_response(lab, invite, "200 OK", n, sdp=True), gw4)
            uac.answered(await _expect(uac_p, b"SIP/2.0 200 "))
            uac_t.sendto(uac.in_dialog("ACK", 1, 2), gw6)
            await _expect(uas_p, b"ACK ")
            uac_t.sendto(uac.in_dialog("BYE", 2, 3), gw6)
            bye = await _expect(uas_p, b"BYE ")
            uas_t.sendto(uas_response(lab, bye, "200 OK", n, sdp=False), gw4)
            await _expect(uac_p, b"SIP/2.0 200 ")
        cpu = time.process_time() - cpu0
    finally:
        for transport, _ in peers:
            transport.close()
        server.close()
    return {"us_per_call": bench.spent / calls * 1e6, "process_us_per_call": cpu / calls * 1e6}


def edge(calls: int, loop: str = "auto") -> dict[str, Any]:
    """``_edge`` in a fresh event loop (``loop``: xlat/eventloop.py's choice, as the
    daemon's ``--event-loop``), with the daemon's garbage collector settings."""
    with _daemon_gc():
        return eventloop.run(_edge(calls), loop)


def _record(figure: str, calls: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figure's JSON object: medians over ``runs``, and each run's value."""
    return {
        "figure": figure,
        "impl": "xlat",
        "us_per_call": round(statistics.median(r["us_per_call"] for r in runs), 1),
        "calls": calls,
        "runs": len(runs),
        "process_us_per_call": round(statistics.median(r["process_us_per_call"] for r in runs), 1),
        "us_per_call_each": [round(r["us_per_call"], 1) for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sipcore", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=CALLS, help="timed calls per run")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    parser.add_argument("--profile", type=int, nargs="?", const=25, metavar="TOP",
                        help="one run under cProfile; print the TOP functions on stderr")
    parser.add_argument("--edge", action="store_true",
                        help="also the sip_edge figure (loopback UDP through the asyncio edge)")
    parser.add_argument("--event-loop", choices=eventloop.LOOPS, default="auto",
                        help="the sip_edge figure's event loop, as xlat run's [default: auto]")
    args = parser.parse_args(argv)
    if args.profile is not None:
        profiler = cProfile.Profile()
        runs = [run(args.calls, profiler)]
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)
    else:
        runs = [run(args.calls) for _ in range(args.runs)]
    print(json.dumps(_record("sip_core", args.calls, runs)), flush=True)
    if args.edge:
        edge_runs = [edge(EDGE_CALLS, args.event_loop) for _ in range(args.runs)]
        loop = eventloop.resolve(args.event_loop)[0]
        print(json.dumps({**_record("sip_edge", EDGE_CALLS, edge_runs), "event_loop": loop}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
