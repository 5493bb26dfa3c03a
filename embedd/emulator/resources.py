"""The Files and Batch endpoints of the emulator.

Files are streamed to disk on upload and checked line by line (in a worker thread)
before they are accepted. Batches are records whose status is computed from the
clock (:mod:`embedd.emulator.lifecycle`); the first request that sees a batch in a
terminal state writes its output and error files (in a worker thread, under a
per-batch lock) and the batch object then names them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from embedd.emulator.errors import ApiError, invalid, invalid_value, not_found
from embedd.emulator.lifecycle import (
    ACTIVE,
    TERMINAL_WITH_OUTPUT,
    BatchRecord,
    lines_done,
    phase_at,
    render_batch,
)
from embedd.emulator.output import write_batch_output
from embedd.emulator.server import (
    TRUNCATE,
    Emulator,
    drop_connection,
    emulator_of,
    json_response,
    read_json,
)
from embedd.emulator.store import new_id, page_after, public_file
from embedd.emulator.validation import EMBEDDINGS_URL, MAX_BATCH_BYTES, scan_batch_file

_CHUNK = 1024 * 1024
_BATCH_KEYS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
_MIN_EXPIRY_S, _MAX_EXPIRY_S = 3600, 30 * 24 * 3600
_ENDPOINTS = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)


def _int_param(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_value(name) from None
    if not 1 <= value <= high:
        raise invalid(f"Invalid '{name}': must be between 1 and {high}.", param=name)
    return value


# Files -------------------------------------------------------------------------------


async def upload_file(request: web.Request) -> web.StreamResponse:
    """``POST /v1/files``: multipart upload of a batch input file."""
    emu = emulator_of(request)
    if not request.content_type.startswith("multipart/"):
        raise invalid(
            f"Invalid Content-Type header ({request.content_type}), expected multipart/form-data."
        )
    file_id = new_id("file-")
    part_path = emu.store.content_path(file_id).with_suffix(".upload.part")
    purpose: str | None = None
    filename: str | None = None
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                await _save_part(part, part_path)
        if filename is None:
            raise invalid("'file' is a required property", param="file")
        if purpose is None:
            raise invalid("'purpose' is a required property", param="purpose")
        if purpose != "batch":
            raise invalid(
                f"Invalid purpose '{purpose}': this emulator accepts only 'batch'.",
                param="purpose",
            )
        # Tokens are counted only where the enqueued-token limit needs them.
        count = emu.config.enqueued_token_limit is not None
        summary = await asyncio.to_thread(scan_batch_file, part_path, count=count)
        part_path.replace(emu.store.content_path(file_id))
    finally:
        part_path.unlink(missing_ok=True)
    meta = emu.store.add_file(
        file_id,
        filename=filename,
        purpose="batch",
        created=emu.clock(),
        private={
            "lines": summary.lines,
            "inputs": summary.inputs,
            "model": summary.model,
            "tokens": summary.tokens,
        },
    )
    return json_response(public_file(meta))


async def _save_part(part: BodyPartReader, path: Any) -> None:
    size = 0
    with path.open("wb") as handle:
        while chunk := await part.read_chunk(_CHUNK):
            size += len(chunk)
            if size > MAX_BATCH_BYTES:
                raise invalid(
                    f"File is too large: the maximum for a batch file is {MAX_BATCH_BYTES} bytes.",
                    param="file",
                )
            handle.write(chunk)


async def list_files(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files``: optional ``purpose``, ``order``, ``after``, ``limit``."""
    emu = emulator_of(request)
    limit = _int_param(request, "limit", 10_000, 10_000)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_value("order")
    files = emu.store.list_files(request.query.get("purpose"))
    if order == "desc":
        files.reverse()
    page, more = page_after([public_file(m) for m in files], request.query.get("after"), limit)
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": more,
        }
    )


def _file(emu: Emulator, request: web.Request) -> dict[str, Any]:
    file_id = request.match_info["id"]
    meta = emu.store.files.get(file_id)
    if meta is None:
        raise not_found("such file", file_id)
    return meta


