"""Collection: poll batches in flight, download their files, store the vectors.

A batch that reached a terminal status is moved to `collecting` first (intent), then
its output and error files are streamed to disk and parsed line by line in a worker
thread, a slice at a time. Vectors are stored slice by slice (idempotent: a crash
repeats the download and re-inserts nothing twice); the verdict on every other
request and the ledger row land in one final transaction with `collected`.

Outcome policy (SPEC §4):
    completed          missing custom_id → retry (counted against max_retries)
    expired, cancelled missing → re-queued at no cost to retries
    failed             token_limit_exceeded → all re-queued, back off, learn the limit;
                       errors naming lines → those fail for good, the rest re-queued;
                       otherwise → retry (counted), so a poison shard cannot loop
    error-file lines   batch_expired / batch_cancelled → re-queued at no cost to retries;
                       retryable (429, 5xx) → retry; anything else fails its record
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO, Any

from embedd.accounting import flush_ledger, ledger_time
from embedd.batchlines import LineResult, MalformedLine, parse_output_line
from embedd.cost import entry_row, make_entry
from embedd.crashpoints import crash_point
from embedd.errors import EmbeddError, SubmissionPaused, TransientError
from embedd.planner import learn_queue_limit
from embedd.runtime import Runtime
from embedd.states import BATCH_TERMINAL
from embedd.vectors import VectorLike

SLICE = 1000
READ_BUFFER = 1 << 20  # output lines are ~16 KB at 3072 dimensions: read many at once
# Error-file codes for lines the batch never ran because it expired or was
# cancelled: re-queued at no cost to their retries (SPEC §4), like missing lines.
UNFINISHED_CODES = frozenset({"batch_expired", "batch_cancelled"})


def downloads_dir(rt: Runtime) -> Path:
    return rt.paths.state_dir / "downloads"


async def poll_loop(rt: Runtime) -> None:
    """Poll every batch in flight each poll interval; collect those that ended."""
    while not rt.stopping.is_set():
        try:
            await poll_once(rt)
        except SubmissionPaused as exc:
            rt.log.error("poll.paused", reason=exc.message)
        except TransientError as exc:
            rt.log.warning("poll.retry_later", error=exc.message)
        await rt.wake.wait("poll", rt.poll_interval)


async def poll_once(rt: Runtime) -> None:
    for row in await rt.store.shards_in("collecting"):
        await collect(rt, row["id"], json.loads(row["final"]))
    now = rt.clock()
    for row in await rt.store.shards_in("submitted"):
        if rt.stopping.is_set():
            return
        if row["polled_at"] is not None and now - row["polled_at"] < rt.poll_interval * 0.9:
            continue
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


def _stuck(rt: Runtime, batch: dict[str, Any], now: float) -> bool:
    expires = batch.get("expires_at")
    return isinstance(expires, int | float) and now > expires + rt.settings.batch_expiry_grace


async def collect(rt: Runtime, shard: str, batch: dict[str, Any]) -> None:
    """Collect one ended batch: vectors, per-request verdicts, ledger line."""
    s = rt.settings
    sent = await rt.store.shard_tokens(shard)
    status = str(batch.get("status"))
    batch_id = str(batch.get("id"))
    seen: set[str] = set()
    retry: list[tuple[str, str]] = []
    fail: list[tuple[str, str]] = []
    requeue: list[str] = []
    completed = 0
    line_tokens = 0
    downloads = downloads_dir(rt)
    downloads.mkdir(parents=True, exist_ok=True)
    files = [
        (kind, batch.get(f"{kind}_file_id"))
        for kind in ("output", "error")
        if batch.get(f"{kind}_file_id")
    ]
    for kind, file_id in files:
        dest = downloads / f"{shard}.{kind}.jsonl"
        await rt.client.download_file(str(file_id), dest)
        with dest.open("rb", buffering=READ_BUFFER) as fh:
            async for results in parsed_slices(fh, s.openai_dimensions):
                good: list[tuple[str, VectorLike, int | None]] = []
                for r in results:
                    if r.custom_id not in sent or r.custom_id in seen:
                        rt.log.warning("batch.unexpected_line", shard=shard, custom_id=r.custom_id)
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
                await rt.store.add_vectors(good, origin=batch_id, now=rt.clock())
    crash_point("after_collect_vectors")
    missing = [k for k in sent if k not in seen]
    if status == "completed":
        retry.extend((k, "missing from the batch's output and error files") for k in missing)
    elif status in ("expired", "cancelled"):
        requeue.extend(missing)
    elif status == "failed":
        await _failed_batch(rt, shard, batch, missing, fail, requeue, retry)
    usage = batch.get("usage") or {}
    billed = usage.get("input_tokens") if isinstance(usage, dict) else None
    tokens = int(billed) if isinstance(billed, int) and billed > 0 else line_tokens
    ledger_row = None
    unbilled = {k for k, _ in retry} | {k for k, _ in fail}
    if completed or tokens:
        entry = make_entry(
            "batch",
            batch_id=batch_id,
            model=s.openai_model,
            dimensions=s.openai_dimensions,
            requests=completed,
            tokens=tokens,
            estimated_tokens=sum(sent[k] for k in seen if k not in unbilled),
            dedup_tokens=0,
            emulated=rt.emulated,
            prices=rt.prices,
            now=ledger_time(rt),
        )
        ledger_row = entry_row(entry)
    await rt.store.apply_results(
        shard=shard,
        vectors=[],
        origin=batch_id,
        retry=retry,
        fail=fail,
        requeue=requeue,
        max_retries=s.retry_max_retries,
        ledger=ledger_row,
        now=rt.clock(),
    )
    rt.log.info(
        "batch.collected",
        shard=shard,
        batch=batch_id,
        status=status,
        completed=completed,
        retried=len(retry),
        failed=len(fail),
        requeued=len(requeue),
        tokens=tokens,
    )
    await flush_ledger(rt)
    await _clean_up(rt, shard, batch, files)
    rt.wake.kick("deliver", "plan", "retain")


async def _failed_batch(
    rt: Runtime,
    shard: str,
    batch: dict[str, Any],
    missing: list[str],
    fail: list[tuple[str, str]],
    requeue: list[str],
    retry: list[tuple[str, str]],
) -> None:
    errors = ((batch.get("errors") or {}).get("data")) or []
    if any(e.get("code") == "token_limit_exceeded" for e in errors):
        requeue.extend(missing)
        message = " ".join(str(e.get("message", "")) for e in errors)
        limit = learn_queue_limit(message)
        if limit is not None and limit < rt.queue_limit:
            rt.log.warning(
                "queue_limit.learned", configured=rt.queue_limit, organisation_limit=limit
            )
            rt.queue_limit = limit
            await rt.store.set_fact("queue_limit", limit)
        rt.queue_backoff_streak += 1
        delay = rt.client.policy.delay(rt.queue_backoff_streak, None)
        rt.queue_backoff_until = rt.clock() + delay
        rt.log.warning("batch.queue_limit", shard=shard, requeued=len(missing), backoff_s=delay)
        return
    by_line = {int(e["line"]): e for e in errors if isinstance(e.get("line"), int)}
    if by_line:
        shard_file = Path(await rt.store.shard_path(shard) or "")
        ids = await asyncio.to_thread(_custom_ids_by_line, shard_file)
        bad = {ids[n]: e for n, e in by_line.items() if n in ids}
        for key in missing:
            if key in bad:
                fail.append((key, f"{bad[key].get('code')}: {bad[key].get('message')}"))
            else:
                requeue.append(key)
        return
    reason = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or "batch failed"
    retry.extend((k, reason) for k in missing)


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
    rt: Runtime, shard: str, batch: dict[str, Any], files: list[tuple[str, Any]]
) -> None:
    """Remove local copies and the files at OpenAI; failures here cost nothing."""
    for kind, _ in files:
        (downloads_dir(rt) / f"{shard}.{kind}.jsonl").unlink(missing_ok=True)
    path = await rt.store.shard_path(shard)
    if path:
        Path(path).unlink(missing_ok=True)
    remote = [batch.get("input_file_id"), *(fid for _, fid in files)]
    for file_id in remote:
        if not file_id:
            continue
        try:
            await rt.client.delete_file(str(file_id))
        except EmbeddError as exc:
            rt.log.info("file.delete_failed", file_id=file_id, error=exc.message)
