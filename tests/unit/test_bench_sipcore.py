"""bench/sipcore.py drives complete calls through the proxy core: each call must really
go through (the harness checks every hop), and what the calls leave behind must go away
with time, or the figure would measure a leak."""

from bench.sipcore import INTRA, STEP, Bench


def test_calls_go_through_and_leave_nothing_once_timers_ran() -> None:
    bench = Bench()
    for n in range(3):
        bench.call(n)  # raises AssertionError if any hop is missing
    assert bench.spent > 0
    assert bench.proxy.transactions > 0 and len(bench.media.sessions()) == 3
    bench.advance(40.0)  # past Timers J, L, M (32 s) and the delete delay
    assert bench.proxy.transactions == 0 and bench.media.sessions() == []
    assert bench.datapath.flows == {}
    assert abs(bench.now - (3 * STEP + 40.0)) < INTRA / 2  # calls start STEP apart
