"""Tests for embedd.pipeline.planner: cutting shards, when to submit, sync groups, the queue limit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.pipeline.planner import (
    API_MAX_INPUTS_PER_BATCH,
    Cut,
    ShardLimits,
    cut_shard,
    learn_queue_limit,
    pack_sync,
    queue_tokens_estimate,
    should_submit,
)
from embedd.pipeline.submitter import plan_interval


@dataclass(frozen=True)
class Req:
    """A stand-in for a pending request: only what the planner reads."""

    key: str
    tokens: int
    qtokens: int
    nbytes: int


def req(i: int, tokens: int = 10, qtokens: int | None = None, nbytes: int = 100) -> Req:
    return Req(f"k{i:06d}", tokens, tokens if qtokens is None else qtokens, nbytes)


@st.composite
def queues(draw: st.DrawFn) -> list[Req]:
    sizes = draw(
        st.lists(
            st.tuples(
                st.integers(1, 9000),  # tokens
                st.integers(0, 3000),  # extra queue tokens (bytes/4 above tiktoken)
                st.integers(1, 60_000),  # bytes of the JSONL line
            ),
            max_size=80,
        )
    )
    return [Req(f"k{i}", t, t + extra, b) for i, (t, extra, b) in enumerate(sizes)]


limits_st = st.builds(
    ShardLimits,
    max_lines=st.integers(1, 100),
    max_bytes=st.integers(1, 2_000_000),
    max_tokens=st.integers(1, 400_000),
)


@settings(max_examples=300, deadline=None)
@given(pending=queues(), limits=limits_st, headroom=st.integers(-1000, 400_000))
def test_cut_shard_respects_every_limit_and_takes_an_ordered_prefix(
    pending: list[Req], limits: ShardLimits, headroom: int
) -> None:
    """A cut is a prefix of the queue in order, under lines, bytes, tokens and headroom."""
    cut = cut_shard(pending, limits, headroom)
    taken = pending[: cut.lines]
    assert cut.keys == tuple(r.key for r in taken)
    assert cut.lines == len(cut.keys) <= min(limits.max_lines, API_MAX_INPUTS_PER_BATCH)
    assert cut.nbytes == sum(r.nbytes for r in taken) <= limits.max_bytes
    assert cut.tokens == sum(r.tokens for r in taken)
    assert cut.qtokens == sum(r.qtokens for r in taken) <= limits.max_tokens
    if cut.keys:
        assert cut.qtokens <= headroom


@settings(max_examples=300, deadline=None)
@given(pending=queues(), limits=limits_st, headroom=st.integers(-1000, 400_000))
def test_cut_shard_stops_only_at_a_limit_and_names_it(
    pending: list[Req], limits: ShardLimits, headroom: int
) -> None:
    """The cut ends only where the next request would break the limit `stopped_by` names."""
    cut = cut_shard(pending, limits, headroom)
    if cut.stopped_by == "exhausted":
        assert cut.lines == len(pending)
        return
    if cut.stopped_by == "lines":
        assert cut.lines == limits.max_lines
        return
    nxt = pending[cut.lines]  # a limit other than lines stopped the cut: a next one exists
    assert cut.lines < limits.max_lines
    if cut.stopped_by == "bytes":
        assert cut.nbytes + nxt.nbytes > limits.max_bytes
    elif cut.stopped_by == "tokens":
        assert cut.qtokens + nxt.qtokens > limits.max_tokens
    else:
        # Held back by the headroom alone: with a free queue the request would fit.
        assert cut.stopped_by == "headroom"
        assert limits.max_tokens >= cut.qtokens + nxt.qtokens > headroom


def test_cut_shard_takes_everything_that_fits() -> None:
    """A small queue that fits every limit is taken whole, and says it was exhausted."""
    pending = [req(i) for i in range(7)]
    cut = cut_shard(pending, ShardLimits(100, 10_000, 1_000), headroom=1_000)
    assert cut == Cut(tuple(r.key for r in pending), 7, 700, 70, 70, "exhausted")


def test_cut_shard_of_an_empty_queue_is_empty_and_exhausted() -> None:
    """Nothing pending gives an empty cut that is not mistaken for a full one."""
    cut = cut_shard([], ShardLimits(10, 10, 10), headroom=10)
    assert cut.keys == ()
    assert cut.stopped_by == "exhausted"


def test_cut_shard_never_takes_more_than_the_api_input_limit() -> None:
    """Even with max_lines above 50,000 a shard holds at most 50,000 inputs."""
    pending = [Req(f"k{i}", 1, 1, 1) for i in range(API_MAX_INPUTS_PER_BATCH + 1)]
    cut = cut_shard(pending, ShardLimits(60_000, 10**9, 10**9), headroom=10**9)
    assert cut.lines == API_MAX_INPUTS_PER_BATCH
    assert cut.stopped_by == "lines"


def test_180_requests_with_max_lines_50_become_4_shards() -> None:
    """Cutting repeatedly with max_lines = 50 turns 180 requests into 50 + 50 + 50 + 30."""
    queue = [req(i) for i in range(180)]
    limits = ShardLimits(max_lines=50, max_bytes=190_000_000, max_tokens=3_000_000)
    shards: list[Cut] = []
    while queue:
        cut = cut_shard(queue, limits, headroom=3_000_000)
        shards.append(cut)
        queue = queue[cut.lines :]
    assert [c.lines for c in shards] == [50, 50, 50, 30]
    assert [c.stopped_by for c in shards] == ["lines", "lines", "lines", "exhausted"]
    assert [k for c in shards for k in c.keys] == [req(i).key for i in range(180)]


def test_full_shard_is_submitted_at_once() -> None:
    """A shard stopped by lines, bytes or tokens goes out without waiting for flush_after."""
    now = 1_000.0
    full_by_lines = cut_shard([req(i) for i in range(5)], ShardLimits(3, 10**6, 10**6), 10**6)
    full_by_bytes = cut_shard([req(i) for i in range(5)], ShardLimits(99, 250, 10**6), 10**6)
    full_by_tokens = cut_shard([req(i) for i in range(5)], ShardLimits(99, 10**6, 25), 10**6)
    assert [full_by_lines.stopped_by, full_by_bytes.stopped_by, full_by_tokens.stopped_by] == [
        "lines",
        "bytes",
        "tokens",
    ]
    for cut in (full_by_lines, full_by_bytes, full_by_tokens):
        assert should_submit(cut, oldest_queued_at=now, now=now, flush_after=60.0)


def test_partial_shard_waits_until_its_oldest_request_waited_flush_after() -> None:
    """A partial shard is held until the oldest request is flush_after old, then sent."""
    cut = cut_shard([req(i) for i in range(3)], ShardLimits(50, 10**6, 10**6), 10**6)
    assert cut.stopped_by == "exhausted"
    assert not should_submit(cut, oldest_queued_at=100.0, now=159.9, flush_after=60.0)
    assert should_submit(cut, oldest_queued_at=100.0, now=160.0, flush_after=60.0)
    assert should_submit(cut, oldest_queued_at=100.0, now=500.0, flush_after=60.0)


def test_headroom_limited_shard_waits_like_a_partial_one() -> None:
    """A shard cut short only by batches in flight waits flush_after for them to finish."""
    pending = [req(i, tokens=100) for i in range(10)]
    cut = cut_shard(pending, ShardLimits(50, 10**6, 3_000_000), headroom=250)
    assert cut.stopped_by == "headroom"
    assert cut.lines == 2
    assert not should_submit(cut, oldest_queued_at=0.0, now=59.0, flush_after=60.0)
    assert should_submit(cut, oldest_queued_at=0.0, now=60.0, flush_after=60.0)


def test_shard_full_by_tokens_is_full_even_when_headroom_is_lower() -> None:
    """When the next request breaks max_tokens itself, the shard is full, not headroom-limited."""
    pending = [req(0, tokens=90), req(1, tokens=20)]
    cut = cut_shard(pending, ShardLimits(50, 10**6, max_tokens=100), headroom=95)
    assert cut.lines == 1
    assert cut.stopped_by == "tokens"
    assert should_submit(cut, oldest_queued_at=0.0, now=0.0, flush_after=60.0)


def test_empty_cut_is_never_submitted() -> None:
    """No headroom at all means nothing to submit, however old the queue is."""
    cut = cut_shard([req(0)], ShardLimits(50, 10**6, 10**6), headroom=0)
    assert cut.keys == ()
    assert not should_submit(cut, oldest_queued_at=0.0, now=10**6, flush_after=60.0)


def test_queue_tokens_estimate_errs_high() -> None:
    """The queue estimate is the larger of tiktoken's count and bytes / 4, rounded up."""
    assert queue_tokens_estimate(10, 8) == 10
    assert queue_tokens_estimate(10, 41) == 11
    assert queue_tokens_estimate(0, 1) == 1


