"""The asyncio edge of the SIP proxy: sockets in, ``SipProxy`` calls, sockets out.

The only SIP module touching sockets (the aioquic adapter shape): every input is
handed to the sans-I/O core with ``loop.time()`` as ``now``, everything the core
returns is sent at once, and exactly one loop timer is kept armed at
``proxy.next_deadline()``. UDP, TCP and TLS listen where they are told (IPv6
sockets are IPV6_V6ONLY, so both families can share a port number). TCP and TLS
connections are reused in both directions: a response or request for a peer goes
down the connection that peer opened, else a new one is opened from our address of
that family; a TLS connection we open checks the server's certificate against the
system's CAs (or ``--tls-ca``) and the name of the target domain (SNI and name
check, RFC 5922 §7.2). An ICMP error for a UDP datagram we sent (IP_RECVERR) is the
transport error that makes the proxy fail over to the next target (RFC 3263 §4.3).
DNS queries the proxy asks for are run as tasks of their own (``DnsResolver``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import socket
import ssl
import struct
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

from netaddr import IPNetwork

from xlat.addr import Endpoint, IPAddress
from xlat.config import Config
from xlat.media.session import SessionManager
from xlat.sip import dns
from xlat.sip.auth import UsersFile
from xlat.sip.errors import SipParseError
from xlat.sip.message import SipRequest, SipResponse, StreamFramer
from xlat.sip.proxy import MALFORMED, ProxyConfig, Send, SipProxy
from xlat.sip.resolver import DnsResolver
from xlat.sip.uri import SipUri

log = logging.getLogger(__name__)

__all__ = ["SipServer", "TlsSetupError", "proxy_config", "start_proxy", "start_sip"]

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
# Known peers are told to ``tell_peers`` (the nft guard: they leave the strangers' shared
# rate) in batches this long after the first new one, and again when last told longer
# ago than PEER_RETELL (the kernel forgets a peer after nft.PEER_TIMEOUT, 600 s).
PEER_BATCH = 0.02
PEER_RETELL = 300.0
# Linux <linux/in.h>, <linux/in6.h>: queue ICMP errors of a UDP socket (ip(7), ipv6(7));
# Python's socket module does not name them.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data


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
        if kind == socket.SOCK_DGRAM:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        sock.bind((str(ep.host), ep.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SipServer, local: Endpoint, sock: socket.socket) -> None:
        self.server, self.local, self.sock = server, local, sock

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.server.received(data, _endpoint(addr), self.local, "udp")

    def error_received(self, exc: Exception) -> None:
        """An ICMP error came back (port or host unreachable): the error queue says
        for which destination (msg_name of each queued error, ip(7) IP_RECVERR)."""
        log.debug("UDP %s: %s", self.local, exc)
        for dest, errno in _queued_errors(self.sock):
            log.info("UDP to %s failed: %s", dest, os.strerror(errno))
            self.server.transport_error(dest, "udp", unanswered=True)


def _makes_known(data: bytes) -> bool:
    """Does sending ``data`` make its destination a known peer: a request (the proxy
    routed to it), or a 1xx/2xx response (the proxy took its request). A 4xx-6xx, such
    as the 400 for a malformed request, does not."""
    return not data.startswith(b"SIP/2.0 ") or data[8:9] in (b"1", b"2")


def _queued_errors(sock: socket.socket) -> list[tuple[Endpoint, int]]:
    """Drain the socket's error queue: (original destination, errno) of each."""
    out: list[tuple[Endpoint, int]] = []
    while True:
        try:
            _, ancdata, _, addr = sock.recvmsg(1, 512, MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            return out
        except OSError as exc:
            log.debug("reading the error queue: %s", exc)
            return out
        errno = 0
        for _, _, cdata in ancdata:
            if len(cdata) >= _SOCK_EXTENDED_ERR.size:
                errno = _SOCK_EXTENDED_ERR.unpack_from(cdata)[0]
        if addr:
            with contextlib.suppress(ValueError):
                out.append((_endpoint(addr), errno))


class _Tcp(asyncio.Protocol):
    """One TCP or TLS connection, accepted or opened by us; frames the stream (RFC
    3261 §18.3)."""

    def __init__(self, server: SipServer, local: Endpoint, opened: bool = False,
                 kind: str = "tcp") -> None:
        self.server, self.local = server, local
        self.opened = opened  # we connected (else the peer did)
        self.kind = kind  # "tcp" | "tls"
        self.framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self.active = server.loop.time()  # last traffic either way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses, so no
        # isinstance check: xlat/eventloop.py)
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _endpoint(transport.get_extra_info("peername"))
        self.server.connections[self.peer] = self

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None and self.peer is not None
        self.active = self.server.loop.time()
        try:
            messages = self.framer.feed(data)
        except SipParseError as exc:
            log.info("TCP %s: closing, unframeable stream: %s", self.peer, exc,
                     extra=MALFORMED)
            self.transport.close()
            return
        for message in messages:
            self.server.received_message(message, self.peer, self.local, self.kind)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.server.connections.get(self.peer) is self:
            del self.server.connections[self.peer]


class SipServer:
    """The running SIP edge of one proxy. Build it with ``start_sip``."""

    def __init__(self, proxy: SipProxy, loop: asyncio.AbstractEventLoop,
                 resolver: DnsResolver | None = None,
                 tls_client: ssl.SSLContext | None = None) -> None:
        self.proxy = proxy
        self.loop = loop
        self.resolver = resolver
        self.tls_client = tls_client
        self.udp: dict[Endpoint, asyncio.DatagramTransport] = {}
        self.udp_sockets: dict[Endpoint, socket.socket] = {}  # the same, as sockets
        self.tcp: list[asyncio.Server] = []
        self.connections: dict[Endpoint, _Tcp] = {}
        self._connecting: dict[tuple[Endpoint, str], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.Handle | None = None  # fires at _timer_at
        self._timer_at = 0.0  # uvloop's call_at handles have no when()
        self._sweeper: asyncio.TimerHandle | None = None
        self.idle_accepted = float(proxy.config.register_expires[2])
        # where known peers go (the daemon sets it to NftGuard.know), and who was told when
        self.tell_peers: Callable[[list[IPAddress]], None] | None = None
        self._peers_told: dict[IPAddress, float] = {}
        self._peers_new: dict[IPAddress, None] = {}
        self._peers_timer: asyncio.TimerHandle | None = None

    # ---- input ---------------------------------------------------------------------

    def received(self, data: bytes, source: Endpoint, local: Endpoint, transport: str) -> None:
        try:
            sends = self.proxy.receive(data, source, local, transport, self.loop.time())
        except Exception:  # a bug must not stop the gateway: drop that message
            log.exception("SIP message from %s dropped", source)
            sends = []
        self.transmit(sends)

    def received_message(
        self, message: SipRequest | SipResponse, source: Endpoint, local: Endpoint,
        transport: str = "tcp",
    ) -> None:
        try:
            sends = self.proxy.receive_message(message, source, local, transport,
                                               self.loop.time())
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

    def transport_error(self, dest: Endpoint, transport: str, *,
                        unanswered: bool = False) -> None:
        try:
            sends = self.proxy.transport_error(dest, transport, self.loop.time(),
                                               unanswered=unanswered)
        except Exception:
            log.exception("SIP transport error handling failed")
            sends = []
        self.transmit(sends)

    async def _lookup(self, query: dns.Query) -> None:
        """Run one DNS query and hand the answer to the proxy (bounded by the
        resolver's timeout; a failure is an answer too)."""
        result = None
        if self.resolver is not None:
            try:
                result = await self.resolver.lookup(query)
            except Exception:
                log.exception("DNS lookup of %s %s failed", query.rdtype, query.name)
        records, ttl = result if result is not None else (None, None)
        try:
            sends = self.proxy.dns_answer(query, records, ttl, self.loop.time())
        except Exception:
            log.exception("SIP DNS answer handling failed")
            sends = []
        self.transmit(sends)

    # ---- output --------------------------------------------------------------------

    def transmit(self, sends: Sequence[Send]) -> None:
        """Send everything, start the DNS lookups asked for, then re-arm the one timer."""
        for send in sends:
            if self.tell_peers is not None and _makes_known(send.data):
                self._known(send.dest.host)
            try:
                if send.transport == "udp":
                    self._send_udp(send)
                else:
                    self._send_stream(send)
            except OSError as exc:
                log.info("sending to %s/%s failed: %s", send.dest, send.transport, exc)
        for query in self.proxy.dns_queries():
            self._spawn(self._lookup(query))
        self._arm()

    def _known(self, host: IPAddress) -> None:
        told = self._peers_told.get(host)
        if told is not None and self.loop.time() - told < PEER_RETELL:
            return
        self._peers_new[host] = None
        if self._peers_timer is None:
            self._peers_timer = self.loop.call_later(PEER_BATCH, self._tell_peers)

    def _tell_peers(self) -> None:
        """Hand the new known peers over in one batch; forget who was told so long ago
        that the kernel has forgotten them too."""
        self._peers_timer = None
        hosts, self._peers_new = list(self._peers_new), {}
        now = self.loop.time()
        if len(self._peers_told) > 4 * len(hosts) + 1000:
            self._peers_told = {h: t for h, t in self._peers_told.items()
                                if now - t < PEER_RETELL}
        assert self.tell_peers is not None
        try:
            self.tell_peers(hosts)
        except Exception:  # NftError, or the table is gone (re-created within seconds)
            log.exception("telling %d known SIP peer(s) to the nft guard failed", len(hosts))
            return
        self._peers_told.update(dict.fromkeys(hosts, now))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_udp(self, send: Send) -> None:
        local = send.local if send.local in self.udp else next(
            (ep for ep in self.udp if ep.family == send.dest.family), None)
        if local is None:
            log.info("no IPv%d UDP socket to reach %s", send.dest.family, send.dest)
            return
        transport = self.udp[local]
        if cast(asyncio.WriteTransport, transport).get_write_buffer_size() == 0:
            # straight to the socket: an error (EMSGSIZE for a forward too big for a
            # datagram, EPERM...) is this message's, raised here and logged by transmit;
            # uvloop's transport would take it as fatal and stop sending on the socket
            try:
                self.udp_sockets[local].sendto(send.data, _sockaddr(send.dest))
                return
            except (BlockingIOError, InterruptedError):
                pass  # the transport queues it until the socket is writable
        transport.sendto(send.data, _sockaddr(send.dest))

    def _send_stream(self, send: Send) -> None:
        """TCP or TLS: down the peer's connection of that kind, else a new one."""
        conn = self.connections.get(send.dest)
        if conn is not None and conn.kind == send.transport and conn.transport is not None \
                and not conn.transport.is_closing():
            conn.transport.write(send.data)
            conn.active = self.loop.time()
            return
        key = (send.dest, send.transport)
        if key in self._connecting:
            self._connecting[key].append(send.data)
            return
        self._connecting[key] = [send.data]
        self._spawn(self._connect(send.dest, send.local, send.transport, send.server_name))

    async def _connect(self, dest: Endpoint, local: Endpoint | None, kind: str = "tcp",
                       server_name: str | None = None) -> None:
        """Open a connection to ``dest`` and send what waits for it; if that fails, the
        transactions that sent there fail at once (``SipProxy.transport_error``)."""
        source = None if local is None else (str(local.host), 0)
        own = local or Endpoint(ipaddress.ip_address("::" if dest.family == 6 else "0.0.0.0"), 0)
        context: ssl.SSLContext | None = None
        name: str | None = None
        if kind == "tls":
            # RFC 5922 §4, §7.2: the certificate must name the domain we were asked to
            # reach (the URI's host, not an SRV target); SNI carries it (RFC 6066 §3).
            context = self.tls_client or ssl.create_default_context()
            name = server_name or str(dest.host)
        try:
            _, protocol = await asyncio.wait_for(
                self.loop.create_connection(
                    functools.partial(_Tcp, self, own, opened=True, kind=kind),
                    str(dest.host), dest.port, local_addr=source, ssl=context,
                    server_hostname=name),
                CONNECT_TIMEOUT,
            )
        except ssl.SSLCertVerificationError as exc:
            log.warning("TLS connection to %s refused: certificate of %s not trusted: %s",
                        dest, name, exc.verify_message or exc.reason)
            self._connect_failed(dest, kind)
            return
        except OSError as exc:  # refused, unreachable, TLS handshake, or TimeoutError
            log.info("%s connection to %s failed: %s", kind.upper(), dest, exc or "timed out")
            self._connect_failed(dest, kind)
            return
        assert isinstance(protocol, _Tcp) and protocol.transport is not None
        for data in self._connecting.pop((dest, kind), []):
            protocol.transport.write(data)

    def _connect_failed(self, dest: Endpoint, kind: str) -> None:
        self._connecting.pop((dest, kind), None)
        self.transport_error(dest, kind)

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
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer, deadline)
        self._timer_at = deadline

    # ---- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, drop connections and the timer."""
        for handle in (self._timer, self._sweeper, self._peers_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._sweeper = self._peers_timer = None
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
        self.udp_sockets.clear()
        self.tcp.clear()


async def start_sip(
    proxy: SipProxy, listen: Sequence[Endpoint], transports: Sequence[str] = ("udp", "tcp"),
    *, more: Sequence[tuple[str, Endpoint]] = (), tls_server: ssl.SSLContext | None = None,
    tls_client: ssl.SSLContext | None = None, resolver: DnsResolver | None = None,
) -> SipServer:
    """Listen for SIP on every endpoint of ``listen`` with every transport of
    ``transports``, and on each (transport, endpoint) of ``more`` (TLS with
    ``tls_server``); returns the running server. Raises OSError if an endpoint cannot
    be bound (nothing is left open then)."""
    loop = asyncio.get_running_loop()
    server = SipServer(proxy, loop, resolver, tls_client)
    listeners = [(t, ep) for ep in listen for t in transports] + list(more)
    try:
        for transport, ep in listeners:
            if transport == "udp":
                sock = _socket(ep, socket.SOCK_DGRAM)
                udp, _ = await loop.create_datagram_endpoint(
                    functools.partial(_Udp, server, ep, sock), sock=sock)
                server.udp[ep] = udp
                server.udp_sockets[ep] = sock
            else:
                context = tls_server if transport == "tls" else None
                sock = _socket(ep, socket.SOCK_STREAM)
                stream = await loop.create_server(
                    functools.partial(_Tcp, server, ep, kind=transport), sock=sock,
                    ssl=context)
                server.tcp.append(stream)
    except OSError:
        server.close()
        raise
    if any(t != "udp" for t, _ in listeners):
        server.sweep_idle()
    log.info("SIP listening on %s", ", ".join(f"{t}:{ep}" for t, ep in listeners))
    return server


def _advertised(cfg: Config, ep: Endpoint) -> Endpoint:
    """A wildcard listen address is advertised as the first media address of its family."""
    host = ep.host
    if host.is_unspecified:
        host = next((a for a in cfg.media if a.version == ep.family), host)
    return Endpoint(host, ep.port)


def proxy_config(cfg: Config) -> ProxyConfig:
    """The proxy's view of the daemon configuration: the first UDP/TCP endpoint of each
    family is the gateway's SIP address, the first TLS endpoint its TLS address;
    every media address is ours too."""
    sip: dict[int, Endpoint] = {}
    tls: dict[int, Endpoint] = {}
    transports: list[str] = []
    for transport, ep in cfg.sip_listeners():
        (tls if transport == "tls" else sip).setdefault(ep.family, _advertised(cfg, ep))
        if transport != "tls" and transport not in transports:
            transports.append(transport)
    extra = tuple(ep.host for ep in cfg.sip_endpoints() if not ep.host.is_unspecified)
    return ProxyConfig(
        sip=sip or dict(tls),
        transports=tuple(transports),
        tls=tls,
        prefer_family=cfg.prefer_family,
        aliases=(*cfg.media, *extra),
        domains=cfg.domains,
        routes=tuple((r.domain, SipUri.parse(r.target)) for r in cfg.routes),
        nat64_prefixes=tuple(IPNetwork(p) for p in cfg.nat64_prefixes),
        delete_delay=cfg.delete_delay,
        users=None if cfg.users is None else UsersFile(cfg.users),
        registrar_upstream=None if cfg.registrar_upstream is None
        else SipUri.parse(cfg.registrar_upstream),
    )


class TlsSetupError(ValueError):
    """The TLS files cannot be used (unreadable, not PEM, key not matching the
    certificate); the message names the file and says why in one line."""


def tls_contexts(cfg: Config) -> tuple[ssl.SSLContext | None, ssl.SSLContext]:
    """(server, client) TLS contexts. The client verifies server certificates against
    ``tls_ca`` or the system's CAs, with the host name checked (RFC 5922 §7.2), and
    shows our certificate when it has one (RFC 5922 §7.3: proxies authenticate each
    other); the server asks phones for none. Raises TlsSetupError."""
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                            cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(f"--tls-ca {cfg.tls_ca}: {exc}") from None
    server = None
    if cfg.tls_cert is not None and cfg.tls_key is not None:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            server.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
            client.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError(f"--tls-cert {cfg.tls_cert} / --tls-key {cfg.tls_key}: "
                                f"{exc}") from None
    return server, client


async def start_proxy(cfg: Config, manager: SessionManager,
                      prepare: Callable[[SipProxy], None] | None = None) -> SipServer:
    """The daemon's entry point: a proxy over ``manager`` listening on every SIP
    listener of ``cfg``, resolving names with ``cfg.dns_servers`` or resolv.conf.
    ``prepare`` sees the proxy before the first socket is opened (the daemon restores
    journaled registrations and NAT64 flows there)."""
    proxy = SipProxy(proxy_config(cfg), manager, random.Random())
    if prepare is not None:
        prepare(proxy)
    server_ctx, client_ctx = tls_contexts(cfg)
    return await start_sip(proxy, (), more=cfg.sip_listeners(), tls_server=server_ctx,
                           tls_client=client_ctx, resolver=DnsResolver(cfg.dns_servers))
