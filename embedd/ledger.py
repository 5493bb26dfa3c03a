"""The append-only cost ledger file, `ledger.jsonl`: plain blocking file I/O.

The daemon runs these calls in a worker thread; `embedd report` only reads.

Durability and idempotency:

* Every line is written with one `write()` on an `O_APPEND` descriptor, then
  `fsync`ed before `append` returns; a new file also has its folder fsynced.
* Each entry has a key (`batch_id` for usage lines; budget and period for alerts).
  The keys are loaded once when the `Ledger` is opened, and `append` of an entry
  whose key is already in the file writes nothing and returns False. The daemon can
  therefore re-append every row its database holds at start without double counting.
* A crash can leave a torn last line (no trailing newline). Opening the ledger for
  writing repairs it: when the torn text is nevertheless a complete, valid entry
  with a new key (only the newline was lost) the newline is added; otherwise the
  torn text is truncated away. A truncated line is not lost for good: its row is in
  the state database, and the daemon re-appends unwritten rows at start.
  `repair` tells which of the two happened, so the daemon can log it.
* Readers (`read_entries`) never modify the file, and skip a last line without a
  newline: it may be a line the daemon is writing at this very moment.

A line in the middle of the file that is not a ledger entry (someone edited the
file) raises `LedgerCorrupt` naming the line: money lines are never skipped silently.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

from embedd.cost import Entry, EntryKey, LedgerEntry, Totals, parse_line, to_json_line
from embedd.crashpoints import fault_point
from embedd.errors import FatalError
from embedd.spool import FILE_MODE, fsync_dir

Repair = Literal["completed", "truncated"]


class LedgerCorrupt(FatalError):
    """The ledger file holds a line that is not a ledger entry."""


def _open_binary(path: Path) -> BinaryIO | None:
    """`path` opened for reading without following a symlink; None when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    return os.fdopen(fd, "rb")


def _parse(raw: bytes, path: Path, lineno: int) -> Entry:
    try:
        return parse_line(raw)
    except ValueError as exc:
        raise LedgerCorrupt(f"{path} line {lineno} is not a ledger entry: {exc}") from None


def read_entries(
    path: Path, since: datetime | None = None, until: datetime | None = None
) -> Iterator[Entry]:
    """Stream the entries of the ledger at `path` with `since <= ts < until`.

    Reads line by line and never writes; a missing file has no entries; a last line
    without a newline (torn, or being written) is skipped; blank lines are ignored.
    """
    handle = _open_binary(path)
    if handle is None:
        return
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return
            if not raw.strip():
                continue
            entry = _parse(raw, path, lineno)
            if since is not None and entry.ts < since:
                continue
            if until is not None and entry.ts >= until:
                continue
            yield entry


class LedgerWriteError(OSError):
    """ledger.jsonl could not be written (disk full, I/O error); nothing torn was left."""


class Ledger:
    """The ledger at `path`, open for appending (thread-safe); see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: set[EntryKey] = set()
        self._totals = Totals()
        created = not path.exists()
        self._fd = os.open(
            path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
        )
        try:
            self.repair: Repair | None = self._load()
            if created:
                fsync_dir(path.parent)
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> Repair | None:
        """Scan the file once for keys and totals; repair a torn last line."""
        good_end = 0  # offset just after the last complete line
        tail = b""
        with os.fdopen(os.dup(self._fd), "rb") as handle:
            handle.seek(0)
            for lineno, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                good_end += len(raw)
                if raw.strip():
                    self._remember(_parse(raw, self.path, lineno))
        if not tail:
            return None
        try:
            entry: Entry | None = parse_line(tail)
        except ValueError:
            entry = None
        if entry is not None and entry.key not in self._keys:
            # Only the newline was lost: finish the line rather than drop a good entry.
            self._write(b"\n")
            self._remember(entry)
            return "completed"
        os.ftruncate(self._fd, good_end)
        os.fsync(self._fd)
        return "truncated"

    def _remember(self, entry: Entry) -> None:
        self._keys.add(entry.key)
        self._totals = self._totals.add(entry)

    def _write(self, data: bytes) -> None:
        """Append `data` and fsync; on failure cut the file back so no torn line stays."""
        size = os.fstat(self._fd).st_size
        try:
            fault_point("ledger_enospc")
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            # A partial line (disk full) would glue onto the next one; remove it.
            os.ftruncate(self._fd, size)
            raise LedgerWriteError(exc.errno, exc.strerror, str(self.path)) from exc

    def append(self, entry: Entry) -> bool:
        """Append `entry` durably; False (and nothing written) if its key is already there."""
        with self._lock:
            if self._fd < 0:
                raise ValueError("ledger is closed")
            if entry.key in self._keys:
                return False
            self._write(to_json_line(entry))
            self._remember(entry)
            return True

    def __contains__(self, key: object) -> bool:
        """True if an entry with this key (`LedgerEntry.key`, `AlertEntry.key`) is written."""
        with self._lock:
            return key in self._keys

    def has_usage(self, batch_id: str) -> bool:
        """True if the usage line of this batch or sync request group is written."""
        return ("usage", batch_id) in self

    def entries(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> Iterator[Entry]:
        """Stream the written entries with `since <= ts < until`, line by line."""
        return read_entries(self.path, since, until)

    def usage(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> Iterator[LedgerEntry]:
        """Stream only the usage entries (no alerts) with `since <= ts < until`."""
        for entry in self.entries(since, until):
            if isinstance(entry, LedgerEntry):
                yield entry

    def totals(self, since: datetime | None = None, until: datetime | None = None) -> Totals:
        """Sums over the ledger; kept in memory when unbounded, else streamed from the file."""
        if since is None and until is None:
            with self._lock:
                return self._totals
        return Totals.of(self.entries(since, until))

    def close(self) -> None:
        """Close the file; later appends raise."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
