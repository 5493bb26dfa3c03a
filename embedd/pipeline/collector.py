"""Collection: poll batches in flight, download their files, store the vectors.

A batch that reached a terminal status is moved to `collecting` first (intent), then
its output and error files are streamed to disk and parsed line by line in a worker
thread, a slice at a time. Vectors are stored slice by slice (idempotent: a crash
repeats the download and re-inserts nothing twice); the verdict on every other
request and the ledger row land in one final transaction with `collected`.

The outcome policy (SPEC §4) — what happens to each request of an ended batch — is
a pure function in embedd.pipeline.outcome; `collect` applies its verdict.

`collect`, step by step: `_store_vectors` (download, parse, store vectors slice by
slice), `_judge` (the verdict on the requests no line named), the gate's backoff for
a full queue, `_bill` (tokens and the ledger row), `_close` (remote deletes planned,
verdict and ledger row applied, shard closed), then the ledger flush and clean-up.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from embedd import metrics
from embedd.config import Settings
from embedd.crashpoints import crash_point
from embedd.errors import APIPermanentError, EmbeddError, SubmissionPaused, TransientError
from embedd.files.spool import SpoolPaths
from embedd.money.books import Books
from embedd.money.budget import entry_maker, flush_ledger
from embedd.money.ledger import entry_row
from embedd.openai.api import OpenAIClient
from embedd.openai.batchlines import LineResult, MalformedLine, parse_output_line
from embedd.pipeline.gate import SubmissionGate
from embedd.pipeline.outcome import RequestVerdict, batch_errors, judge_missing, needs_line_ids
from embedd.pipeline.supervise import Supervisor
from embedd.pipeline.wakeups import Wakeups
from embedd.state.states import BATCH_TERMINAL, SHARD_IN_FLIGHT
from embedd.state.store import Store
from embedd.state.vectors import VectorLike

SLICE = 1000
READ_BUFFER = 1 << 20  # output lines are ~16 KB at 3072 dimensions: read many at once
# Error-file codes for lines the batch never ran because it expired or was
# cancelled: re-queued at no cost to their retries (SPEC §4), like missing lines.
UNFINISHED_CODES = frozenset({"batch_expired", "batch_cancelled"})


@dataclass(frozen=True)
class Collector:
    """What the collection stage uses. `poll_interval`: seconds between two polls of
    a batch (`[batch] poll_interval`, or `[emulator] poll_interval` when emulated)."""

    settings: Settings
    paths: SpoolPaths
    store: Store
    client: OpenAIClient
    clock: Callable[[], float]
    log: Any
    wake: Wakeups
    guard: Supervisor
    stopping: asyncio.Event
    gate: SubmissionGate
    books: Books
    poll_interval: float


def downloads_dir(rt: Collector) -> Path:
    return rt.paths.state_dir / "downloads"


async def sweep_local_files(rt: Collector) -> list[str]:
    """At start, before any stage runs: remove `state/shards/` and `state/downloads/`
    files (and `.part` leftovers) that no unfinished shard needs; return their names."""
    keep = {r["id"] for r in await rt.store.shards_in(*SHARD_IN_FLIGHT)}
    removed: list[str] = []
    for folder in (rt.paths.state_dir / "shards", downloads_dir(rt)):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            shard = path.name.split(".", 1)[0]
            if path.is_file() and (shard not in keep or path.name.endswith(".part")):
                path.unlink(missing_ok=True)
                removed.append(f"{folder.name}/{path.name}")
    return removed


async def poll_loop(rt: Collector) -> None:
    """Poll every batch in flight each poll interval; collect those that ended."""
    while not rt.stopping.is_set():
        try:
            await rt.guard.run("collect", "poll", functools.partial(poll_once, rt), record=False)
        except SubmissionPaused as exc:
            rt.log.error("poll.paused", reason=exc.message)
        except TransientError as exc:
            rt.log.warning("poll.retry_later", error=exc.message)
        await rt.wake.wait("poll", rt.poll_interval)


async def poll_once(rt: Collector) -> None:
    for row in await rt.store.shards_in("collecting"):
        await _collect_supervised(rt, row["id"], json.loads(row["final"]))
    now = rt.clock()
    for row in await rt.store.shards_in("submitted"):
        if rt.stopping.is_set():
            return
        if row["polled_at"] is not None and now - row["polled_at"] < rt.poll_interval * 0.9:
            continue
        await rt.guard.run(
            "collect",
            f"shard:{row['id']}",
            functools.partial(_poll_shard, rt, row, now),
            functools.partial(give_up_shard, rt, row["id"]),
        )

    await poll_strays(rt)
    await delete_remote_files(rt)


async def _collect_supervised(rt: Collector, shard: str, batch: dict[str, Any]) -> None:
    """`collect` as a supervised unit (SPEC §8): given up, its requests fail for good."""
    await rt.guard.run(
        "collect",
        f"shard:{shard}",
        functools.partial(collect, rt, shard, batch),
        functools.partial(give_up_shard, rt, shard),
    )


async def give_up_shard(rt: Collector, shard: str, reason: str) -> None:
    """A batch that cannot be polled or collected, for good: what it did not deliver
    fails with `reason` (vectors already stored stay), and the shard is closed. Its
    batch is handed to the stray-batch settlement: cancelled if it still runs, and
    what OpenAI billed for it still gets its one ledger line (SPEC §6)."""
    rows = [r for r in await rt.store.shards_in("submitted", "collecting") if r["id"] == shard]
    if not rows:
        return
    if rows[0]["batch_id"]:
        await rt.store.add_stray(str(rows[0]["batch_id"]), shard, rows[0]["status"], rt.clock())
    if rows[0]["state"] == "submitted":
        await rt.store.move_shard(shard, "collecting", final=json.dumps({"error": reason}))
    await rt.store.fail_shard_requests(
        shard, reason, collected=True, max_retries=rt.settings.retry_max_retries, now=rt.clock()
    )
    rt.wake.kick("deliver", "plan")


async def _poll_shard(rt: Collector, row: Any, now: float) -> None:
    batch = await rt.client.retrieve_batch(row["batch_id"])
    status = batch.get("status")
    if status != row["status"]:
        rt.log.info(
            "batch.status",
            shard=row["id"],
            batch=row["batch_id"],
            status=status,
            previous=row["status"],
            request_counts=batch.get("request_counts"),
        )
    await rt.store.update_shard(
        row["id"],
        status=status,
        polled_at=now,
        request_counts=json.dumps(batch.get("request_counts")),
        expires_at=batch.get("expires_at"),
    )
    if status in BATCH_TERMINAL:
        # Keep the final batch object with the shard: collection may be resumed.
        await rt.store.move_shard(row["id"], "collecting", final=json.dumps(batch))
        await collect(rt, row["id"], batch)
    elif _stuck(rt, batch, now) and status != "cancelling":
        rt.log.warning("batch.stuck_cancelled", shard=row["id"], batch=row["batch_id"])
        await rt.client.cancel_batch(row["batch_id"])


def _stuck(rt: Collector, batch: dict[str, Any], now: float) -> bool:
    expires = batch.get("expires_at")
    return isinstance(expires, int | float) and now > expires + rt.settings.batch_expiry_grace


@dataclass
class _Lines:
    """What the output and error files said, line by line (vectors already stored)."""

    seen: set[str]
    verdict: RequestVerdict  # on the error-file lines
    completed: int  # lines with a vector
    line_tokens: int  # the tokens those lines report


async def collect(rt: Collector, shard: str, batch: dict[str, Any]) -> None:
    """Collect one ended batch: vectors, per-request verdicts, ledger line."""
    # Membership from the shard's own record: a resumed collection (after a kill, or
    # a failed download) counts every line again, not only those still planned.
    sent = await rt.store.shard_members(shard) or await rt.store.shard_tokens(shard)
    files = [
        (kind, batch.get(f"{kind}_file_id"))
        for kind in ("output", "error")
        if batch.get(f"{kind}_file_id")
    ]
    lines = await _store_vectors(rt, shard, batch, sent, files)
    crash_point("after_collect_vectors")
    judged = await _judge(rt, shard, batch, sent, lines.seen)
    if judged.queue_full:
        delay = await rt.gate.queue_full(judged.learned_limit)
        rt.log.warning(
            "batch.queue_limit", shard=shard, requeued=len(judged.requeue), backoff_s=delay
        )
    verdict = lines.verdict + judged
    tokens, ledger_row = _bill(rt, batch, sent, lines, verdict)
    await _close(rt, shard, batch, files, verdict, ledger_row)
    rt.log.info(
        "batch.collected",
        shard=shard,
        batch=str(batch.get("id")),
        status=str(batch.get("status")),
        completed=lines.completed,
        retried=len(verdict.retry),
        failed=len(verdict.fail),
        requeued=len(verdict.requeue),
        tokens=tokens,
    )
    created = batch.get("created_at")
    if isinstance(created, int | float):  # submitted (the API's clock) to collected
        metrics.TURNAROUND.observe(max(0.0, rt.clock() - created))
    await flush_ledger(rt.books)
    await _clean_up(rt, shard, batch, files)
    rt.wake.kick("deliver", "plan", "retain")


async def _store_vectors(
    rt: Collector,
    shard: str,
    batch: dict[str, Any],
    sent: dict[str, int],
    files: list[tuple[str, Any]],
) -> _Lines:
    """Download the output and error files, store their vectors a slice at a time, and
    sort their other lines (retry, fail, requeue)."""
    s = rt.settings
    batch_id = str(batch.get("id"))
    seen: set[str] = set()
    retry: list[tuple[str, str]] = []
    fail: list[tuple[str, str]] = []
    requeue: list[str] = []
    completed = 0
    line_tokens = 0
    downloads = downloads_dir(rt)
    downloads.mkdir(parents=True, exist_ok=True)
    for kind, file_id in files:
        dest = downloads / f"{shard}.{kind}.jsonl"
        try:
            await rt.client.download_file(str(file_id), dest)
        except APIPermanentError as exc:
            # The file is gone (404): its lines count as missing, per SPEC §4.
            rt.log.error("batch.file_unavailable", shard=shard, kind=kind, error=exc.message)
            continue
        with dest.open("rb", buffering=READ_BUFFER) as fh:
            async with rt.store.vector_writer(origin=batch_id, clock=rt.clock) as store:
                async for results in parsed_slices(fh, s.openai_dimensions):
                    good: list[tuple[str, VectorLike, int | None]] = []
                    for r in results:
                        if r.custom_id not in sent or r.custom_id in seen:
                            rt.log.warning(
                                "batch.unexpected_line", shard=shard, custom_id=r.custom_id
                            )
                            continue
                        seen.add(r.custom_id)
                        if r.vector is not None:
                            good.append((r.custom_id, r.vector, r.tokens))
                            line_tokens += r.tokens or 0
                        elif r.error_code in UNFINISHED_CODES:
                            requeue.append(r.custom_id)  # never ran: not a failure, not a try
                        elif r.retryable:
                            retry.append((r.custom_id, _describe(r)))
                        else:
                            fail.append((r.custom_id, _describe(r)))
                    completed += len(good)
                    await store.add(good)
                    crash_point("during_collect_vectors")  # written, not yet indexed
    return _Lines(
        seen, RequestVerdict(tuple(retry), tuple(fail), tuple(requeue)), completed, line_tokens
    )


async def _judge(
    rt: Collector, shard: str, batch: dict[str, Any], sent: dict[str, int], seen: set[str]
) -> RequestVerdict:
    """The verdict (embedd.pipeline.outcome) on the requests no line of the batch's files named."""
    status = str(batch.get("status"))
    errors = batch_errors(batch)
    ids: dict[int, str] = {}
    if needs_line_ids(status, errors):
        shard_file = Path(await rt.store.shard_path(shard) or "")
        ids = await asyncio.to_thread(_custom_ids_by_line, shard_file)
    return judge_missing(status, [k for k in sent if k not in seen], errors, ids)


