"""What the flood and abuse tests (test_floods*.py) send by hand: UDP sockets in a lab
namespace, a bare SIP INVITE with an SDP offer, and a UAS that answers INVITEs with a
200 and an SDP answer of its choosing (an attacker's accomplice, or a phone that
answers and then hears nothing more)."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from xlat.addr import Endpoint, IPAddress
from xlat.lab import in_netns
from xlat.sdp import parse_sdp
from xlat.sip.message import SipRequest, SipResponse, make_response, parse_message
from xlat.sip.uri import format_host


def udp(ns: str, host: IPAddress, port: int = 0) -> socket.socket:
    """A UDP socket bound to ``host:port`` in namespace ``ns`` (timeout 2 s)."""
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if host.version == 6 else socket.AF_INET,
                          socket.SOCK_DGRAM)
    s.bind((str(host), port))
    s.settimeout(2.0)
    return s


def tcp(ns: str, source: IPAddress, dest: Endpoint) -> socket.socket:
    """A TCP connection from ``source`` in ``ns`` to ``dest`` (timeout 5 s)."""
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if source.version == 6 else socket.AF_INET,
                          socket.SOCK_STREAM)
    s.settimeout(5.0)
    s.bind((str(source), 0))
    s.connect((str(dest.host), dest.port))
    return s


def sdp(media: Endpoint, extra: bytes = b"") -> bytes:
    ip = "IP6" if media.family == 6 else "IP4"
    return (f"v=0\r\no=- 1 1 IN {ip} {media.host}\r\ns=-\r\nc=IN {ip} {media.host}\r\n"
            f"t=0 0\r\nm=audio {media.port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            ).encode() + extra


def invite(caller: Endpoint, ruri: str, body: bytes, *, transport: str = "UDP",
           call_id: str | None = None) -> bytes:
    """An INVITE from ``caller`` (its Via and Contact) to ``ruri`` carrying ``body``."""
    host = f"{format_host(caller.host)}:{caller.port}"
    call_id = call_id or f"{uuid.uuid4().hex}@abuse.test"
    head = (f"INVITE {ruri} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} {host};branch=z9hG4bK{uuid.uuid4().hex[:16]}\r\n"
            f"From: <sip:mallory@{host}>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <{ruri}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:mallory@{host}>\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def offered_media(message: SipRequest | SipResponse) -> Endpoint:
    """The address and port of the first m= line of a message's SDP."""
    stream = parse_sdp(message.body).media[0]
    assert stream.address is not None
    return Endpoint(stream.address, stream.port)


def responses(sock: socket.socket, seconds: float) -> list[SipResponse]:
    """Every SIP response ``sock`` receives within ``seconds``."""
    got: list[SipResponse] = []
    sock.settimeout(seconds)
    try:
        while True:
            message = parse_message(sock.recv(65535))
            if isinstance(message, SipResponse):
                got.append(message)
    except TimeoutError:
        return got


@dataclass
class Answerer:
    """A UAS at ``local`` (its socket ``sock``): each INVITE for which ``answer(n,
    invite)`` gives an SDP gets a 200 OK with it (``n`` counts INVITEs from 0); None
    leaves it unanswered. Records every INVITE received. Runs in a thread until
    ``stop()``."""

    local: Endpoint
    sock: socket.socket
    answer: Callable[[int, SipRequest], bytes | None]
    invites: list[SipRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen: set[str] = set()
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            message = parse_message(data)
            if not (isinstance(message, SipRequest) and message.method == "INVITE") \
                    or message.call_id in seen:  # a retransmission: the proxy's Timer A
                continue
            seen.add(message.call_id)
            self.invites.append(message)
            body = self.answer(len(self.invites) - 1, message)
            if body is None:
                continue
            contact = f"<sip:uas@{format_host(self.local.host)}:{self.local.port}>"
            reply = make_response(message, 200, to_tag=uuid.uuid4().hex[:8], extra_headers=[
                ("Contact", contact), ("Content-Type", "application/sdp")])
            for rr in message.get_all("Record-Route"):
                reply.insert(len(reply.headers) - 1, "Record-Route", rr)
            reply.body = body
            self.sock.sendto(reply.to_bytes(), peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
