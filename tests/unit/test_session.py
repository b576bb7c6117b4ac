"""The media session state machine, driven with a hand-stepped clock."""

import random
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address

import pytest

from xlat.addr import Endpoint
from xlat.media.datapath import FakeDatapath, FlowCounters, Latch
from xlat.media.ports import PortsExhausted, RelayPortPool
from xlat.media.session import SessionManager, SessionNotFound, StreamMismatch, StreamSpec

GW4 = IPv4Address("203.0.113.1")
GW6 = IPv6Address("2001:db8:6::1")
A6 = Endpoint.parse("[2001:db8:6::2]:4000")
B4 = Endpoint.parse("203.0.113.2:5000")


def one(relays: list[Endpoint | None]) -> Endpoint:
    """The relay of a one-stream offer or answer (not rejected)."""
    (relay,) = relays
    assert relay is not None
    return relay


def make(ports: int = 999, **kw: object) -> tuple[SessionManager, FakeDatapath]:
    mgr = SessionManager(
        {4: RelayPortPool(GW4, 30000, 30000 + ports), 6: RelayPortPool(GW6, 30000, 30000 + ports)},
        rng=random.Random(1), **kw,  # type: ignore[arg-type]
    )
    dp = FakeDatapath()

    def apply() -> None:
        batch = mgr.drain()
        dp.remove(batch.remove)
        dp.install(batch.install)
        dp.refresh(batch.refresh)

    mgr.on_change = apply
    return mgr, dp


def test_offer_answer_installs_four_flows_across_families() -> None:
    mgr, dp = make()
    relay_b = one(mgr.offer("c1", "ta", [StreamSpec(A6)], toward=4, now=0.0))
    assert relay_b is not None and relay_b.family == 4
    # before the answer only B -> A can flow (early media)
    assert {f.match for f in dp.flows.values()} == {relay_b, Endpoint(GW4, relay_b.port + 1)}
    relay_a = one(mgr.answer("c1", "ta", "tb", [StreamSpec(B4)], now=1.0))
    assert relay_a is not None and relay_a.family == 6
    rtp_ab = dp.flows[relay_a]
    assert (rtp_ab.source, rtp_ab.to, rtp_ab.reverse) == (relay_b, B4, relay_b)
    rtcp_ba = dp.flows[Endpoint(GW4, relay_b.port + 1)]
    assert rtcp_ba.to == Endpoint(A6.host, A6.port + 1)
    assert len(dp.flows) == 4


def test_repeated_offer_returns_same_relays_and_reinvite_keeps_ports() -> None:
    mgr, dp = make()
    first = mgr.offer("c1", "ta", [StreamSpec(A6)], toward=4, now=0.0)
    assert mgr.offer("c1", "ta", [StreamSpec(A6)], toward=4, now=0.5) == first
    relay_a = one(mgr.answer("c1", "ta", "tb", [StreamSpec(B4)], now=1.0))
    # re-INVITE from the callee (its tag now the from-tag) puts A on hold
    hold = Endpoint.parse("0.0.0.0:5000")
    again = mgr.offer("c1", "tb", [StreamSpec(hold)], toward=6, now=2.0)
    assert again == [relay_a]
    assert relay_a not in dp.flows  # nothing sent to a party on hold
    mgr.answer("c1", "tb", "ta", [StreamSpec(A6)], now=3.0)
    mgr.offer("c1", "tb", [StreamSpec(B4)], toward=6, now=4.0)
    assert dp.flows[relay_a].to == B4
    assert len(mgr.sessions()) == 1


def test_rejected_stream_and_rtcp_mux() -> None:
    mgr, dp = make()
    relays = mgr.offer("c", "a", [StreamSpec(A6, rtcp_mux=True), StreamSpec(None)], toward=4,
                       now=0.0)
    assert relays[1] is None
    mgr.answer("c", "a", "b", [StreamSpec(B4), StreamSpec(None)], now=0.0)
    assert relays[0] is not None
    assert dp.flows[Endpoint(GW4, relays[0].port + 1)].to == A6  # RTCP muxed onto RTP


