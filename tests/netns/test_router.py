"""``xlat run`` on a router's life: sockets on the media address next to the guard,
interfaces deleted and re-created under a live stream, ``nft flush ruleset``."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_start import start

from xlat.lab import GW4, V4_HOST, Lab, in_netns

pytestmark = pytest.mark.netns

RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"


def dns_query(qid: int) -> bytes:
    """A DNS query for example.test A (RFC 1035 §4.1)."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return header + b"\x07example\x04test\x00" + struct.pack("!HH", 1, 1)


@pytest.fixture
def dns_echo(lab: Lab) -> Iterator[tuple[str, int]]:
    """A UDP server on the IPv4 host's port 53 that answers each query with itself,
    QR bit set."""
    with in_netns(lab.v4):
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((str(V4_HOST), 53))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(512)
            except TimeoutError:
                continue
            server.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield (str(V4_HOST), 53)
    finally:
        stop.set()
        thread.join()
        server.close()


def test_replies_to_ephemeral_sockets_on_the_media_address_all_arrive(
    lab: Lab, tmp_path: Path, dns_echo: tuple[str, int]
) -> None:
    # ephemeral ports 32768-36767, relay ports 32768-34767: without the reservation about
    # half of the queries would leave from a relay port and lose their answer to the guard
    lab.run(lab.gw, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 36767"])
    before = lab.run(lab.gw, ["cat", RESERVED])
    gw = start(lab, tmp_path, "--ports", "32768-34767")
    try:
        assert lab.run(lab.gw, ["cat", RESERVED]).strip() == "32768-34767"
        answered, ports = 0, []
        for qid in range(300):
            with in_netns(lab.gw):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with s:
                s.bind((str(GW4), 0))
                s.settimeout(1.0)
                s.sendto(dns_query(qid), dns_echo)
                ports.append(s.getsockname()[1])
                try:
                    answer = s.recv(512)
                except TimeoutError:
                    continue
                answered += answer[:2] == struct.pack("!H", qid) and answer[2] & 0x80 != 0
        assert answered == 300
        assert not [p for p in ports if 32768 <= p <= 34767]
        assert gw.json("stats")["drops"]["unallocated"]["packets"] == 0  # type: ignore
    finally:
        gw.stop()
    assert lab.run(lab.gw, ["cat", RESERVED]) == before  # given back on a clean stop
