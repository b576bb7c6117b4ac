"""EbpfDatapath on the real kernel: bpf/xlat.c at TC ingress of the lab gateway.

Flows are installed directly (no daemon); packets are raw frames sent from the end hosts
and captured on the other side, where IP and UDP checksums are recomputed and compared
(tx checksum offload is off in the lab, so what is captured is what is on the wire).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP, IPOption_RR, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from bench import bpfcost
from xlat.addr import Endpoint
from xlat.lab import (
    GW4,
    GW4_IF,
    GW6,
    GW6_IF,
    HOST_IF,
    V4_HOST,
    V4_HOST2,
    V6_HOST,
    V6_HOST2,
    Lab,
    in_netns,
)
from xlat.media.datapath import Flow, Latch
from xlat.media.ebpf import BpffsError, EbpfDatapath, PinnedMapMismatch
from xlat.media.ebpfcheck import check_kernel

pytestmark = pytest.mark.netns

RELAY6 = Endpoint(GW6, 30000)  # leg A's relay (A is the IPv6 host)
RELAY4 = Endpoint(GW4, 30002)  # leg B's relay (B is the IPv4 host)
A = Endpoint(V6_HOST, 5004)
B = Endpoint(V4_HOST, 40000)
EF = 0xB8  # DSCP EF (46) << 2
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


# ---- fixtures: the datapath in the gateway, raw I/O on the hosts ------------------------


def load_datapath(lab: Lab) -> EbpfDatapath:
    """An EbpfDatapath on both gateway interfaces, created inside the gateway netns."""
    with in_netns(lab.gw):
        return EbpfDatapath([GW6_IF, GW4_IF], bpffs=lab.bpffs / "xlat")


@pytest.fixture
def dp(ebpf_lab: Lab) -> Iterator[EbpfDatapath]:
    """A fresh datapath (new maps, zero counters); fully removed afterwards."""
    datapath = load_datapath(ebpf_lab)
    try:
        yield datapath
    finally:
        datapath.close(keep=False)


@dataclass
class Host:
    """Raw Ethernet I/O on an end host's eth0, addressed to the gateway's MAC."""

    ns: str
    mac: str
    gw_mac: str
    sock: socket.socket = field(repr=False)

    def send(self, l3: Packet) -> None:
        """Send one IP packet to the gateway."""
        self.sock.send(bytes(Ether(src=self.mac, dst=self.gw_mac) / l3))

    def receive(self, dport: int, count: int = 1, timeout: float = 1.0) -> list[Ether]:
        """Incoming UDP packets to ``dport``: waits for ``count`` of them, or ``timeout``
        (then returns what came: callers assert on the list)."""
        got: list[Ether] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                break
            data, addr = self.sock.recvfrom(65535)
            if addr[2] == PACKET_OUTGOING:
                continue
            pkt = Ether(data)
            if UDP in pkt and pkt[UDP].dport == dport and (IP in pkt or IPv6 in pkt):
                got.append(pkt)
        return got


def open_host(lab: Lab, ns: str, gw_if: str) -> Host:
    with in_netns(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((HOST_IF, 0))
    return Host(ns, lab.mac(ns, HOST_IF), lab.mac(lab.gw, gw_if), sock)


@pytest.fixture
def v6host(ebpf_lab: Lab) -> Iterator[Host]:
    host = open_host(ebpf_lab, ebpf_lab.v6, GW6_IF)
    try:
        yield host
    finally:
        host.sock.close()


@pytest.fixture
def v4host(ebpf_lab: Lab) -> Iterator[Host]:
    host = open_host(ebpf_lab, ebpf_lab.v4, GW4_IF)
    try:
        yield host
    finally:
        host.sock.close()


def port(ep: Endpoint, offset: int) -> Endpoint:
    return Endpoint(ep.host, ep.port + offset)


def flow(match: Endpoint, source: Endpoint, to: Endpoint, **kw: object) -> Flow:
    kw.setdefault("idle_timeout", 60.0)
    kw.setdefault("latch", Latch.OFF)
    return Flow("test", match, source, to, **kw)  # type: ignore[arg-type]


def call_flows(rtcp: int = 0, **kw: object) -> list[Flow]:
    """A <-> B through RELAY6/RELAY4, on the RTP (0) or RTCP (1) port pair."""
    return [
        flow(
            port(RELAY6, rtcp), port(RELAY4, rtcp), port(B, rtcp), reverse=port(RELAY4, rtcp), **kw
        ),
        flow(
            port(RELAY4, rtcp), port(RELAY6, rtcp), port(A, rtcp), reverse=port(RELAY6, rtcp), **kw
        ),
    ]


def udp6(src: Endpoint, dst: Endpoint, payload: bytes, **ip: object) -> Packet:
    return (
        IPv6(src=str(src.host), dst=str(dst.host), **ip)
        / UDP(sport=src.port, dport=dst.port)
        / Raw(payload)
    )


def udp4(src: Endpoint, dst: Endpoint, payload: bytes, **ip: object) -> Packet:
    return (
        IP(src=str(src.host), dst=str(dst.host), **ip)
        / UDP(sport=src.port, dport=dst.port)
        / Raw(payload)
    )


def assert_checksums_valid(pkt: Ether) -> None:
    """Recompute the IP header and UDP checksums and compare with what was received."""
    fresh = pkt.copy()
    if IP in fresh:
        del fresh[IP].chksum
    del fresh[UDP].chksum
    rebuilt = Ether(bytes(fresh))
    if IP in pkt:
        assert pkt[IP].chksum == rebuilt[IP].chksum, "IPv4 header checksum"
    else:
        assert pkt[UDP].chksum != 0, "IPv6 UDP checksum must not be 0 (RFC 8200 8.1)"
    if pkt[UDP].chksum != 0:
        assert pkt[UDP].chksum == rebuilt[UDP].chksum, "UDP checksum"


def received_one(host: Host, dst: Endpoint) -> Ether:
    got = host.receive(dst.port)
    assert len(got) == 1, f"expected one packet to {dst}"
    return got[0]


def drops(dp: EbpfDatapath) -> dict[str, int]:
    """Non-zero drop/pass counters, packets only."""
    return {k: v.packets for k, v in dp.drops().items() if v.packets}


# ---- translation ----------------------------------------------------------------------


@pytest.mark.parametrize("rtcp", [0, 1], ids=["rtp", "rtcp"])
def test_v6_to_v4_rewrites_headers_and_keeps_payload(
    dp: EbpfDatapath, v6host: Host, v4host: Host, rtcp: int
) -> None:
    dp.install(call_flows(rtcp))
    payload = bytes(range(256)) * 3 + b"odd"
    v6host.send(udp6(port(A, rtcp), port(RELAY6, rtcp), payload, tc=EF, hlim=64))
    pkt = received_one(v4host, port(B, rtcp))
    assert (pkt[IP].src, pkt[UDP].sport) == (str(GW4), RELAY4.port + rtcp)
    assert (pkt[IP].dst, pkt[UDP].dport) == (str(B.host), B.port + rtcp)
    assert pkt[IP].ttl == 63
    assert pkt[IP].tos == EF
    assert pkt[IP].flags == 0 and pkt[IP].frag == 0  # RFC 7915 5.1: DF only above 1260
    assert pkt[Raw].load == payload
    assert_checksums_valid(pkt)
    assert dp.counters()[port(RELAY6, rtcp)].packets == 1


@pytest.mark.parametrize("rtcp", [0, 1], ids=["rtp", "rtcp"])
def test_v4_to_v6_rewrites_headers_and_keeps_payload(
    dp: EbpfDatapath, v6host: Host, v4host: Host, rtcp: int
) -> None:
    dp.install(call_flows(rtcp))
    payload = b"\x80\x00" + bytes(range(171))
    v4host.send(udp4(port(B, rtcp), port(RELAY4, rtcp), payload, tos=EF, ttl=64))
    pkt = received_one(v6host, port(A, rtcp))
    assert (pkt[IPv6].src, pkt[UDP].sport) == (str(GW6), RELAY6.port + rtcp)
    assert (pkt[IPv6].dst, pkt[UDP].dport) == (str(A.host), A.port + rtcp)
    assert pkt[IPv6].hlim == 63
    assert pkt[IPv6].tc == EF
    assert pkt[IPv6].fl == 0
    assert pkt[Raw].load == payload
    assert_checksums_valid(pkt)


def test_v6_to_v4_sets_df_above_1260_bytes(dp: EbpfDatapath, v6host: Host, v4host: Host) -> None:
    dp.install(call_flows())
    v6host.send(udp6(A, RELAY6, b"\x55" * 1300))
    pkt = received_one(v4host, B)
    assert pkt[IP].flags == "DF"
    assert_checksums_valid(pkt)


def test_a_translated_checksum_of_zero_is_sent_as_ffff(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    """RFC 768: a computed 0 goes out as 0xffff; on IPv4 a 0 would mean "no checksum".
    The last payload word is chosen so that the translated datagram sums to 0xffff."""
    dp.install(call_flows())

    def payload(word: int) -> bytes:
        return b"\x80\x00rtp-payload-" + word.to_bytes(2, "big")

    translated = IP(src=str(GW4), dst=str(B.host)) / UDP(sport=RELAY4.port, dport=B.port)
    check = Ether(bytes(Ether() / translated / Raw(payload(0))))[UDP].chksum
    word = 0xFFFF - (~check & 0xFFFF)  # makes the ones' complement sum 0xffff
    v6host.send(udp6(A, RELAY6, payload(word)))
    pkt = received_one(v4host, B)
    assert pkt[Raw].load == payload(word)
    assert pkt[UDP].chksum == 0xFFFF


def ones_sum(data: bytes) -> int:
    """RFC 1071 sum of big-endian 16-bit words, folded, not complemented."""
    data += b"\0" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header_sum(src: Endpoint, dst: Endpoint, udp_len: int) -> int:
    """What a CHECKSUM_PARTIAL UDP checksum field holds (RFC 768, RFC 8200 8.1)."""
    return ones_sum(src.host.packed + dst.host.packed + bytes([0, 17]) + udp_len.to_bytes(2, "big"))


def test_a_checksum_equal_to_the_pseudo_header_sum_is_updated_right(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    """A complete checksum that happens to equal what a CHECKSUM_PARTIAL field would hold
    (1 in 65535) takes the helper path, which must see it is a checksum after all."""
    dp.install(call_flows())

    def payload(word: int) -> bytes:
        return b"\x80\x00rtp-payload-" + word.to_bytes(2, "big")

    check = Ether(bytes(Ether() / udp6(A, RELAY6, payload(0))))[UDP].chksum
    word = (check - pseudo_header_sum(A, RELAY6, 8 + len(payload(0)))) % 0xFFFF
    sent = Ether(bytes(Ether() / udp6(A, RELAY6, payload(word))))
    assert sent[UDP].chksum % 0xFFFF == pseudo_header_sum(A, RELAY6, 8 + len(payload(0)))
    v6host.send(sent[IPv6])
    pkt = received_one(v4host, B)
    assert pkt[Raw].load == payload(word)
    assert_checksums_valid(pkt)


@contextlib.contextmanager
def tx_offload_on(lab: Lab, ns: str) -> Iterator[None]:
    """Tx checksum offload on ``ns``'s eth0 for the block: its UDP sockets then send
    CHECKSUM_PARTIAL packets. The gateway's veths keep it off, so the kernel completes
    the checksum when the translated packet leaves, and the capture sees what a NIC would
    have sent."""
    lab.run(ns, ["ethtool", "-K", HOST_IF, "tx", "on"])
    try:
        yield
    finally:
        lab.run(ns, ["ethtool", "-K", HOST_IF, "tx", "off"])


def send_from_socket(ns: str, src: Endpoint, dst: Endpoint, payload: bytes) -> None:
    """One datagram from an ordinary UDP socket of the host in ``ns``."""
    family = socket.AF_INET6 if src.host.version == 6 else socket.AF_INET
    with in_netns(ns):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.bind((str(src.host), src.port))
        sock.sendto(payload, (str(dst.host), dst.port))


@pytest.mark.parametrize("direction", ["v6->v4", "v4->v6"])
def test_checksum_partial_from_a_local_sender_is_right_on_the_wire(
    dp: EbpfDatapath, ebpf_lab: Lab, v6host: Host, v4host: Host, direction: str
) -> None:
    """CHECKSUM_PARTIAL: the field holds the pseudo-header sum, which must take the new
    addresses but not the new ports (the payload is summed when the packet leaves)."""
    dp.install(call_flows())
    payload = b"\x80\x00" + bytes(range(170))
    sender, src, relay, receiver, dst = (
        (ebpf_lab.v6, A, RELAY6, v4host, B)
        if direction == "v6->v4"
        else (ebpf_lab.v4, B, RELAY4, v6host, A)
    )
    with tx_offload_on(ebpf_lab, sender):
        send_from_socket(sender, src, relay, payload)
        pkt = received_one(receiver, dst)
    assert pkt[Raw].load == payload
    assert_checksums_valid(pkt)


def test_checksum_partial_with_a_zero_checksum_diff(
    dp: EbpfDatapath, ebpf_lab: Lab, v4host: Host
) -> None:
    """A diff (addresses + ports) of zero leaves a CHECKSUM_PARTIAL field looking the same
    either way: the two-call path. The peer's port is chosen to cancel the rest."""
    old = ones_sum(A.host.packed + RELAY6.host.packed + struct.pack("!HH", A.port, RELAY6.port))
    new = ones_sum(RELAY4.host.packed + B.host.packed + struct.pack("!H", RELAY4.port))
    peer = Endpoint(B.host, ones_sum(struct.pack("!HH", old, ~new & 0xFFFF)))  # old - new
    assert 0 < peer.port < 0xFFFF
    dp.install([flow(RELAY6, RELAY4, peer)])
    with tx_offload_on(ebpf_lab, ebpf_lab.v6):
        send_from_socket(ebpf_lab.v6, A, RELAY6, b"zero diff")
        pkt = received_one(v4host, peer)
    assert pkt[Raw].load == b"zero diff"
    assert_checksums_valid(pkt)


