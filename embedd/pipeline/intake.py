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
import codecs
import contextlib
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from embedd import memory
from embedd.config import Settings
from embedd.crashpoints import crash_point
from embedd.errors import InputRejected
from embedd.files.documents import READ_BYTES, Record, iter_document, prescan
from embedd.files.outbox import write_failure
from embedd.files.refusal import MAX_NAME_BYTES, failed_name, refuse
from embedd.files.spool import Entry, SpoolPaths, fsync_dir, kind_of, open_input, scan
from embedd.openai.batchlines import request_line_size
from embedd.pipeline.planner import queue_tokens_estimate
from embedd.pipeline.supervise import Supervisor
from embedd.pipeline.wakeups import Wakeups
from embedd.state.store import NewRecord, NewRequest, Store, db_text, encode_input, new_id
from embedd.tokens import PIECE_CHARS, LongPolicy, TokenIds, Tokenizer, cut_point, plan_chunks

_REFUSED_KINDS = {
    "symlink": "it is a symbolic link; embedd never follows links, copy the file instead",
    "dir": "it is a folder; only inbox/sync/ may be a folder in the inbox",
    "fifo": "it is a FIFO (named pipe), not a regular file",
    "device": "it is a device node, not a regular file",
    "socket": "it is a socket, not a regular file",
    "other": "it is not a regular file",
}


@dataclass(frozen=True)
class Intake:
    """What the intake stage uses. `queue_lock` is shared with retention: a file's
    requests are queued and the cache is pruned one at a time."""

    settings: Settings
    paths: SpoolPaths
    store: Store
    tokenizer: Tokenizer
    clock: Callable[[], float]
    log: Any
    wake: Wakeups
    guard: Supervisor
    stopping: asyncio.Event
    queue_lock: asyncio.Lock


