"""Deadlines for many soft-state timers, at one pointer per timer.

Pure: time is passed in. Items go into buckets of ``quantum`` seconds; the heap holds
bucket numbers, not items, so a hundred thousand sessions with a handful of distinct
deadlines cost a list slot each. The owner keeps each item's real deadline: a re-armed
item is simply added again, and its stale entry is recognised (and skipped) by the
owner when its bucket comes due.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

T = TypeVar("T")


class DeadlineBuckets(Generic[T]):
    """Items by deadline. ``pop_due(now, limit)`` hands out, oldest bucket first, up to
    ``limit`` items whose bucket has begun by ``now``; ``next_deadline()`` is the end
    of the oldest bucket (so a waiter wakes at most ``quantum`` late), or its start when
    a limit left some of it behind (the rest is due already)."""

    def __init__(self, quantum: float = 0.1) -> None:
        self.quantum = quantum
        self._buckets: dict[int, list[T]] = {}
        self._keys: list[int] = []  # heap of bucket numbers
        self._cut: int | None = None  # bucket that the last pop_due left partly unpopped

    def bucket(self, when: float) -> int:
        """The number of the bucket a deadline falls in."""
        return math.floor(when / self.quantum)

    def add(self, when: float, item: T) -> None:
        self._put(self.bucket(when), item)

    def defer(self, now: float, item: T) -> None:
        """Put ``item`` in the bucket after the one ``now`` falls in: for an item whose
        bucket has begun but whose deadline has not come (``pop_due`` would hand it out
        again at once)."""
        self._put(self.bucket(now) + 1, item)

    def _put(self, key: int, item: T) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = [item]
            heapq.heappush(self._keys, key)
        else:
            bucket.append(item)

    def next_deadline(self) -> float | None:
        if not self._keys:
            return None
        first = self._keys[0]
        return (first if first == self._cut else first + 1) * self.quantum

    def pop_due(self, now: float, limit: int | None = None) -> list[T]:
        """Items of the buckets that have begun by ``now`` (some may not be due until the
        bucket ends: the owner checks), at most ``limit``; the rest stay."""
        due: list[T] = []
        self._cut = None
        last = self.bucket(now)
        while self._keys and self._keys[0] <= last:
            bucket = self._buckets[self._keys[0]]
            room = len(bucket) if limit is None else limit - len(due)
            if room < len(bucket):
                due += bucket[len(bucket) - room:]
                del bucket[len(bucket) - room:]
                self._cut = self._keys[0]
                break
            due += bucket
            del self._buckets[heapq.heappop(self._keys)]
        return due