@pytest.mark.parametrize("length", [0, 1, 3, 161, 1200, 1400])
def test_zero_ipv4_udp_checksum_becomes_a_real_one_on_ipv6(
    dp: EbpfDatapath, v6host: Host, v4host: Host, length: int
) -> None:
    dp.install(call_flows())
    payload = bytes((i * 7 + 3) & 0xFF for i in range(length))
    v4host.send(
        IP(src=str(B.host), dst=str(GW4))
        / UDP(sport=B.port, dport=RELAY4.port, chksum=0)
        / Raw(payload)
    )
    pkt = received_one(v6host, A)
    assert pkt[UDP].chksum != 0
    assert bytes(pkt[UDP].payload) == payload
    assert_checksums_valid(pkt)


def test_zero_ipv4_udp_checksum_stays_zero_when_anchored(dp: EbpfDatapath, v4host: Host) -> None:
    to = Endpoint(V4_HOST2, 40010)
    dp.install([flow(Endpoint(GW4, 30010), Endpoint(GW4, 30012), to)])
    v4host.send(
        IP(src=str(B.host), dst=str(GW4)) / UDP(sport=B.port, dport=30010, chksum=0) / Raw(b"rtp")
    )
    pkt = received_one(v4host, to)
    assert pkt[UDP].chksum == 0
    assert_checksums_valid(pkt)


