"""The asyncio edge of the SIP proxy: sockets in, ``SipProxy`` calls, sockets out.

The only SIP module touching sockets (the aioquic adapter shape): every input is
handed to the sans-I/O core with ``loop.time()`` as ``now``, everything the core
returns is sent at once, and exactly one loop timer is kept armed at
``proxy.next_deadline()``. UDP and TCP listen on every given endpoint (IPv6 sockets
are IPV6_V6ONLY, so both families can share a port number). TCP connections are
reused in both directions: a response or request for a peer goes down the
connection that peer opened, else a new one is opened from our address of that
family.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import random
import socket
from collections.abc import Sequence

from netaddr import IPNetwork

from xlat.addr import Endpoint
from xlat.config import Config
from xlat.media.session import SessionManager
from xlat.sip.errors import SipParseError
from xlat.sip.message import SipRequest, SipResponse, StreamFramer
from xlat.sip.proxy import ProxyConfig, Send, SipProxy
from xlat.sip.uri import SipUri

log = logging.getLogger(__name__)

__all__ = ["SipServer", "proxy_config", "start_proxy", "start_sip"]

# How long opening a TCP connection may take before the transactions waiting on it fail
# (Kamailio's tcp_connect_timeout default), well inside Timers B and F (32 s).
CONNECT_TIMEOUT = 10.0
# A TCP connection we opened is closed after this long without traffic (Kamailio's
# tcp_connection_lifetime default): another can always be opened to the peer's listener.
IDLE_OPENED = 120.0
# One a phone opened is its only way in (RFC 5626 flow): it is closed only when idle for
# longer than the longest registration the registrar grants (a registered phone
# refreshes within it).
SWEEP_INTERVAL = 10.0  # how often idle connections are looked for


# Peers repeat: their socket addresses and Endpoints are converted once each way.
@functools.lru_cache(maxsize=4096)
def _endpoint(sockaddr: tuple[str | int, ...]) -> Endpoint:
    host = str(sockaddr[0]).split("%", 1)[0]  # drop an IPv6 zone index
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Endpoint(ip, int(sockaddr[1]))


@functools.lru_cache(maxsize=4096)
def _sockaddr(ep: Endpoint) -> tuple[str, int]:
    return str(ep.host), ep.port


def _socket(ep: Endpoint, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ep.family == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(ep.host), ep.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer, local: Endpoint) -> None:
        self.server, self.local = server, local

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server.received(data, _endpoint(addr), self.local, "udp")

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP %s: %s", self.local, exc)


class _Tcp(asyncio.Protocol):
    """One TCP connection, accepted or opened by us; frames the stream (RFC 3261 §18.3)."""

    def __init__(self, server: SipServer, local: Endpoint, opened: bool = False) -> None:
        self.server, self.local = server, local
        self.opened = opened  # we connected (else the peer did)
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.active = server.loop.time()  # last traffic either way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = _endpoint(transport.get_extra_info("peername"))
        self.server.connections[self.peer] = self

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.peer is not None
        self.active = self.server.loop.time()
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            log.info("TCP %s: closing, unframeable stream: %s", self.peer, exc)
            self.transport.close()
            return
        for message in messages:
            self.server.received_message(message, self.peer, self.local)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.server.connections.get(self.peer) is self:
            del self.server.connections[self.peer]


class SipServer:
    """The running SIP edge of one proxy. Build it with ``start_sip``."""

    def __init__(self, proxy: SipProxy, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop
        self.udp: dict[Endpoint, asyncio.DatagramTransport] = {}
        self.tcp: list[asyncio.Server] = []
        self.connections: dict[Endpoint, _Tcp] = {}
        self._connecting: dict[Endpoint, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.idle_accepted = float(proxy.config.register_expires[2])

    # ---- input ---------------------------------------------------------------------

    def received(self, data: bytes, source: Endpoint, local: Endpoint, transport: str) -> None:
        try:
            sends = self.proxy.receive(data, source, local, transport, self.loop.time())
        except Exception:  # a bug must not stop the gateway: drop that message
            log.exception("SIP message from %s dropped", source)
            sends = []
        self.transmit(sends)

    def received_message(
        self, message: SipRequest | SipResponse, source: Endpoint, local: Endpoint
    ) -> None:
        try:
            sends = self.proxy.receive_message(message, source, local, "tcp", self.loop.time())
        except Exception:
            log.exception("SIP message from %s dropped", source)
            sends = []
        self.transmit(sends)

    def _on_timer(self, scheduled: float) -> None:
        self._timer = None
        try:
            sends = self.proxy.handle_timer(max(scheduled, self.loop.time()))
        except Exception:
            log.exception("SIP timer failed")
            sends = []
        self.transmit(sends)

    # ---- output --------------------------------------------------------------------

    def transmit(self, sends: Sequence[Send]) -> None:
        """Send everything, then re-arm the one timer."""
        for send in sends:
            try:
                if send.transport == "tcp":
                    self._send_tcp(send)
                else:
                    self._send_udp(send)
            except OSError as exc:
                log.info("sending to %s/%s failed: %s", send.dest, send.transport, exc)
        self._arm()

    def _send_udp(self, send: Send) -> None:
        sock = self.udp.get(send.local) if send.local is not None else None
        if sock is None:
            sock = next((t for ep, t in self.udp.items() if ep.family == send.dest.family), None)
        if sock is None:
            log.info("no IPv%d UDP socket to reach %s", send.dest.family, send.dest)
            return
        sock.sendto(send.data, _sockaddr(send.dest))

    def _send_tcp(self, send: Send) -> None:
        conn = self.connections.get(send.dest)
        if conn is not None and conn.transport is not None and not conn.transport.is_closing():
            conn.transport.write(send.data)
            conn.active = self.loop.time()
            return
        if send.dest in self._connecting:
            self._connecting[send.dest].append(send.data)
            return
        self._connecting[send.dest] = [send.data]
        task = self.loop.create_task(self._connect(send.dest, send.local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, dest: Endpoint, local: Endpoint | None) -> None:
        """Open a connection to ``dest`` and send what waits for it; if that fails, the
        transactions that sent there fail at once (``SipProxy.transport_error``)."""
        source = None if local is None else (str(local.host), 0)
        own = local or Endpoint(ipaddress.ip_address("::" if dest.family == 6 else "0.0.0.0"), 0)
        try:
            _, protocol = await asyncio.wait_for(
                self.loop.create_connection(functools.partial(_Tcp, self, own, opened=True),
                                            str(dest.host), dest.port, local_addr=source),
                CONNECT_TIMEOUT,
            )
        except OSError as exc:  # refused, unreachable, or TimeoutError
            log.info("TCP connection to %s failed: %s", dest, exc or "timed out")
            self._connecting.pop(dest, None)
            try:
                sends = self.proxy.transport_error(dest, "tcp", self.loop.time())
            except Exception:
                log.exception("SIP transport error handling failed")
                sends = []
            self.transmit(sends)
            return
        assert isinstance(protocol, _Tcp) and protocol.transport is not None
        for data in self._connecting.pop(dest, []):
            protocol.transport.write(data)

    def sweep_idle(self) -> None:
        """Close idle TCP connections (IDLE_OPENED, or ``idle_accepted`` for those the
        peers opened); runs again after SWEEP_INTERVAL."""
        now = self.loop.time()
        for conn in list(self.connections.values()):
            idle = IDLE_OPENED if conn.opened else self.idle_accepted
            if conn.transport is not None and now - conn.active > idle:
                log.debug("TCP %s: closing after %.0f s idle", conn.peer, now - conn.active)
                conn.transport.close()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self.sweep_idle)

    def _arm(self) -> None:
        """Make the loop timer fire by the proxy's next deadline. One already armed at or
        before it stays (firing early finds nothing due, and re-arms): the deadline moves
        with nearly every message, and a new TimerHandle per message costs more."""
        deadline = self.proxy.next_deadline()
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer.when() <= deadline:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer, deadline)

    # ---- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, drop connections and the timer."""
        for handle in (self._timer, self._sweeper):
            if handle is not None:
                handle.cancel()
        self._timer = self._sweeper = None
        for task in self._tasks:
            task.cancel()
        for udp in self.udp.values():
            udp.close()
        for server in self.tcp:
            server.close()
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        self.udp.clear()
        self.tcp.clear()


