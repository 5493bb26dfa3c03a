"""The sync lane: files from `inbox/sync/` through `POST /v1/embeddings`, now.

Pending sync requests are packed into calls of at most `[sync] max_inputs` inputs
and `[sync] max_request_tokens` tokens; calls run concurrently and the limiter in
the client spaces them to the RPM/TPM budget. Each answered call stores its vectors
and its ledger row (kind `sync`) in one transaction. A call the API refuses as a
whole is split in halves until the refused input is alone, and only that one fails.

On SIGTERM a call in flight is not cancelled: it finishes (and its ledger line is
written) within most of `[daemon] stop_timeout`. Known limit (SPEC §6): a call whose
answer is lost in a `kill -9` may be billed without a ledger line; the batch lane has
no such window.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from embedd.config import Settings
from embedd.errors import APIPermanentError, SubmissionPaused, TransientError
from embedd.money.books import Books
from embedd.money.budget import entry_maker, flush_ledger, submission_allowed
from embedd.money.ledger import entry_row
from embedd.openai.api import OpenAIClient
from embedd.openai.batchlines import BadVector, decode_embedding
from embedd.pipeline.gate import SubmissionGate
from embedd.pipeline.outcome import RequestVerdict
from embedd.pipeline.planner import pack_sync
from embedd.pipeline.supervise import Supervisor
from embedd.pipeline.wakeups import Wakeups
from embedd.state.store import Pending, Store, new_id

CONCURRENCY = 8


@dataclass(frozen=True)
class SyncLane:
    """What the sync lane uses."""

    settings: Settings
    store: Store
    client: OpenAIClient
    clock: Callable[[], float]
    log: Any
    wake: Wakeups
    guard: Supervisor
    stopping: asyncio.Event
    gate: SubmissionGate
    books: Books


async def sync_loop(rt: SyncLane) -> None:
    in_flight: set[str] = set()
    slots = asyncio.Semaphore(CONCURRENCY)
    async with asyncio.TaskGroup() as tg:
        while not rt.stopping.is_set():
            if not rt.gate.paused():
                pending = [
                    p
                    for p in await rt.store.pending("sync", 20 * rt.settings.sync_max_inputs)
                    if p.key not in in_flight
                ]
                by_key = {p.key: p for p in pending}
                groups = pack_sync(
                    pending, rt.settings.sync_max_inputs, rt.settings.sync_max_request_tokens
                )
                for group in groups:
                    tokens = sum(by_key[k].tokens for k in group)
                    if not await submission_allowed(rt.books, tokens, "sync"):
                        break
                    await slots.acquire()
                    if rt.stopping.is_set():
                        slots.release()
                        break
                    in_flight.update(group)
                    tg.create_task(_run(rt, [by_key[k] for k in group], in_flight, slots))
            await rt.wake.wait("sync", 1.0)


async def _run(
    rt: SyncLane, group: list[Pending], in_flight: set[str], slots: asyncio.Semaphore
) -> None:
    try:
        await rt.guard.run(
            "sync",
            f"call:{_unit_of(group)}",
            lambda: _finish_on_stop(rt, call(rt, group)),
            functools.partial(_give_up, rt, group),
        )
    except SubmissionPaused as exc:
        await rt.gate.pause(exc.message)
    except TransientError as exc:
        rt.log.warning("sync.retry_later", inputs=len(group), error=exc.message)
    finally:
        in_flight.difference_update(p.key for p in group)
        slots.release()
        rt.wake.kick("deliver")


def _unit_of(group: list[Pending]) -> str:
    """A sync call's unit name: the same requests make the same unit after a restart."""
    h = hashlib.sha256()
    for key in sorted(p.key for p in group):
        h.update(key.encode())
    return h.hexdigest()[:16]


async def _give_up(rt: SyncLane, group: list[Pending], reason: str) -> None:
    """A sync call that failed for good (SPEC §8): its requests fail with `reason`."""
    for p in group:
        await _settle(rt, p, reason)


async def _finish_on_stop(rt: SyncLane, work: Coroutine[Any, Any, None]) -> None:
    """Run `work`; when the daemon stops meanwhile, let it finish (the API may have
    billed the call already, and its answer and ledger line are stored) within most
    of `[daemon] stop_timeout`, then give up on it."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            rt.log.info("sync.finishing_before_stop")
            budget = 0.8 * rt.settings.daemon_stop_timeout
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), budget)
            if not task.done():
                task.cancel()
        raise


async def call(rt: SyncLane, group: list[Pending]) -> None:
    """One `/v1/embeddings` call for `group`, split on a permanent refusal."""
    s = rt.settings
    inputs = [p.input for p in group]
    try:
        reply = await rt.client.embeddings(
            inputs,  # type: ignore[arg-type]
            s.openai_model,
            s.send_dimensions,
            tokens=sum(p.tokens for p in group),
        )
    except APIPermanentError as exc:
        if len(group) == 1:
            await _settle(rt, group[0], f"{exc.status} {exc.code}: {exc.message}")
            return
        half = len(group) // 2
        await call(rt, group[:half])
        await call(rt, group[half:])
        return
    vectors: list[tuple[str, bytes, int | None]] = []
    retry: list[tuple[str, str]] = []
    data = sorted(reply.get("data") or [], key=lambda d: int(d.get("index", 0)))
    if len(data) != len(group):
        retry = [(p.key, f"reply had {len(data)} vectors for {len(group)} inputs") for p in group]
        data = []
    for p, item in zip(group, data, strict=False):
        try:
            vec = decode_embedding(item["embedding"], s.openai_dimensions)
        except (BadVector, KeyError) as exc:
            retry.append((p.key, f"bad vector in reply: {exc}"))
            continue
        vectors.append((p.key, vec.astype("<f4").tobytes(), p.tokens))
    usage = reply.get("usage") or {}
    tokens = int(usage.get("prompt_tokens") or usage.get("total_tokens") or 0)
    call_id = new_id("sync")
    entry = entry_maker(rt.books).usage(
        "sync",
        batch_id=call_id,
        requests=len(vectors),
        tokens=tokens,
        estimated_tokens=sum(p.tokens for p in group),
    )
    await rt.store.apply_results(
        RequestVerdict(retry=tuple(retry)),
        vectors=vectors,
        origin=call_id,
        ledger=entry_row(entry),
        max_retries=s.retry_max_retries,
        now=rt.clock(),
    )
    rt.log.info("sync.embedded", call=call_id, inputs=len(vectors), tokens=tokens)
    await flush_ledger(rt.books)


async def _settle(rt: SyncLane, req: Pending, error: str) -> None:
    await rt.store.apply_results(
        RequestVerdict(fail=((req.key, error),)),
        max_retries=rt.settings.retry_max_retries,
        now=rt.clock(),
    )
    rt.log.warning("sync.refused", key=req.key[:12], error=error)