def test_answer_without_offer_and_mismatched_answer() -> None:
    mgr, _ = make()
    with pytest.raises(SessionNotFound):
        mgr.answer("nope", "a", "b", [StreamSpec(B4)], now=0.0)
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    with pytest.raises(StreamMismatch):
        mgr.answer("c", "a", "b", [StreamSpec(B4), StreamSpec(B4)], now=0.0)


def test_fork_gets_its_own_offerer_leg_and_shares_answerer_leg() -> None:
    mgr, dp = make()
    relay_b = one(mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0))
    ra1 = one(mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=0.1))
    b2 = Endpoint.parse("203.0.113.3:6000")
    ra2 = one(mgr.answer("c", "a", "b2", [StreamSpec(b2)], now=0.2))
    assert ra1 != ra2 and len(mgr.find("c")) == 2
    assert dp.flows[ra1].to == B4 and dp.flows[ra2].to == b2
    assert dp.flows[relay_b].source == ra2  # the latest answer owns the shared leg
    assert mgr.flow_count == len(dp.flows) == 6
    mgr.delete("c", "a", "b2", now=1.0, delay=0)
    assert ra2 not in dp.flows and dp.flows[relay_b].source == ra1
    assert mgr.flow_count == len(dp.flows) == 4
    mgr.delete("c", now=2.0, delay=0)
    assert dp.flows == {} and mgr.sessions() == [] and mgr.flow_count == 0


def test_restored_fork_keeps_the_shared_relay_until_the_last_holder_ends() -> None:
    mgr, _ = make()
    relay_b = one(mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0))
    mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=0.1)
    mgr.answer("c", "a", "b2", [StreamSpec(Endpoint.parse("203.0.113.3:6000"))], now=0.2)
    mgr2, dp2 = make()
    flows = mgr2.restore(journaled(mgr), now=50.0)
    dp2.install(flows)
    pool4, pool6 = mgr2.pools[4][0], mgr2.pools[6][0]
    assert (pool4.in_use, pool6.in_use) == (1, 2) and mgr2.flow_count == len(dp2.flows) == 6
    mgr2.delete("c", "a", "b1", now=51.0, delay=0)
    assert relay_b is not None and pool4.owns(relay_b)  # b2 still holds it
    mgr2.delete("c", now=52.0, delay=0)
    assert (pool4.in_use, pool6.in_use) == (0, 0) and dp2.flows == {}


def test_delete_delay_keeps_flows_then_frees_ports() -> None:
    mgr, dp = make(ports=1, delete_delay=10.0)  # one pair per family
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b", [StreamSpec(B4)], now=0.0)
    assert mgr.delete("c", now=1.0)
    (s,) = mgr.sessions()
    assert s.state == "deleting" and len(dp.flows) == 4
    assert mgr.expire(10.9, dp.counters) == []
    assert [x.id for x in mgr.expire(11.0, dp.counters)] == [s.id]
    assert dp.flows == {}
    with pytest.raises(PortsExhausted):  # quarantined for 5 s
        mgr.offer("d", "a", [StreamSpec(A6)], toward=4, now=12.0)
    assert mgr.offer("d", "a", [StreamSpec(A6)], toward=4, now=16.0)[0] is not None
    assert not mgr.delete("unknown", now=0.0)


def test_exhaustion_leaks_nothing() -> None:
    mgr, _ = make(ports=1)
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    with pytest.raises(PortsExhausted):
        mgr.offer("d", "a", [StreamSpec(A6)], toward=4, now=0.0)
    assert [s.call_id for s in mgr.sessions()] == ["c"]
    assert mgr.pools[4][0].in_use == 1 and mgr.pools[6][0].in_use == 1