@settings(max_examples=300, deadline=None)
@given(
    max_inputs=st.integers(1, 20),
    max_tokens=st.integers(1, 5_000),
    data=st.data(),
)
def test_pack_sync_keeps_order_limits_and_every_key_once(
    max_inputs: int, max_tokens: int, data: st.DataObject
) -> None:
    """Sync groups keep queue order, hold every key once and stay under both call limits."""
    tokens = data.draw(st.lists(st.integers(1, max_tokens), max_size=60))
    pending = [Req(f"k{i}", t, t, 4 * t) for i, t in enumerate(tokens)]
    groups = pack_sync(pending, max_inputs, max_tokens)
    assert [k for g in groups for k in g] == [r.key for r in pending]
    by_key = {r.key: r for r in pending}
    for i, group in enumerate(groups):
        assert 1 <= len(group) <= max_inputs
        assert sum(by_key[k].tokens for k in group) <= max_tokens
        if i + 1 < len(groups):
            # A group closes only when the next request would not fit in it.
            first_next = by_key[groups[i + 1][0]]
            group_tokens = sum(by_key[k].tokens for k in group)
            assert len(group) == max_inputs or group_tokens + first_next.tokens > max_tokens


def test_pack_sync_of_nothing_is_no_call() -> None:
    """An empty sync queue makes no groups, so no empty request is ever sent."""
    assert pack_sync([], 2048, 300_000) == []


