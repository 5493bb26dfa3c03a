"""Submission: cut shards from the queue, write their JSONL, upload, create batches.

Every step that costs money or creates something at OpenAI is recorded before and
after, so a restart can tell "not done" from "done but not recorded":

    planned   shard row + `state/shards/SHARD.jsonl` written, requests `planned`
    uploaded  the file id is recorded (upload named `SHARD.jsonl`)
    submitted the batch id is recorded (batch `metadata` names the shard)

On start, `reconcile` lists every batch and every batch-purpose file at OpenAI
*before anything is submitted*: a shard whose batch exists is recorded as submitted,
one whose upload exists is recorded as uploaded, and uploads of ours that no shard
needs are deleted. So a crash between any two steps never creates a second batch.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from embedd.batchlines import encode_request_line
from embedd.budgeting import submission_allowed
from embedd.crashpoints import crash_point
from embedd.errors import (
    APIPermanentError,
    EmbeddError,
    SubmissionPaused,
    TransientError,
)
from embedd.planner import ShardLimits, cut_shard, should_submit
from embedd.runtime import Runtime
from embedd.spool import fsync_dir
from embedd.store import new_id, request_inputs

METADATA_KEY = "embedd_shard"
UPLOAD_PREFIX = "embedd-"


def upload_name(shard: str) -> str:
    return f"{UPLOAD_PREFIX}{shard}.jsonl"


def shard_of_upload(filename: str) -> str | None:
    if filename.startswith(UPLOAD_PREFIX) and filename.endswith(".jsonl"):
        return filename[len(UPLOAD_PREFIX) : -len(".jsonl")]
    return None


def shards_dir(rt: Runtime) -> Path:
    return rt.paths.state_dir / "shards"


async def reconcile(rt: Runtime) -> None:
    """Match unfinished shards with what exists at OpenAI before submitting anything."""
    open_shards = {r["id"]: r for r in await rt.store.shards_in("planned", "uploaded")}
    live = {r["id"] for r in await rt.store.shards_in("planned", "uploaded", "submitted")}
    batches: dict[str, dict[str, Any]] = {}
    async for batch in rt.client.list_batches():
        shard = (batch.get("metadata") or {}).get(METADATA_KEY)
        if isinstance(shard, str) and shard in open_shards and shard not in batches:
            batches[shard] = batch
    uploads: dict[str, list[dict[str, Any]]] = {}
    async for f in rt.client.list_files("batch"):
        shard = shard_of_upload(str(f.get("filename", "")))
        if shard is not None:
            uploads.setdefault(shard, []).append(f)
    for shard, row in open_shards.items():
        if shard in batches:
            batch = batches[shard]
            crash_point("during_recovery")  # found at OpenAI, not yet recorded here
            if row["state"] == "planned":
                await rt.store.move_shard(shard, "uploaded", file_id=batch["input_file_id"])
            await _record_submitted(rt, shard, batch)
            rt.log.info("shard.reconciled", shard=shard, batch=batch["id"], found="batch")
        elif row["state"] == "planned" and uploads.get(shard):
            file_id = uploads[shard][0]["id"]
            await rt.store.move_shard(shard, "uploaded", file_id=file_id)
            rt.log.info("shard.reconciled", shard=shard, file_id=file_id, found="upload")
    # Uploads no shard will use: a crash after upload, or a superseded duplicate.
    used = {r["file_id"] for r in await rt.store.shards_in("uploaded", "submitted", "collecting")}
    for shard, files in uploads.items():
        for f in files:
            if f["id"] in used or (shard in live and f["id"] == files[0]["id"]):
                continue
            try:
                await rt.client.delete_file(f["id"])
                rt.log.info("upload.orphan_deleted", shard=shard, file_id=f["id"])
            except EmbeddError as exc:
                rt.log.warning("upload.orphan_delete_failed", file_id=f["id"], error=exc.message)


async def submit_loop(rt: Runtime) -> None:
    """Keep cutting and submitting shards until the daemon stops."""
    while not rt.stopping.is_set():
        try:
            await submit_once(rt)
        except SubmissionPaused as exc:
            await pause(rt, exc.message)
        except TransientError as exc:
            rt.log.warning("submit.retry_later", error=exc.message)
        await rt.wake.wait("plan", 1.0)


async def pause(rt: Runtime, reason: str) -> None:
    """Stop submitting for a while; files are kept, the reason shows in status."""
    if rt.paused_reason != reason:
        rt.log.error("submission.paused", reason=reason)
    rt.paused_reason = reason
    rt.paused_until = rt.clock() + max(60.0, rt.settings.breaker_cooldown)
    await rt.store.set_fact("paused", {"reason": reason, "until": rt.paused_until})


async def unpause(rt: Runtime) -> None:
    if rt.paused_reason is not None:
        rt.log.info("submission.resumed", previous_reason=rt.paused_reason)
        rt.paused_reason = None
        rt.client.clear_pause()
        await rt.store.set_fact("paused", None)


def may_submit(rt: Runtime) -> bool:
    now = rt.clock()
    if rt.paused_reason is not None and now < rt.paused_until:
        return False
    return now >= rt.queue_backoff_until


async def submit_once(rt: Runtime) -> None:
    """Finish shards already planned, then cut and submit new ones while they are due."""
    if not may_submit(rt):
        return
    for row in await rt.store.shards_in("planned", "uploaded"):
        await advance(rt, row["id"])
    while not rt.stopping.is_set() and may_submit(rt):
        shard = await plan_one(rt)
        if shard is None:
            return
        await advance(rt, shard)


async def plan_one(rt: Runtime) -> str | None:
    """Cut one shard if one is due, write its file and record it; return its id."""
    s = rt.settings
    headroom = rt.queue_limit - await rt.store.queue_tokens_in_flight()
    if headroom <= 0:
        return None
    pending = await rt.store.pending("batch", s.batch_max_lines, inputs=False)
    limits = ShardLimits(s.batch_max_lines, s.batch_max_bytes, rt.queue_limit)
    cut = cut_shard(pending, limits, headroom)
    oldest = await rt.store.oldest_pending("batch")
    if not should_submit(cut, oldest, rt.clock(), s.batch_flush_after):
        return None
    if not await submission_allowed(rt, cut.tokens, "batch"):
        return None
    shard = new_id("shard")
    chosen = {k for k in cut.keys}
    path = shards_dir(rt) / f"{shard}.jsonl"
    await asyncio.to_thread(_write_shard, rt, path, [p.key for p in pending if p.key in chosen])
    await rt.store.create_shard(
        shard,
        path=path,
        keys=cut.keys,
        nbytes=cut.nbytes,
        tokens=cut.tokens,
        qtokens=cut.qtokens,
        now=rt.clock(),
    )
    rt.log.info(
        "shard.planned",
        shard=shard,
        lines=cut.lines,
        bytes=cut.nbytes,
        tokens=cut.tokens,
        stopped_by=cut.stopped_by,
    )
    return shard


def _write_shard(rt: Runtime, path: Path, keys: list[str]) -> None:
    s = rt.settings
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with part.open("wb") as f:
        # the texts are read a few hundred at a time, never the whole shard's at once
        for key, value in request_inputs(rt.store.path, keys):
            f.write(encode_request_line(key, value, s.openai_model, s.send_dimensions))
        f.flush()
        os.fsync(f.fileno())
    part.rename(path)
    fsync_dir(path.parent)


async def advance(rt: Runtime, shard: str) -> None:
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
    except APIPermanentError as exc:
        # The API refuses this file for good (it should not: we validate every line).
        # Count it against the requests' retries so a poison request ends in failed/.
        keys = await rt.store.shard_keys(shard)
        await rt.store.apply_results(
            shard=None,
            vectors=[],
            origin="",
            retry=[(k, f"batch submission refused: {exc.message}") for k in keys],
            fail=[],
            requeue=[],
            max_retries=rt.settings.retry_max_retries,
            ledger=None,
            now=rt.clock(),
        )
        await rt.store.move_shard(shard, "abandoned", error=exc.message)
        rt.log.error("shard.refused", shard=shard, error=exc.message)
        return
    await _record_submitted(rt, shard, batch)
    await unpause(rt)
    rt.wake.kick("poll")


async def _record_submitted(rt: Runtime, shard: str, batch: dict[str, Any]) -> None:
    await rt.store.move_shard(
        shard,
        "submitted",
        batch_id=batch["id"],
        status=batch.get("status"),
        submitted_at=rt.clock(),
        expires_at=batch.get("expires_at"),
    )
    rt.log.info("shard.submitted", shard=shard, batch=batch["id"], status=batch.get("status"))
