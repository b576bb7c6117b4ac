"""The crash journal: the daemon's state, written down as it changes, so that a daemon
started after a crash (``kill -9``, the OOM killer, a bug) adopts every live call.

What is journaled is a set of *tables* of JSON values by key: ``session`` (media
sessions with their relay ports, by session id: what a BYE, re-INVITE or NG ``delete``
after a restart needs to find its call), ``binding`` (registrar bindings, by address of
record) and ``meta`` (the clock the times were taken on). The owners of that state (the
session manager, the registrar) hand out their changed entries; the daemon puts them
here once per event-loop turn, together with that turn's datapath batch.

The core (``Journal``, ``replay``, ``clock_shift``) is sans-I/O: changes in, bytes out;
bytes in, tables out. ``JournalFiles`` is the thin edge that writes them.

On disk, in the state directory, files named after the daemon's control socket (so
daemons sharing a state directory keep apart):

- ``NAME.snapshot``: every entry as of the last compaction, written to a temporary file,
  fsynced and renamed over the old one: it is always whole, old or new.
- ``NAME.log``: the records since then, appended, one write per loop turn.
- ``NAME.log.next``: while a compaction's fsync runs (in a thread), the records since
  it began; renamed over ``NAME.log`` once the new snapshot is in place.

A record is one line of JSON: ``["put", TABLE, KEY, VALUE]`` or ``["del", TABLE, KEY]``.
Replaying the snapshot, then the log(s), last record winning, gives the state. A crash
in the middle of an append leaves a torn last line (no newline, or not JSON): it is
dropped, and so is any line that does not decode (a disk that lost a block). The log is
compacted (a new snapshot, the log emptied) when it holds more records than twice the
entries and at least ``COMPACT_MIN``. A crash after the snapshot's rename but before
the log's replacement replays an old log over a new snapshot: harmless, as every key's
last record in that log is its value in the snapshot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COMPACT_MIN",
    "Journal",
    "JournalFiles",
    "Replay",
    "boot_id",
    "clock",
    "clock_shift",
    "journal_name",
    "replay",
]

COMPACT_MIN = 10_000  # log records before a compaction is worth its full write
_PUT, _DEL = "put", "del"


@dataclass
class Replay:
    """What ``replay`` made of the files: the tables, and what it had to drop."""

    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: int = 0  # records applied
    torn: int = 0  # an unterminated last line (a crash mid-append)
    skipped: int = 0  # terminated lines that did not decode

    def table(self, name: str) -> dict[str, Any]:
        return self.tables.get(name, {})


def replay(*chunks: bytes) -> Replay:
    """Apply the records of ``chunks`` (the snapshot, then the log) in order."""
    out = Replay()
    for chunk in chunks:
        lines = chunk.split(b"\n")
        if lines[-1]:  # no newline at the end: the write of that record was cut short
            out.torn += 1
        for line in lines[:-1]:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                op, table, key = record[0], record[1], record[2]
                if op == _PUT:
                    out.tables.setdefault(table, {})[key] = record[3]
                elif op == _DEL:
                    out.tables.get(table, {}).pop(key, None)
                else:
                    raise ValueError(op)
            except (ValueError, TypeError, IndexError, KeyError):
                out.skipped += 1
                continue
            out.records += 1
    return out


class Journal:
    """The journaled tables and the records not yet written. Sans-I/O: ``put`` and
    ``delete`` change an entry; ``pending()`` takes the bytes to append to the log;
    ``snapshot()`` gives the bytes of a compacted file (and starts a new log). Each
    entry is kept as the record that last put it, encoded once: a snapshot of 10k
    sessions is a join of their lines, not 10k JSON encodings."""

    def __init__(self, compact_min: int = COMPACT_MIN) -> None:
        self.compact_min = compact_min
        self.logged = 0  # records in the log since the last snapshot
        self._lines: dict[str, dict[str, bytes]] = {}  # table -> key -> its put record
        self._out: list[bytes] = []

    def put(self, table: str, key: str, value: Any) -> None:
        """Set an entry (``value`` must be JSON-able)."""
        line = _encode([_PUT, table, key, value])
        self._lines.setdefault(table, {})[key] = line
        self._out.append(line)

    def delete(self, table: str, key: str) -> None:
        """Remove an entry; removing a missing one writes nothing."""
        if self._lines.get(table, {}).pop(key, None) is not None:
            self._out.append(_encode([_DEL, table, key]))

    def update(self, table: str, changes: Iterable[tuple[str, Any]]) -> None:
        """``put`` each (key, value), ``delete`` each (key, None): the changes the owners
        of the state hand out."""
        for key, value in changes:
            if value is None:
                self.delete(table, key)
            else:
                self.put(table, key, value)

    def drop(self, table: str) -> None:
        """Remove a whole table."""
        for key in list(self._lines.get(table, ())):
            self.delete(table, key)

    def count(self, table: str) -> int:
        return len(self._lines.get(table, ()))

    def entries(self) -> int:
        return sum(len(t) for t in self._lines.values())

    def pending(self) -> bytes:
        """The records since the last call, one line each, for one append."""
        data = b"".join(self._out)
        self.logged += len(self._out)
        self._out.clear()
        return data

    def compaction_due(self) -> bool:
        """The log, with what is pending, holds more records than a snapshot would."""
        return self.logged + len(self._out) > max(self.compact_min, 2 * self.entries())

    def snapshot(self) -> bytes:
        """Every entry as one ``put`` record each; what was pending is in it too, and
        the log starts over."""
        self._out.clear()
        self.logged = 0
        return b"".join(line for table in self._lines.values() for line in table.values())


def _encode(record: list[Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


# ---- clocks ------------------------------------------------------------------------------


def clock(boot_id: str, monotonic: float, wall: float) -> dict[str, Any]:
    """The ``meta``/``clock`` entry: journaled times are CLOCK_MONOTONIC seconds (the
    clock of the kernel's last_seen), which only mean something within one boot."""
    return {"boot": boot_id, "monotonic": monotonic, "wall": wall}


def clock_shift(saved: Mapping[str, Any] | None, boot_id: str, monotonic: float,
                wall: float) -> float:
    """What to add to a journaled monotonic time to get one on today's clock: nothing
    within the same boot; after a reboot, the monotonic clock restarted, so the saved
    times are carried over by wall-clock time."""
    if not saved or saved.get("boot") == boot_id:
        return 0.0
    return (monotonic - wall) - (float(saved["monotonic"]) - float(saved["wall"]))


# ---- the files -------------------------------------------------------------------------


class JournalFiles:
    """The edge: a journal's files in ``directory`` (see the module docstring).
    ``load`` reads them; ``start`` writes a fresh snapshot and opens an empty log;
    ``write`` appends what is pending; ``sync`` makes the appended records durable (a
    process crash loses nothing written; fsync is for power loss).

    When compaction is due, ``write`` writes the new snapshot to a temporary file,
    switches the appends to ``NAME.log.next`` and returns the slow part (fsync, renames)
    for the caller to run in a thread, then to call ``compacted`` back in its loop: the
    event loop never waits for the disk. Replay reads the snapshot, the log and the next
    log in that order, which gives the state whichever step a crash interrupts: before
    the snapshot's rename, the old snapshot and log hold everything up to the switch and
    the next log the rest; after it, the old log is harmless over the new snapshot."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.snapshot_path = directory / f"{name}.snapshot"
        self.log_path = directory / f"{name}.log"
        self.next_path = directory / f"{name}.log.next"
        self._tmp = directory / f"{name}.snapshot.tmp"
        self._fd: int | None = None
        self._unsynced = False
        self._lost = False  # a write failed: the files miss records, compact next time
        self._retired: list[int] = []  # fds of a compaction in flight, closed by compacted()

    @property
    def started(self) -> bool:
        return self._fd is not None

    @property
    def compacting(self) -> bool:
        return bool(self._retired)

    def load(self) -> Replay:
        """The state the files hold (empty if there are none). Creates the directory.
        Raises OSError if it cannot be created or written, or the files not read."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{self.directory} is not writable")
        chunks = []
        for path in (self.snapshot_path, self.log_path, self.next_path):
            try:
                chunks.append(path.read_bytes())
            except FileNotFoundError:
                chunks.append(b"")
        return replay(*chunks)

    def start(self, journal: Journal) -> None:
        """Write ``journal``'s snapshot and open an empty log. Raises OSError."""
        self.compact(journal)

    def write(self, journal: Journal) -> Callable[[], None] | None:
        """Append the pending records in one write; or, when compaction is due, begin
        one and return its slow part (see the class docstring). After a failed write it
        compacts at once. Raises OSError (disk full): the records stay in ``journal``
        and reach the disk with the next successful compaction."""
        if self._fd is None:
            return None
        if self._lost:
            self.compact(journal)
            return None
        if journal.compaction_due() and not self.compacting:
            return self._begin_compaction(journal)
        self._append(journal.pending())
        return None

    def compacted(self, failed: bool) -> None:
        """The slow part of a compaction has run (``failed``: it raised)."""
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()
        self._lost = self._lost or failed

    def compact(self, journal: Journal) -> None:
        """Compact now, waiting for the disk: a new snapshot (temporary file, fsync,
        rename, fsync of the directory), then one empty log. Raises OSError."""
        self._lost = True  # until the new snapshot is in place
        fd, finish = self._write_snapshot(journal.snapshot())
        try:
            finish()
        finally:
            os.close(fd)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.next_path.unlink(missing_ok=True)
        self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
                           0o600)
        self._unsynced = self._lost = False

    def sync(self) -> None:
        """fdatasync the log if anything was appended since (safe to run in a thread
        while appends go on: one arriving meanwhile is synced next time)."""
        fd = self._fd
        if fd is not None and self._unsynced:
            self._unsynced = False
            os.fdatasync(fd)

    def close(self, journal: Journal | None) -> None:
        """Compact ``journal`` into the snapshot and close (no compaction may be in
        flight); with ``None`` (nothing left worth keeping) remove the files."""
        try:
            if journal is not None:
                self.compact(journal)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if journal is None:
            for path in (self.snapshot_path, self.log_path, self.next_path):
                path.unlink(missing_ok=True)

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            _write_all(self._fd, data)
        except OSError:
            self._lost = True
            raise
        self._unsynced = self._unsynced or bool(data)

    def _begin_compaction(self, journal: Journal) -> Callable[[], None]:
        """Snapshot to the temporary file and appends to the next log, in the loop; the
        returned part makes it durable and renames, in a thread. What is pending goes to
        the log first: should the compaction fail, the log still has it."""
        self._append(journal.pending())
        fd, finish = self._write_snapshot(journal.snapshot())
        assert self._fd is not None
        self._retired += [fd, self._fd]
        self._fd = os.open(self.next_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
                           0o600)

        def durable() -> None:
            finish()
            # appends go on through the fd, whatever its file's name
            os.replace(self.next_path, self.log_path)

        return durable

    def _write_snapshot(self, data: bytes) -> tuple[int, Callable[[], None]]:
        """Write ``data`` to the temporary file now; returns its fd (the caller closes
        it) and the part that fsyncs it, renames it over the snapshot and fsyncs the
        directory (before the next log can replace the log: the renames must reach the
        disk in that order)."""
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
        except OSError:
            os.close(fd)
            raise

        def finish() -> None:
            os.fsync(fd)
            os.replace(self._tmp, self.snapshot_path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

        return fd, finish


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def journal_name(control: Path) -> str:
    """The files' name for the daemon of control socket ``control``: its absolute path
    with ``/`` as ``-`` (``/run/xlat/control.sock`` -> ``run-xlat-control.sock``)."""
    return str(control.absolute()).strip("/").replace("/", "-")



def boot_id() -> str:
    """This boot's random id (Linux): monotonic times of another boot mean nothing now."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