def test_reoffer_that_runs_out_of_ports_changes_nothing() -> None:
    mgr, dp = make(ports=1)  # one pair per family: the call holds both
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b", [StreamSpec(B4)], now=0.0)
    installed = dict(dp.flows)
    moved = Endpoint(A6.host, 6000)
    for streams in ([StreamSpec(None), StreamSpec(A6)], [StreamSpec(moved), StreamSpec(A6)]):
        with pytest.raises(PortsExhausted):  # the second stream finds no pair
            mgr.offer("c", "a", streams, toward=4, now=1.0)
        assert dp.flows == installed and mgr.flow_count == len(installed)
        assert len(mgr.sessions()) == 1
        assert mgr.pools[4][0].in_use == 1 and mgr.pools[6][0].in_use == 1
    mgr.offer("c", "a", [StreamSpec(moved)], toward=4, now=2.0)  # the retry that fits
    assert {f.to for f in dp.flows.values()} >= {moved}
    mgr.delete("c", now=3.0, delay=0)
    assert dp.flows == {} and mgr.flow_count == 0 and mgr.pools[4][0].in_use == 0


def test_fork_answer_that_fails_leaves_no_fork() -> None:
    mgr, dp = make(ports=1)
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b", [StreamSpec(B4)], now=0.0)
    installed = dict(dp.flows)
    with pytest.raises(StreamMismatch):
        mgr.answer("c", "a", "c2", [StreamSpec(B4), StreamSpec(B4)], now=1.0)
    with pytest.raises(PortsExhausted):  # a fork needs an offerer-facing pair: none left
        mgr.answer("c", "a", "c3", [StreamSpec(B4)], now=1.0)
    assert len(mgr.find("c")) == 1 and dp.flows == installed
    mgr.delete("c", "a", "b", now=2.0, delay=0)
    assert dp.flows == {} and mgr.flow_count == 0
    assert mgr.pools[4][0].in_use == 0 and mgr.pools[6][0].in_use == 0


def test_a_manual_relay_that_finds_no_ports_leaves_nothing() -> None:
    mgr, dp = make(ports=1)
    mgr.add(A6, B4, now=0.0)  # takes the only pair of each family
    with pytest.raises(PortsExhausted):
        mgr.add(A6, B4, now=1.0)
    assert len(mgr.sessions()) == 1 and mgr.ended["ports_exhausted"] == 1
    assert mgr.flow_count == len(dp.flows) == 4


def test_an_answer_from_the_callee_with_an_unknown_to_tag_forks_nothing() -> None:
    mgr, dp = make()
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b", [StreamSpec(B4)], now=0.0)
    with pytest.raises(SessionNotFound):
        mgr.answer("c", "b", "x", [StreamSpec(A6)], now=1.0)
    assert len(mgr.find("c")) == 1 and mgr.pools[4][0].in_use == 1
    assert mgr.flow_count == len(dp.flows) == 4


def test_expiry_retries_sessions_whose_counters_could_not_be_read() -> None:
    mgr, dp = make(idle_timeout=10.0)
    sessions = [mgr.add(A6, B4, now=0.0) for _ in range(3)]

    def broken(matches: Sequence[Endpoint]) -> Mapping[Endpoint, FlowCounters]:
        raise OSError("map lookup failed")

    with pytest.raises(OSError):
        mgr.expire(10.0, broken)
    assert mgr.expire(10.5, dp.counters) == []  # asked again a second later
    assert sorted(s.id for s in mgr.expire(11.0, dp.counters)) == sorted(s.id for s in sessions)


def test_expiry_mid_bucket_ends_what_is_due_without_spinning_on_the_rest() -> None:
    mgr, dp = make(idle_timeout=10.0)
    early = [mgr.add(A6, B4, now=0.01) for _ in range(5)]
    late = [mgr.add(A6, B4, now=0.08) for _ in range(5)]  # same 0.1 s bucket, due later
    ended, passes = mgr.expire(10.05, dp.counters, limit=3), 1
    while (deadline := mgr.next_deadline()) is not None and deadline <= 10.05:
        ended += mgr.expire(10.05, dp.counters, limit=3)  # more is due: the daemon goes on
        passes += 1
        assert passes <= 4, "a limited sweep keeps handing out what is not due"
    assert sorted(s.id for s in ended) == sorted(s.id for s in early)
    assert deadline is not None and deadline <= 10.08 + 2 * 0.1  # at most two buckets late
    assert sorted(s.id for s in mgr.expire(deadline, dp.counters)) == sorted(
        s.id for s in late)


