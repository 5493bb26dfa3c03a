"""The vector cache: flat float32 segment files under `state/vectors/`.

A segment `NNNNNNNNNN.f32` holds up to `capacity` rows of `dims` little-endian
float32, nothing else: row `r` starts at byte `r * dims * 4`. Which key lives in
which (segment, row) is the database's business (`vectors` and `segments` tables,
see `store.py`); this module only writes and reads rows.

One `SegmentWriter` per state directory appends rows to the active segment: a
slice's rows are gathered into one block and written with `pwrite` (one system call
per segment touched), then `fdatasync`ed, so a 0.8 GB output file is never held in
memory beyond one slice. A row is durable before `write`
returns; the caller commits the index rows that point to it only after that (crash
order: segment bytes, then index). A row written but never indexed is dead space in
its segment, reclaimed when the segment is dropped.

Segments are dropped whole (never compacted), least recently used first: see
docs/storage.md.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

SEGMENT_BYTES = 16 * 2**20  # the default size of one segment file
_NAME = re.compile(r"^(\d{10})\.f32$")

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

    def info(self) -> SegmentInfo:
        return SegmentInfo(
            self.id, self.dims, self.capacity, self.next_row, self.capacity * self.dims * 4
        )

    def put(self, block: npt.NDArray[np.float32]) -> None:
        """Write `block` (rows x dims, C order) at the next free row; not yet durable."""
        view = block.data.cast("B")
        offset = self.next_row * self.dims * 4
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written
        self.next_row += block.shape[0]

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class SegmentWriter:
    """Appends rows to segments under `root`; thread-safe (one lock around a write).

    `put` writes rows without waiting for the disk; `sync` makes every row put so far
    durable (all the segments touched, synced side by side); `write` is both."""

    def __init__(self, root: Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = root
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._next_id = 1
        self._unsynced: dict[int, _Active] = {}  # put since the last sync (may be closed)

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
        self, vectors: Sequence[VectorLike] | npt.NDArray[np.float32]
    ) -> tuple[list[tuple[int, int]], list[SegmentInfo]]:
        """`put`, then `sync`: everything is durable on return."""
        with self._lock:
            placed = self._put(vectors)
            self._sync()
        return placed

    def put(
        self, vectors: Sequence[VectorLike] | npt.NDArray[np.float32]
    ) -> tuple[list[tuple[int, int]], list[SegmentInfo]]:
        """Store `vectors` (all of one length; a sequence of rows or one 2-D block),
        not yet durable; return each one's (segment, row) and the state of every
        segment touched."""
        with self._lock:
            return self._put(vectors)

    def sync(self) -> None:
        """Make every row `put` so far durable. Rows may be put meanwhile (from
        another thread): the disk is waited for outside the lock."""
        with self._lock:
            pending = list(self._unsynced.values())
            self._unsynced.clear()
        try:
            _sync_all(pending)
        except BaseException:
            with self._lock:  # not known to be durable: the next sync tries again
                for seg in pending:
                    self._unsynced.setdefault(seg.id, seg)
            raise
        with self._lock:
            for seg in pending:
                if seg is not self._active and seg.id not in self._unsynced:
                    seg.close()

    def _put(
        self, vectors: Sequence[VectorLike] | npt.NDArray[np.float32]
    ) -> tuple[list[tuple[int, int]], list[SegmentInfo]]:
        block = _block(vectors)
        slots: list[tuple[int, int]] = []
        touched: dict[int, SegmentInfo] = {}
        i = 0
        while i < block.shape[0]:
            seg = self._segment_for(block.shape[1])
            start = seg.next_row
            n = min(block.shape[0] - i, seg.capacity - start)
            seg.put(block[i : i + n])
            self._unsynced[seg.id] = seg
            slots.extend((seg.id, start + j) for j in range(n))
            touched[seg.id] = seg.info()
            i += n
        return slots, list(touched.values())

    def _sync(self) -> None:
        pending = list(self._unsynced.values())
        _sync_all(pending)
        self._unsynced.clear()
        for seg in pending:
            if seg is not self._active:
                seg.close()

    def _segment_for(self, dims: int) -> _Active:
        seg = self._active
        if seg is not None and seg.dims == dims and seg.next_row < seg.capacity:
            return seg
        if seg is not None and seg.id not in self._unsynced:
            seg.close()  # (an unsynced one is closed by the next sync)
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
            for seg in self._unsynced.values():
                if seg is not self._active:
                    seg.close()
            self._unsynced.clear()
            if self._active is not None:
                self._active.close()
                self._active = None


def _sync_all(segments: list[_Active]) -> None:
    if len(segments) == 1:
        segments[0].sync()
    elif segments:
        # Side by side: the file system commits their metadata together.
        with ThreadPoolExecutor(min(8, len(segments))) as pool:
            list(pool.map(_Active.sync, segments))


def _row(value: VectorLike) -> npt.NDArray[np.float32]:
    if isinstance(value, bytes):
        return np.frombuffer(value, dtype="<f4")
    return value


def _block(vectors: Sequence[VectorLike] | npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """`vectors` as one C-ordered (rows x dims) little-endian float32 block."""
    if isinstance(vectors, np.ndarray):
        block = vectors
    elif not vectors:
        return np.empty((0, 0), dtype="<f4")
    else:
        block = np.stack([_row(v) for v in vectors])
    if block.ndim != 2:
        raise ValueError(f"vectors must be rows of one length, got shape {block.shape}")
    return np.ascontiguousarray(block, dtype="<f4")


class SegmentReader:
    """Reads rows by (segment, row, dims): nothing is kept beyond the open file
    descriptors, so memory stays flat however much is read. `gather` reads rows in any
    order into one block; `rows` and `row` are its shorthands for a run and one row."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[int, int] = {}

    def rows(self, segment: int, first: int, count: int, dims: int) -> npt.NDArray[np.float32]:
        """Rows [first, first + count) of `segment` as a (count x dims) block."""
        return self.gather([(segment, first + n) for n in range(count)], dims)

    def gather(self, places: Sequence[tuple[int, int]], dims: int) -> npt.NDArray[np.float32]:
        """The rows at `places`, (segment, row) pairs in any order, as one block in that
        order (a batch answers in any order, so a file's rows are scattered over its
        segments): one `pread` a row, straight into the block."""
        out = np.empty((len(places), dims), dtype="<f4")
        size = dims * 4
        for i, (segment, row) in enumerate(places):
            if os.preadv(self._fd(segment), [out[i].data.cast("B")], row * size) != size:
                raise OSError(f"segment {segment} is shorter than its index says (row {row})")
        return out

    def _fd(self, segment: int) -> int:
        fd = self._fds.get(segment)
        if fd is None:
            fd = self._fds[segment] = os.open(segment_path(self.root, segment), os.O_RDONLY)
        return fd

    def row(self, segment: int, row: int, dims: int) -> npt.NDArray[np.float32]:
        return self.gather([(segment, row)], dims).reshape(dims)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def remove_segments(root: Path, segments: Iterable[int]) -> None:
    """Delete segment files (after their index rows are gone)."""
    for segment in segments:
        segment_path(root, segment).unlink(missing_ok=True)
