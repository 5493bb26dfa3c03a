"""Client-side rate limiting: token buckets for requests and tokens per minute.

The core, :class:`TokenBucket`, is plain arithmetic: every method takes ``now`` (seconds
on any monotonic scale) and answers how long to wait. :class:`Limiter` wires two
buckets (requests, tokens) to an injected clock and sleep, and keeps callers in
first-come-first-served order.

OpenAI reports its view of the limits in ``x-ratelimit-*`` response headers;
:meth:`Limiter.update_from_headers` lowers our buckets to match it (never raises them
above the configured limits), and :meth:`Limiter.penalize` holds every caller back
after a 429.

Batch-queue limits (enqueued tokens) are a different pool: batch uploads, creates and
polls call ``acquire(requests=1, tokens=0)``; only the synchronous embeddings path
charges tokens.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

# Waits shorter than this are rounding noise from float arithmetic, not a real wait.
_EPSILON = 1e-9

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_reset(value: str) -> float | None:
    """Parse an ``x-ratelimit-reset-*`` value ("6ms", "1s", "1m0s", "2.5s") into seconds.

    A bare number is taken as seconds. Returns None for anything unparseable.
    """
    text = value.strip().lower()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        return None
    return total


class TokenBucket:
    """A token bucket: ``capacity`` tokens, refilled continuously at ``refill_per_s``.

    The level may go negative: a request larger than the whole bucket is let through
    once the bucket is full and leaves a debt that later callers wait out. That keeps
    an oversize request from deadlocking while still honouring the average rate.
    """

    def __init__(self, capacity: float, refill_per_s: float, now: float = 0.0) -> None:
        if capacity <= 0 or refill_per_s <= 0:
            raise ValueError("capacity and refill_per_s must be positive")
        self.capacity = float(capacity)
        self.refill_per_s = float(refill_per_s)
        self.level = float(capacity)
        self.updated = now
        self.held_until = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.refill_per_s)
            self.updated = now

    def available(self, now: float) -> float:
        """The level at ``now`` (may be negative while a debt is being paid off)."""
        self._refill(now)
        return self.level

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0 if it can be taken now)."""
        self._refill(now)
        need = min(float(amount), self.capacity)  # oversize: wait for a full bucket
        hold = max(0.0, self.held_until - now)
        short = need - self.level
        refill_wait = short / self.refill_per_s if short > _EPSILON else 0.0
        return max(hold, refill_wait)

    def take(self, amount: float, now: float) -> None:
        """Take ``amount`` unconditionally (call after ``wait_time`` returned 0)."""
        self._refill(now)
        self.level -= float(amount)

    def try_take(self, amount: float, now: float) -> float:
        """Take ``amount`` if possible and return 0, else return the seconds to wait."""
        wait = self.wait_time(amount, now)
        if wait <= _EPSILON:
            self.take(amount, now)
            return 0.0
        return wait

    def hold(self, until: float) -> None:
        """Let nothing through before ``until`` (a server-imposed pause)."""
        self.held_until = max(self.held_until, until)

    def recalibrate(self, capacity: float, remaining: float, now: float) -> None:
        """Adopt a server-reported limit and remaining count, keeping the refill period.

        The level only goes down: our own count already includes requests the
        server has not seen yet, so a higher "remaining" is stale, not extra room.
        """
        self._refill(now)
        if capacity > 0 and capacity < self.capacity:
            period = self.capacity / self.refill_per_s
            self.capacity = float(capacity)
            self.refill_per_s = self.capacity / period
        self.level = min(self.level, float(remaining), self.capacity)


class Limiter:
    """Requests-per-minute and tokens-per-minute limits, shared by every API call.

    ``acquire`` callers are served strictly in arrival order: a large request at the
    head of the queue is not starved by a stream of small ones behind it.
    """

    def __init__(
        self,
        rpm: int,
        tpm: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        now = clock()
        self.rpm = rpm
        self.tpm = tpm
        self.requests = TokenBucket(rpm, rpm / 60.0, now)
        self.tokens = TokenBucket(tpm, tpm / 60.0, now)
        self._clock = clock
        self._sleep = sleep
        # asyncio.Lock hands itself to waiters in FIFO order and newcomers do not
        # barge past queued waiters, which is exactly the fairness we want.
        self._lock = asyncio.Lock()

    def wait_time(self, requests: int, tokens: int, now: float) -> float:
        """Seconds until both buckets can serve this call (pure, no side effect)."""
        wait = self.requests.wait_time(requests, now) if requests else 0.0
        if tokens:
            wait = max(wait, self.tokens.wait_time(tokens, now))
        return wait

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None:
        """Wait until ``requests`` and ``tokens`` are available, then take them."""
        async with self._lock:
            while True:
                now = self._clock()
                wait = self.wait_time(requests, tokens, now)
                if wait <= _EPSILON:
                    self.requests.take(requests, now)
                    self.tokens.take(tokens, now)
                    return
                await self._sleep(wait)

    def penalize(self, seconds: float, now: float | None = None) -> None:
        """After a 429: let no call through for ``seconds``."""
        at = self._clock() if now is None else now
        until = at + max(0.0, seconds)
        self.requests.hold(until)
        self.tokens.hold(until)

    def update_from_headers(self, headers: Mapping[str, str], now: float | None = None) -> None:
        """Recalibrate from ``x-ratelimit-limit-*``, ``-remaining-*`` and ``-reset-*``.

        When the server says a pool is exhausted, nothing from that pool is let
        through until its reset time has passed.
        """
        at = self._clock() if now is None else now
        lowered = {k.lower(): v for k, v in headers.items()}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            limit = _number(lowered.get(f"x-ratelimit-limit-{name}"))
            remaining = _number(lowered.get(f"x-ratelimit-remaining-{name}"))
            if limit is None or remaining is None:
                continue
            bucket.recalibrate(limit, remaining, at)
            reset_text = lowered.get(f"x-ratelimit-reset-{name}")
            reset = parse_reset(reset_text) if reset_text else None
            if remaining <= 0 and reset:
                bucket.hold(at + reset)

    def snapshot(self, now: float | None = None) -> dict[str, float]:
        """Current levels, for ``embedd status``."""
        at = self._clock() if now is None else now
        return {
            "rpm": float(self.rpm),
            "tpm": float(self.tpm),
            "requests_available": round(self.requests.available(at), 3),
            "tokens_available": round(self.tokens.available(at), 3),
            "held_for_s": round(
                max(0.0, self.requests.held_until - at, self.tokens.held_until - at), 3
            ),
        }


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None
