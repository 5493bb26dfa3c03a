"""Token-bucket arithmetic and the async limiter, driven by an injected clock."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from embedd.openai.limiter import Limiter, ServerWindow, TokenBucket, parse_reset


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


def test_adopt_limit_only_lowers_capacity() -> None:
    """A server limit below ours is adopted with the same refill period; a higher one is not."""
    bucket = TokenBucket(capacity=60, refill_per_s=1.0, now=0.0)
    bucket.adopt_limit(30, now=0.0)
    assert bucket.capacity == 30.0
    assert bucket.refill_per_s == pytest.approx(0.5)  # same 60 s period
    assert bucket.available(0.0) == 30.0
    bucket.adopt_limit(1000, now=0.0)
    assert bucket.capacity == 30.0


def test_spent_server_window_holds_until_reset_without_refilling() -> None:
    """Once the server's room is below the call, the call waits for the reset, not a refill."""
    window = ServerWindow()
    window.observe(remaining=1000, reset_in=10.0, in_flight=0, now=0.0)
    window.take(900, 0.0)
    assert window.wait_time(50, 0, 1.0) == 0.0
    assert window.wait_time(200, 0, 1.0) == pytest.approx(9.0)
    assert window.wait_time(200, 0, 9.99) == pytest.approx(0.01)
    assert window.wait_time(200, 0, 10.0) == 0.0  # a fresh window: its allowance is back


def test_server_room_is_net_of_calls_in_flight() -> None:
    """The server's remaining, less our unanswered calls, is the room we use."""
    window = ServerWindow()
    window.observe(remaining=1000, reset_in=10.0, in_flight=600, now=0.0)
    assert window.room(600, 0.0) == 400.0
    assert window.wait_time(500, 600, 0.0) == pytest.approx(10.0)
    # The later answer shows the server had counted them: the room grows back.
    window.observe(remaining=400, reset_in=9.9, in_flight=0, now=0.1)
    assert window.wait_time(400, 0, 0.1) == 0.0


def test_overtaken_and_old_window_headers_are_ignored() -> None:
    """An answer stating more room in the same window, or a window already over, changes nothing."""
    window = ServerWindow()
    window.observe(remaining=500, reset_in=8.0, in_flight=0, now=0.0)
    window.observe(remaining=900, reset_in=7.9, in_flight=0, now=0.1)
    assert window.room(0, 0.1) == 500.0
    window.observe(remaining=20, reset_in=0.01, in_flight=0, now=0.2)  # previous window
    assert window.room(0, 0.2) == 500.0
    window.observe(remaining=300, reset_in=10.0, in_flight=0, now=8.5)  # the next window
    assert window.room(0, 8.5) == 300.0


def test_fresh_window_allows_what_a_window_held_less_calls_in_flight() -> None:
    """After a reset and before news, calls in flight may use up the largest room seen."""
    window = ServerWindow()
    assert window.wait_time(10**9, 0, 0.0) == 0.0  # nothing known: no server limit yet
    window.observe(remaining=1000, reset_in=1.0, in_flight=0, now=0.0)
    assert window.room(300, 2.0) == 700.0
    assert window.wait_time(800, 300, 2.0) == math.inf  # until an answer says more
    assert window.wait_time(5000, 0, 2.0) == 0.0  # oversize: goes into an empty window


async def test_calls_in_flight_are_tracked_per_task() -> None:
    """A call is in flight until its own task reports headers or ends; others' headers
    are reduced by it."""
    clock = FakeClock()
    limiter = Limiter(rpm=1000, tpm=100_000, clock=clock, sleep=clock.sleep)
    sent = asyncio.Event()
    answer = asyncio.Event()

    async def slow_call() -> None:
        await limiter.acquire(1, 400)
        sent.set()
        await answer.wait()

    async with asyncio.TaskGroup() as group:
        group.create_task(slow_call())
        await sent.wait()
        await limiter.acquire(1, 100)
        assert limiter.in_flight() == (2, 500)
        limiter.update_from_headers(_headers(tokens=1000, reset="10s"), clock())
        assert limiter.in_flight() == (1, 400)
        assert limiter.server_tokens.room(400, clock()) == 600.0
        answer.set()
    assert limiter.in_flight() == (0, 0)


async def test_waiter_wakes_when_an_answer_shows_more_room() -> None:
    """A caller held until the reset goes as soon as an answer shows the room is there."""
    limiter = Limiter(rpm=1000, tpm=100_000)
    limiter.update_from_headers(_headers(tokens=2000, reset="1m0s"))
    sent, answered = asyncio.Event(), asyncio.Event()

    async def other_call() -> None:
        await limiter.acquire(1, 400)
        sent.set()
        await answered.wait()
        # the server had already counted this call in the figure below
        limiter.update_from_headers(_headers(tokens=500, reset="59s"))

    async with asyncio.TaskGroup() as group:
        group.create_task(other_call())
        await sent.wait()
        limiter.update_from_headers(_headers(tokens=500, reset="59s"))
        assert limiter.server_tokens.room(400, time.monotonic()) == 100.0
        waiter = group.create_task(limiter.acquire(1, 300))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # held for the minute, as far as it knows
        answered.set()
        await asyncio.wait_for(waiter, 5)


def _headers(tokens: int, reset: str) -> dict[str, str]:
    return {
        "x-ratelimit-limit-tokens": "100000",
        "x-ratelimit-remaining-tokens": str(tokens),
        "x-ratelimit-reset-tokens": reset,
    }


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


async def test_update_from_headers_lowers_limits_and_holds_exhausted_pool() -> None:
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
    assert limiter.server_tokens.room(0, clock()) == 149990.0
    assert limiter.wait_time(1, 0, clock()) == pytest.approx(60.0)
    assert limiter.wait_time(0, 10, clock()) == 0.0


async def test_update_from_headers_ignores_missing_or_bad_values() -> None:
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
