"""The media model (xlat/media/model.py): the session state table, and forks as
parties of one call."""

import itertools
import random
from ipaddress import IPv4Address, IPv6Address

import pytest

from xlat.addr import Endpoint
from xlat.media.datapath import FakeDatapath
from xlat.media.model import TRANSITIONS, Call, Event, MediaSession, Party, SessionStateError, State
from xlat.media.ports import RelayPortPool
from xlat.media.session import SessionManager, StreamSpec

A6 = Endpoint.parse("[2001:db8:6::2]:4000")
B4 = Endpoint.parse("203.0.113.2:5000")
C4 = Endpoint.parse("203.0.113.3:6000")

# The table as the lifecycle means it: what each state takes, and where it goes.
EXPECTED = {
    State.ACTIVE: {Event.OFFER: State.ACTIVE, Event.ANSWER: State.ACTIVE,
                   Event.MEDIA: State.ACTIVE, Event.DELETE: State.DELETING,
                   Event.DELETED: State.ENDED, Event.IDLE: State.ENDED,
                   Event.LIFETIME: State.ENDED, Event.REMOVED: State.ENDED,
                   Event.FLUSHED: State.ENDED, Event.PORTS_EXHAUSTED: State.ENDED},
    # deleted: re-INVITEs and answers still taken, a second delete moves nothing;
    # idleness, lifetime and a failed allocation do not apply
    State.DELETING: {Event.OFFER: State.DELETING, Event.ANSWER: State.DELETING,
                     Event.DELETE: State.DELETING, Event.DELETED: State.ENDED,
                     Event.REMOVED: State.ENDED, Event.FLUSHED: State.ENDED},
    State.ENDED: {},  # nothing happens to an ended session
}


def bare(state: State) -> MediaSession:
    call = Call("c", [])
    session = MediaSession(id="s", origin="sip", call=call,
                           parties=(Party("a", 6, []), Party(None, 4, [])),
                           idle_timeout=60.0, lifetime=None, created=0.0, activity=0.0,
                           state=state)
    call.sessions.append(session)
    return session


@pytest.mark.parametrize(("state", "event"), list(itertools.product(State, Event)))
def test_every_state_and_event(state: State, event: Event) -> None:
    session = bare(state)
    want = EXPECTED[state].get(event)
    if want is None:
        with pytest.raises(SessionStateError) as err:
            session.handle(event)
        assert (err.value.state, err.value.event) == (state, event)
        assert str(err.value) == f"{event.value} is illegal in session state {state.value}"
        assert session.state is state  # unchanged
    else:
        assert session.handle(event) is want and session.state is want


def test_the_table_holds_exactly_the_expected_moves() -> None:
    assert {(s, e): to for s, moves in EXPECTED.items() for e, to in moves.items()} == TRANSITIONS


def make() -> tuple[SessionManager, FakeDatapath]:
    mgr = SessionManager({4: RelayPortPool(IPv4Address("203.0.113.1"), 30000, 30100),
                          6: RelayPortPool(IPv6Address("2001:db8:6::1"), 30000, 30100)},
                         rng=random.Random(7))
    dp = FakeDatapath()

    def apply() -> None:
        batch = mgr.drain()
        dp.remove(batch.remove)
        dp.install(batch.install)

    mgr.on_change = apply
    return mgr, dp


def test_forks_are_parties_sharing_the_offerer() -> None:
    mgr, dp = make()
    (shown_to_callees,) = mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=0.1)
    mgr.answer("c", "a", "b2", [StreamSpec(C4)], now=0.2)
    first, second = mgr.find("c")  # in answer order
    assert (first.tags, second.tags) == (("a", "b1"), ("a", "b2"))
    # one offerer party: its stand-in, what every callee was shown, is one relay
    assert first.parties[0] is second.parties[0]
    assert first.stand_ins(0) == second.stand_ins(0) == [shown_to_callees]
    # each callee a party of its own, with its own stand-in shown to the caller
    assert first.parties[1] is not second.parties[1]
    assert first.stand_ins(1) != second.stand_ins(1)
    assert (mgr.pools[4][0].in_use, mgr.pools[6][0].in_use) == (1, 2)
    assert mgr.family_of("c", "a") == 6 and mgr.family_of("c", "b2") == 4
    # the latest answer owns the flow towards the caller
    assert dp.flows[shown_to_callees].to == A6 and dp.flows[shown_to_callees].source == (
        second.stand_ins(1)[0])
    # a re-INVITE answered by b1 makes b1 the latest
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=1.0, to_tag="b1")
    mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=1.1)
    assert mgr.find("c") == [second, first]
    assert dp.flows[shown_to_callees].source == first.stand_ins(1)[0]
    records = {r["id"]: r for _, r in mgr.drain_records() if r is not None}
    assert (records[second.id]["answered"], records[first.id]["answered"]) == (0, 1)
    # the fork that ends takes its own relay along; the caller's stays with the other
    mgr.delete("c", "a", "b1", now=2.0, delay=0)
    assert (mgr.pools[4][0].in_use, mgr.pools[6][0].in_use) == (1, 1)
    assert dp.flows[shown_to_callees].source == second.stand_ins(1)[0]
    mgr.delete("c", now=3.0, delay=0)
    assert (mgr.pools[4][0].in_use, mgr.pools[6][0].in_use) == (0, 0) and dp.flows == {}


def test_restored_forks_share_one_offerer_party_again() -> None:
    mgr, _ = make()
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=0.1)
    mgr.answer("c", "a", "b2", [StreamSpec(C4)], now=0.2)
    records = [r for _, r in mgr.drain_records() if r is not None]
    again, _ = make()
    flows = again.restore(reversed(records), now=10.0)  # journal order says nothing
    first, second = again.find("c")
    assert (first.tags, second.tags) == (("a", "b1"), ("a", "b2"))
    assert first.parties[0] is second.parties[0]
    assert {f.match: f for f in flows} == {
        f.match: f for s in mgr.find("c") for f in mgr.flows(s)}
    assert (again.pools[4][0].in_use, again.pools[6][0].in_use) == (1, 2)


def test_query_reports_each_party_of_a_forked_call() -> None:
    mgr, _ = make()
    mgr.offer("c", "a", [StreamSpec(A6)], toward=4, now=0.0)
    mgr.answer("c", "a", "b1", [StreamSpec(B4)], now=0.1)
    mgr.answer("c", "a", "b2", [StreamSpec(C4)], now=0.2)
    info = mgr.query("c", None, None, None)
    tags = info["tags"]
    assert isinstance(tags, dict) and set(tags) == {"a", "b1", "b2"}
    assert tags["a"]["in dialogue with"] == "b2"  # the latest answer
    (media,) = tags["b1"]["medias"]
    rtp, rtcp = media["streams"]
    assert rtp["advertised endpoint"] == {"family": "IPv4", "address": "203.0.113.2",
                                          "port": 5000}
    assert rtcp["advertised endpoint"]["port"] == 5001
    # the local port b1 sends to is the caller's stand-in, what b1 was shown
    (caller_stand_in,) = mgr.find("c", "a", "b1")[0].stand_ins(0)
    assert (rtp["local address"], rtp["local port"]) == (str(caller_stand_in.host),
                                                         caller_stand_in.port)
