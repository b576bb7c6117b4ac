"""RelayCore: the userspace relay's decisions, time stepped by hand."""

from __future__ import annotations

import pytest

from xlat.addr import Endpoint
from xlat.media.datapath import Flow, Latch
from xlat.media.userspace import DropReason, Forward, RelayCore


def ep(text: str) -> Endpoint:
    return Endpoint.parse(text)


RELAY6 = ep("[2001:db8:6::1]:30000")  # faces the v6 phone
RELAY4 = ep("203.0.113.1:30000")  # faces the v4 phone
PHONE6 = ep("[2001:db8:6::2]:4000")
PHONE4 = ep("203.0.113.2:5000")
NAT4 = ep("203.0.113.3:6000")  # where the v4 phone's media really comes from


def pair(
    latch: Latch = Latch.LEARN, timeout: float = 60.0, rate: int = 0, to4: Endpoint = PHONE4
) -> tuple[Flow, Flow]:
    """v6 -> v4 and v4 -> v6 flows of one RTP stream."""
    down = Flow(
        "s1",
        RELAY6,
        RELAY4,
        to4,
        timeout,
        latch,
        reverse=RELAY4,
        expect=PHONE6,
        rate_limit_pps=rate,
    )
    up = Flow(
        "s1",
        RELAY4,
        RELAY6,
        PHONE6,
        timeout,
        latch,
        reverse=RELAY6,
        expect=to4,
        rate_limit_pps=rate,
    )
    return down, up


def test_forwards_both_ways_and_counts() -> None:
    core = RelayCore()
    core.install(pair(), now=0.0)
    assert core.receive(RELAY6, PHONE6, 172, now=1.0) == Forward(RELAY4, PHONE4)
    assert core.receive(RELAY4, PHONE4, 100, now=1.5) == Forward(RELAY6, PHONE6)
    assert core.receive(RELAY6, PHONE6, 28, now=2.0) == Forward(RELAY4, PHONE4)
    down = core.counters()[RELAY6]
    assert (down.packets, down.bytes, down.last_seen, down.to) == (2, 200, 2.0, PHONE4)
    assert core.drops() == {}


def test_unknown_match_is_unallocated() -> None:
    core = RelayCore()
    assert core.receive(RELAY6, PHONE6, 10, now=0.0) is DropReason.UNALLOCATED
    assert core.drops()["unallocated"].bytes == 10


def test_learn_latches_reverse_flow_once() -> None:
    core = RelayCore()
    core.install(pair(), now=0.0)
    # the v4 phone is behind a NAT: its media comes from NAT4, not the SDP's PHONE4
    assert core.receive(RELAY4, NAT4, 50, now=1.0) == Forward(RELAY6, PHONE6)
    assert core.receive(RELAY6, PHONE6, 50, now=1.1) == Forward(RELAY4, NAT4)
    assert core.counters()[RELAY6].to == NAT4
    # only the first packet latches
    core.receive(RELAY4, PHONE4, 50, now=1.2)
    assert core.receive(RELAY6, PHONE6, 50, now=1.3) == Forward(RELAY4, NAT4)


def test_learn_ignores_other_family_source() -> None:
    core = RelayCore()
    core.install(pair(), now=0.0)
    core.receive(RELAY4, PHONE6, 50, now=1.0)  # impossible on a v6only socket: not learnt
    assert core.counters()[RELAY6].to == PHONE4


def test_latch_off_never_learns() -> None:
    core = RelayCore()
    core.install(pair(Latch.OFF), now=0.0)
    core.receive(RELAY4, NAT4, 50, now=1.0)
    assert core.receive(RELAY6, PHONE6, 50, now=1.1) == Forward(RELAY4, PHONE4)


def test_no_peer_drops_but_still_latches_the_other_way() -> None:
    core = RelayCore()
    core.install(pair(to4=ep("0.0.0.0:0")), now=0.0)  # v4 peer unknown until it sends
    assert core.receive(RELAY6, PHONE6, 40, now=1.0) is DropReason.NO_PEER
    assert core.receive(RELAY4, NAT4, 40, now=1.5) == Forward(RELAY6, PHONE6)
    assert core.receive(RELAY6, PHONE6, 40, now=2.0) == Forward(RELAY4, NAT4)
    assert core.drops()["no_peer"].packets == 1


