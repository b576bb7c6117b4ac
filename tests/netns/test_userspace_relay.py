"""UserspaceRelay in the lab's gateway namespace (xlat/lab.py) relaying real datagrams
between the v6 host and the v4 host."""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from ipaddress import ip_address
from typing import Any

import pytest

from xlat.addr import Endpoint
from xlat.lab import Lab, in_netns
from xlat.media.datapath import Flow, Latch
from xlat.media.userspace import RelayBindError, UserspaceRelay

pytestmark = pytest.mark.netns

RELAY6 = Endpoint.parse("[2001:db8:6::1]:30000")  # faces the v6 host
RELAY4 = Endpoint.parse("203.0.113.1:30000")  # faces the v4 host
PHONE6 = Endpoint.parse("[2001:db8:6::2]:6000")
PHONE4 = Endpoint.parse("203.0.113.2:4000")
PAYLOAD = bytes(range(256)) * 4 + b"\x80\x00"


def plus(e: Endpoint, n: int) -> Endpoint:
    return Endpoint(e.host, e.port + n)


def stream(latch: Latch = Latch.LEARN, timeout: float = 60.0, rtcp: bool = False) -> list[Flow]:
    """v6 -> v4 and v4 -> v6 flows of the RTP (or RTCP: ports + 1) stream."""
    n = int(rtcp)
    r6, r4, p6, p4 = plus(RELAY6, n), plus(RELAY4, n), plus(PHONE6, n), plus(PHONE4, n)
    return [
        Flow("s", r6, r4, p4, timeout, latch, reverse=r4, expect=p6),
        Flow("s", r4, r6, p6, timeout, latch, reverse=r6, expect=p4),
    ]


@asynccontextmanager
async def relay_in(
    lab: Lab, flows: list[Flow], clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[UserspaceRelay]:
    relay = UserspaceRelay(clock=clock)
    try:
        with in_netns(lab.gw):
            relay.install(flows)
        yield relay
    finally:
        relay.close(keep=False)


class Host:
    """Non-blocking UDP sockets in one host namespace, read through the running loop."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.socks: list[socket.socket] = []

    def bind(self, ep: Endpoint) -> socket.socket:
        with in_netns(self.ns):
            sock = socket.socket(
                socket.AF_INET6 if ep.family == 6 else socket.AF_INET, socket.SOCK_DGRAM
            )
        self.socks.append(sock)
        sock.setblocking(False)
        sock.bind((str(ep.host), ep.port))
        return sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


async def send(sock: socket.socket, payload: bytes, to: Endpoint) -> None:
    await asyncio.get_running_loop().sock_sendto(sock, payload, (str(to.host), to.port))


async def recv(sock: socket.socket, wait: float = 2.0) -> tuple[bytes, Endpoint] | None:
    """The next datagram and its source, or None after ``wait`` seconds (neighbour
    discovery can take a second before a host's first datagram)."""
    loop = asyncio.get_running_loop()
    try:
        data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 4096), wait)
    except TimeoutError:
        return None
    return data, Endpoint(ip_address(addr[0]), addr[1])


def run(scenario: Callable[[Host, Host], Coroutine[Any, Any, None]], lab: Lab) -> None:
    """Run ``scenario(v6_host, v4_host)`` on a fresh loop."""
    hosts = Host(lab.v6), Host(lab.v4)
    try:
        asyncio.run(scenario(*hosts))
    finally:
        for h in hosts:
            h.close()


def test_v6_to_v4_and_back_rtp_and_rtcp(lab: Lab) -> None:
    async def scenario(v6: Host, v4: Host) -> None:
        async with relay_in(lab, stream() + stream(rtcp=True)) as relay:
            for n in (0, 1):  # RTP, then RTCP
                a, b = v6.bind(plus(PHONE6, n)), v4.bind(plus(PHONE4, n))
                await send(a, PAYLOAD, plus(RELAY6, n))
                assert await recv(b) == (PAYLOAD, plus(RELAY4, n))
                await send(b, PAYLOAD[::-1], plus(RELAY4, n))
                assert await recv(a) == (PAYLOAD[::-1], plus(RELAY6, n))
            counters = relay.counters()
            for match in (RELAY6, RELAY4, plus(RELAY6, 1), plus(RELAY4, 1)):
                assert (counters[match].packets, counters[match].bytes) == (1, len(PAYLOAD))
            assert relay.drops() == {}

    run(scenario, lab)