def test_idle_expiry_asks_only_due_sessions_and_respects_traffic() -> None:
    mgr, dp = make(idle_timeout=30.0)
    s = mgr.add(A6, B4, now=0.0)
    other = mgr.add(A6, B4, now=20.0)
    asked: list[int] = []

    def lookup(matches: Sequence[Endpoint]) -> Mapping[Endpoint, FlowCounters]:
        asked.append(len(matches))
        return dp.counters(matches)

    legs = s.streams[0]
    assert legs is not None
    dp.stats[legs[0].relay] = FlowCounters(packets=3, bytes=300, last_seen=25.0)
    assert mgr.expire(30.0, lookup) == []
    assert asked == [4]  # only the due session was looked at
    assert [x.id for x in mgr.expire(54.9, lookup)] == [other.id]  # never saw a packet
    assert [x.id for x in mgr.expire(55.0, lookup)] == [s.id]  # 30 s after its last packet
    assert mgr.sessions() == [] and dp.flows == {}


def test_mass_expiry_is_spread_over_passes_with_one_lookup_each() -> None:
    mgr, dp = make(ports=99, idle_timeout=10.0)
    sessions = [mgr.add(A6, B4, now=0.0) for _ in range(20)]
    asked: list[int] = []

    def lookup(matches: Sequence[Endpoint]) -> Mapping[Endpoint, FlowCounters]:
        asked.append(len(matches))
        return dp.counters(matches)

    ended = mgr.expire(10.0, lookup, limit=8)
    assert len(ended) == 8 and asked == [8 * 4]
    deadline = mgr.next_deadline()
    assert deadline is not None and deadline <= 10.0  # the rest is due already
    ended += mgr.expire(10.0, lookup, limit=8) + mgr.expire(10.0, lookup, limit=8)
    assert sorted(s.id for s in ended) == sorted(s.id for s in sessions)
    assert asked == [32, 32, 16]
    assert mgr.next_deadline() is None and mgr.flow_count == 0 and dp.flows == {}


def test_flush_ends_everything_and_frees_every_port() -> None:
    mgr, dp = make()
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=0.1)
    mgr.answer("c", "a", "b2", [StreamSpec(Endpoint.parse("203.0.113.3:6000"))], now=0.2)
    mgr.add(A6, B4, now=0.3)
    assert mgr.flush(now=1.0) == 3
    assert mgr.sessions() == [] and mgr.find("c") == [] and dp.flows == {}
    assert mgr.pools[4][0].in_use == 0 and mgr.pools[6][0].in_use == 0
    assert mgr.flow_count == 0 and mgr.next_deadline() is None
    assert mgr.ended["flushed"] == 3
    mgr.add(A6, B4, now=10.0)  # the manager goes on as new
    assert len(dp.flows) == 4 and mgr.flow_count == 4


def test_lifetime_caps_a_busy_session() -> None:
    mgr, dp = make()
    s = mgr.add(A6, B4, now=0.0, idle_timeout=60, lifetime=5.0)
    assert [x.id for x in mgr.expire(5.0, dp.counters)] == [s.id]


def test_manual_session_describe_matches_cli_contract() -> None:
    mgr, dp = make()
    s = mgr.add(A6, B4, now=0.0)
    d = s.describe(now=1.0)
    legs = d["legs"]
    assert isinstance(legs, list)
    assert legs[0]["peer"] == str(A6) and legs[0]["relay"].startswith("[2001:db8:6::1]:")
    assert legs[1]["peer"] == str(B4) and legs[1]["relay"].startswith("203.0.113.1:")
    assert d["state"] == "active" and d["id"] == s.id
    mgr.remove(s.id, now=1.0)
    assert dp.flows == {}
    with pytest.raises(SessionNotFound):
        mgr.remove(s.id, now=1.0)


def test_strict_latch_expects_negotiated_sources() -> None:
    mgr, dp = make(latch=Latch.STRICT)
    s = mgr.add(A6, B4, now=0.0)
    legs = s.streams[0]
    assert legs is not None
    assert dp.flows[legs[0].relay].expect == A6
    assert dp.flows[legs[1].relay].latch is Latch.STRICT