async def get_file(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{id}``."""
    return json_response(public_file(_file(emulator_of(request), request)))


async def delete_file(request: web.Request) -> web.StreamResponse:
    """``DELETE /v1/files/{id}``."""
    emu = emulator_of(request)
    meta = _file(emu, request)
    emu.store.delete_file(meta["id"])
    return json_response({"id": meta["id"], "object": "file", "deleted": True})


async def file_content(request: web.Request) -> web.StreamResponse:
    """``GET /v1/files/{id}/content``: stream the bytes with their Content-Length."""
    emu = emulator_of(request)
    meta = _file(emu, request)
    path = emu.store.content_path(meta["id"])
    size = path.stat().st_size
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    # The truncate fault: the full length is declared, half the bytes are sent.
    budget = size // 2 if request.get(TRUNCATE) else size
    request[TRUNCATE] = False  # handled here, not again by the middleware
    sent = 0
    with path.open("rb") as handle:
        while sent < budget:
            chunk = handle.read(min(_CHUNK, budget - sent))
            if not chunk:
                break
            sent += len(chunk)
            await response.write(chunk)
    if sent < size:
        return drop_connection(request)
    await response.write_eof()
    return response


# Batches -----------------------------------------------------------------------------


def _check_metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > 16:
        raise invalid("Invalid 'metadata': at most 16 string key-value pairs.", param="metadata")
    for key, value in raw.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise invalid(
                "Invalid 'metadata': keys are strings of at most 64 characters and values "
                "strings of at most 512 characters.",
                param="metadata",
            )
    return dict(raw)


def _check_expiry(raw: Any) -> None:
    """``output_expires_after``: ``{"anchor": "created_at", "seconds": 3600..2592000}``."""
    if not isinstance(raw, dict) or set(raw) != {"anchor", "seconds"}:
        raise invalid_value("output_expires_after")
    if raw["anchor"] != "created_at":
        raise invalid_value("output_expires_after.anchor")
    seconds = raw["seconds"]
    if not isinstance(seconds, int) or isinstance(seconds, bool):
        raise invalid_value("output_expires_after.seconds")
    if not _MIN_EXPIRY_S <= seconds <= _MAX_EXPIRY_S:
        raise invalid(
            "Invalid 'output_expires_after.seconds': must be between "
            f"{_MIN_EXPIRY_S} and {_MAX_EXPIRY_S}.",
            param="output_expires_after.seconds",
        )


def _in_flight_tokens(emu: Emulator, now: float) -> int:
    return sum(
        rec.tokens
        for rec in emu.store.batches.values()
        if rec.outcome != "token_limit" and phase_at(rec, now).status in ACTIVE
    )


async def create_batch(request: web.Request) -> web.StreamResponse:
    """``POST /v1/batches``."""
    emu = emulator_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("We could not parse the JSON body of your request.")
    for key in body:
        if key not in _BATCH_KEYS:
            raise invalid(f"Unrecognized request argument supplied: {key}")
    for key in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(key), str):
            raise invalid(f"Missing required parameter: '{key}'.", param=key)
    if body["endpoint"] not in _ENDPOINTS:
        raise invalid_value("endpoint")
    if body["completion_window"] != "24h":
        raise invalid_value("completion_window")
    metadata = _check_metadata(body.get("metadata"))
    if "output_expires_after" in body:
        _check_expiry(body["output_expires_after"])
    meta = emu.store.files.get(body["input_file_id"])
    if meta is None:
        raise not_found("such file", body["input_file_id"], param="input_file_id")
    if meta["purpose"] != "batch":
        raise invalid("The input file must be uploaded with purpose 'batch'.", "input_file_id")
    if body["endpoint"] != EMBEDDINGS_URL:
        raise invalid(
            f"The input file's requests are for {EMBEDDINGS_URL}, not {body['endpoint']}.",
            param="endpoint",
        )
    digest = await asyncio.to_thread(_sha256, emu.store.content_path(meta["id"]))
    now = emu.clock()
    config = emu.config
    rec = BatchRecord(
        input_sha256=digest,
        id=new_id("batch_"),
        input_file_id=meta["id"],
        endpoint=EMBEDDINGS_URL,
        completion_window="24h",
        metadata=metadata,
        model=meta.get("_model"),
        created=now,
        lines=int(meta["_lines"]),
        tokens=int(meta["_tokens"]),
        validating_s=config.validating_s,
        in_progress_s=config.in_progress_s,
        finalizing_s=config.finalizing_s,
        seed=config.seed,
    )
    rule = emu.faults.on_batch(metadata)
    if rule is not None:
        rec.outcome = rule.outcome
        rec.completed_fraction = rule.completed_fraction if rule.outcome != "complete" else 1.0
        rec.failed_line_rate = rule.failed_line_rate
        rec.failed_line_status = rule.failed_line_status
        rec.files_gone = rule.files_gone
        rec.usage_missing = rule.usage_missing
        if rule.outcome == "invalid":
            rec.invalid_lines = _invalid_lines(rec, rule.invalid_line_rate)
    limit = config.enqueued_token_limit
    if limit is not None and _in_flight_tokens(emu, now) + rec.tokens > limit:
        rec.outcome = "token_limit"
        rec.token_limit = limit
    emu.store.save_batch(rec)
    emu.counters["batches_created"] += 1
    emu.by_metadata[_metadata_key(metadata)] += 1
    return json_response(await _batch_object(emu, rec))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _invalid_lines(rec: BatchRecord, rate: float) -> list[int]:
    """The 1-based lines a batch failing validation names: a seeded draw, at least one."""
    rng = random.Random(f"{rec.seed}:{rec.id}")
    lines = [n for n in range(1, rec.lines + 1) if rng.random() < rate]
    return lines or [rng.randint(1, max(1, rec.lines))]


def _metadata_key(metadata: dict[str, str] | None) -> str:
    return json.dumps(metadata or {}, sort_keys=True)


def _has_output(rec: BatchRecord) -> bool:
    return rec.output is not None


async def _ensure_output(emu: Emulator, rec: BatchRecord, now: float) -> None:
    """Write the output and error files of a batch that has reached a terminal state."""
    phase = phase_at(rec, now)
    if phase.status not in TERMINAL_WITH_OUTPUT or rec.output is not None:
        return
    lock = emu.locks.setdefault(rec.id, asyncio.Lock())
    async with lock:
        if _has_output(rec):  # another request wrote it while this one waited
            return
        out_id, err_id = new_id("file-"), new_id("file-")
        summary = await asyncio.to_thread(
            write_batch_output,
            batch_id=rec.id,
            input_path=emu.store.content_path(rec.input_file_id),
            output_path=emu.store.content_path(out_id),
            error_path=emu.store.content_path(err_id),
            done=lines_done(rec, phase.done_fraction),
            unfinished_code="batch_expired" if phase.status == "expired" else "batch_cancelled",
            failed_line_rate=rec.failed_line_rate,
            failed_line_status=rec.failed_line_status,
            seed=rec.seed,
            stop=emu.stopping,
        )
        created = emu.clock()
        for file_id, lines, suffix in (
            (out_id, summary.output_lines, "output"),
            (err_id, summary.error_lines, "error"),
        ):
            if lines and rec.files_gone:  # named by the batch, but 404 when fetched
                emu.store.content_path(file_id).unlink(missing_ok=True)
            elif lines:
                emu.store.add_file(
                    file_id,
                    filename=f"{rec.id}_{suffix}.jsonl",
                    purpose="batch_output",
                    created=created,
                )
        rec.output = {
            "output_file_id": out_id if summary.output_lines else None,
            "error_file_id": err_id if summary.error_lines else None,
            "completed": summary.completed,
            "failed": summary.failed,
            "tokens": summary.tokens,
        }
        emu.store.save_batch(rec)
        emu.counters["tokens_billed"] += summary.tokens
        emu.billed_lines.update(summary.billed)


async def _batch_object(emu: Emulator, rec: BatchRecord) -> dict[str, Any]:
    now = emu.clock()
    await _ensure_output(emu, rec, now)
    return render_batch(rec, now)


def _batch(emu: Emulator, request: web.Request) -> BatchRecord:
    batch_id = request.match_info["id"]
    rec = emu.store.batches.get(batch_id)
    if rec is None:
        raise not_found("such batch", batch_id)
    return rec


async def get_batch(request: web.Request) -> web.StreamResponse:
    """``GET /v1/batches/{id}``."""
    emu = emulator_of(request)
    return json_response(await _batch_object(emu, _batch(emu, request)))


async def list_batches(request: web.Request) -> web.StreamResponse:
    """``GET /v1/batches``: newest first, cursor paging with ``after`` and ``limit``."""
    emu = emulator_of(request)
    limit = _int_param(request, "limit", 20, 100)
    lag = emu.faults.list_lag_s
    now = emu.clock()
    records = [rec for rec in emu.store.list_batches() if now - rec.created >= lag]
    ids = [{"id": rec.id} for rec in records]
    page_ids, more = page_after(ids, request.query.get("after"), limit)
    wanted = {item["id"] for item in page_ids}
    page = [await _batch_object(emu, rec) for rec in records if rec.id in wanted]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": more,
        }
    )


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    """``POST /v1/batches/{id}/cancel``: only a validating or running batch can be cancelled."""
    emu = emulator_of(request)
    rec = _batch(emu, request)
    now = emu.clock()
    status = phase_at(rec, now).status
    if status in ("validating", "in_progress"):
        rec.cancel_requested = now
        emu.store.save_batch(rec)
    elif status not in ("cancelling", "cancelled"):
        raise ApiError(409, f"Cannot cancel a batch with status '{status}'.")
    return json_response(await _batch_object(emu, rec))


def add_routes(app: web.Application) -> None:
    """Register the Files and Batch endpoints."""
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{id}", get_file)
    app.router.add_delete("/v1/files/{id}", delete_file)
    app.router.add_get("/v1/files/{id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{id}", get_batch)
    app.router.add_post("/v1/batches/{id}/cancel", cancel_batch)
