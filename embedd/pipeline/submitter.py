"""Submission: cut shards from the queue, write their JSONL, upload, create batches.

Every step that costs money or creates something at OpenAI is recorded before and
after, so a restart can tell "not done" from "done but not recorded":

    planned   shard row + `state/shards/SHARD.jsonl` written, requests `planned`
    uploaded  the file id is recorded (upload named `SHARD.jsonl`)
    submitted the batch id is recorded (batch `metadata` names the shard)

    unknown   the create's answer was lost and the lookup failed: no new POST until
              a lookup (every page, no cut-off, with backoff) finds the batch or,
              `[batch] list_lag` after the create, proves it absent

On start and whenever a shard is unknown, `reconcile` lists every batch and every
batch-purpose file at OpenAI *before anything is submitted*: a shard whose batch
exists is recorded as submitted, one whose upload exists is recorded as uploaded, a
second batch for a shard is cancelled and billed (a stray), and files of ours that
nothing needs are deleted. So a crash between any two steps never creates a second
batch, and one that exists anyway is found, stopped and paid for in the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedd.config import Settings
from embedd.crashpoints import crash_point
from embedd.errors import (
    APIPermanentError,
    EmbeddError,
    SubmissionPaused,
    TransientError,
)
from embedd.files.spool import SpoolPaths, fsync_dir
from embedd.money.books import Books
from embedd.money.budget import submission_allowed
from embedd.openai.api import CreateOutcomeUnknown, OpenAIClient
from embedd.openai.batchlines import encode_request_line
from embedd.pipeline.gate import SubmissionGate
from embedd.pipeline.planner import API_MAX_INPUTS_PER_BATCH, ShardLimits, cut_shard, should_submit
from embedd.pipeline.supervise import Supervisor
from embedd.pipeline.wakeups import Wakeups
from embedd.state.states import BATCH_TERMINAL, SHARD_FINISHED, SHARD_UNSUBMITTED, SHARD_UPLOADED
from embedd.state.store import Store, new_id, request_inputs

METADATA_KEY = "embedd_shard"
UPLOAD_PREFIX = "embedd-"


@dataclass(frozen=True)
class Submitter:
    """What the submission stage uses (reconcile at start, then `submit_loop`)."""

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


def upload_name(shard: str) -> str:
    return f"{UPLOAD_PREFIX}{shard}.jsonl"


def shard_of_upload(filename: str) -> str | None:
    if filename.startswith(UPLOAD_PREFIX) and filename.endswith(".jsonl"):
        return filename[len(UPLOAD_PREFIX) : -len(".jsonl")]
    return None


def shards_dir(rt: Submitter) -> Path:
    return rt.paths.state_dir / "shards"


async def reconcile(rt: Submitter) -> None:
    """Match our shards with every batch and file at OpenAI (every page, no cut-off).

    Runs at start before anything is submitted, and whenever a shard is `unknown`.
    A shard not yet submitted whose batch exists is recorded as submitted (the oldest
    such batch is its own); any other batch naming one of our shards is a stray: it
    is cancelled if it still runs, and billed in the ledger when it ends. An `unknown`
    shard with no batch is proven absent only by a listing that started `[batch]
    list_lag` after its create: it goes back to `uploaded` and is created again.
    """
    started = rt.clock()
    found: dict[str, list[dict[str, Any]]] = {}
    async for batch in rt.client.list_batches():
        shard = (batch.get("metadata") or {}).get(METADATA_KEY)
        if isinstance(shard, str):
            found.setdefault(shard, []).append(batch)
    rows: dict[str, Any] = {}
    for shard, batches in found.items():
        row = await rt.store.shard(shard)
        if row is None:
            continue  # not one of ours (another daemon's, or long pruned)
        rows[shard] = row
        batches.sort(key=lambda b: (b.get("created_at") or 0, str(b.get("id"))))
        extras = batches
        if row["state"] in SHARD_UNSUBMITTED:
            ours, extras = batches[0], batches[1:]
            crash_point("during_recovery")  # found at OpenAI, not yet recorded here
            if row["state"] == "planned":
                await rt.store.move_shard(shard, "uploaded", file_id=ours["input_file_id"])
            await _record_submitted(rt, shard, ours)
            rt.log.info("shard.reconciled", shard=shard, batch=ours["id"], found="batch")
        elif row["batch_id"]:
            extras = [b for b in batches if b.get("id") != row["batch_id"]]
        for batch in extras:
            await _stray(rt, shard, batch)
    for row in await rt.store.shards_in("unknown"):
        if row["id"] in found:
            continue
        if started >= (row["unknown_since"] or 0) + rt.settings.batch_list_lag:
            if await rt.store.move_shard(row["id"], "uploaded", error=None):
                rt.log.warning("shard.create_absent", shard=row["id"], file_id=row["file_id"])
        else:
            await rt.store.update_shard(
                row["id"], lookup_at=(row["unknown_since"] or 0) + rt.settings.batch_list_lag
            )
    await _reconcile_files(rt, found, rows)


async def _reconcile_files(
    rt: Submitter, found: dict[str, list[dict[str, Any]]], rows: dict[str, Any]
) -> None:
    """Uploads a planned shard can use; leftovers of ours to delete (recorded, retried)."""
    files: dict[str, dict[str, Any]] = {}
    for purpose in ("batch", "batch_output"):
        async for f in rt.client.list_files(purpose):
            files[str(f.get("id"))] = f
    uploads: dict[str, list[dict[str, Any]]] = {}
    for f in files.values():
        shard = shard_of_upload(str(f.get("filename", "")))
        if shard is not None:
            uploads.setdefault(shard, []).append(f)
    for row in await rt.store.shards_in("planned"):
        if uploads.get(row["id"]):
            file_id = uploads[row["id"]][0]["id"]
            await rt.store.move_shard(row["id"], "uploaded", file_id=file_id)
            rt.log.info("shard.reconciled", shard=row["id"], file_id=file_id, found="upload")
    live = {r["id"] for r in await rt.store.shards_in(*SHARD_UNSUBMITTED)}
    used = {r["file_id"] for r in await rt.store.shards_in(*SHARD_UPLOADED)}
    leftovers: list[tuple[str, str | None, str]] = []
    # Uploads no shard will use: a crash after upload, or a superseded duplicate.
    for shard, ups in uploads.items():
        for f in ups:
            if f["id"] in used or (shard in live and f["id"] == ups[0]["id"]):
                continue
            leftovers.append((str(f["id"]), None, "input"))
    # Files of ended batches of ours whose shard is final: collection is over.
    for shard, batches in found.items():
        rec = rows.get(shard)
        if rec is None or rec["state"] not in SHARD_FINISHED:
            continue
        for batch in batches:
            if batch.get("status") not in BATCH_TERMINAL:
                continue
            for kind in ("input", "output", "error"):
                file_id = batch.get(f"{kind}_file_id")
                if file_id and file_id in files and file_id not in used:
                    leftovers.append((str(file_id), None, kind))
    if leftovers:
        await rt.store.plan_remote_deletes(leftovers, rt.clock())
        rt.log.info("files.leftovers_found", files=len(leftovers))


async def _stray(rt: Submitter, shard: str, batch: dict[str, Any]) -> None:
    """A second batch for a shard that has one: cancel it if it runs; bill it later."""
    batch_id = str(batch.get("id"))
    if not await rt.store.add_stray(batch_id, shard, batch.get("status"), rt.clock()):
        return
    rt.log.warning("batch.duplicate", shard=shard, batch=batch_id, status=batch.get("status"))
    if batch.get("status") not in BATCH_TERMINAL and batch.get("status") != "cancelling":
        try:
            await rt.client.cancel_batch(batch_id)
        except EmbeddError as exc:  # retried when the stray is next looked at
            rt.log.warning("batch.duplicate_cancel_failed", batch=batch_id, error=exc.message)


async def settle_unknown(rt: Submitter) -> None:
    """Look up `unknown` shards whose lookup is due; back off when the lookup fails."""
    now = rt.clock()
    unknown = await rt.store.shards_in("unknown")
    if not any((r["lookup_at"] or 0) <= now for r in unknown):
        return
    try:
        await reconcile(rt)
    except (TransientError, APIPermanentError) as exc:  # a listing that failed settles nothing
        for row in unknown:
            lookups = int(row["lookups"]) + 1
            delay = rt.client.policy.delay(lookups, getattr(exc, "retry_after", None))
            await rt.store.update_shard(row["id"], lookups=lookups, lookup_at=now + delay)
        rt.log.warning("shard.lookup_failed", shards=len(unknown), error=exc.message)


async def submit_loop(rt: Submitter) -> None:
    """Keep cutting and submitting shards until the daemon stops."""
    while not rt.stopping.is_set():
        try:
            # Cutting shards is the stage's own step: supervised, but no input's unit.
            await rt.guard.run("submit", "plan", functools.partial(submit_once, rt), record=False)
        except SubmissionPaused as exc:
            await rt.gate.pause(exc.message)
        except TransientError as exc:
            rt.log.warning("submit.retry_later", error=exc.message)
        await rt.wake.wait("plan", plan_interval(rt.settings.batch_flush_after))


PLAN_INTERVAL = 1.0  # the longest the planner sleeps between passes


def plan_interval(flush_after: float) -> float:
    """How long the planner sleeps between passes when nothing wakes it: a second,
    or less when `[batch] flush_after` is shorter, so a partial shard leaves when it is
    due and not up to a second late (intake's wake-up comes before it is due)."""
    return min(PLAN_INTERVAL, max(0.05, flush_after))


async def submit_once(rt: Submitter) -> None:
    """Finish shards already planned, then cut and submit new ones while they are due."""
    await settle_unknown(rt)
    if not rt.gate.may_submit():
        return
    for row in await rt.store.shards_in("planned", "uploaded"):
        await _advance_supervised(rt, row["id"])
    while not rt.stopping.is_set() and rt.gate.may_submit():
        shard = await plan_one(rt)
        if shard is None:
            return
        await _advance_supervised(rt, shard)


async def _advance_supervised(rt: Submitter, shard: str) -> None:
    """`advance` as a supervised unit (SPEC §8): given up, its requests fail for good."""

    async def give_up(reason: str) -> None:
        await abandon_shard(rt, shard, reason)

    await rt.guard.run("submit", f"shard:{shard}", functools.partial(advance, rt, shard), give_up)


async def abandon_shard(rt: Submitter, shard: str, reason: str) -> None:
    """Fail a shard that was never submitted: its requests fail for good with `reason`."""
    await rt.store.fail_shard_requests(
        shard, reason, collected=False, max_retries=rt.settings.retry_max_retries, now=rt.clock()
    )
    await rt.store.move_shard(shard, "abandoned", error=reason)
    rt.wake.kick("deliver")


async def plan_one(rt: Submitter) -> str | None:
    """Cut one shard if one is due, write its file and record it; return its id."""
    s = rt.settings
    headroom = rt.gate.queue_limit - await rt.store.queue_tokens_in_flight()
    if headroom <= 0:
        return None
    # While the whole queue fits one shard and its oldest request has not waited
    # `flush_after`, no shard is due: known from totals, without reading every row.
    count, nbytes, qtokens, oldest = await rt.store.pending_totals("batch")
    if count == 0:
        return None
    fits = (
        count < min(s.batch_max_lines, API_MAX_INPUTS_PER_BATCH)
        and nbytes <= s.batch_max_bytes
        and qtokens <= min(rt.gate.queue_limit, headroom)
    )
    if fits and oldest is not None and rt.clock() - oldest < s.batch_flush_after:
        return None
    pending = await rt.store.pending("batch", s.batch_max_lines, inputs=False)
    limits = ShardLimits(s.batch_max_lines, s.batch_max_bytes, rt.gate.queue_limit)
    cut = cut_shard(pending, limits, headroom)
    oldest = await rt.store.oldest_pending("batch")
    if not should_submit(cut, oldest, rt.clock(), s.batch_flush_after):
        return None
    if not await submission_allowed(rt.books, cut.tokens, "batch"):
        return None
    shard = new_id("shard")
    chosen = {k for k in cut.keys}
    path = shards_dir(rt) / f"{shard}.jsonl"
    part = path.with_name(path.name + ".part")
    keys = [p.key for p in pending if p.key in chosen]
    # The file is written and made durable (and named) while the shard's rows are
    # written, and the transaction commits only once it is: the two overlap (the
    # file in this thread, the rows in the database's), and a shard is never recorded
    # without its file. A crash in between leaves a file no shard names, which the
    # next start sweeps.
    durable = asyncio.ensure_future(asyncio.to_thread(_write_shard, rt, part, path, keys))
    try:
        await rt.store.create_shard(
            shard,
            path=path,
            keys=cut.keys,
            nbytes=cut.nbytes,
            tokens=cut.tokens,
            qtokens=cut.qtokens,
            now=rt.clock(),
            before_commit=durable,
        )
    finally:
        if not durable.done():
            await asyncio.wait([durable])  # its thread renames the file: let it finish
        if not durable.cancelled():
            durable.exception()  # retrieved: the transaction's own error is the one raised
    rt.log.info(
        "shard.planned",
        shard=shard,
        lines=cut.lines,
        bytes=cut.nbytes,
        tokens=cut.tokens,
        stopped_by=cut.stopped_by,
    )
    return shard


def _write_shard(rt: Submitter, part: Path, path: Path, keys: list[str]) -> None:
    """Write the batch file's lines to `part`, then make it durable as `path`."""
    s = rt.settings
    part.parent.mkdir(parents=True, exist_ok=True)
    with part.open("wb") as f:
        # the texts are read a few hundred at a time, never the whole shard's at once
        for key, value in request_inputs(rt.store.path, keys):
            f.write(encode_request_line(key, value, s.openai_model, s.send_dimensions))
        f.flush()
        os.fsync(f.fileno())
    part.rename(path)
    fsync_dir(path.parent)
    crash_point("during_plan")  # (the transaction recording the shard waits for this)


async def advance(rt: Submitter, shard: str) -> None:
    """Move one shard from planned or uploaded to submitted."""
    rows = [r for r in await rt.store.shards_in("planned", "uploaded") if r["id"] == shard]
    if not rows:
        return
    row = rows[0]
    path = Path(row["path"])
    try:
        file_id = row["file_id"]
        if row["state"] == "planned":
            uploaded = await rt.client.upload_file(path, upload_name(shard))
            file_id = uploaded["id"]
            crash_point("after_upload")
            await rt.store.move_shard(shard, "uploaded", file_id=file_id)
            rt.log.info("shard.uploaded", shard=shard, file_id=file_id)
        batch = await rt.client.create_batch(file_id, {METADATA_KEY: shard})
        crash_point("after_batch_create")
    except CreateOutcomeUnknown as exc:
        # The batch may exist: no new POST until a lookup settles it.
        now = rt.clock()
        await rt.store.move_shard(
            shard,
            "unknown",
            unknown_since=now,
            lookup_at=now + rt.settings.batch_list_lag,
            lookups=0,
            error=exc.message,
        )
        rt.log.warning("shard.create_unknown", shard=shard, file_id=file_id, error=exc.message)
        return
    except APIPermanentError as exc:
        # The API refuses this file for good (it should not: we validate every line).
        # Count it against the requests' retries so a poison request ends in failed/;
        # one transaction, so a crash never leaves the shard half refused.
        await rt.store.refuse_shard(shard, exc.message, rt.settings.retry_max_retries, rt.clock())
        rt.log.error("shard.refused", shard=shard, error=exc.message)
        if file_id:  # its upload is of no use any more
            await rt.store.plan_remote_deletes([(str(file_id), shard, "input")], rt.clock())
        path.unlink(missing_ok=True)
        return
    await _record_submitted(rt, shard, batch)
    await rt.gate.resume()
    rt.wake.kick("poll")


async def _record_submitted(rt: Submitter, shard: str, batch: dict[str, Any]) -> None:
    await rt.store.move_shard(
        shard,
        "submitted",
        batch_id=batch["id"],
        status=batch.get("status"),
        submitted_at=rt.clock(),
        expires_at=batch.get("expires_at"),
    )
    rt.log.info("shard.submitted", shard=shard, batch=batch["id"], status=batch.get("status"))
