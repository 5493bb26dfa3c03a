"""Token-bucket arithmetic and the async limiter, driven by an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from embedd.limiter import Limiter, TokenBucket, parse_reset


class FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6ms", 0.006),
        ("20ms", 0.02),
        ("1s", 1.0),
        ("1m0s", 60.0),
        ("2m30s", 150.0),
        ("1h2m3s", 3723.0),
        ("2.5s", 2.5),
        ("0s", 0.0),
        ("7", 7.0),
        (" 3s ", 3.0),
    ],
)
def test_parse_reset_reads_openai_durations(text: str, seconds: float) -> None:
    """x-ratelimit-reset values in OpenAI's Go-style duration format parse to seconds."""
    assert parse_reset(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s1", "1s junk"])
def test_parse_reset_rejects_garbage(text: str) -> None:
    """An unparseable reset value yields None instead of a made-up wait."""
    assert parse_reset(text) is None


def test_bucket_allows_burst_up_to_capacity_then_waits_for_refill() -> None:
    """A full bucket serves a burst of `capacity`, then the next unit waits 1/rate."""
    bucket = TokenBucket(capacity=10, refill_per_s=2.0, now=0.0)
    for _ in range(10):
        assert bucket.try_take(1, 0.0) == 0.0
    assert bucket.try_take(1, 0.0) == pytest.approx(0.5)
    assert bucket.try_take(1, 0.5) == 0.0


def test_bucket_refill_never_exceeds_capacity() -> None:
    """A long idle period refills to capacity, not beyond."""
    bucket = TokenBucket(capacity=5, refill_per_s=1.0, now=0.0)
    bucket.take(5, 0.0)
    assert bucket.available(1000.0) == 5.0


def test_bucket_oversize_request_waits_for_full_bucket_and_leaves_debt() -> None:
    """A request bigger than capacity goes once the bucket is full and later calls pay."""
    bucket = TokenBucket(capacity=100, refill_per_s=10.0, now=0.0)
    bucket.take(50, 0.0)
    assert bucket.wait_time(250, 0.0) == pytest.approx(5.0)  # until full, not forever
    assert bucket.try_take(250, 5.0) == 0.0
    assert bucket.available(5.0) == pytest.approx(-150.0)
    assert bucket.wait_time(1, 5.0) == pytest.approx(15.1)


def test_bucket_hold_blocks_until_deadline() -> None:
    """A hold (after a 429) makes even a full bucket wait until its deadline."""
    bucket = TokenBucket(capacity=10, refill_per_s=1.0, now=0.0)
    bucket.hold(3.0)
    assert bucket.wait_time(1, 1.0) == pytest.approx(2.0)
    assert bucket.wait_time(1, 3.0) == 0.0


def test_bucket_rejects_non_positive_parameters() -> None:
    """A zero capacity or rate is a configuration error, not an infinite wait."""
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(1, 0.0)


def test_recalibrate_only_lowers_level_and_capacity() -> None:
    """Server headers can lower our limit and level but never raise them."""
    bucket = TokenBucket(capacity=60, refill_per_s=1.0, now=0.0)
    bucket.recalibrate(capacity=30, remaining=20, now=0.0)
    assert bucket.capacity == 30.0
    assert bucket.refill_per_s == pytest.approx(0.5)  # same 60 s period
    assert bucket.available(0.0) == 20.0
    bucket.recalibrate(capacity=1000, remaining=1000, now=0.0)
    assert bucket.capacity == 30.0
    assert bucket.available(0.0) == 20.0


async def test_limiter_paces_requests_at_rpm_after_burst() -> None:
    """With rpm=60, 60 calls go at once and each later call waits one second."""
    clock = FakeClock()
    limiter = Limiter(rpm=60, tpm=1_000_000, clock=clock, sleep=clock.sleep)
    for _ in range(60):
        await limiter.acquire()
    assert clock.sleeps == []
    await limiter.acquire()
    await limiter.acquire()
    assert sum(clock.sleeps) == pytest.approx(2.0)


async def test_limiter_charges_tokens_against_tpm() -> None:
    """Token-heavy calls wait for the token bucket even when requests are free."""
    clock = FakeClock()
    limiter = Limiter(rpm=1000, tpm=600, clock=clock, sleep=clock.sleep)
    await limiter.acquire(tokens=600)
    await limiter.acquire(tokens=300)
    assert sum(clock.sleeps) == pytest.approx(30.0)  # 300 tokens at 10 tokens/s


async def test_limiter_batch_calls_cost_no_tokens() -> None:
    """Batch uploads and polls (tokens=0) never touch the TPM bucket."""
    clock = FakeClock()
    limiter = Limiter(rpm=1000, tpm=10, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        await limiter.acquire(requests=1, tokens=0)
    assert clock.sleeps == []
    assert limiter.tokens.available(clock()) == 10.0


async def test_limiter_oversize_token_request_does_not_deadlock() -> None:
    """A call needing more tokens than tpm goes through once the bucket is full."""
    clock = FakeClock()
    limiter = Limiter(rpm=1000, tpm=100, clock=clock, sleep=clock.sleep)
    await limiter.acquire(tokens=50)
    await asyncio.wait_for(limiter.acquire(tokens=500), timeout=5)
    assert sum(clock.sleeps) == pytest.approx(30.0)  # 50 tokens at 100/60 per second


async def test_limiter_serves_waiters_in_arrival_order() -> None:
    """A big request queued first is served before small ones that arrive later."""
    clock = FakeClock()
    limiter = Limiter(rpm=10_000, tpm=100, clock=clock, sleep=clock.sleep)
    await limiter.acquire(tokens=100)  # drain
    order: list[str] = []

    async def call(name: str, tokens: int) -> None:
        await limiter.acquire(tokens=tokens)
        order.append(name)

    async with asyncio.TaskGroup() as group:
        group.create_task(call("big", 90))
        await asyncio.sleep(0)
        for i in range(5):
            group.create_task(call(f"small{i}", 1))
    assert order == ["big", "small0", "small1", "small2", "small3", "small4"]


async def test_penalize_holds_every_caller() -> None:
    """After a 429 penalty, the next call waits the penalty even with a full bucket."""
    clock = FakeClock()
    limiter = Limiter(rpm=1000, tpm=1000, clock=clock, sleep=clock.sleep)
    limiter.penalize(7.5)
    await limiter.acquire()
    assert sum(clock.sleeps) == pytest.approx(7.5)


def test_update_from_headers_lowers_limits_and_holds_exhausted_pool() -> None:
    """Headers recalibrate both buckets; an exhausted pool waits for its reset."""
    clock = FakeClock()
    limiter = Limiter(rpm=3000, tpm=1_000_000, clock=clock, sleep=clock.sleep)
    headers = {
        "X-RateLimit-Limit-Requests": "500",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "150000",
        "x-ratelimit-remaining-tokens": "149990",
        "x-ratelimit-reset-tokens": "6ms",
    }
    limiter.update_from_headers(headers, clock())
    assert limiter.requests.capacity == 500.0
    assert limiter.tokens.capacity == 150000.0
    assert limiter.tokens.available(clock()) == 149990.0
    assert limiter.wait_time(1, 0, clock()) == pytest.approx(60.0)
    assert limiter.wait_time(0, 10, clock()) == 0.0


def test_update_from_headers_ignores_missing_or_bad_values() -> None:
    """Absent or non-numeric headers leave the limiter as configured."""
    clock = FakeClock()
    limiter = Limiter(rpm=100, tpm=1000, clock=clock, sleep=clock.sleep)
    limiter.update_from_headers({"x-ratelimit-limit-requests": "many"}, clock())
    limiter.update_from_headers({"x-ratelimit-remaining-tokens": "5"}, clock())
    assert limiter.snapshot(clock()) == {
        "rpm": 100.0,
        "tpm": 1000.0,
        "requests_available": 100.0,
        "tokens_available": 1000.0,
        "held_for_s": 0.0,
    }