def test_anchoring_v4_to_v4(dp: EbpfDatapath, v4host: Host) -> None:
    to = Endpoint(V4_HOST2, 40010)
    dp.install([flow(Endpoint(GW4, 30010), Endpoint(GW4, 30012), to)])
    v4host.send(udp4(B, Endpoint(GW4, 30010), b"anchored", tos=EF, ttl=9, id=4242, flags="DF"))
    pkt = received_one(v4host, to)
    assert (pkt[IP].src, pkt[UDP].sport, pkt[IP].dst) == (str(GW4), 30012, str(V4_HOST2))
    assert (pkt[IP].ttl, pkt[IP].tos, pkt[IP].id, pkt[IP].flags) == (8, EF, 4242, "DF")
    assert pkt[Raw].load == b"anchored"
    assert_checksums_valid(pkt)


def test_anchoring_v6_to_v6(dp: EbpfDatapath, v6host: Host) -> None:
    to = Endpoint(V6_HOST2, 40020)
    dp.install([flow(Endpoint(GW6, 30020), Endpoint(GW6, 30022), to)])
    v6host.send(udp6(A, Endpoint(GW6, 30020), b"anchored6", tc=EF, hlim=2, fl=0x12345))
    pkt = received_one(v6host, to)
    assert (pkt[IPv6].src, pkt[UDP].sport, pkt[IPv6].dst) == (str(GW6), 30022, str(V6_HOST2))
    assert (pkt[IPv6].hlim, pkt[IPv6].tc, pkt[IPv6].fl) == (1, EF, 0x12345)
    assert pkt[Raw].load == b"anchored6"
    assert_checksums_valid(pkt)


