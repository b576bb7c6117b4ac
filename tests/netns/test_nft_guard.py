"""NftGuard in the lab's gateway namespace (xlat/lab.py: v6 host -- gw -- v4 host).
Packets are real UDP datagrams between the namespaces."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from ipaddress import ip_address, ip_network

import pytest

from xlat.addr import Endpoint
from xlat.lab import GW4, GW6, Lab, in_netns
from xlat.media.datapath import Flow
from xlat.media.nft import NftError, NftGuard, check_nft

pytestmark = pytest.mark.netns


def nft_json(lab: Lab, *args: str) -> dict:
    """`nft -j ARGS` inside the gateway namespace."""
    return json.loads(lab.run(lab.gw, ["nft", "-j", *args]))


@pytest.fixture
def guards(lab: Lab) -> Iterator[list[NftGuard]]:
    """Guards the test makes (in lab.gw); closed at teardown."""
    made: list[NftGuard] = []
    try:
        yield made
    finally:
        for g in made:
            g.close(keep=False)


SIP_LISTEN = (Endpoint(GW4, 5060), Endpoint(GW6, 5060))
SO_RCVBUFFORCE = 33  # asm-generic/socket.h (not in Python's socket module)


def new_guard(lab: Lab, guards: list[NftGuard], **kw: object) -> NftGuard:
    args: dict = {"port_min": 30000, "port_max": 30999, "grace": 0.0,
                  "sip_listen": SIP_LISTEN} | kw
    with in_netns(lab.gw):
        g = NftGuard([GW4, GW6], sip_rate=50, **args)
    guards.append(g)
    return g


def flow(host: str, port: int, timeout: float = 2.0) -> Flow:
    match = Endpoint(ip_address(host), port)
    other = Endpoint(GW6 if match.family == 4 else GW4, port)
    peer = Endpoint.parse("[2001:db8:6::2]:4000" if match.family == 4 else "203.0.113.2:4000")
    return Flow("s", match, other, peer, timeout)


def udp(ns: str, family: int, bind: str | None = None) -> socket.socket:
    with in_netns(ns):
        s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    if bind is not None:
        ep = Endpoint.parse(bind)
        s.bind((str(ep.host), ep.port))
    s.settimeout(0.3)
    return s


def drain(sock: socket.socket) -> list[tuple[str, int]]:
    """Sources of the datagrams waiting on ``sock`` (waits 0.3 s for the last)."""
    sources = []
    try:
        while True:
            sources.append(sock.recvfrom(2048)[1][:2])
    except TimeoutError:
        return sources


def received(sock: socket.socket) -> int:
    return len(drain(sock))


def test_check_nft_passes() -> None:
    assert all(ok for _what, ok, _detail in check_nft())


def test_table_has_sets_counters_and_input_chain(lab: Lab, guards: list) -> None:
    new_guard(lab, guards)
    objs = nft_json(lab, "list", "table", "inet", "xlat")["nftables"]
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}
    assert sets["relay4"]["type"] == ["ipv4_addr", "inet_service"]
    assert sets["relay6"]["type"] == ["ipv6_addr", "inet_service"]
    assert "timeout" in sets["relay4"]["flags"] and "timeout" in sets["relay6"]["flags"]
    (chain,) = (o["chain"] for o in objs if "chain" in o)
    assert (chain["hook"], chain["prio"]) == ("input", -10)
    counters = {o["counter"]["name"] for o in objs if "counter" in o}
    assert counters == {"to_stack", "unallocated", "sip_rate_limited", "sip_strangers_limited"}


def test_install_sets_timeouts_and_remove_tolerates_missing(lab: Lab, guards: list) -> None:
    g = new_guard(lab, guards, grace=5.0)
    g.install([flow("203.0.113.1", 30000, 60), flow("2001:db8:6::1", 30002, 10.5)])
    (set4,) = (
        o["set"]
        for o in nft_json(lab, "list", "set", "inet", "xlat", "relay4")["nftables"]
        if "set" in o
    )
    (elem,) = set4["elem"]
    assert elem["elem"]["val"]["concat"] == ["203.0.113.1", 30000]
    assert elem["elem"]["timeout"] == 65
    assert g.elements(6)[Endpoint.parse("[2001:db8:6::1]:30002")][0] == 16  # 15.5 rounded up
    g.remove([Endpoint.parse("203.0.113.1:30000"), Endpoint.parse("203.0.113.1:30004")])
    gone = Endpoint.parse("203.0.113.1:30000")
    g.remove([gone, gone])  # already gone, twice in a batch: not an error
    g.refresh([flow("2001:db8:6::1", 30002, 10.5)] * 2)
    assert g.elements(4) == {}
    assert list(g.elements(6)) == [Endpoint.parse("[2001:db8:6::1]:30002")]


def test_unallocated_port_dropped_allocated_port_admitted(lab: Lab, guards: list) -> None:
    g = new_guard(lab, guards)
    g.install([flow("203.0.113.1", 30000, 60)])
    # sockets on both ports: only nft can keep a datagram from the unallocated one
    with (
        udp(lab.gw, 4, "203.0.113.1:30000") as open_,
        udp(lab.gw, 4, "203.0.113.1:30002") as shut,
        udp(lab.v4, 4) as host,
    ):
        for _ in range(3):
            host.sendto(b"rtp", ("203.0.113.1", 30000))
            host.sendto(b"rtp!", ("203.0.113.1", 30002))
        host.sendto(b"outside", ("203.0.113.1", 31000))  # outside the range: not ours
        assert received(open_) == 3
        assert received(shut) == 0
    drops = g.drops()
    assert (drops["unallocated"].packets, drops["unallocated"].bytes) == (3, 3 * (20 + 8 + 4))
    assert g.named_counters()["to_stack"].packets == 3
    assert g.counters() == {}


def test_elements_expire_and_refresh_extends_deadline(lab: Lab, guards: list) -> None:
    g = new_guard(lab, guards)
    left, kept = flow("203.0.113.1", 30000, 2.0), flow("203.0.113.1", 30002, 2.0)
    t0 = time.monotonic()
    g.install([left, kept])
    time.sleep(1.2)
    before = g.elements(4)[kept.match][1]
    g.refresh([kept])
    after = g.elements(4)[kept.match][1]
    print(f"\nexpires before refresh {before}s, after {after}s")
    assert after > before
    time.sleep(max(0.0, t0 + 2.6 - time.monotonic()))  # past the first deadline
    assert list(g.elements(4)) == [kept.match]
    deadline = time.monotonic() + 3.0
    while g.elements(4) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert g.elements(4) == {}
    print(f"refreshed element gone {time.monotonic() - t0:.1f}s after install")
    with udp(lab.v4, 4) as host:
        host.sendto(b"late", ("203.0.113.1", 30002))
    time.sleep(0.1)
    assert g.drops()["unallocated"].packets == 1


def test_sip_flood_cut_per_source(lab: Lab, guards: list) -> None:
    g = new_guard(lab, guards)  # 50 packets/s per source
    senders = {
        "flood4": (lab.v4, 4, "203.0.113.2:0"),
        "flood6": (lab.v6, 6, "[2001:db8:6::2]:0"),
        "calm4": (lab.v4, 4, "203.0.113.3:0"),  # another IPv4 source: its own budget
        "same64": (lab.v6, 6, "[2001:db8:6::3]:0"),  # same /64 as flood6: shares it
    }
    with (
        udp(lab.gw, 4, "203.0.113.1:5060") as sip4,
        udp(lab.gw, 6, "[2001:db8:6::1]:5060") as sip6,
    ):
        socks = {name: udp(*args) for name, args in senders.items()}
        try:
            for _ in range(500):
                socks["flood4"].sendto(b"OPTIONS", ("203.0.113.1", 5060))
                socks["flood6"].sendto(b"OPTIONS", ("2001:db8:6::1", 5060))
            for _ in range(3):
                socks["calm4"].sendto(b"INVITE", ("203.0.113.1", 5060))
                socks["same64"].sendto(b"INVITE", ("2001:db8:6::1", 5060))
            got = {name: 0 for name in senders}
            by_addr = {s.getsockname()[:2]: name for name, s in socks.items()}
            for server in (sip4, sip6):
                for source in drain(server):
                    got[by_addr[source]] += 1
        finally:
            for sock in socks.values():
                sock.close()
    print(f"\nSIP flood, packets through: {got}")
    assert 0 < got["flood4"] < 100 and 0 < got["flood6"] < 100
    assert got["calm4"] == 3
    assert got["same64"] == 0
    assert g.drops()["sip_rate_limited"].packets == 1006 - sum(got.values())


def test_trusted_sources_and_other_ports_are_not_limited(lab: Lab, guards: list) -> None:
    trusted = ip_network("203.0.113.2/32")  # a trunk
    g = new_guard(lab, guards, trusted=[trusted], sip_listen=[Endpoint(GW4, 5060)])
    with (
        udp(lab.gw, 4, "203.0.113.1:5060") as sip,
        udp(lab.gw, 4, "203.0.113.1:5070") as other,  # not a SIP listen address
        udp(lab.v4, 4, "203.0.113.2:0") as trunk,
        udp(lab.v4, 4, "203.0.113.3:0") as stranger,
    ):
        for sock in (sip, other):  # room for every datagram: nothing lost but to nft
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 22)
        for i in range(400):
            trunk.sendto(b"INVITE", ("203.0.113.1", 5060))
            stranger.sendto(b"INVITE", ("203.0.113.1", 5060))
            stranger.sendto(b"not SIP", ("203.0.113.1", 5070))
            if i % 50 == 49:  # stay under the receive queue
                time.sleep(0.01)
        sources = drain(sip)
        assert received(other) == 400
        got = {"trunk": sources.count(trunk.getsockname()[:2]),
               "stranger": sources.count(stranger.getsockname()[:2])}
    print(f"\nSIP through: {got}")
    assert got["trunk"] == 400
    assert 0 < got["stranger"] < 100
    assert g.drops()["sip_rate_limited"].packets == 400 - got["stranger"]


def test_strangers_share_one_rate_and_known_peers_are_spared(lab: Lab, guards: list) -> None:
    """40 strangers each at the per-source rate (50/s) for a second: together they get
    the strangers' shared rate (10 x 50/s, burst 500); a peer told with ``know`` gets
    through in full, as a route target's or a callee's replies must."""
    from bench.junk import add_sources

    g = new_guard(lab, guards, sip_listen=[Endpoint(GW4, 5060)])
    peer = "203.0.113.3"
    g.know([ip_address(peer)])
    (peers4,) = (o["set"] for o in nft_json(lab, "list", "set", "inet", "xlat",
                                              "peers4")["nftables"] if "set" in o)
    assert [e["elem"]["val"] for e in peers4["elem"]] == [peer]
    with udp(lab.gw, 4, "203.0.113.1:5060") as sip:
        sip.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 24)
        strangers = [udp(lab.v4, 4, f"{a}:0") for a in add_sources(lab, 40)]
        known = udp(lab.v4, 4, f"{peer}:0")
        known_port = known.getsockname()[1]
        try:
            for _ in range(50):  # 50 rounds in ~1 s: every source at 50/s
                for sock in strangers:
                    sock.sendto(b"junk", ("203.0.113.1", 5060))
                known.sendto(b"SIP/2.0 200 OK", ("203.0.113.1", 5060))
                time.sleep(0.02)
            sources = drain(sip)
        finally:
            for sock in [*strangers, known]:
                sock.close()
    through_known = sources.count((peer, known_port))
    through_strangers = len(sources) - through_known
    drops = g.drops()
    print(f"\nthrough: known peer {through_known}/50, strangers {through_strangers}/2000; "
          f"drops {drops}")
    assert through_known == 50
    assert through_strangers <= 500 + 10 * 50 * 1.5  # burst + the rate for ~1.5 s
    assert drops["sip_strangers_limited"].packets == 2000 - through_strangers \
        - drops["sip_rate_limited"].packets
    assert drops["sip_strangers_limited"].packets >= 500


def test_close_deletes_table_keep_leaves_it(lab: Lab, guards: list) -> None:
    g = new_guard(lab, guards)
    g.close(keep=True)
    assert any("table" in o for o in nft_json(lab, "list", "tables")["nftables"])
    g.close(keep=False)
    assert not any("table" in o for o in nft_json(lab, "list", "tables")["nftables"])
    with pytest.raises(NftError, match="No such file or directory"):
        g.install([flow("203.0.113.1", 30000)])


def test_adopting_leftover_table_keeps_elements(lab: Lab, guards: list) -> None:
    crashed = new_guard(lab, guards)
    crashed.install([flow("203.0.113.1", 30000, 60), flow("2001:db8:6::1", 30000, 60)])
    adopted = new_guard(lab, guards, port_min=40000, port_max=40999)
    assert list(adopted.elements(4)) == [Endpoint.parse("203.0.113.1:30000")]
    assert list(adopted.elements(6)) == [Endpoint.parse("[2001:db8:6::1]:30000")]
    rules = [
        o
        for o in nft_json(lab, "list", "chain", "inet", "xlat", "input")["nftables"]
        if "rule" in o
    ]
    assert len(rules) == 8  # replaced, not appended
    ports = nft_json(lab, "list", "set", "inet", "xlat", "relay_ports")["nftables"]
    (relay_ports,) = (o["set"]["elem"] for o in ports if "set" in o)
    assert relay_ports == [{"range": [40000, 40999]}]


def test_10k_elements_in_one_transaction(lab: Lab, guards: list) -> None:
    g = new_guard(lab, guards)
    flows = [flow("203.0.113.1", 20000 + i, 60) for i in range(5000)]
    flows += [flow("2001:db8:6::1", 20000 + i, 60) for i in range(5000)]
    t = time.monotonic()
    g.install(flows)
    took_install = time.monotonic() - t
    t = time.monotonic()
    g.refresh(flows)
    took_refresh = time.monotonic() - t
    print(f"\n10k elements: install {took_install:.3f}s, refresh {took_refresh:.3f}s")
    assert len(g.elements(4)) == 5000 and len(g.elements(6)) == 5000