def test_learn_latches_to_where_the_v4_peer_really_sends_from(lab: Lab) -> None:
    nat = Endpoint.parse("203.0.113.3:4444")

    async def scenario(v6: Host, v4: Host) -> None:
        async with relay_in(lab, stream()) as relay:
            a, sdp_addr, real = v6.bind(PHONE6), v4.bind(PHONE4), v4.bind(nat)
            await send(real, b"first", RELAY4)
            assert await recv(a) == (b"first", RELAY6)  # gw's first packet to v6: ND first
            await send(a, b"answer", RELAY6)
            assert await recv(real) == (b"answer", RELAY4)
            assert await recv(sdp_addr, 0.2) is None
            assert relay.counters()[RELAY6].to == nat

    run(scenario, lab)


def test_strict_drops_and_counts_other_sources(lab: Lab) -> None:
    async def scenario(v6: Host, v4: Host) -> None:
        async with relay_in(lab, stream(Latch.STRICT)) as relay:
            good, bad, b = (
                v6.bind(PHONE6),
                v6.bind(Endpoint.parse("[2001:db8:6::3]:6000")),
                v4.bind(PHONE4),
            )
            await send(bad, b"forged", RELAY6)
            await send(good, b"genuine", RELAY6)
            assert await recv(b) == (b"genuine", RELAY4)
            assert await recv(b, 0.2) is None
            drop = relay.drops()["strict_mismatch"]
            assert (drop.packets, drop.bytes) == (1, len(b"forged"))

    run(scenario, lab)


def test_idle_flow_expires(lab: Lab) -> None:
    async def scenario(v6: Host, v4: Host) -> None:
        now = [1000.0]  # the relay's clock, stepped by hand
        async with relay_in(lab, stream(timeout=0.5), clock=lambda: now[0]) as relay:
            a, b = v6.bind(PHONE6), v4.bind(PHONE4)
            await send(a, b"alive", RELAY6)
            assert await recv(b) == (b"alive", RELAY4)
            now[0] += 0.49
            await send(a, b"in time", RELAY6)
            assert await recv(b) == (b"in time", RELAY4)
            now[0] += 0.51  # quiet for longer than the idle timeout
            await send(a, b"too late", RELAY6)
            assert await recv(b, 0.3) is None
            assert relay.drops()["expired"].packets == 1

    run(scenario, lab)


def test_remove_stops_forwarding_and_frees_ports(lab: Lab) -> None:
    async def scenario(v6: Host, v4: Host) -> None:
        async with relay_in(lab, stream()) as relay:
            a, b = v6.bind(PHONE6), v4.bind(PHONE4)
            relay.remove([RELAY6])
            await send(a, b"one way gone", RELAY6)
            await send(b, b"other way on", RELAY4)  # RELAY6 still sends for this flow
            assert await recv(a) == (b"other way on", RELAY6)
            assert await recv(b, 0.2) is None
            assert relay.drops()["unallocated"].packets == 1  # RELAY6 is bound, flow gone
            relay.remove([RELAY4])
            with in_netns(lab.gw):
                for ep in (RELAY6, RELAY4):  # both free again
                    family = socket.AF_INET6 if ep.family == 6 else socket.AF_INET
                    with socket.socket(family, socket.SOCK_DGRAM) as s:
                        s.bind((str(ep.host), ep.port))

    run(scenario, lab)


def test_endpoint_in_use_is_a_bind_error_others_still_relay(lab: Lab) -> None:
    async def scenario(v6: Host, v4: Host) -> None:
        with in_netns(lab.gw), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
            squatter.bind((str(RELAY4.host), RELAY4.port))
            relay = UserspaceRelay()
            try:
                with pytest.raises(RelayBindError, match=re.escape(str(RELAY4))) as caught:
                    relay.install(stream(rtcp=True) + stream())
                assert caught.value.errno == errno.EADDRINUSE  # no SO_REUSEADDR sharing
                a, b = v6.bind(plus(PHONE6, 1)), v4.bind(plus(PHONE4, 1))
                await send(a, b"rtcp", plus(RELAY6, 1))
                assert await recv(b) == (b"rtcp", plus(RELAY4, 1))
            finally:
                relay.close(keep=False)

    run(scenario, lab)
