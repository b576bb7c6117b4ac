"""RFC 3261 §17 transactions (with RFC 6026 Accepted), driven with a fake clock."""

from __future__ import annotations

import pytest

from xlat.sip.transaction import (
    ENTRY_TIMERS,
    INITIAL,
    TRANSITIONS,
    Deliver,
    Event,
    Kind,
    State,
    Timeout,
    Timers,
    Transaction,
    TransactionError,
    Transmit,
    TransportFailure,
)

REQUEST = b"INVITE sip:bob@203.0.113.2 SIP/2.0\r\n\r\n"


def fire_all(txn: Transaction, until: float) -> list[tuple[float, object]]:
    """Run every timer up to ``until``; (time, action) for each action."""
    out: list[tuple[float, object]] = []
    while (when := txn.next_deadline()) is not None and when <= until:
        out += [(when, a) for a in txn.handle_timer(when)]
    return out


def test_invite_client_retransmits_doubling_then_times_out_at_64_t1() -> None:
    txn = Transaction(Kind.INVITE_CLIENT, REQUEST, reliable=False)
    assert txn.start(0.0) == [Transmit(REQUEST)]
    events = fire_all(txn, 100.0)
    resends = [t for t, a in events if a == Transmit(REQUEST)]
    assert resends == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # timer A: T1, 2T1, 4T1, ...
    assert events[-1] == (32.0, Timeout())  # timer B = 64*T1
    assert txn.terminated and txn.next_deadline() is None


def test_reliable_transport_never_retransmits_and_skips_wait_states() -> None:
    txn = Transaction(Kind.NON_INVITE_CLIENT, REQUEST, reliable=True)
    txn.start(0.0)
    assert txn.next_deadline() == 32.0  # only timer F
    assert txn.receive_response(200, "ok", 1.0) == [Deliver("ok")]
    assert txn.state is State.COMPLETED and txn.next_deadline() == 1.0  # K = 0
    txn.handle_timer(1.0)
    assert txn.terminated


def test_non_invite_client_e_caps_at_t2_and_is_t2_in_proceeding() -> None:
    txn = Transaction(Kind.NON_INVITE_CLIENT, REQUEST, reliable=False)
    txn.start(0.0)
    resends = [t for t, a in fire_all(txn, 12.0) if isinstance(a, Transmit)]
    assert resends == [0.5, 1.5, 3.5, 7.5, 11.5]  # 0.5, 1, 2, 4, 4 (T2)
    assert txn.receive_response(100, "trying", 12.0) == [Deliver("trying")]
    assert txn.state is State.PROCEEDING
    resends = [t for t, a in fire_all(txn, 20.0) if isinstance(a, Transmit)]
    assert resends == [15.5, 19.5]
    assert txn.receive_response(404, "nf", 20.0) == [Deliver("nf")]
    # retransmitted finals are absorbed, then timer K (T4) ends it
    assert txn.receive_response(404, "nf", 21.0) == []
    assert txn.next_deadline() == 25.0
    txn.handle_timer(25.0)
    assert txn.terminated


def test_invite_client_acks_failures_and_reacks_retransmissions() -> None:
    acks: list[object] = []

    def make_ack(response: object) -> bytes:
        acks.append(response)
        return b"ACK"

    txn = Transaction(Kind.INVITE_CLIENT, REQUEST, reliable=False, make_ack=make_ack)
    txn.start(0.0)
    assert txn.receive_response(180, "ringing", 0.2) == [Deliver("ringing")]
    assert txn.next_deadline() is None  # A and B stop in Proceeding (Timer C is the TU's)
    assert txn.receive_response(486, "busy", 1.0) == [Transmit(b"ACK"), Deliver("busy")]
    assert txn.receive_response(486, "busy", 2.0) == [Transmit(b"ACK")]
    assert acks == ["busy"]  # built once
    assert txn.next_deadline() == 33.0  # timer D = 32 s on UDP
    txn.handle_timer(33.0)
    assert txn.terminated


def test_invite_client_accepted_passes_2xx_retransmissions_up() -> None:
    txn = Transaction(Kind.INVITE_CLIENT, REQUEST, reliable=False)
    txn.start(0.0)
    assert txn.receive_response(200, "ok", 1.0) == [Deliver("ok")]
    assert txn.state is State.ACCEPTED
    assert txn.receive_response(200, "ok again", 1.5) == [Deliver("ok again")]
    assert txn.receive_response(180, "late", 1.6) == []
    assert txn.next_deadline() == 33.0  # timer M
    txn.handle_timer(33.0)
    assert txn.terminated


