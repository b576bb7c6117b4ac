"""``xlat run`` on a router's life: sockets on the media address next to the guard,
interfaces deleted and re-created under a live stream, ``nft flush ruleset``."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import nft_elements, udp
from test_start import A, B, nft_tables, our_filters, start

from xlat.addr import Endpoint
from xlat.lab import GW4, GW4_IF, GW6_IF, HOST_IF, PREFIX4, V4_HOST, Lab, in_netns

pytestmark = pytest.mark.netns

RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"


def nft_json(lab: Lab, *args: str) -> dict:
    return json.loads(lab.run(lab.gw, ["nft", "-j", *args]))


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


class Stream:
    """``src`` sends a numbered datagram to ``to`` every ``interval`` seconds from a
    thread; ``dst`` records when each arrives."""

    def __init__(self, src: socket.socket, to: Endpoint, dst: socket.socket,
                 interval: float = 0.005) -> None:
        self.src, self.to, self.dst, self.interval = src, to, dst, interval
        self.arrivals: list[tuple[float, int]] = []
        self._stop = threading.Event()
        dst.settimeout(0.05)
        self._threads = [threading.Thread(target=self._send), threading.Thread(target=self._recv)]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _send(self) -> None:
        seq = 0
        while not self._stop.is_set():
            with contextlib.suppress(OSError):  # no route while a link is away
                self.src.sendto(seq.to_bytes(4, "big"), (str(self.to.host), self.to.port))
            seq += 1
            time.sleep(self.interval)

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.dst.recv(64)
            except (TimeoutError, OSError):
                continue
            self.arrivals.append((time.monotonic(), int.from_bytes(data[:4], "big")))

    def first_after(self, t: float, timeout: float = 3.0) -> float | None:
        """Seconds from ``t`` to the first arrival after it (None: none in ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [at for at, _ in self.arrivals if at > t]
            if later:
                return later[0] - t
            time.sleep(0.005)
        return None


def recreate_v4_link(lab: Lab) -> float:
    """Delete the gateway's IPv4 veth (its peer, the v4 host's eth0, goes with it) and
    build it again: new ifindexes, same names and addresses. Returns when the new link
    came up (time.monotonic())."""
    peer = f"{GW4_IF}p-{lab.tag}"[:15]
    lab.run(lab.gw, ["ip", "link", "del", GW4_IF])
    time.sleep(0.3)  # the stream runs into the hole meanwhile
    lab.run(lab.gw, ["ip", "link", "add", GW4_IF, "type", "veth", "peer", "name", peer])
    lab.run(lab.gw, ["ip", "link", "set", peer, "netns", lab.v4])
    for cmd in (f"ip link set {peer} name {HOST_IF}",
                f"ip addr add {V4_HOST}/{PREFIX4} dev {HOST_IF}",
                f"ip link set {HOST_IF} up",
                f"ip route add default via {GW4}"):
        lab.run(lab.v4, cmd.split())
    lab.run(lab.gw, ["ip", "addr", "add", f"{GW4}/{PREFIX4}", "dev", GW4_IF])
    lab.run(lab.gw, ["ip", "link", "set", GW4_IF, "up"])
    return time.monotonic()


def test_a_veth_deleted_and_recreated_mid_stream_forwards_again(
    lab: Lab, tmp_path: Path
) -> None:
    gw = start(lab, tmp_path, "--interface", GW6_IF, "--interface", GW4_IF)
    try:
        old = lab.run(lab.gw, ["cat", f"/sys/class/net/{GW4_IF}/ifindex"]).strip()
        relay_a, relay_b, _ = gw.add(str(A), str(B))
        with (
            udp(lab.v6, A) as a, udp(lab.v4, B) as b,
            Stream(a, relay_a, b) as v6_to_v4,  # filter on gw6, next hop out of gw4
            Stream(b, relay_b, a) as v4_to_v6,  # filter on gw4 itself
        ):
            assert v6_to_v4.first_after(time.monotonic()) is not None
            assert v4_to_v6.first_after(time.monotonic()) is not None
            up = recreate_v4_link(lab)
            resumed = {"v6->v4 (next hop re-looked up)": v6_to_v4.first_after(up),
                       "v4->v6 (program re-attached to gw4)": v4_to_v6.first_after(up)}
        print(f"\nforwarding again after re-creation, seconds: {resumed}")
        links = [line for line in gw.log.read_text().splitlines() if "link" in line]
        assert all(s is not None and s < 1.0 for s in resumed.values()), (resumed, links)
        new = lab.run(lab.gw, ["cat", f"/sys/class/net/{GW4_IF}/ifindex"]).strip()
        assert new != old and "direct-action" in our_filters(lab, GW4_IF)
        log = gw.log.read_text()
        assert f"link {GW4_IF} (ifindex {old}) vanished: its filter is gone" in log
        assert f"link {GW4_IF} appeared (ifindex {new}, up): eBPF program attached" in log \
            or f"link {GW4_IF} is up: eBPF program attached" in log, log
        assert gw.json("stats")["forwarded"]["ebpf"]["packets"] > 0  # type: ignore[index]
    finally:
        gw.stop()
    assert gw.proc.returncode == 0
    assert our_filters(lab, GW4_IF) == ""  # the clean stop detached the new one too


def test_default_interfaces_follow_new_and_vanished_links(lab: Lab, tmp_path: Path) -> None:
    gw = start(lab, tmp_path)
    try:
        lab.run(lab.gw, ["ip", "link", "add", "xnew0", "type", "veth", "peer", "name", "xnew1"])
        assert our_filters(lab, "xnew0") == ""  # down: not one of "every interface up"
        lab.run(lab.gw, ["ip", "link", "set", "xnew0", "up"])
        t0 = time.monotonic()
        while our_filters(lab, "xnew0") == "" and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        took = time.monotonic() - t0
        print(f"\nnew interface xnew0 up -> filter attached: {took:.3f} s")
        assert took < 1.0
        lab.run(lab.gw, ["ip", "link", "del", "xnew0"])
        deadline = time.monotonic() + 2
        while "xnew0 (ifindex" not in gw.log.read_text().split("attached")[-1]:
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.05)
        assert "vanished: its filter is gone with it" in gw.log.read_text()
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.log.read_text()