def test_nat64_offerer_leg_learns_its_peer() -> None:
    mgr, dp = make()
    relay_b = one(mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0, offerer_family=4))
    flow = dp.flows[relay_b]
    assert flow.to.port == 0 and flow.to.family == 4 and flow.latch is Latch.LEARN
    relay_a = one(mgr.answer("c", "a", "b", [StreamSpec(B4)], now=0.0))
    assert relay_a is not None and relay_a.family == 4


def journaled(mgr: SessionManager) -> list[dict[str, object]]:
    """The records a journal holds for ``mgr``'s live sessions."""
    return [r for _, r in mgr.drain_records() if r is not None]


def test_records_restore_sessions_ports_and_flows_without_queueing_them() -> None:
    mgr, dp = make(delete_delay=5.0)
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b", [StreamSpec(B4)], now=1.0)
    manual = mgr.add(A6, B4, now=2.0, idle_timeout=30, lifetime=100)
    mgr.delete("c", now=3.0)
    data = journaled(mgr)
    assert len(data) == 2

    mgr2, dp2 = make(delete_delay=5.0)
    flows = mgr2.restore(data, now=1000.0, shift=996.0)  # a reboot: times move with it
    assert dp2.flows == {} and mgr2.drain().install == []  # the caller installs what lacks
    assert {f.match for f in flows} == dp.flows.keys() and mgr2.flow_count == 8
    dp2.install(flows)
    restored = mgr2.get(manual.id)
    assert restored.created == 998.0 and restored.lifetime == 100
    assert mgr2.pools[4][0].in_use == 2 and mgr2.pools[6][0].in_use == 2
    # the deleting call still ends 5 s after its BYE, on the new clock
    assert [s.call_id for s in mgr2.expire(1003.9, dp2.counters)] == []
    assert [s.call_id for s in mgr2.expire(1004.0, dp2.counters)] == ["c"]
    assert dp2.flows.keys() == {f.match for f in flows if f.session == manual.id}
    # new allocations do not collide with restored ones
    relays = mgr2.offer("d", "a", [StreamSpec(A6)], toward=4, now=1005.0)
    assert relays[0] not in {lg.relay for lg in restored.legs()}


def test_drain_records_gives_each_changed_session_once_and_ended_ones_as_none() -> None:
    mgr, _ = make()
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    (sid, rec), = mgr.drain_records()
    assert rec is not None and rec["id"] == sid and rec["tags"] == ["a", None]
    assert mgr.drain_records() == []
    mgr.answer("c", "a", "b", [StreamSpec(B4)], now=1.0)
    mgr.delete("c", now=2.0)  # a delete delay only changes the state: journaled too
    ((_, rec),) = mgr.drain_records()
    assert rec is not None and rec["tags"] == ["a", "b"] and rec["state"] == "deleting"
    mgr.expire(100.0, lambda m: {})
    assert mgr.drain_records() == [(sid, None)]


def test_a_bad_record_is_skipped_and_claims_no_port() -> None:
    mgr, _ = make()
    mgr.add(A6, B4, now=0.0)
    good = journaled(mgr)[0]
    bad = dict(good, id="bad", streams=[[good["streams"][0][0], ["nonsense", None, None, 0]]])
    mgr2, _ = make()
    flows = mgr2.restore([bad, good], now=0.0)
    assert [s.id for s in mgr2.sessions()] == [good["id"]] and len(flows) == 4
    assert mgr2.pools[4][0].in_use == 1 and mgr2.pools[6][0].in_use == 1


def test_stream_rejected_by_the_answer_is_released() -> None:
    mgr, dp = make()
    mgr.offer("c", "a", [StreamSpec(A6), StreamSpec(Endpoint.parse("[2001:db8:6::2]:4002"))],
              toward=4, now=0.0)
    relays = mgr.answer("c", "a", "b", [StreamSpec(B4), StreamSpec(None)], now=0.0)
    assert relays[0] is not None and relays[1] is None
    assert mgr.pools[4][0].in_use == 1 and len(dp.flows) == 4
