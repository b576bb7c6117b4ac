"""The proxy's timer table: one heap of (deadline, entry) for every transaction.

An entry (a server transaction, a branch) says when it wants to run next
(``deadline()``) and remembers the deadline it was last pushed with (``pushed``), so
a deadline is pushed once however often the entry is looked at. Entries whose
deadline moved or that ended stay in the heap until they come up and are dropped
then (lazy deletion): pushing is O(log n), nothing is ever searched.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["DeadlineHeap", "Timed"]


class Timed(Protocol):
    pushed: float | None

    def deadline(self) -> float | None: ...


E = TypeVar("E", bound=Timed)


class DeadlineHeap(Generic[E]):
    """Deadlines of the entries ``alive`` says are live (sans-I/O: times come in).
    A live entry found with a deadline other than the one it was pushed with is
    handed to ``track`` (default: ``push``), which may forget it if it has ended."""

    def __init__(self, alive: Callable[[E], bool],
                 track: Callable[[E], None] | None = None) -> None:
        self._alive = alive
        self._track = self.push if track is None else track
        self._heap: list[tuple[float, int, E]] = []
        self._seq = itertools.count()  # ties: first pushed, first due; entries never compared

    def push(self, entry: E) -> None:
        """(Re)schedule ``entry`` at its current deadline, unless already pushed so."""
        when = entry.deadline()
        if when is not None and when != entry.pushed:
            entry.pushed = when
            heapq.heappush(self._heap, (when, next(self._seq), entry))

    def due(self, now: float) -> Iterator[E]:
        """The live entries whose deadline is ``now`` or earlier, in deadline order; an
        entry pushed while this runs is yielded too if it is due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, entry = heapq.heappop(heap)
            if entry.pushed == when:
                entry.pushed = None
            if not self._alive(entry):
                continue
            if entry.deadline() != when:
                self._track(entry)
                continue
            yield entry

    def next_deadline(self) -> float | None:
        """The earliest deadline an entry still wants; None when there is none."""
        heap = self._heap
        while heap:
            when, _, entry = heap[0]
            if self._alive(entry) and entry.deadline() == when:
                return when
            heapq.heappop(heap)
            if entry.pushed == when:
                entry.pushed = None
            if self._alive(entry):
                self._track(entry)
        return None