def _bill(
    rt: Collector,
    batch: dict[str, Any],
    sent: dict[str, int],
    lines: _Lines,
    verdict: RequestVerdict,
) -> tuple[int, tuple[str, str, str, str] | None]:
    """The tokens billed for the batch (the API's usage when it is exact, else what the
    lines report or, failing that, our own count) and its ledger row (None: nothing)."""
    completed = lines.completed
    usage = batch.get("usage") or {}
    billed = usage.get("input_tokens") if isinstance(usage, dict) else None
    exact = (
        isinstance(billed, int) and not isinstance(billed, bool) and (billed > 0 or not completed)
    )
    tokens = int(billed) if exact and isinstance(billed, int) else lines.line_tokens
    unbilled = verdict.unbilled()
    if not exact and completed and not tokens:
        tokens = sum(sent[k] for k in lines.seen if k not in unbilled)
    if not (completed or tokens):
        return tokens, None
    entry = entry_maker(rt.books).usage(
        "batch",
        batch_id=str(batch.get("id")),
        requests=completed,
        tokens=tokens,
        estimated_tokens=sum(sent[k] for k in lines.seen if k not in unbilled),
        estimated=not exact,
    )
    return tokens, entry_row(entry)


async def _close(
    rt: Collector,
    shard: str,
    batch: dict[str, Any],
    files: list[tuple[str, Any]],
    verdict: RequestVerdict,
    ledger_row: tuple[str, str, str, str] | None,
) -> None:
    """Record the remote deletes, then apply the verdict and the ledger row and close
    the shard, in one transaction."""
    # Recorded before the shard is final; carried out (and retried) once it is.
    remote = [("input", batch.get("input_file_id")), *files]
    await rt.store.plan_remote_deletes(
        [(str(fid), shard, kind) for kind, fid in remote if fid], rt.clock()
    )
    await rt.store.apply_results(
        verdict,
        shard=shard,
        origin=str(batch.get("id")),
        ledger=ledger_row,
        max_retries=rt.settings.retry_max_retries,
        now=rt.clock(),
    )


