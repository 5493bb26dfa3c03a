"""Deliver the outcome of one input file: results to outbox/, failures to failed/, inputs to done/.

SPEC sections 1 and 3. Each function is idempotent per job, which is how a crash
between doing the work and recording it in the state database never yields a
second copy: calling again with the same `job` finds what the first call left
and completes it instead of starting over.

Order on disk, and what a crash at each point leaves:

- results: `NAME.json` (manifest, carrying `"job"`) is written, then `NAME.npy`.
  A manifest of this job without its `.npy` is finished on the next call; the
  `.npy` appearing means "complete" to readers.
- failures: `NAME.error.json` first, then the input is moved next to it under
  the same base name. A retry finds the error file by its `"job"` and moves the
  input if it is still at its source.

Both look for their earlier work under the names `candidate_names` yields
(`NAME`, `NAME~JOB`, ...), reading small JSON files with the same care as inputs
(no links followed, no FIFO opened), since failed/ holds arbitrary user files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
from numpy.lib import format as npy_format

from embedd.crashpoints import crash_point
from embedd.errors import InputRejected
from embedd.files.jsonio import dumps_document
from embedd.files.spool import (
    SpoolPaths,
    Writer,
    atomic_write,
    candidate_names,
    fsync_dir,
    move_exact,
    read_input,
    rename_noreplace,
)

MAX_SIDECAR_BYTES = 64 << 20  # a manifest or error file larger than this is not ours


def _job_of(path: Path) -> str | None:
    """The `"job"` of a JSON sidecar we may have written, or None if it is not one."""
    try:
        doc = json.loads(read_input(path, MAX_SIDECAR_BYTES))
    except (FileNotFoundError, InputRejected, ValueError, UnicodeDecodeError):
        return None
    job = doc.get("job") if isinstance(doc, dict) else None
    return job if isinstance(job, str) else None


def _json_bytes(doc: dict[str, Any]) -> bytes:
    # ASCII escapes keep names that are not valid UTF-8 (surrogate escapes) writable
    # Money (`Decimal`, a manifest's cost_usd) is written exactly, never as a float.
    return (dumps_document(doc) + "\n").encode("ascii")


def _with_job(doc: dict[str, Any], job: str, what: str) -> dict[str, Any]:
    if doc.get("job", job) != job:
        raise ValueError(f"{what} says job {doc['job']!r}, not {job!r}")
    return {**doc, "job": job}


@dataclass(frozen=True)
class RowStream:
    """A result too large to hold twice: its shape, and its rows as they are produced,
    each a row (1-D) or a block of consecutive rows (2-D)."""

    shape: tuple[int, int]
    rows: Callable[[], Iterator[npt.NDArray[np.floating]]]


def _npy_writer(array: npt.NDArray[np.float32]) -> Writer:
    def write(f: BinaryIO) -> None:
        npy_format.write_array(f, array, allow_pickle=False)

    return write


STREAM_BLOCK_BYTES = 8 << 20  # single rows and small blocks are gathered to this size
DIRECT_BYTES = 1 << 20  # a block of rows this big is written as it comes


def _npy_stream_writer(stream: RowStream) -> Writer:
    """Write the `.npy` header, then the rows as they come: a block of at least
    `DIRECT_BYTES` straight through, single rows and smaller blocks gathered into
    blocks of a few MB first (one finiteness check and one write per block); check
    count, size, finiteness."""
    n, d = stream.shape

    def write(f: BinaryIO) -> None:
        header = {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (n, d)}
        npy_format.write_array_header_1_0(f, header)
        staging = np.empty((max(1, min(n, STREAM_BLOCK_BYTES // max(1, 4 * d))), d), np.float32)
        count = filled = 0  # rows taken, rows of them waiting in `staging`

        def put(rows: npt.NDArray[np.floating], first: int) -> None:
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                raise ValueError(f"row {first + int(np.argmax(bad))} is not finite")
            f.write(np.ascontiguousarray(rows, dtype=np.float32).data.cast("B"))
            f.flush()
            # Start the disk writing these bytes now (and drop them from the page cache
            # once written), so the final fsync finds little left to do.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

        for item in stream.rows():
            shape = np.shape(item)
            rows = item if len(shape) == 2 else np.reshape(item, (1, -1)) if shape else None
            if rows is None or rows.shape[1] != d:
                raise ValueError(f"row {count} has shape {shape[-1:]}, expected ({d},)")
            if count + len(rows) > n:
                raise ValueError(f"more than {n} rows for a result of {n} records")
            if len(rows) * d * 4 >= DIRECT_BYTES:
                if filled:
                    put(staging[:filled], count - filled)
                    filled = 0
                put(rows, count)
                count += len(rows)
                continue
            done = 0
            while done < len(rows):
                take = min(len(rows) - done, len(staging) - filled)
                staging[filled : filled + take] = rows[done : done + take]
                filled, done, count = filled + take, done + take, count + take
                if filled == len(staging):
                    put(staging, count - filled)
                    filled = 0
        if filled:
            put(staging[:filled], count - filled)
        if count != n:
            raise ValueError(f"{count} rows for a result of {n} records")

    return write


def _writer_for(vectors: npt.NDArray[np.floating] | RowStream) -> Writer:
    if isinstance(vectors, RowStream):
        return _npy_stream_writer(vectors)
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"vectors must be 2-D (records x dimensions), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("vectors must be finite")
    return _npy_writer(array)


def find_result(paths: SpoolPaths, name: str, job: str) -> str | None:
    """Base name (`NAME` or `NAME~JOB`...) whose manifest in outbox/ belongs to `job`."""
    for base in candidate_names(name, job):
        if _job_of(paths.outbox / f"{base}.json") == job:
            return base
    return None


def write_result(
    paths: SpoolPaths,
    name: str,
    job: str,
    vectors: npt.NDArray[np.floating] | RowStream,
    manifest: dict[str, Any],
) -> Path:
    """Write `outbox/NAME.json` then `outbox/NAME.npy` atomically; return the `.npy` path.

    `vectors` become float32, C order, shape (records, dimensions); they must be
    2-D and finite. A `RowStream` is written row by row as it is produced, so a large
    result is never held in memory whole. `manifest["job"]` is set to `job` (a different job is an
    error). If `NAME.npy` or `NAME.json` already belongs to something else, the
    pair is `NAME~JOB.npy` / `NAME~JOB.json`. If this job's result is already
    there, nothing is written and its path is returned.
    """
    writer = _writer_for(vectors)
    doc = _with_job(manifest, job, "manifest")
    base = find_result(paths, name, job)
    if base is not None:
        npy = paths.outbox / f"{base}.npy"
        if not os.path.lexists(npy):  # crashed after the manifest: finish it
            atomic_write(paths.outbox, npy.name, writer, replace=False)
        return npy
    for base in candidate_names(name, job):
        manifest_path = paths.outbox / f"{base}.json"
        npy = paths.outbox / f"{base}.npy"
        if os.path.lexists(manifest_path) or os.path.lexists(npy):
            continue
        try:
            atomic_write(paths.outbox, manifest_path.name, _json_bytes(doc), replace=False)
        except FileExistsError:
            continue  # appeared meanwhile; try the next name
        crash_point("during_outbox_write")
        atomic_write(paths.outbox, npy.name, writer, replace=False)
        return npy
    raise FileExistsError(f"no free name for the result of {name} in {paths.outbox}")


def find_failure(paths: SpoolPaths, name: str, job: str) -> str | None:
    """Base name in failed/ whose `.error.json` belongs to `job`."""
    for base in candidate_names(name, job):
        if _job_of(paths.failed / f"{base}.error.json") == job:
            return base
    return None


def write_failure(
    paths: SpoolPaths, source: Path, name: str, job: str, error: dict[str, Any]
) -> Path:
    """Write `failed/NAME.error.json`, then move `source` to `failed/NAME`; return the latter.

    `error` is `{"source", "sha256", "job", "reason", "records"}` as given (its
    `"job"` is set to `job`). `source` may be a file, symlink, FIFO or folder; it
    is moved, never opened or followed. If either name is taken by something
    else, `NAME~JOB` is used for both. Idempotent per job; a `source` that is
    already gone is fine (the error file alone is written).
    """
    doc = _with_job(error, job, "error")
    base = find_failure(paths, name, job)
    if base is None:
        for candidate in candidate_names(name, job):
            target = paths.failed / candidate
            err = paths.failed / f"{candidate}.error.json"
            if os.path.lexists(target) or os.path.lexists(err):
                continue
            try:
                atomic_write(paths.failed, err.name, _json_bytes(doc), replace=False)
            except FileExistsError:
                continue
            base = candidate
            break
        else:
            raise FileExistsError(f"no free name for the failure of {name} in {paths.failed}")
    target = paths.failed / base
    if os.path.lexists(source):
        if not move_exact(source, target):
            raise FileExistsError(f"{target} is taken by another file; {source} stays")
        fsync_dir(paths.failed)
        fsync_dir(source.parent)
    return target


def finish_input(paths: SpoolPaths, source: Path, name: str, job: str, keep: bool) -> Path | None:
    """After a result is delivered: move `source` to `done/` (never overwriting) or delete it.

    Returns the path in done/, or None when deleted or when `source` was already
    gone (a repeated call after a crash).
    """
    if not os.path.lexists(source):
        return None
    if keep:
        return rename_noreplace(source, paths.done, name, job)
    source.unlink(missing_ok=True)
    fsync_dir(source.parent)
    return None
