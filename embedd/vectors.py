"""The vector cache: flat float32 segment files under `state/vectors/`.

A segment `NNNNNNNNNN.f32` holds up to `capacity` rows of `dims` little-endian
float32, nothing else: row `r` starts at byte `r * dims * 4`. Which key lives in
which (segment, row) is the database's business (`vectors` and `segments` tables,
see `store.py`); this module only writes and reads rows.

One `SegmentWriter` per state directory appends rows to the active segment through
a memory map: a vector is copied into the map, the written range is flushed
(`msync`) and dropped from the process's memory (`MADV_DONTNEED`), so collecting
a 0.8 GB output file never holds more than one slice of it. A row is durable
before `write` returns; the caller commits the index rows that point to it only
after that (crash order: segment bytes, then index). A row written but never
indexed is dead space in its segment, reclaimed when the segment is dropped.

Segments are dropped whole (never compacted), least recently used first: see
docs/storage.md.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

SEGMENT_BYTES = 16 * 2**20  # the default size of one segment file
_NAME = re.compile(r"^(\d{10})\.f32$")
_PAGE = mmap.PAGESIZE

VectorLike = bytes | npt.NDArray[np.float32]


def segment_path(root: Path, segment: int) -> Path:
    return root / f"{segment:010d}.f32"


def segment_files(root: Path) -> dict[int, Path]:
    """Segment id → path of every segment file under `root`."""
    try:
        paths = list(root.iterdir())
    except FileNotFoundError:
        return {}
    return {int(m.group(1)): p for p in paths if (m := _NAME.match(p.name))}


def cache_bytes(root: Path) -> int:
    """Bytes the segment files take on disk now (cheap: one stat per segment)."""
    total = 0
    for path in segment_files(root).values():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        total += min(st.st_size, st.st_blocks * 512)
    return total


@dataclass(frozen=True)
class SegmentInfo:
    """What the index records about a segment after a write."""

    id: int
    dims: int
    capacity: int
    rows: int  # rows handed out so far (the next free row)
    bytes: int  # the file's size: capacity * dims * 4


class _Active:
    def __init__(self, path: Path, info: SegmentInfo, create: bool) -> None:
        self.path = path
        self.dims = info.dims
        self.capacity = info.capacity
        self.id = info.id
        self.next_row = info.rows
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create or os.fstat(self.fd).st_size != info.bytes:
            os.ftruncate(self.fd, info.bytes)  # sparse: blocks are allocated as rows land
            os.fsync(self.fd)
        self.map = mmap.mmap(self.fd, info.bytes)
        self.rows: npt.NDArray[np.float32] = np.ndarray(
            (self.capacity, self.dims), dtype="<f4", buffer=self.map
        )

    def info(self) -> SegmentInfo:
        return SegmentInfo(
            self.id, self.dims, self.capacity, self.next_row, self.capacity * self.dims * 4
        )

    def sync(self, first: int, last: int) -> None:
        """Make rows [first, last) durable, then let go of their pages."""
        row_bytes = self.dims * 4
        start = (first * row_bytes // _PAGE) * _PAGE
        end = min(len(self.map), last * row_bytes)
        self.map.flush(start, end - start)
        self.map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        del self.rows
        self.map.close()
        os.close(self.fd)


class SegmentWriter:
    """Appends rows to segments under `root`; thread-safe (one lock around a write)."""

    def __init__(self, root: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = root
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._next_id = 1

    def resume(self, last: SegmentInfo | None, highest_id: int) -> None:
        """Continue the newest segment the index knows (or start after `highest_id`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._next_id = max(highest_id, last.id if last else 0) + 1
        if last is not None and last.rows < last.capacity:
            path = segment_path(self.root, last.id)
            if path.exists():
                self._active = _Active(path, last, create=False)

    @property
    def active_id(self) -> int | None:
        return None if self._active is None else self._active.id

    def write(
        self, vectors: Sequence[VectorLike]
    ) -> tuple[list[tuple[int, int]], list[SegmentInfo]]:
        """Store `vectors` (all of one length); return each one's (segment, row) and
        the state of every segment touched. Everything is durable on return."""
        slots: list[tuple[int, int]] = []
        touched: dict[int, SegmentInfo] = {}
        with self._lock:
            i = 0
            while i < len(vectors):
                seg = self._segment_for(_row(vectors[i]).shape[0])
                start = seg.next_row
                n = min(len(vectors) - i, seg.capacity - start)
                for j in range(n):
                    seg.rows[start + j] = _row(vectors[i + j])
                    slots.append((seg.id, start + j))
                seg.next_row = start + n
                seg.sync(start, start + n)
                touched[seg.id] = seg.info()
                i += n
        return slots, list(touched.values())

    def _segment_for(self, dims: int) -> _Active:
        seg = self._active
        if seg is not None and seg.dims == dims and seg.next_row < seg.capacity:
            return seg
        if seg is not None:
            seg.close()
        capacity = max(1, self.segment_bytes // (4 * dims))
        info = SegmentInfo(self._next_id, dims, capacity, 0, capacity * dims * 4)
        self._next_id += 1
        self.root.mkdir(parents=True, exist_ok=True)
        self._active = _Active(segment_path(self.root, info.id), info, create=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)  # the new file's name is durable before any index row names it
        finally:
            os.close(fd)
        return self._active

    def close(self) -> None:
        with self._lock:
            if self._active is not None:
                self._active.close()
                self._active = None


def _row(value: VectorLike) -> npt.NDArray[np.float32]:
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype="<f4")
    return value


class SegmentReader:
    """Reads rows by (segment, row, dims) with `pread`: nothing is mapped or cached
    beyond the open file descriptors, so memory stays flat however much is read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[int, int] = {}

    def row(self, segment: int, row: int, dims: int) -> npt.NDArray[np.float32]:
        fd = self._fds.get(segment)
        if fd is None:
            fd = self._fds[segment] = os.open(segment_path(self.root, segment), os.O_RDONLY)
        size = dims * 4
        data = os.pread(fd, size, row * size)
        if len(data) != size:
            raise OSError(f"segment {segment} is shorter than its index says (row {row})")
        return np.frombuffer(data, dtype="<f4")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def remove_segments(root: Path, segments: Iterable[int]) -> None:
    """Delete segment files (after their index rows are gone)."""
    for segment in segments:
        segment_path(root, segment).unlink(missing_ok=True)