def test_strict_drops_other_sources() -> None:
    core = RelayCore()
    core.install(pair(Latch.STRICT), now=0.0)
    assert core.receive(RELAY4, NAT4, 60, now=1.0) is DropReason.STRICT_MISMATCH
    assert core.receive(RELAY4, PHONE4, 60, now=1.1) == Forward(RELAY6, PHONE6)
    assert core.receive(RELAY6, PHONE6, 60, now=1.2) == Forward(RELAY4, PHONE4)  # not learnt
    assert core.drops()["strict_mismatch"].packets == 1
    assert core.counters()[RELAY4].packets == 1


def test_idle_flow_expires_and_traffic_or_refresh_keeps_it() -> None:
    core = RelayCore()
    down, up = pair(timeout=2.0)
    core.install([down, up], now=10.0)
    assert isinstance(core.receive(RELAY6, PHONE6, 10, now=11.9), Forward)  # restarts timer
    assert isinstance(core.receive(RELAY6, PHONE6, 10, now=13.8), Forward)
    core.refresh([up], now=13.0)
    assert isinstance(core.receive(RELAY4, PHONE4, 10, now=14.9), Forward)
    assert core.receive(RELAY6, PHONE6, 10, now=15.9) is DropReason.EXPIRED
    assert core.receive(RELAY4, PHONE4, 10, now=17.0) is DropReason.EXPIRED
    assert core.drops()["expired"].packets == 2


def test_rate_limit_caps_packets_per_second() -> None:
    core = RelayCore()
    core.install(pair(rate=50), now=0.0)
    verdicts = [core.receive(RELAY6, PHONE6, 10, now=0.001 * i) for i in range(100)]
    forwarded = sum(isinstance(v, Forward) for v in verdicts)
    assert 50 <= forwarded <= 55  # one second's burst, refilled by 50/s over 0.1 s
    assert core.drops()["rate_limited"].packets == 100 - forwarded
    # after a quiet second the bucket is full again
    assert isinstance(core.receive(RELAY6, PHONE6, 10, now=2.0), Forward)


@pytest.mark.parametrize("same", [True, False])
def test_reinstall_keeps_counters_and_latch_only_if_unchanged(same: bool) -> None:
    core = RelayCore()
    down, up = pair()
    core.install([down, up], now=0.0)
    core.receive(RELAY4, NAT4, 10, now=1.0)
    core.receive(RELAY6, PHONE6, 10, now=1.1)
    new_peer = ep("203.0.113.2:5002")
    again = down if same else Flow("s1", RELAY6, RELAY4, new_peer, 60.0, reverse=RELAY4)
    core.install([again], now=2.0)
    counters = core.counters()[RELAY6]
    assert counters.packets == 1
    assert counters.to == (NAT4 if same else new_peer)


def test_remove_and_endpoints() -> None:
    core = RelayCore()
    down, up = pair()
    core.install([down, up], now=0.0)
    assert core.endpoints() == {RELAY6, RELAY4}
    core.remove([RELAY6, ep("192.0.2.9:1")])
    assert core.endpoints() == {RELAY4, RELAY6}  # RELAY6 is still ``up``'s source
    assert core.receive(RELAY6, PHONE6, 10, now=1.0) is DropReason.UNALLOCATED
    core.remove([RELAY4])
    assert core.endpoints() == set()
    assert core.counters() == {}


def test_replacing_a_flow_binds_nothing_new_and_frees_an_old_source() -> None:
    core = RelayCore()
    down, up = pair()
    assert sorted(map(str, core.install([down, up], now=0.0)[0])) == sorted(
        map(str, (RELAY6, RELAY4)))
    assert core.install([pair(to4=NAT4)[0]], now=1.0) == ([], [])  # same sockets
    other = ep("203.0.113.1:30002")
    moved = Flow("s1", RELAY6, other, PHONE4, 60.0, reverse=RELAY4)
    assert core.install([moved], now=2.0) == ([other], [])  # RELAY4 still matches ``up``
    assert core.remove([RELAY4]) == [RELAY4]
    assert core.endpoints() == {RELAY6, other}


def test_an_endpoint_freed_and_reused_in_one_batch_is_neither_bound_nor_closed() -> None:
    core = RelayCore()
    m1, m2 = ep("[2001:db8:6::1]:30000"), ep("[2001:db8:6::1]:30002")
    e, e2 = ep("203.0.113.1:30000"), ep("203.0.113.1:30002")
    core.install([Flow("s1", m1, e, PHONE4, 60.0)], now=0.0)
    # one batch: the flow at m1 moves off e, and a new flow at m2 sends from e
    bind, close = core.install([Flow("s1", m1, e2, PHONE4, 60.0),
                                Flow("s2", m2, e, PHONE4, 60.0)], now=1.0)
    assert sorted(map(str, bind)) == sorted(map(str, (e2, m2)))  # e's socket stays bound
    assert close == []
