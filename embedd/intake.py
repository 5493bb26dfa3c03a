"""Intake: from a name in the inbox to queued requests in the state database.

The claim follows "intent before side effect":

1. a `files` row in state `claiming` records the job id and the original name;
2. the entry is renamed from `inbox/NAME` to `work/JOB` (atomic, same file system),
   so a producer can drop a new `NAME` at once and nothing of ours is overwritten;
3. the bytes are read, parsed and tokenized, and in one transaction the records,
   their pieces and the new requests are stored and the file becomes `queued`.

A crash after 1 finds `work/JOB` (continue at 3) or `inbox/NAME` (rename again) or
neither (the producer took it back: forget the row). A refusal at any point moves
the entry to `failed/` with a reason and the file becomes `failed`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from embedd.batchlines import request_line_size
from embedd.crashpoints import crash_point
from embedd.documents import Record, parse_document
from embedd.errors import InputRejected
from embedd.outbox import write_failure
from embedd.planner import queue_tokens_estimate
from embedd.runtime import Runtime
from embedd.spool import Entry, fsync_dir, kind_of, read_input, scan
from embedd.store import NewRecord, NewRequest, encode_input, new_id
from embedd.tokens import PIECE_CHARS, Chunk, LongPolicy, TokenIds, plan_chunks

_REFUSED_KINDS = {
    "symlink": "it is a symbolic link; embedd never follows links, copy the file instead",
    "dir": "it is a folder; only inbox/sync/ may be a folder in the inbox",
    "fifo": "it is a FIFO (named pipe), not a regular file",
    "device": "it is a device node, not a regular file",
    "socket": "it is a socket, not a regular file",
    "other": "it is not a regular file",
}


MAX_NAME_BYTES = 200


def request_key(model: str, dimensions: int, value: str | list[int]) -> str:
    """The identity of one input: the same text, model and size embed to the same vector."""
    h = hashlib.sha256(f"{model}\x00{dimensions}\x00".encode())
    h.update(encode_input(value).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# Files claimed at once: one is tokenized (CPU, in threads) while another is written
# to the state database (its own thread), so the two overlap instead of alternating.
CLAIMS_IN_PARALLEL = 2


async def scan_and_claim(rt: Runtime) -> int:
    """Claim everything the inbox holds now; return how many entries were claimed.

    Each claim is independent (its own job row, rename and transactions), so a few
    run side by side; every claim is still recorded before its file is moved.
    """
    entries = await asyncio.to_thread(scan, rt.paths)
    slots = asyncio.Semaphore(CLAIMS_IN_PARALLEL)
    claimed = 0

    async def one(entry: Entry) -> None:
        nonlocal claimed
        async with slots:
            if not rt.stopping.is_set() and await claim(rt, entry):
                claimed += 1

    async with asyncio.TaskGroup() as tg:
        for entry in entries:
            tg.create_task(one(entry))
    if claimed:
        rt.wake.kick("plan", "sync", "deliver")
    return claimed


async def claim(rt: Runtime, entry: Entry) -> bool:
    """Claim one inbox entry; False if it vanished before we could."""
    job = new_id("job")
    await rt.store.begin_claim(job, entry.name, entry.lane, rt.clock())
    work = rt.paths.work / job
    try:
        os.rename(entry.path, work)
    except FileNotFoundError:
        await rt.store.forget_claim(job)
        return False
    await asyncio.to_thread(_fsync_both, entry.path.parent, rt.paths.work)
    crash_point("after_claim")
    rt.log.info("file.claimed", file=entry.name, job=job, lane=entry.lane, kind=entry.kind)
    await process_claimed(rt, job, entry.name, entry.lane)
    return True


async def resume_claims(rt: Runtime) -> None:
    """Finish claims a crash interrupted (files still in state `claiming`)."""
    for row in await rt.store.files_in("claiming"):
        job, name, lane = row["job"], row["name"], row["lane"]
        work = rt.paths.work / job
        if not os.path.lexists(work):
            origin = (rt.paths.inbox_sync if lane == "sync" else rt.paths.inbox) / name
            try:
                os.rename(origin, work)
            except FileNotFoundError:
                await rt.store.forget_claim(job)
                rt.log.info("file.claim_dropped", file=name, job=job)
                continue
        rt.log.info("file.claim_resumed", file=name, job=job)
        await process_claimed(rt, job, name, lane)


async def process_claimed(rt: Runtime, job: str, name: str, lane: str) -> None:
    """Read, parse and queue `work/JOB`, or refuse it into failed/."""
    work = rt.paths.work / job
    sha256: str | None = None
    try:
        mode = os.lstat(work).st_mode
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InputRejected(
                f"{name[:40]}… was refused: its name is longer than {MAX_NAME_BYTES} bytes, "
                "leaving no room for the result's suffixes."
            )
        if not stat.S_ISREG(mode):
            raise InputRejected(f"{name} was refused: {_REFUSED_KINDS[kind_of(mode)]}.")
        data = await asyncio.to_thread(read_input, work, rt.settings.inputs_max_file_bytes)
        size = len(data)
        sha256 = await asyncio.to_thread(_sha256, data)
        prepared = await asyncio.to_thread(_prepare, rt, name, data)
    except InputRejected as exc:
        await refuse(rt, job, name, work, exc, sha256)
        return
    del data  # the records hold what is needed; the raw bytes can go before the write
    records, requests = prepared
    # Claims run side by side, but "which texts are already known" and storing this
    # file's requests happen as one step, so a text shared by two files dropped together
    # is billed to one of them and marked cached in the other.
    async with rt.queue_lock:
        known = await rt.store.known_keys(q.key for q in requests)
        new_records = _mark_cached(records, known)
        await rt.store.queue_file(
            job,
            sha256=sha256,
            size=size,
            records=new_records,
            requests=[q for q in requests if q.key not in known],
            lane=lane,
            now=rt.clock(),
        )
    rt.log.info(
        "file.queued",
        file=name,
        job=job,
        lane=lane,
        records=len(new_records),
        tokens=sum(r.tokens for r in new_records),
        cached=sum(r.cached for r in new_records),
    )


async def refuse(
    rt: Runtime, job: str, name: str, work: Path, exc: InputRejected, sha256: str | None
) -> None:
    error: dict[str, Any] = {
        "source": name,
        "sha256": sha256,
        "job": job,
        "reason": exc.message,
        "records": exc.records,
    }
    target = await asyncio.to_thread(write_failure, rt.paths, work, name, job, error)
    await rt.store.move_file(job, "failed", reason=exc.message, result=str(target))
    rt.log.warning("file.failed", file=name, job=job, reason=exc.message)


PreparedRecord = tuple[Record, int, list[tuple[str, Chunk]]]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Texts tokenized in one call: tiktoken's lists of Python ints (36 bytes a token) exist
# for one such batch at a time; a long text's ids are kept as a uint32 array.
TOKENIZE_BATCH_CHARS = 2 << 20


def _batches(records: Sequence[Record]) -> Iterator[Sequence[Record]]:
    start = chars = 0
    for i, record in enumerate(records):
        chars += len(record.text)
        if chars >= TOKENIZE_BATCH_CHARS:
            yield records[start : i + 1]
            start, chars = i + 1, 0
    if start < len(records):
        yield records[start:]


def _tokenized(rt: Runtime, records: Sequence[Record]) -> Iterator[tuple[Record, TokenIds]]:
    """Each record with its token ids, in bounded memory (see TOKENIZE_BATCH_CHARS)."""
    limit = rt.settings.inputs_max_tokens
    for batch in _batches(records):
        short = [r.text for r in batch if len(r.text) <= PIECE_CHARS]
        ids_of_short = iter(rt.tokenizer.encode_batch(short))
        del short
        for record in batch:
            if len(record.text) > PIECE_CHARS:
                yield record, rt.tokenizer.encode_compact(record.text)
                continue
            ids = next(ids_of_short)
            yield record, ids if len(ids) <= limit else np.asarray(ids, dtype=np.uint32)


def _prepare(rt: Runtime, name: str, data: bytes) -> tuple[list[PreparedRecord], list[NewRequest]]:
    """Parse and tokenize (CPU work, run in a thread). Raises InputRejected."""
    s = rt.settings
    records = parse_document(name, data)
    prepared: list[PreparedRecord] = []
    requests: dict[str, NewRequest] = {}
    problems: list[dict[str, Any]] = []
    for record, tokens in _tokenized(rt, records):
        try:
            chunks = plan_chunks(
                record.text,
                tokens,
                s.inputs_max_tokens,
                cast(LongPolicy, s.inputs_long),
                record_id=record.id,
            )
        except InputRejected as exc:
            problems.extend(exc.records)
            continue
        keyed: list[tuple[str, Chunk]] = []
        for chunk in chunks:
            # token windows go in their stored form, made once: the key hashes it too
            value = chunk.input if isinstance(chunk.input, str) else encode_input(chunk.input)
            key = request_key(s.openai_model, s.openai_dimensions, value)
            keyed.append((key, Chunk(value, chunk.tokens)))
            if key not in requests:
                text_bytes = len(value.encode()) if chunk.input is value else 4 * chunk.tokens
                requests[key] = NewRequest(
                    key=key,
                    input=value,
                    tokens=chunk.tokens,
                    qtokens=queue_tokens_estimate(chunk.tokens, text_bytes),
                    nbytes=request_line_size(key, chunk.input, s.openai_model, s.send_dimensions),
                )
        prepared.append((record, len(tokens), keyed))
    if problems:
        raise InputRejected(
            f"{name} has {len(problems)} record(s) over {s.inputs_max_tokens} tokens "
            f'and [inputs] long = "fail"; first: {problems[0]["id"]!r}.',
            records=problems,
        )
    return prepared, list(requests.values())


def _mark_cached(records: Sequence[PreparedRecord], known: set[str]) -> list[NewRecord]:
    """A record is cached when every piece was embedded or queued before it."""
    seen = set(known)
    out: list[NewRecord] = []
    for record, ntokens, keyed in records:
        keys = [k for k, _ in keyed]
        cached = all(k in seen for k in keys)
        seen.update(keys)
        out.append(
            NewRecord(
                rid=record.id,
                meta=record.meta,
                tokens=ntokens,
                pieces=[(k, c.tokens) for k, c in keyed],
                cached=cached,
            )
        )
    return out


def _fsync_both(a: Path, b: Path) -> None:
    fsync_dir(a)
    fsync_dir(b)
