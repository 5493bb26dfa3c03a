"""Delivery: a file whose every piece is embedded becomes `.npy` + manifest.

The file moves `queued → writing` first (intent). The outbox writer is idempotent
per job — it finds a result this job already wrote — so a crash anywhere in here
is finished by running it again, and never yields a second copy. Then the input
moves to `done/` (or is deleted) and the file becomes `done`. A file with a record
that failed for good goes to `failed/` whole, with each record's error.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedd import metrics
from embedd.config import Settings
from embedd.crashpoints import crash_point, fault_point
from embedd.errors import InputRejected
from embedd.files.outbox import RowStream, finish_input, write_result
from embedd.files.refusal import refuse
from embedd.files.spool import SpoolPaths
from embedd.money.books import Books
from embedd.money.budget import record_dedup
from embedd.money.ledger import format_ts
from embedd.money.prices import lane_cost
from embedd.pipeline.supervise import Supervisor
from embedd.pipeline.wakeups import Wakeups
from embedd.state.store import Store, piece_blocks
from embedd.tokens import combine_chunks


@dataclass(frozen=True)
class Delivery:
    """What the delivery stage uses."""

    settings: Settings
    paths: SpoolPaths
    store: Store
    clock: Callable[[], float]
    log: Any
    wake: Wakeups
    guard: Supervisor
    stopping: asyncio.Event
    books: Books


def rfc3339(ts: float) -> str:
    """`ts` (seconds since the epoch) in the ledger's one timestamp format."""
    return format_ts(datetime.fromtimestamp(ts, UTC))


async def deliver_loop(rt: Delivery) -> None:
    while not rt.stopping.is_set():
        await deliver_ready(rt)
        await rt.wake.wait("deliver", 2.0)


async def deliver_ready(rt: Delivery) -> int:
    """Deliver every file that is complete; return how many."""
    delivered = 0
    for row in await rt.store.ready_files():
        if rt.stopping.is_set():
            break
        if await rt.guard.run(
            "deliver",
            f"job:{row['job']}",
            functools.partial(deliver, rt, row),
            functools.partial(_give_up, rt, row),
        ):
            delivered += 1
    return delivered


async def _give_up(rt: Delivery, row: Any, reason: str) -> None:
    """A delivery that failed for good (SPEC §8): the input goes to failed/."""
    await _refuse(rt, row, InputRejected(reason))


async def _refuse(rt: Delivery, row: Any, exc: InputRejected) -> None:
    """The file's input to failed/ with `exc` as the reason."""
    job = row["job"]
    await refuse(
        rt.store, rt.paths, rt.log, job, row["name"], rt.paths.work / job, exc, row["sha256"]
    )


async def deliver(rt: Delivery, row: Any) -> None:
    job, name = row["job"], row["name"]
    work = rt.paths.work / job
    if row["state"] == "queued":
        await rt.store.move_file(job, "writing")
    records = await rt.store.file_records(job)
    pieces = await rt.store.file_pieces(job)
    errors = [
        {"id": records[p["idx"]]["rid"], "error": p["error"] or "the API refused this input"}
        for p in pieces
        if not p["embedded"]
    ]
    if errors:
        reason = (
            f"{name}: {len(errors)} of {len(records)} record(s) could not be embedded; "
            f"first: {errors[0]['id']!r}: {errors[0]['error']}"
        )
        await _refuse(rt, row, InputRejected(reason, records=errors))
        return
    chunks = [0] * len(records)
    for p in pieces:
        chunks[p["idx"]] += 1
    origins = {p["origin"] for p in pieces if p["origin"]}
    rows = RowStream(
        (len(records), rt.settings.openai_dimensions),
        functools.partial(record_rows, piece_blocks(rt.store.path, job)),
    )
    s = rt.settings
    billed = sum(r["tokens"] for r in records if not r["cached"])
    manifest: dict[str, Any] = {
        "source": name,
        "sha256": row["sha256"],
        "job": job,
        "model": s.openai_model,
        "dimensions": s.openai_dimensions,
        "mode": row["lane"],
        "emulated": rt.books.emulated,
        "records": [_record_entry(r, chunks[i]) for i, r in enumerate(records)],
        "tokens": sum(r["tokens"] for r in records),
        "cost_usd": lane_cost(
            rt.books.prices, s.openai_model, billed, row["lane"]
        ),  # Decimal: written exactly
        "batches": sorted(origins),
        "submitted_at": rfc3339(row["claimed_at"]),
        "completed_at": rfc3339(rt.clock()),
    }
    path = await asyncio.to_thread(_write_result, rt, name, job, rows, manifest)
    crash_point("after_outbox_write")
    await asyncio.to_thread(finish_input, rt.paths, work, name, job, s.spool_keep_inputs)
    dedup = sum(r["tokens"] for r in records if r["cached"])
    if dedup:
        await record_dedup(rt.books, job, row["lane"], dedup)
    await rt.store.move_file(job, "done", completed_at=rt.clock(), result=str(path))
    rt.log.info("file.done", file=name, job=job, result=path.name, records=len(records))
    cached = sum(1 for r in records if r["cached"])
    metrics.file_finished(
        row["lane"], "done", {"embedded": len(records) - cached, "cached": cached}
    )

    rt.wake.kick("retain")  # its vectors may leave the cache now, its texts have left


def _write_result(
    rt: Delivery, name: str, job: str, rows: RowStream, manifest: dict[str, Any]
) -> Path:
    fault_point("outbox_enospc")
    return write_result(rt.paths, name, job, rows, manifest)


def _record_entry(r: Any, chunks: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": r["rid"], "tokens": r["tokens"], "chunks": chunks}
    if r["cached"]:
        entry["cached"] = True
    if r["meta"] is not None:
        entry["meta"] = json.loads(r["meta"])
    return entry


def record_rows(
    blocks: Iterable[tuple[Sequence[int], Sequence[int], npt.NDArray[np.float32]]],
) -> Iterator[npt.NDArray[np.float32]]:
    """One row per record, in order, from its pieces' blocks (`store.piece_blocks`,
    which never splits a record between blocks): a record of several chunks becomes
    their token-weighted mean, re-normalised (SPEC §2, `long = "average"`). A block of
    one-piece records comes out whole."""
    for idxs, tokens, block in blocks:
        if all(a < b for a, b in itertools.pairwise(idxs)):
            yield block
            continue
        for _, group in itertools.groupby(zip(idxs, tokens, block, strict=True), key=_first):
            parts = list(group)
            if len(parts) == 1:
                yield parts[0][2]
            else:
                vectors = np.stack([v for _, _, v in parts])
                yield combine_chunks(vectors, [t for _, t, _ in parts])


def _first(piece: tuple[int, int, npt.NDArray[np.float32]]) -> int:
    return piece[0]