def request_key(model: str, dimensions: int, value: str | list[int]) -> str:
    """The identity of one input: the same text, model and size embed to the same vector."""
    h = hashlib.sha256(f"{model}\x00{dimensions}\x00".encode())
    h.update(encode_input(value).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


# Files claimed at once: while one is read and parsed and another written to the
# state database (its own thread), a third keeps the tokenizer's threads busy. (With
# two, every change of file left a core idle: intake bench, 9.2 to 9.8 s became 8.3 to 8.6 s.)
CLAIMS_IN_PARALLEL = 3
# Of those, claims of one big text at once: such a claim holds the text's token ids
# (4 bytes a token) until its record is stored, about 160 MB at the largest file.
WHOLE_TEXTS_IN_PARALLEL = 2


def is_whole_text(name: str, size: int) -> bool:
    """A file tokenized as one big text, straight from the file (`_whole_text`)."""
    return not name.lower().endswith((".json", ".jsonl")) and size > 4 * PIECE_CHARS


async def scan_and_claim(rt: Intake) -> int:
    """Claim everything the inbox holds now; return how many entries were claimed.

    Each claim is independent (its own job row, rename and transactions), so a few
    run side by side; every claim is still recorded before its file is moved.
    """
    await resume_claims(rt)  # claims whose last try failed: their backoff may be over
    entries = await asyncio.to_thread(scan, rt.paths)
    slots = asyncio.Semaphore(CLAIMS_IN_PARALLEL)
    whole_texts = asyncio.Semaphore(WHOLE_TEXTS_IN_PARALLEL)
    claimed = 0

    async def one(entry: Entry) -> None:
        nonlocal claimed
        heavy: contextlib.AbstractAsyncContextManager[Any] = (
            whole_texts if _entry_is_whole_text(entry) else contextlib.nullcontext()
        )
        async with heavy, slots:
            if not rt.stopping.is_set() and await claim(rt, entry):
                claimed += 1

    async with asyncio.TaskGroup() as tg:
        for entry in entries:
            tg.create_task(one(entry))
    if claimed:
        rt.wake.kick("plan", "sync", "deliver")
    return claimed


def _entry_is_whole_text(entry: Entry) -> bool:
    try:
        size = entry.path.lstat().st_size
    except OSError:
        return False  # gone or unreadable: the claim itself says what happened
    return entry.kind == "file" and is_whole_text(entry.name, size)


async def claim(rt: Intake, entry: Entry) -> bool:
    """Claim one inbox entry and process it, each step a supervised unit (SPEC §8);
    False if it vanished before we could claim it, or the claim itself failed."""
    jobs: list[str] = []

    async def take() -> None:
        jobs.append(await _take(rt, entry))

    # Taking the entry is two short steps (a row, a rename); its tries are kept in
    # memory. Everything after the rename is the job's unit, recorded in the database.
    unit = f"inbox:{entry.lane}/{entry.name}"
    give_up = functools.partial(_refuse_entry, rt, entry)
    ok = await rt.guard.run("intake", unit, take, give_up, record=False)
    if not ok or not jobs[0]:
        return False
    await _supervised(rt, jobs[0], entry.name, entry.lane, resume=False)
    return True


async def _take(rt: Intake, entry: Entry) -> str:
    """Record the claim, then move `inbox/NAME` to `work/JOB`; the job, or "" if gone."""
    job = new_id("job")
    await rt.store.begin_claim(job, db_text(entry.name), entry.lane, rt.clock())
    work = rt.paths.work / job
    try:
        os.rename(entry.path, work)
    except FileNotFoundError:
        await rt.store.forget_claim(job)
        return ""
    except OSError:
        # Not moved: the entry stays the inbox's unit (tried again, or refused whole).
        await rt.store.forget_claim(job)
        raise
    await asyncio.to_thread(_fsync_both, entry.path.parent, rt.paths.work)
    crash_point("after_claim")
    rt.log.info("file.claimed", file=entry.name, job=job, lane=entry.lane, kind=entry.kind)
    return job


async def _refuse_entry(rt: Intake, entry: Entry, reason: str) -> None:
    """An inbox entry that could not even be claimed, for good: into failed/."""
    job = new_id("job")
    error: dict[str, Any] = {
        "source": entry.name,
        "sha256": None,
        "job": job,
        "reason": reason,
        "records": [],
    }
    name = failed_name(entry.name)
    await asyncio.to_thread(write_failure, rt.paths, entry.path, name, job, error)
    rt.log.warning("file.failed", file=entry.name, job=job, reason=reason)


async def resume_claims(rt: Intake) -> None:
    """Finish claims a crash (or a failed try) interrupted: files still `claiming`."""
    for row in await rt.store.files_in("claiming"):
        if rt.stopping.is_set():
            return
        await _supervised(rt, row["job"], row["name"], row["lane"], resume=True)


async def _supervised(rt: Intake, job: str, name: str, lane: str, *, resume: bool) -> None:
    """Process `work/JOB` as one supervised unit; a unit given up goes to failed/."""

    async def work() -> None:
        if resume and not await _resume_one(rt, job, name, lane):
            return
        await process_claimed(rt, job, name, lane)

    async def give_up(reason: str) -> None:
        await refuse(
            rt.store, rt.paths, rt.log, job, name, rt.paths.work / job, InputRejected(reason), None
        )

    await rt.guard.run("intake", f"job:{job}", work, give_up)


async def _resume_one(rt: Intake, job: str, name: str, lane: str) -> bool:
    work = rt.paths.work / job
    if not os.path.lexists(work):
        origin = (rt.paths.inbox_sync if lane == "sync" else rt.paths.inbox) / name
        try:
            os.rename(origin, work)
        except FileNotFoundError:
            await rt.store.forget_claim(job)
            rt.log.info("file.claim_dropped", file=name, job=job)
            return False
    rt.log.info("file.claim_resumed", file=name, job=job)
    return True


async def process_claimed(rt: Intake, job: str, name: str, lane: str) -> None:
    """Read, parse and queue `work/JOB`, or refuse it into failed/."""
    work = rt.paths.work / job
    sha256: str | None = None
    try:
        mode = os.lstat(work).st_mode
        if db_text(name) != name:
            raise InputRejected(
                f"{db_text(name)} was refused: its name is not valid UTF-8; "
                "rename it (UTF-8 names only)."
            )
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InputRejected(
                f"{name[:40]}… was refused: its name is longer than {MAX_NAME_BYTES} bytes, "
                "leaving no room for the result's suffixes."
            )
        if not stat.S_ISREG(mode):
            raise InputRejected(f"{name} was refused: {_REFUSED_KINDS[kind_of(mode)]}.")
        try:
            f = await asyncio.to_thread(open_input, work, rt.settings.inputs_max_file_bytes)
        except PermissionError:
            raise InputRejected(
                f"{name} cannot be read: permission denied; let the daemon's user or group "
                "read it (a producer's umask of 077 refuses it)."
            ) from None
        with f:
            # The file is read a piece at a time, never whole: hashed first, then
            # parsed, tokenized and stored a batch at a time, so memory holds one
            # batch, never all its records (SPEC §9, claims stream).
            size, digest = await asyncio.to_thread(
                _hash_file, f, name, rt.settings.inputs_max_file_bytes
            )
            sha256 = digest
            crash_point("during_parse")
            await rt.store.clear_claim(job)  # what an interrupted claim had stored
            batches = _prepared_batches(rt, name, f, size)
            first = 0
            held: tuple[list[NewRecord], list[NewRequest]] | None = None
            while (batch := await asyncio.to_thread(next, batches, None)) is not None:
                if held is not None:  # not the last batch: set aside until the file is whole
                    await rt.store.stage(job, first, *held)
                    first += len(held[0])
                held = batch
                del batch
            del batches
    except InputRejected as exc:
        await rt.store.clear_claim(job)
        await refuse(rt.store, rt.paths, rt.log, job, name, work, exc, sha256)
        return
    # Claims run side by side, but "which texts are already known" and queueing this
    # file's requests happen as one step, so a text shared by two files dropped together
    # is billed to one of them and marked cached in the other.
    async with rt.queue_lock:
        count, tokens, cached = await rt.store.queue_staged(
            job,
            last=None if held is None else (first, *held),
            sha256=digest,
            size=size,
            lane=lane,
            now=rt.clock(),
        )
    rt.log.info(
        "file.queued", file=name, job=job, lane=lane, records=count, tokens=tokens, cached=cached
    )
    await asyncio.to_thread(memory.trim)  # the claim's batches go back to the system


def _hash_file(f: IO[bytes], name: str, max_bytes: int) -> tuple[int, str]:
    """The size and SHA-256 of the open input, read a piece at a time."""
    digest = hashlib.sha256()
    size = 0
    f.seek(0)
    while part := f.read(READ_BYTES):
        digest.update(part)
        size += len(part)
        if size > max_bytes:
            raise InputRejected(
                f"{name} grew past the limit of {max_bytes} bytes while being read."
            )
    return size, digest.hexdigest()


# Records stored in one transaction (a file of up to this much text is queued in one
# step, its texts written once), and records tokenized in one call (their ids, 4 bytes
# a token, exist for one such call at a time). A whole batch is one call: its runs
# queue on the tokenizer's threads together, so of two claims one finishes first and
# is stored while the other is tokenized (in smaller calls the two took turns and
# finished together, leaving the tokenizer idle while both were stored).
BATCH_CHARS = 4 << 20
TOKENIZE_CHARS = 4 << 20


def _batches(records: Iterable[Record], limit: int = BATCH_CHARS) -> Iterator[list[Record]]:
    batch: list[Record] = []
    chars = 0
    for record in records:
        batch.append(record)
        chars += len(record.text)
        if chars >= limit:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _whole_text(
    rt: Intake, name: str, f: IO[bytes], size: int
) -> Iterator[tuple[Record, TokenIds]]:
    """A big text file (one record) tokenized straight from the file, a piece at a
    time: neither its bytes nor its text ever exist whole (as one string a non-Latin
    text takes 2 or 4 bytes a character). Same checks and messages as `documents`
    (SPEC §2). The token ids go into one array sized for the worst case (a token per
    byte): only the pages written take memory, and no second copy is made."""
    pos = prescan(name, f, utf8=False)  # a NUL anywhere is reported first
    out = np.empty(max(size, 1), dtype=np.uint32)
    count = 0
    carry = ""
    rest = b""
    blank = True
    while True:
        raw = f.read(PIECE_CHARS)
        final = len(raw) < PIECE_CHARS
        piece = rest + raw if rest else raw
        del raw
        try:
            text, used = codecs.utf_8_decode(piece, "strict", final)
        except UnicodeDecodeError as exc:
            raise InputRejected(
                f"{name} is not valid UTF-8: byte offset {pos + exc.start} ({exc.reason})."
            ) from None
        rest = piece[used:]
        pos += used
        del piece
        text = carry + text
        blank = blank and not text.strip()
        cut = len(text) if final else cut_point(text, 0, len(text))
        ids = rt.tokenizer.encode_compact(text[:cut])
        out[count : count + len(ids)] = ids
        count += len(ids)
        del ids
        carry = text[cut:]
        del text
        if final:
            break
    if blank:
        error = "text is empty or whitespace only"
        raise InputRejected(f"{name}: {error}.", records=[{"id": name, "error": error}])
    tokens = out[:count]
    if len(tokens) <= rt.settings.inputs_max_tokens:  # short after all: send the text
        del tokens, out
        yield from _tokenized(rt, [*iter_document(name, f)])
        return
    yield Record(name, "", None, None), tokens


def _tokenized(rt: Intake, batch: Sequence[Record]) -> Iterator[tuple[Record, TokenIds]]:
    """Each record with its token ids, as a compact uint32 array."""
    for part in _batches(batch, TOKENIZE_CHARS):
        short = [r.text for r in part if len(r.text) <= PIECE_CHARS]
        ids_of_short = iter(rt.tokenizer.encode_batch_compact(short))
        del short
        for record in part:
            if len(record.text) > PIECE_CHARS:
                yield record, rt.tokenizer.encode_compact(record.text)
                continue
            yield record, next(ids_of_short)


def _prepared_batches(
    rt: Intake, name: str, f: IO[bytes], size: int
) -> Iterator[tuple[list[NewRecord], list[NewRequest]]]:
    """Parse, tokenize and key the file's records a batch at a time (CPU work: each
    step runs in a worker thread). Raises InputRejected when the file is refused;
    per-record problems are all reported at the end, and once there is one no more
    batches are produced. `cached` is decided later, when the file is queued."""
    s = rt.settings
    problems: list[dict[str, Any]] = []
    whole_text = is_whole_text(name, size)
    batches = [[]] if whole_text else _batches(iter_document(name, f))
    for batch in batches:
        records: list[NewRecord] = []
        requests: dict[str, NewRequest] = {}
        tokenized = _whole_text(rt, name, f, size) if whole_text else _tokenized(rt, batch)
        staged = 0
        for record, tokens in tokenized:
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
            pieces: list[tuple[str, int]] = []
            for chunk in chunks:
                # token windows go in their stored form, made once: the key hashes it too
                value = chunk.input if isinstance(chunk.input, str) else encode_input(chunk.input)
                key = request_key(s.openai_model, s.openai_dimensions, value)
                pieces.append((key, chunk.tokens))
                if key not in requests:
                    text_bytes = len(value.encode()) if chunk.input is value else 4 * chunk.tokens
                    requests[key] = NewRequest(
                        key=key,
                        input=value,
                        tokens=chunk.tokens,
                        qtokens=queue_tokens_estimate(chunk.tokens, text_bytes),
                        nbytes=request_line_size(
                            key, chunk.input, s.openai_model, s.send_dimensions
                        ),
                    )
                    staged += len(value)
                    if whole_text and staged >= BATCH_CHARS:
                        # one huge text's windows: set aside a few MB of them at a time
                        yield [], list(requests.values())
                        requests.clear()
                        staged = 0
            records.append(NewRecord(record.id, record.meta, len(tokens), pieces, cached=False))
        if not problems:
            yield records, list(requests.values())
    if problems:
        raise InputRejected(
            f"{name} has {len(problems)} record(s) over {s.inputs_max_tokens} tokens "
            f'and [inputs] long = "fail"; first: {problems[0]["id"]!r}.',
            records=problems,
        )


def _fsync_both(a: Path, b: Path) -> None:
    fsync_dir(a)
    fsync_dir(b)