def test_invite_server_resends_failure_until_ack_then_waits_t4() -> None:
    txn = Transaction(Kind.INVITE_SERVER, REQUEST, reliable=False)
    assert txn.start(0.0) == []
    assert txn.send_response(100, b"100", 0.0) == [Transmit(b"100")]
    assert txn.receive_request(False, "again", 0.3) == [Transmit(b"100")]
    assert txn.send_response(486, b"486", 1.0) == [Transmit(b"486")]
    resends = [t for t, a in fire_all(txn, 6.0) if a == Transmit(b"486")]
    assert resends == [1.5, 2.5, 4.5]  # timer G: T1, 2T1, 4T1 (capped at T2)
    assert txn.receive_request(True, "ack", 6.0) == []
    assert txn.state is State.CONFIRMED and txn.next_deadline() == 11.0  # timer I = T4
    assert txn.receive_request(True, "ack", 7.0) == []  # absorbed
    txn.handle_timer(11.0)
    assert txn.terminated


def test_invite_server_without_ack_times_out_with_h() -> None:
    txn = Transaction(Kind.INVITE_SERVER, REQUEST, reliable=True)
    txn.start(0.0)
    txn.send_response(500, b"500", 0.0)
    assert fire_all(txn, 100.0) == [(32.0, Timeout())]


def test_invite_server_accepted_allows_more_2xx_and_absorbs_retransmissions() -> None:
    txn = Transaction(Kind.INVITE_SERVER, REQUEST, reliable=False)
    txn.start(0.0)
    txn.send_response(200, b"200a", 0.0)
    assert txn.send_response(200, b"200b", 0.1) == [Transmit(b"200b")]  # another fork
    assert txn.receive_request(False, "again", 0.2) == []
    with pytest.raises(TransactionError) as err:
        txn.send_response(486, b"486", 0.3)
    assert err.value.state is State.ACCEPTED and txn.state is State.ACCEPTED
    txn.handle_timer(32.0)
    assert txn.terminated


def test_non_invite_server_resends_its_final_and_ends_with_j() -> None:
    txn = Transaction(Kind.NON_INVITE_SERVER, REQUEST, reliable=False)
    txn.start(0.0)
    assert txn.receive_request(False, "again", 0.1) == []  # Trying: nothing to resend yet
    txn.send_response(200, b"200", 0.2)
    assert txn.receive_request(False, "again", 0.3) == [Transmit(b"200")]
    with pytest.raises(TransactionError):
        txn.send_response(180, b"180", 0.4)
    assert txn.next_deadline() == pytest.approx(32.2)
    txn.handle_timer(32.2)
    assert txn.terminated


def test_custom_timer_values() -> None:
    txn = Transaction(Kind.NON_INVITE_CLIENT, REQUEST, reliable=False,
                      timers=Timers(t1=0.1, t2=0.2, t4=1.0))
    txn.start(0.0)
    resends = [round(t, 3) for t, a in fire_all(txn, 1.0) if isinstance(a, Transmit)]
    assert resends == [0.1, 0.3, 0.5, 0.7, 0.9]
    assert fire_all(txn, 10.0)[-1] == (pytest.approx(6.4), Timeout())


def test_table_is_consistent() -> None:
    """Every state a machine can reach is its initial state or a table target, every
    timer event only fires in states that arm it, and only Terminated is final."""
    for kind in Kind:
        reachable = {INITIAL[kind]} | {
            new for (k, _, _), (new, _) in TRANSITIONS.items() if k is kind
        }
        for (k, state, event), _ in TRANSITIONS.items():
            if k is not kind:
                continue
            assert state in reachable
            if event.name.startswith("TIMER_"):
                armed = {t for (kk, s), ts in ENTRY_TIMERS.items() if kk is kind for t in ts}
                assert event in armed, (kind, state, event)
            assert state is not State.TERMINATED
        assert any(new is State.TERMINATED for (k, _, _), (new, _) in TRANSITIONS.items()
                   if k is kind)
    # every timer armed on entering a state (or carried into Proceeding) can fire there
    for (kind, state), timers in ENTRY_TIMERS.items():
        for timer in timers:
            assert (kind, state, timer) in TRANSITIONS
    for timer in (Event.TIMER_E, Event.TIMER_F):
        assert (Kind.NON_INVITE_CLIENT, State.PROCEEDING, timer) in TRANSITIONS


def test_transport_error_ends_a_client_transaction_before_its_final_response() -> None:
    for kind in (Kind.INVITE_CLIENT, Kind.NON_INVITE_CLIENT):
        txn = Transaction(kind, REQUEST, reliable=True, make_ack=lambda r: b"ACK")
        txn.start(0.0)
        assert txn.transport_error(0.1) == [TransportFailure()]
        assert txn.terminated and txn.next_deadline() is None
    done = Transaction(Kind.INVITE_CLIENT, REQUEST, reliable=False, make_ack=lambda r: b"ACK")
    done.start(0.0)
    done.receive_response(486, "busy", 0.1)
    assert done.transport_error(0.2) == [] and done.state is State.COMPLETED
