"""DeadlineBuckets: timers by bucket, popped in deadline order, with a limit."""

from xlat.media.timers import DeadlineBuckets


def test_pops_only_buckets_that_have_begun_oldest_first() -> None:
    timers: DeadlineBuckets[str] = DeadlineBuckets(quantum=1.0)
    timers.add(5.5, "b")
    timers.add(2.2, "a")
    timers.add(9.0, "c")
    assert timers.next_deadline() == 3.0  # the end of a's bucket: at most a quantum late
    assert timers.pop_due(1.99) == []
    assert timers.pop_due(2.0) == ["a"]  # its bucket has begun; the owner checks 2.2
    assert timers.pop_due(6.0) == ["b"]
    assert timers.next_deadline() == 10.0
    assert timers.pop_due(100.0) == ["c"]
    assert timers.next_deadline() is None


def test_limit_leaves_the_rest_due_and_says_so() -> None:
    timers: DeadlineBuckets[int] = DeadlineBuckets(quantum=0.5)
    for i in range(10):
        timers.add(1.0, i)
    timers.add(7.0, 99)
    first = timers.pop_due(2.0, limit=4)
    assert len(first) == 4
    assert timers.next_deadline() == 1.0  # the cut bucket's start: more is due now
    rest = timers.pop_due(2.0, limit=100)
    assert sorted(first + rest) == list(range(10))
    assert timers.next_deadline() == 7.5


def test_the_same_item_may_be_added_twice() -> None:
    timers: DeadlineBuckets[str] = DeadlineBuckets(quantum=1.0)
    timers.add(1.0, "x")
    timers.add(4.0, "x")  # re-armed: the first entry becomes stale, the owner skips it
    assert timers.pop_due(1.0) == ["x"]
    assert timers.pop_due(4.0) == ["x"]
