"""Retention: what the daemon keeps is bounded by settings, not by what it processed.

Each pass (every minute, and after each collection or delivery; the sweeps marked
"full" only once a minute):

- drops whole vector segments unused for `[dedup] keep`, then the least recently
  used until the cache fits `[dedup] max_bytes` (never one an unfinished file needs),
  and (full) segment files no index row names;
- (full) deletes the texts of requests that were still in a batch when their file
  finished;
- prunes the rows of files finished longer ago than `[state] keep` (the ledger stays).

The arithmetic lives in `Store.prune_vectors` / `Store.prune_finished`; this module
only runs them on a schedule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from embedd import memory
from embedd.config import Settings
from embedd.pipeline.wakeups import Wakeups
from embedd.state.store import Store
from embedd.state.vectors import SEGMENT_BYTES

INTERVAL = 60.0


@dataclass(frozen=True)
class Retention:
    """What retention uses. `queue_lock` is intake's: pruning the cache never runs
    while a file's requests are being queued against it."""

    settings: Settings
    store: Store
    clock: Callable[[], float]
    log: Any
    wake: Wakeups
    stopping: asyncio.Event
    queue_lock: asyncio.Lock


def segment_bytes(max_bytes: int) -> int:
    """Segment size for a cache of `max_bytes`: at most 16 MiB, and small enough that
    dropping one whole segment frees at most an eighth of the cache."""
    return max(4096, min(SEGMENT_BYTES, max_bytes // 8))


async def retention_loop(rt: Retention) -> None:
    """A full pass every INTERVAL; on a kick between them, the cheap part."""
    last_full = float("-inf")
    while not rt.stopping.is_set():
        full = rt.clock() - last_full >= INTERVAL
        await retain_once(rt, full=full)
        if full:
            last_full = rt.clock()
        await rt.wake.wait("retain", INTERVAL)


async def retain_once(rt: Retention, *, full: bool = True) -> None:
    s = rt.settings
    now = rt.clock()
    # Under the queue lock: a claim that found a text cached queues its file before
    # the segment holding that vector can be judged unused.
    async with rt.queue_lock:
        dropped = await rt.store.prune_vectors(
            max_bytes=s.dedup_max_bytes, keep=s.dedup_keep, now=now, sweep=full
        )
    if dropped:
        rt.log.info("dedup.segments_dropped", segments=len(dropped))
    if full:
        forgotten = await rt.store.forget_orphan_texts()
        if forgotten:
            rt.log.info("state.texts_deleted", requests=forgotten)
    pruned = await rt.store.prune_finished(now - s.state_keep)
    if pruned:
        rt.log.info("state.files_pruned", files=pruned)
    await rt.store.checkpoint()  # finish a truncation a reader held up
    # what a delivery, a collection or this pass freed goes back to the system
    await asyncio.to_thread(memory.trim)