async def start_sip(
    proxy: SipProxy, listen: Sequence[Endpoint], transports: Sequence[str] = ("udp", "tcp")
) -> SipServer:
    """Listen for SIP on every endpoint with every transport; returns the running server.
    Raises OSError if an endpoint cannot be bound (nothing is left open then)."""
    loop = asyncio.get_running_loop()
    server = SipServer(proxy, loop)
    try:
        for ep in listen:
            if "udp" in transports:
                udp, _ = await loop.create_datagram_endpoint(
                    functools.partial(_Udp, server, ep), sock=_socket(ep, socket.SOCK_DGRAM)
                )
                server.udp[ep] = udp
            if "tcp" in transports:
                sock = _socket(ep, socket.SOCK_STREAM)
                tcp = await loop.create_server(functools.partial(_Tcp, server, ep), sock=sock)
                server.tcp.append(tcp)
    except OSError:
        server.close()
        raise
    if "tcp" in transports:
        server.sweep_idle()
    log.info("SIP listening on %s (%s)", ", ".join(map(str, listen)), "/".join(transports))
    return server


def proxy_config(cfg: Config) -> ProxyConfig:
    """The proxy's view of the daemon configuration: the first SIP endpoint of each
    family is the gateway's SIP address (a wildcard listen address is advertised as
    the first media address of its family); every media address is ours too."""
    sip: dict[int, Endpoint] = {}
    for ep in cfg.sip_endpoints():
        host = ep.host
        if host.is_unspecified:
            host = next((a for a in cfg.media if a.version == ep.family), host)
        sip.setdefault(ep.family, Endpoint(host, ep.port))
    extra = tuple(ep.host for ep in cfg.sip_endpoints() if not ep.host.is_unspecified)
    return ProxyConfig(
        sip=sip,
        aliases=(*cfg.media, *extra),
        domains=cfg.domains,
        routes=tuple((r.domain, SipUri.parse(r.target)) for r in cfg.routes),
        nat64_prefixes=tuple(IPNetwork(p) for p in cfg.nat64_prefixes),
        delete_delay=cfg.delete_delay,
    )


async def start_proxy(cfg: Config, manager: SessionManager) -> SipServer:
    """The daemon's entry point: a proxy over ``manager`` listening on every SIP
    endpoint of ``cfg`` with UDP and TCP."""
    proxy = SipProxy(proxy_config(cfg), manager, random.Random())
    return await start_sip(proxy, cfg.sip_endpoints())
