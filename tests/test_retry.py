"""The retry policy: backoff arithmetic and the outcome classification table."""

from __future__ import annotations

import random

import pytest

from embedd.openai.retry import Decision, ExcKind, RetryPolicy, classify, retry_after

R, P, Z, OK = Decision.RETRY, Decision.PERMANENT, Decision.PAUSE, Decision.OK


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (200, None, OK),
        (201, None, OK),
        (400, "invalid_request_error", P),
        (401, "invalid_api_key", Z),
        (401, None, Z),
        (403, None, Z),
        (404, None, P),
        (408, None, R),
        (409, None, R),
        (413, None, P),
        (422, None, P),
        (429, "rate_limit_exceeded", R),
        (429, None, R),
        (429, "insufficient_quota", Z),
        (400, "billing_hard_limit_reached", Z),
        (500, None, R),
        (502, None, R),
        (503, None, R),
        (504, None, R),
        (599, None, R),
        (302, None, P),
        (418, None, P),
    ],
)
def test_classify_status_table(status: int, code: str | None, expected: Decision) -> None:
    """Each status/code pair maps to the documented decision."""
    assert classify(status, code, {}, None) is expected


@pytest.mark.parametrize("kind", list(ExcKind))
def test_classify_transport_failures_retry(kind: ExcKind) -> None:
    """Connection errors, timeouts, truncated and HTML/garbled bodies are retried."""
    assert classify(None, None, {}, kind.value) is R


@pytest.mark.parametrize("kind", [ExcKind.TRUNCATED, ExcKind.HTML, ExcKind.BAD_BODY])
def test_classify_success_status_with_unreadable_body_retries(kind: ExcKind) -> None:
    """A 200 whose body was cut or is an HTML page is a failure, not a success."""
    assert classify(200, None, {}, kind.value) is R


def test_classify_needs_status_or_exception() -> None:
    """Calling classify with nothing to classify is a programming error."""
    with pytest.raises(ValueError, match="status or an exception"):
        classify(None, None, {}, None)


@pytest.mark.parametrize(
    ("status", "header", "expected"),
    [
        (400, "true", R),
        (500, "false", P),
        (503, "FALSE", P),
        (429, "false", P),
        (500, "maybe", R),  # not a boolean: ignored
    ],
)
def test_x_should_retry_overrides_status(status: int, header: str, expected: Decision) -> None:
    """The server's x-should-retry header wins over the status table."""
    assert classify(status, None, {"X-Should-Retry": header}, None) is expected


@pytest.mark.parametrize(
    ("status", "code"), [(401, None), (403, None), (429, "insufficient_quota")]
)
def test_x_should_retry_never_unpauses(status: int, code: str | None) -> None:
    """A pausing status or error code stays a pause whatever x-should-retry says."""
    assert classify(status, code, {"x-should-retry": "true"}, None) is Z


def test_retry_after_prefers_milliseconds_header() -> None:
    """retry-after-ms is more precise than retry-after and wins."""
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == pytest.approx(1.5)


def test_retry_after_seconds_and_http_date() -> None:
    """retry-after accepts seconds, or an HTTP date relative to the wall clock."""
    assert retry_after({"Retry-After": "20"}) == 20.0
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert retry_after({"retry-after": date}, wall_now=1445412470.0) == pytest.approx(10.0)
    assert retry_after({"retry-after": date}) is None  # no wall clock: cannot tell
    assert retry_after({"retry-after": "garbage"}, wall_now=0.0) is None


def test_retry_after_falls_back_to_exhausted_pool_reset_on_429() -> None:
    """A 429 without Retry-After waits for the reset of the pool that ran out."""
    headers = {
        "x-ratelimit-remaining-requests": "10",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "800ms",
    }
    assert retry_after(headers, 429) == pytest.approx(0.8)
    del headers["x-ratelimit-remaining-tokens"]
    assert retry_after(headers, 429) == pytest.approx(2.0)  # none exhausted: longest
    assert retry_after(headers, 500) is None  # resets only matter for 429
    assert retry_after({}, 429) is None


def test_delay_is_bounded_by_exponential_ceiling_and_cap() -> None:
    """Delay for attempt n lies in [0, min(cap, base*2**n)]."""
    policy = RetryPolicy(base=1.0, cap=60.0, max_retries=5, rng=random.Random(1))
    for attempt in range(12):
        ceiling = min(60.0, 2.0**attempt)
        samples = [policy.delay(attempt, None) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # jitter spans the range


def test_delay_never_below_retry_after_even_above_cap() -> None:
    """The server's Retry-After is a floor, also when it exceeds the cap."""
    policy = RetryPolicy(base=1.0, cap=10.0, rng=random.Random(2))
    for attempt in range(8):
        assert policy.delay(attempt, 3.0) >= 3.0
        assert policy.delay(attempt, 90.0) == 90.0


def test_delay_huge_attempt_does_not_overflow() -> None:
    """A very large attempt number still yields a capped delay."""
    policy = RetryPolicy(cap=5.0, rng=random.Random(3))
    assert 0.0 <= policy.delay(10_000, None) <= 5.0


def test_should_retry_counts_up_to_max_retries() -> None:
    """Exactly max_retries retries are allowed."""
    policy = RetryPolicy(max_retries=3)
    assert [policy.should_retry(n) for n in range(5)] == [True, True, True, False, False]
