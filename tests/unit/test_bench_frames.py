"""The frames ``udpblast frames`` sends (bench/env.py ``udp_frame``): scapy, an
independent dissector, must read the addresses, ports and payload back and find both
checksums right."""

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from bench.env import BenchError, udp_frame

SRC_MAC, DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"


@pytest.mark.parametrize(("src", "dst", "layer"), [
    ("2001:db8:6::2", "2001:db8:4::2", IPv6), ("203.0.113.2", "198.51.100.2", IP)])
def test_frame_reads_back_with_good_checksums(src: str, dst: str, layer: type) -> None:
    frame = udp_frame(SRC_MAC, DST_MAC, src, 40000, dst, 30002, 172)
    packet = Ether(frame)
    assert (packet.src, packet.dst) == (SRC_MAC, DST_MAC)
    ip, udp = packet[layer], packet[UDP]
    assert (ip.src, ip.dst, udp.sport, udp.dport) == (src, dst, 40000, 30002)
    assert bytes(udp.payload) == bytes(172)
    sent_udp, sent_ip_sum = udp.chksum, getattr(ip, "chksum", None)
    del udp.chksum  # scapy computes what they should be
    if layer is IP:
        del ip.chksum
    again = Ether(bytes(packet))
    assert again[UDP].chksum == sent_udp != 0
    if layer is IP:
        assert again[IP].chksum == sent_ip_sum


def test_mixed_families_are_refused() -> None:
    with pytest.raises(BenchError, match="not of one family"):
        udp_frame(SRC_MAC, DST_MAC, "2001:db8:6::2", 1, "203.0.113.2", 2, 16)