def _custom_ids_by_line(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            out[number] = str(json.loads(line)["custom_id"])
    return out


async def parsed_slices(fh: IO[bytes], dimensions: int) -> AsyncIterator[list[LineResult]]:
    """The file's lines parsed a slice at a time in a worker thread, the next slice
    parsed while the caller stores this one (its vectors' disk sync overlaps parsing)."""
    ahead = asyncio.ensure_future(asyncio.to_thread(_parse_slice, fh, dimensions))
    try:
        while results := await ahead:
            ahead = asyncio.ensure_future(asyncio.to_thread(_parse_slice, fh, dimensions))
            yield results
    finally:
        if not ahead.done():
            await asyncio.wait([ahead])  # the thread reads `fh`: let it finish first
        if not ahead.cancelled():
            ahead.exception()  # retrieved: an error of the caller's own wins


def _parse_slice(fh: IO[bytes], dimensions: int) -> list[LineResult]:
    out: list[LineResult] = []
    for line in _lines(fh, SLICE):
        try:
            out.append(parse_output_line(line, dimensions))
        except MalformedLine:
            continue  # its custom_id is then missing, and handled as such
    return out


def _lines(fh: IO[bytes], n: int) -> Iterator[bytes]:
    for _ in range(n):
        line = fh.readline()
        if not line:
            return
        if not line.isspace():  # (no copy of a 16 KB line, unlike strip())
            yield line


def _describe(r: LineResult) -> str:
    parts = [str(p) for p in (r.error_status, r.error_code) if p is not None]
    return (
        f"{' '.join(parts)}: {r.error_message or 'no message'}" if parts else str(r.error_message)
    )


async def _clean_up(
    rt: Collector, shard: str, batch: dict[str, Any], files: list[tuple[str, Any]]
) -> None:
    """Remove the local copies; the files at OpenAI go through the recorded deletes."""
    for kind, _ in files:
        dest = downloads_dir(rt) / f"{shard}.{kind}.jsonl"
        dest.unlink(missing_ok=True)
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
    path = await rt.store.shard_path(shard)
    if path:
        Path(path).unlink(missing_ok=True)
    await delete_remote_files(rt)


async def delete_remote_files(rt: Collector) -> None:
    """Carry out the recorded deletes that are due; a failure is retried with backoff."""
    now = rt.clock()
    for row in await rt.store.due_remote_deletes(now):
        if rt.stopping.is_set():
            return
        file_id = str(row["file_id"])
        try:
            await rt.client.delete_file(file_id)
        except APIPermanentError as exc:
            if exc.status != 404:
                rt.log.warning("file.delete_refused", file_id=file_id, error=exc.message)
            # 404: already gone. Anything else permanent: retrying cannot help.
        except EmbeddError as exc:
            attempts = int(row["attempts"]) + 1
            delay = rt.client.policy.delay(attempts, getattr(exc, "retry_after", None))
            await rt.store.remote_delete_failed(file_id, exc.message, now + delay)
            rt.log.info("file.delete_failed", file_id=file_id, error=exc.message, retry_in_s=delay)
            continue
        await rt.store.remote_delete_done(file_id)
        rt.log.info("file.deleted", file_id=file_id, kind=row["kind"], shard=row["shard"])


async def poll_strays(rt: Collector) -> None:
    """Second batches found for a shard: cancel while they run, bill them when they end.

    Their output is not used (the shard's own batch carries its work); what OpenAI
    billed for them still gets exactly one `batch` ledger line (SPEC §6).
    """
    for row in await rt.store.open_strays():
        if rt.stopping.is_set():
            return
        batch_id = str(row["batch_id"])
        try:
            batch = await rt.client.retrieve_batch(batch_id)
            status = batch.get("status")
            if status not in BATCH_TERMINAL:
                if status != "cancelling":
                    await rt.client.cancel_batch(batch_id)
                continue
        except APIPermanentError as exc:
            rt.log.error("batch.duplicate_refused", batch=batch_id, error=exc.message)
            continue
        counts = batch.get("request_counts") or {}
        completed = int(counts.get("completed") or 0)
        total = int(counts.get("total") or 0)
        usage = batch.get("usage") or {}
        billed = usage.get("input_tokens") if isinstance(usage, dict) else None
        exact = isinstance(billed, int) and not isinstance(billed, bool)
        if exact and isinstance(billed, int):
            tokens = billed
        else:
            members = await rt.store.shard_members(str(row["shard"]))
            share = completed / total if total else 0.0
            tokens = round(sum(members.values()) * share)
        ledger_row = None
        if completed or tokens:
            entry = entry_maker(rt.books).usage(
                "batch",
                batch_id=batch_id,
                requests=completed,
                tokens=tokens,
                estimated_tokens=0,
                estimated=not exact,
            )
            ledger_row = entry_row(entry)
        files = [
            (str(batch[f"{kind}_file_id"]), kind)
            for kind in ("output", "error")
            if batch.get(f"{kind}_file_id")
        ]
        if files:
            await rt.store.plan_remote_deletes([(f, None, k) for f, k in files], rt.clock())
        if batch.get("input_file_id"):
            await rt.store.plan_remote_deletes(
                [(str(batch["input_file_id"]), str(row["shard"]), "input")], rt.clock()
            )
        await rt.store.settle_stray(batch_id, ledger_row, rt.clock())
        rt.log.warning(
            "batch.duplicate_settled",
            shard=row["shard"],
            batch=batch_id,
            status=status,
            completed=completed,
            tokens=tokens,
        )
        await flush_ledger(rt.books)
