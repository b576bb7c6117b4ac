"""The proxy's timer table (xlat/sip/deadlines.py): due entries in deadline order,
moved and ended entries dropped lazily."""

from __future__ import annotations

from dataclasses import dataclass

from xlat.sip.deadlines import DeadlineHeap


@dataclass(eq=False)
class Entry:
    when: float | None
    alive: bool = True
    pushed: float | None = None

    def deadline(self) -> float | None:
        return self.when


def test_due_in_order_each_once_and_next_deadline() -> None:
    heap: DeadlineHeap[Entry] = DeadlineHeap(lambda e: e.alive)
    late, early = Entry(2.0), Entry(1.0)
    for entry in (late, early, late):  # pushed twice at one deadline: kept once
        heap.push(entry)
    assert heap.next_deadline() == 1.0
    assert list(heap.due(0.5)) == []
    assert list(heap.due(2.0)) == [early, late]
    assert heap.next_deadline() is None


def test_moved_and_ended_entries_are_dropped_when_they_come_up() -> None:
    tracked: list[Entry] = []
    heap: DeadlineHeap[Entry] = DeadlineHeap(lambda e: e.alive, tracked.append)
    moved, ended, kept = Entry(1.0), Entry(1.0), Entry(3.0)
    for entry in (moved, ended, kept):
        heap.push(entry)
    moved.when, ended.alive = 5.0, False
    assert heap.next_deadline() == 3.0  # both stale heads popped on the way
    assert tracked == [moved]  # the live one handed back to be rescheduled
    heap.push(moved)
    assert list(heap.due(4.0)) == [kept]
    assert list(heap.due(5.0)) == [moved]


def test_an_entry_pushed_while_running_timers_fires_in_the_same_pass_if_due() -> None:
    heap: DeadlineHeap[Entry] = DeadlineHeap(lambda e: e.alive)
    first, second = Entry(1.0), Entry(1.5)
    heap.push(first)
    fired = []
    for entry in heap.due(2.0):
        fired.append(entry)
        if entry is first:
            heap.push(second)
    assert fired == [first, second]