def test_packet_over_the_mtu_after_translation_is_left_to_the_stack(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    """IPv4 1500 bytes becomes IPv6 1520 > MTU 1500: the FIB lookup says FRAG_NEEDED even
    though a smaller packet of the same flow has filled the next-hop cache."""
    dp.install(call_flows())
    v4host.send(udp4(B, RELAY4, b"small"))
    assert len(v6host.receive(A.port)) == 1
    v4host.send(udp4(B, RELAY4, b"\x42" * (1500 - 28)))
    assert v6host.receive(A.port, timeout=0.3) == []
    assert drops(dp)["mtu_exceeded"] == 1
    v4host.send(udp4(B, RELAY4, b"small again"))
    assert len(v6host.receive(A.port)) == 1


# ---- what goes to the stack untouched ---------------------------------------------------


@pytest.fixture
def gw_socket(ebpf_lab: Lab) -> Iterator[socket.socket]:
    """A UDP socket on RELAY4 in the gateway: proof that a packet reached the stack intact
    (the userspace relay listens the same way)."""
    with in_netns(ebpf_lab.gw):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((str(RELAY4.host), RELAY4.port))
    sock.settimeout(1.0)
    try:
        yield sock
    finally:
        sock.close()


def test_ttl_1_is_left_to_the_stack(dp: EbpfDatapath, v6host: Host, v4host: Host) -> None:
    dp.install(call_flows())
    v6host.send(udp6(A, RELAY6, b"hop", hlim=1))
    v4host.send(udp4(B, RELAY4, b"hop", ttl=1))
    assert v4host.receive(B.port, timeout=0.3) == []
    assert v6host.receive(A.port, timeout=0.1) == []
    assert drops(dp)["ttl_exceeded"] == 2
    assert dp.forwarded().packets == 0


def test_unknown_relay_port_goes_to_the_stack(dp: EbpfDatapath, v4host: Host, v6host: Host) -> None:
    dp.install(call_flows())
    v4host.send(udp4(B, Endpoint(GW4, 39998), b"nobody"))
    assert v6host.receive(A.port, timeout=0.3) == []
    assert dp.drops()["no_flow"].packets == 1


def test_ipv4_options_reach_the_stack_unmangled(
    dp: EbpfDatapath, v4host: Host, v6host: Host, gw_socket: socket.socket
) -> None:
    dp.install(call_flows())
    v4host.send(
        IP(src=str(B.host), dst=str(GW4), options=[IPOption_RR()])
        / UDP(sport=B.port, dport=RELAY4.port)
        / Raw(b"with options")
    )
    data, src = gw_socket.recvfrom(2048)
    assert (data, src) == (b"with options", (str(B.host), B.port))
    assert v6host.receive(A.port, timeout=0.2) == []
    assert dp.drops()["ip_options"].packets == 1


def test_ipv4_fragments_reach_the_stack_unmangled(
    dp: EbpfDatapath, v4host: Host, v6host: Host, gw_socket: socket.socket
) -> None:
    dp.install(call_flows())
    payload = bytes(range(256)) * 4
    frags = fragment(udp4(B, RELAY4, payload, id=777), fragsize=512)
    assert len(frags) == 3
    for frag in frags:
        v4host.send(frag)
    data, _ = gw_socket.recvfrom(4096)
    assert data == payload  # reassembled by the stack: nothing was rewritten
    assert v6host.receive(A.port, timeout=0.2) == []
    assert dp.drops()["fragment"].packets == 3


def test_ipv6_extension_header_goes_to_the_stack(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    dp.install(call_flows())
    v6host.send(
        IPv6(src=str(A.host), dst=str(GW6))
        / IPv6ExtHdrDestOpt()
        / UDP(sport=A.port, dport=RELAY6.port)
        / Raw(b"ext")
    )
    assert v4host.receive(B.port, timeout=0.3) == []
    assert dp.drops()["ext_header"].packets == 1


def test_ipv6_udp_checksum_zero_is_not_translated(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    """RFC 8200 8.1: a zero UDP checksum is illegal on IPv6; the stack drops it."""
    dp.install(call_flows())
    v6host.send(
        IPv6(src=str(A.host), dst=str(GW6))
        / UDP(sport=A.port, dport=RELAY6.port, chksum=0)
        / Raw(b"zero")
    )
    assert v4host.receive(B.port, timeout=0.3) == []
    assert dp.drops()["malformed"].packets == 1


# ---- soft state -------------------------------------------------------------------------


def test_idle_flow_stops_forwarding_without_python(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    dp.install(call_flows(idle_timeout=0.4))
    v6host.send(udp6(A, RELAY6, b"1"))
    assert len(v4host.receive(B.port)) == 1
    time.sleep(0.6)
    v6host.send(udp6(A, RELAY6, b"2"))
    assert v4host.receive(B.port, timeout=0.3) == []
    assert dp.drops()["expired"].packets == 1


def test_never_used_flow_expires_too(dp: EbpfDatapath, v6host: Host, v4host: Host) -> None:
    dp.install(call_flows(idle_timeout=0.2))
    time.sleep(0.3)
    v6host.send(udp6(A, RELAY6, b"late"))
    assert v4host.receive(B.port, timeout=0.3) == []
    assert dp.drops()["expired"].packets == 1


def test_remove_stops_forwarding_at_once(dp: EbpfDatapath, v6host: Host, v4host: Host) -> None:
    dp.install(call_flows())
    v6host.send(udp6(A, RELAY6, b"before"))
    assert len(v4host.receive(B.port)) == 1
    dp.remove([RELAY6, Endpoint(GW6, 31000)])  # an unknown match is not an error
    v6host.send(udp6(A, RELAY6, b"after"))
    assert v4host.receive(B.port, timeout=0.3) == []
    assert dp.drops()["no_flow"].packets == 1
    assert list(dp.counters()) == [RELAY4]
    assert list(dp.counters([RELAY6, RELAY4])) == [RELAY4]


def test_install_replacing_a_flow_keeps_its_counters(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    dp.install(call_flows())
    v6host.send(udp6(A, RELAY6, b"one"))
    assert len(v4host.receive(B.port)) == 1
    new_b = Endpoint(V4_HOST2, 40100)
    dp.install([flow(RELAY6, RELAY4, new_b)])
    v6host.send(udp6(A, RELAY6, b"two"))
    assert len(v4host.receive(new_b.port)) == 1
    counters = dp.counters([RELAY6])[RELAY6]
    assert (counters.packets, counters.to) == (2, new_b)


# ---- latching and rate cap --------------------------------------------------------------


def test_learn_latches_the_reverse_flow_and_unknown_peer_drops(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    """NAT64-style: B's SDP address is useless (port 0 = unknown); B's first packet tells."""
    real_b = Endpoint(V4_HOST2, 41000)
    dp.install(
        [
            flow(RELAY6, RELAY4, Endpoint(GW4, 0), latch=Latch.LEARN, reverse=RELAY4),
            flow(RELAY4, RELAY6, A, latch=Latch.LEARN, reverse=RELAY6),
        ]
    )
    v6host.send(udp6(A, RELAY6, b"too early"))
    assert v4host.receive(real_b.port, timeout=0.3) == []
    assert drops(dp)["no_peer"] == 1

    v4host.send(udp4(real_b, RELAY4, b"hello from B"))
    assert received_one(v6host, A)[Raw].load == b"hello from B"
    assert dp.counters()[RELAY6].to == real_b

    v6host.send(udp6(A, RELAY6, b"now"))
    assert received_one(v4host, real_b)[Raw].load == b"now"
    # learned once: a later source does not move the flow
    v4host.send(udp4(B, RELAY4, b"other source"))
    assert len(v6host.receive(A.port)) == 1
    assert dp.counters()[RELAY6].to == real_b


def test_strict_forwards_only_the_expected_source(
    dp: EbpfDatapath, v6host: Host, v4host: Host
) -> None:
    dp.install([flow(RELAY6, RELAY4, B, latch=Latch.STRICT, expect=A)])
    v6host.send(udp6(Endpoint(V6_HOST2, A.port), RELAY6, b"spoof host"))
    v6host.send(udp6(Endpoint(A.host, A.port + 2), RELAY6, b"spoof port"))
    v6host.send(udp6(A, RELAY6, b"genuine"))
    got = v4host.receive(B.port, count=3, timeout=0.5)
    assert [p[Raw].load for p in got] == [b"genuine"]
    assert drops(dp)["strict_mismatch"] == 2


def test_rate_cap_drops_the_excess(dp: EbpfDatapath, v6host: Host, v4host: Host) -> None:
    dp.install([flow(RELAY6, RELAY4, B, rate_limit_pps=50)])
    start = time.monotonic()
    for i in range(300):
        v6host.send(udp6(A, RELAY6, i.to_bytes(2, "big")))
    elapsed = time.monotonic() - start
    forwarded = dp.counters()[RELAY6].packets
    # one second of burst (50) plus 50 pps while sending
    assert 50 <= forwarded <= 50 + int(50 * elapsed) + 2
    assert dp.drops()["rate_limited"].packets == 300 - forwarded


# ---- counting, adoption -----------------------------------------------------------------


def test_ten_thousand_packets_are_counted_in_the_kernel(dp: EbpfDatapath, v6host: Host) -> None:
    dp.install(call_flows())
    frame_l3 = udp6(A, RELAY6, b"\x80" * 172)
    l3_len = len(bytes(frame_l3))
    for _ in range(10_000):
        v6host.send(frame_l3)
    counters = dp.counters()[RELAY6]
    assert (counters.packets, counters.bytes) == (10_000, 10_000 * l3_len)
    assert counters.last_seen == pytest.approx(time.monotonic(), abs=5.0)
    assert dp.forwarded().packets == 10_000


def our_filters(lab: Lab) -> list[str]:
    out = lab.run(lab.gw, ["tc", "filter", "show", "dev", GW6_IF, "ingress"])
    return [line for line in out.splitlines() if "name xlat" in line]


def test_a_second_datapath_adopts_flows_counters_and_filters(
    ebpf_lab: Lab, v6host: Host, v4host: Host
) -> None:
    first = load_datapath(ebpf_lab)
    second: EbpfDatapath | None = None
    try:
        first.install(call_flows())
        v6host.send(udp6(A, RELAY6, b"before restart"))
        assert len(v4host.receive(B.port)) == 1
        first.close(keep=True)  # the daemon exits, media keeps flowing
        v6host.send(udp6(A, RELAY6, b"while down"))
        assert len(v4host.receive(B.port)) == 1

        second = load_datapath(ebpf_lab)
        assert second.counters()[RELAY6].packets == 2
        assert set(second.counters()) == {RELAY6, RELAY4}
        assert second.forwarded().packets == 2
        assert len(our_filters(ebpf_lab)) == 1  # replaced, not stacked
        v6host.send(udp6(A, RELAY6, b"after restart"))
        assert len(v4host.receive(B.port)) == 1
        assert second.counters()[RELAY6].packets == 3
    finally:
        (second or first).close(keep=False)
    assert our_filters(ebpf_lab) == []
    assert not (ebpf_lab.bpffs / "xlat").exists()


def test_pinned_map_of_another_layout_is_refused(ebpf_lab: Lab) -> None:
    pin_dir = ebpf_lab.bpffs / "xlat"
    pin_dir.mkdir()
    try:
        create = f"bpftool map create {pin_dir / 'flows'} type hash key 20 value 64 entries 16"
        subprocess.run([*create.split(), "name", "flows"], check=True)
        with pytest.raises(PinnedMapMismatch, match="value_size"):
            load_datapath(ebpf_lab)
    finally:
        for pin in pin_dir.iterdir():
            pin.unlink()
        pin_dir.rmdir()
    assert our_filters(ebpf_lab) == []


def tc(lab: Lab, *args: str) -> str:
    return lab.run(lab.gw, ["tc", *args])


def test_close_detaches_only_our_filter(ebpf_lab: Lab, v6host: Host, v4host: Host) -> None:
    datapath = load_datapath(ebpf_lab)
    foreign = "filter add dev gw6 ingress prio 60000 protocol all u32 match u32 0 0 classid 1:1"
    tc(ebpf_lab, *foreign.split())
    try:
        datapath.install(call_flows())
        v6host.send(udp6(A, RELAY6, b"ours runs first"))
        assert len(v4host.receive(B.port)) == 1
        datapath.close(keep=False)
        assert our_filters(ebpf_lab) == []
        assert "u32" in tc(ebpf_lab, "filter", "show", "dev", GW6_IF, "ingress")
        assert "clsact" in tc(ebpf_lab, "qdisc", "show", "dev", GW6_IF)
        assert "clsact" not in tc(ebpf_lab, "qdisc", "show", "dev", "gw4")  # nothing else there
    finally:
        tc(ebpf_lab, "qdisc", "del", "dev", GW6_IF, "clsact")


def test_pin_directory_must_be_on_bpffs(ebpf_lab: Lab, tmp_path: Path) -> None:
    with in_netns(ebpf_lab.gw), pytest.raises(BpffsError, match=str(tmp_path)):
        EbpfDatapath([GW6_IF], bpffs=tmp_path / "xlat")


def test_check_kernel_reports_every_feature_ok(ebpf_lab: Lab) -> None:
    with in_netns(ebpf_lab.gw):
        results = check_kernel(ebpf_lab.bpffs)
    assert {name for name, _, _ in results} >= {
        "bcc",
        "kernel headers",
        "bpffs",
        "bpf program",
        "clsact",
    }
    assert [r for r in results if not r[1]] == []


def test_program_cost_per_translated_packet(ebpf_lab: Lab) -> None:
    """The bpf_cost bench figure (bench/bpfcost.py) on this lab: every timed run must have
    forwarded (it checks each verdict, and that the hot cycle translated on every run).
    The bound is generous: a shared 2-core VM; the target is 300 ns per packet."""
    records = {r["direction"]: r for r in bpfcost.measure_in(ebpf_lab.gw, ebpf_lab.bpffs, True)}
    for direction, r in records.items():
        print(
            f"xlat {direction}: {r['ns_per_packet']} ns per packet "
            f"(no flow {r.get('no_flow_ns', '-')} ns; test_run {r['test_run_overhead_ns']} ns "
            f"subtracted; {r['method']})"
        )
    assert set(records) == {"v6->v4", "v4->v6", "v6<->v4"}
    assert all(0 < r["ns_per_packet"] < 3000 for r in records.values())