@pytest.mark.parametrize("datapath", ["ebpf", "userspace"])
def test_nft_flush_ruleset_mid_stream_brings_the_table_back(
    lab: Lab, tmp_path: Path, datapath: str
) -> None:
    gw = start(lab, tmp_path, "--datapath", datapath)
    try:
        relay_a, _, _ = gw.add(str(A), str(B))
        time.sleep(0.1)  # the guard's batch (datapath.GUARD_DELAY)
        before = nft_elements(lab, "relay6")
        with udp(lab.v6, A) as a, udp(lab.v4, B) as b, Stream(a, relay_a, b) as stream:
            assert stream.first_after(time.monotonic()) is not None
            lab.run(lab.gw, ["nft", "flush", "ruleset"])
            flushed = time.monotonic()
            while not any(t["name"] == "xlat" for t in nft_tables(lab)):
                assert time.monotonic() - flushed < 3, gw.log.read_text()
                time.sleep(0.01)
            back = time.monotonic() - flushed
            time.sleep(0.2)
            resumed = stream.first_after(time.monotonic())
        print(f"\n{datapath}: nft flush ruleset -> table inet xlat back in {back:.3f} s")
        assert back <= 2.0 and resumed is not None
        assert nft_elements(lab, "relay6") == before  # the current relay ports, again
        assert (before != []) == (datapath == "userspace")
        sets = nft_json(lab, "list", "set", "inet", "xlat", "relay_ports")
        assert sets["nftables"][1]["set"]["elem"] == [{"range": [30000, 30099]}]
        stats = gw.json("stats")
        assert isinstance(stats, dict) and stats["table_restored"] == 1
        assert "table inet xlat was deleted (nft flush ruleset?): re-created it" in \
            gw.log.read_text()
    finally:
        gw.stop()
    assert gw.proc.returncode == 0, gw.log.read_text()
    assert nft_tables(lab) == []