def test_learn_queue_limit_reads_openai_message() -> None:
    """OpenAI's token_limit_exceeded message yields the organisation's limit as a number."""
    message = (
        "Enqueued token limit reached for text-embedding-3-large in organization org-abc. "
        "Limit: 3,000,000 enqueued tokens. Please try again once some in_progress batches "
        "have been completed."
    )
    assert learn_queue_limit(message) == 3_000_000


@pytest.mark.parametrize(
    ("message", "limit"),
    [
        ("Limit: 20000000 enqueued tokens.", 20_000_000),
        ("Limit: 100,000,000 enqueued tokens", 100_000_000),
        ("Enqueued token limit reached. Please try again later.", None),
        ("Limit: unknown", None),
        ("", None),
    ],
)
def test_learn_queue_limit_is_none_without_a_number(message: str, limit: int | None) -> None:
    """A message without "Limit: N" teaches nothing; one with it gives N."""
    assert learn_queue_limit(message) == limit


@pytest.mark.parametrize(
    ("flush_after", "interval"), [(60.0, 1.0), (1.0, 1.0), (0.2, 0.2), (0.0, 0.05)]
)
def test_the_planner_wakes_in_time_for_a_short_flush_after(
    flush_after: float, interval: float
) -> None:
    """Between passes the planner sleeps at most a second, and no longer than
    `flush_after` (so a 0.2 s setting is not a second in practice), never spinning."""
    assert plan_interval(flush_after) == interval
