"""A small rtpengine NG client (``<cookie> <bencode dict>`` over UDP), the same requests
for xlat and rtpengine: offer/answer/delete of one audio stream, v6 offerer, v4 answerer
(the interfaces are named ``v6``/``v4`` on both)."""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.env import BenchError
from xlat.control.bencode import decode, encode
from xlat.lab import in_netns

_MEDIA = re.compile(rb"^c=IN IP[46] (\S+)\r?$.*?^m=audio (\d+) ", re.M | re.S)


def sdp(host: str, port: int) -> bytes:
    """A one-stream G.711 SDP from ``host``:``port``."""
    ip = "IP6" if ":" in host else "IP4"
    return (f"v=0\r\no=- 1 1 IN {ip} {host}\r\ns=-\r\nc=IN {ip} {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n").encode()


def media_of(body: bytes) -> tuple[str, int]:
    """The (address, port) of the first audio stream of an SDP (the relay it names)."""
    m = _MEDIA.search(body)
    if m is None:
        raise BenchError(f"no c=/m=audio in SDP: {body[:200]!r}")
    return m.group(1).decode(), int(m.group(2))


class NgClient:
    """A UDP socket (made in namespace ``ns``) talking NG to ``server``."""

    def __init__(self, ns: str, server: tuple[str, int], timeout: float = 2.0) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.sock.connect(server)
        self._prefix = uuid.uuid4().hex[:8]
        self._n = 0

    def __enter__(self) -> NgClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def cookie(self) -> bytes:
        self._n += 1
        return f"{self._prefix}_{self._n}".encode()

    @staticmethod
    def encode(cookie: bytes, command: dict[str, Any]) -> bytes:
        return cookie + b" " + encode(command)

    @staticmethod
    def decode(datagram: bytes) -> tuple[bytes, dict[str, Any]]:
        cookie, _, body = datagram.partition(b" ")
        reply = decode(body)
        if not isinstance(reply, dict):
            raise BenchError(f"NG reply is not a dictionary: {datagram[:100]!r}")
        return cookie, reply

    def request(self, command: dict[str, Any]) -> dict[str, Any]:
        """One request, its reply; raises BenchError on an NG error or no reply."""
        cookie = self.cookie()
        self.sock.send(self.encode(cookie, command))
        while True:
            try:
                got, reply = self.decode(self.sock.recv(65535))
            except TimeoutError:
                raise BenchError(f"NG {command['command']}: no reply") from None
            if got == cookie:
                break
        if reply.get("result") not in (b"ok", b"pong"):
            raise BenchError(f"NG {command['command']}: {reply.get('error-reason', reply)!r}")
        return reply

    def ping(self) -> bool:
        try:
            return self.request({"command": "ping"}).get("result") == b"pong"
        except (BenchError, OSError):
            return False


def offer(call_id: str, v6_peer: tuple[str, int]) -> dict[str, Any]:
    """The v6 party's offer, to be sent to a v4 party."""
    return {"command": "offer", "call-id": call_id, "from-tag": "ft",
            "sdp": sdp(*v6_peer), "direction": ["v6", "v4"], "address family": "IP4",
            "replace": ["origin", "session connection"], "flags": ["trust address"]}


def answer(call_id: str, v4_peer: tuple[str, int]) -> dict[str, Any]:
    """The v4 party's answer, to be sent back to the v6 offerer."""
    return {"command": "answer", "call-id": call_id, "from-tag": "ft", "to-tag": "tt",
            "sdp": sdp(*v4_peer), "direction": ["v4", "v6"], "address family": "IP6",
            "replace": ["origin", "session connection"], "flags": ["trust address"]}


def delete(call_id: str) -> dict[str, Any]:
    return {"command": "delete", "call-id": call_id, "from-tag": "ft"}


@contextmanager
def call(ng: NgClient, v6_peer: tuple[str, int], v4_peer: tuple[str, int]
         ) -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """A call between the two peers for the duration of the block. Yields the relay the
    v6 party sends to and the relay the v4 party sends to."""
    call_id = f"bench-{uuid.uuid4().hex[:10]}"
    offered = ng.request(offer(call_id, v6_peer))
    answered = ng.request(answer(call_id, v4_peer))
    try:
        yield media_of(answered["sdp"]), media_of(offered["sdp"])
    finally:
        ng.request(delete(call_id))
