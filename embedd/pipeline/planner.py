"""Packing pending requests into batch files and sync calls: pure decisions.

A shard (one batch input file) never exceeds any of its limits: `max_lines` lines,
50,000 inputs (one input a line, so the smaller of the two), `max_bytes` bytes, and
the tokens the organisation's batch queue can still take. A partial shard waits
until its oldest request has waited `flush_after`, so small drops never wait forever
and large drops are not cut into many small batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

API_MAX_INPUTS_PER_BATCH = 50_000


class Packable(Protocol):
    """What the planner needs to know of a request."""

    @property
    def key(self) -> str: ...
    @property
    def tokens(self) -> int: ...
    @property
    def qtokens(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class ShardLimits:
    max_lines: int
    max_bytes: int
    max_tokens: int  # the queue limit: no single batch may hold more


StopReason = Literal["lines", "bytes", "tokens", "headroom", "exhausted"]


@dataclass(frozen=True)
class Cut:
    """The longest prefix of the queue that fits in one shard, and why it stopped."""

    keys: tuple[str, ...]
    lines: int
    nbytes: int
    tokens: int
    qtokens: int
    stopped_by: StopReason


def queue_tokens_estimate(tokens: int, text_bytes: int) -> int:
    """Tokens counted against the batch queue: the larger of tiktoken's count and bytes/4.

    OpenAI counts enqueued tokens its own way; erring high keeps us under the limit.
    """
    return max(tokens, math.ceil(text_bytes / 4))


def cut_shard(pending: Sequence[Packable], limits: ShardLimits, headroom: int) -> Cut:
    """Take requests in queue order while every limit still holds.

    `headroom` is what the queue can take now (limit minus tokens in flight).
    """
    max_lines = min(limits.max_lines, API_MAX_INPUTS_PER_BATCH)
    keys: list[str] = []
    nbytes = tokens = qtokens = 0
    stopped: StopReason = "exhausted"
    for req in pending:
        if len(keys) >= max_lines:
            stopped = "lines"
            break
        if nbytes + req.nbytes > limits.max_bytes:
            stopped = "bytes"
            break
        # "tokens" means full: the next request breaks the limit itself, so waiting for
        # batches in flight could not grow this shard. "headroom" means waiting could.
        if qtokens + req.qtokens > limits.max_tokens:
            stopped = "tokens"
            break
        if qtokens + req.qtokens > headroom:
            stopped = "headroom"
            break
        keys.append(req.key)
        nbytes += req.nbytes
        tokens += req.tokens
        qtokens += req.qtokens
    else:
        if len(keys) >= max_lines and pending:
            stopped = "lines"
    return Cut(tuple(keys), len(keys), nbytes, tokens, qtokens, stopped)


def should_submit(cut: Cut, oldest_queued_at: float | None, now: float, flush_after: float) -> bool:
    """Submit a full shard at once; a partial one once its oldest request waited enough.

    A shard held back only by the queue headroom is partial too: waiting for batches
    in flight to finish makes fewer, fuller batches.
    """
    if not cut.keys:
        return False
    if cut.stopped_by in ("lines", "bytes", "tokens"):
        return True
    return oldest_queued_at is not None and now - oldest_queued_at >= flush_after


def pack_sync(
    pending: Sequence[Packable], max_inputs: int, max_tokens: int
) -> list[tuple[str, ...]]:
    """Group sync-lane requests into `/v1/embeddings` calls under both per-call limits."""
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    tokens = 0
    for req in pending:
        if current and (len(current) >= max_inputs or tokens + req.tokens > max_tokens):
            groups.append(tuple(current))
            current, tokens = [], 0
        current.append(req.key)
        tokens += req.tokens
    if current:
        groups.append(tuple(current))
    return groups


def learn_queue_limit(message: str) -> int | None:
    """The organisation's limit from a `token_limit_exceeded` message, if it says one.

    "... Limit: 3,000,000 enqueued tokens. ..." → 3000000
    """
    marker = "Limit:"
    at = message.find(marker)
    if at < 0:
        return None
    digits = ""
    for ch in message[at + len(marker) :].lstrip():
        if ch.isdigit():
            digits += ch
        elif ch in ",_" and digits:
            continue
        else:
            break
    return int(digits) if digits else None
