"""Client-side rate limiting: our configured limits and the server's stated room.

Two pure cores, both plain arithmetic on values (``now`` in seconds on any monotonic
scale) that answer how long to wait:

- :class:`TokenBucket` holds the configured ``[limits] rpm`` / ``tpm``: ``capacity``
  units refilled continuously at capacity/60 a second.
- :class:`ServerWindow` holds what the server last said in its ``x-ratelimit-*``
  headers: ``remaining`` room until a reset. OpenAI documents that a per-minute limit
  may be enforced in shorter slices; a slice does not refill gradually, so once its
  room is spent nothing more fits before its reset, whatever the per-minute rate
  says. The room is taken net of our calls still in flight (the server may not have
  counted them yet) and of calls sent since.

:class:`Limiter` wires a bucket and a window per pool (requests, tokens) to an
injected clock and sleep, keeps callers in first-come-first-served order, and keeps
the tally of calls in flight. A call is in flight from ``acquire`` until the same
asyncio task reports its response headers, acquires again (the previous attempt
ended without a response) or finishes. :meth:`Limiter.penalize` holds every caller
back after a 429.

Batch-queue limits (enqueued tokens) are a different pool: batch uploads, creates and
polls call ``acquire(requests=1, tokens=0)``; only the synchronous embeddings path
charges tokens.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Waits shorter than this are rounding noise from float arithmetic, not a real wait.
_EPSILON = 1e-9
# How long a caller waiting for news from calls in flight sleeps before looking again
# (a safety net: answers and finished tasks wake it at once).
_RECHECK_S = 1.0

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

    def adopt_limit(self, capacity: float, now: float) -> None:
        """Adopt a server-reported limit lower than ours, keeping the refill period.

        A higher one is ignored: the configured limit is the user's ceiling.
        """
        self._refill(now)
        if 0 < capacity < self.capacity:
            period = self.capacity / self.refill_per_s
            self.capacity = float(capacity)
            self.refill_per_s = self.capacity / period
            self.level = min(self.level, self.capacity)


@dataclass
class ServerWindow:
    """The server's stated room in one pool until its next reset, net of our calls.

    ``remaining`` is None until a header arrives. ``allowance`` is the most room the
    server has ever reported, a lower bound of what one fresh window holds: once a
    window's reset has passed and no header about the next one has arrived yet,
    callers may have that much in flight.
    """

    remaining: float | None = None
    reported: float = 0.0  # the remaining the server last stated for this window
    reset_at: float = 0.0
    span: float = 0.0  # the longest reset interval seen: about one window
    allowance: float = 0.0

    def observe(self, remaining: float, reset_in: float, in_flight: float, now: float) -> None:
        """Take in one response's ``remaining`` and ``reset`` for this pool.

        ``in_flight`` is what our other calls still unanswered asked for: the server
        may not have counted them yet, so they come off its figure.
        """
        reset_at = now + max(0.0, reset_in)
        self.span = max(self.span, reset_in)
        self.allowance = max(self.allowance, remaining)
        if self.remaining is not None:
            # Answers can overtake each other. Within one window the server's
            # remaining only goes down, so a higher one was stated earlier; a reset
            # well before the current one belongs to a window already over.
            tolerance = self.span / 2
            if reset_at < self.reset_at - tolerance:
                return
            if reset_at <= self.reset_at + tolerance:
                if remaining > self.reported:
                    return
                reset_at = max(reset_at, self.reset_at)
        self.remaining = remaining - in_flight
        self.reported = remaining
        self.reset_at = reset_at

    def room(self, in_flight: float, now: float) -> float:
        """What may still be sent now (``math.inf`` when the server has said nothing)."""
        if self.remaining is not None and now < self.reset_at:
            return self.remaining
        if self.allowance > 0:
            return self.allowance - in_flight  # a fresh window, as far as we know
        return math.inf

    def wait_time(self, amount: float, in_flight: float, now: float) -> float:
        """Seconds until ``amount`` fits; ``math.inf`` means "until a call in flight answers".

        A call larger than a whole window waits for an empty one.
        """
        need = min(float(amount), self.allowance) if self.allowance > 0 else float(amount)
        if need <= self.room(in_flight, now) + _EPSILON:
            return 0.0
        if self.remaining is not None and now < self.reset_at:
            return self.reset_at - now
        return math.inf

    def take(self, amount: float, now: float) -> None:
        """Count a call sent now against the current window's room."""
        if self.remaining is not None and now < self.reset_at:
            self.remaining -= float(amount)


@dataclass
class _Flight:
    requests: int
    tokens: int


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
        self.server_requests = ServerWindow()
        self.server_tokens = ServerWindow()
        self._clock = clock
        self._sleep = sleep
        # asyncio.Lock hands itself to waiters in FIFO order and newcomers do not
        # barge past queued waiters, which is exactly the fairness we want.
        self._lock = asyncio.Lock()
        self._flights: dict[asyncio.Task[Any], _Flight] = {}
        self._watched: set[asyncio.Task[Any]] = set()
        self._news = asyncio.Event()

    def in_flight(self) -> tuple[int, int]:
        """(requests, tokens) of calls sent and not yet answered."""
        flights = self._flights.values()
        return sum(f.requests for f in flights), sum(f.tokens for f in flights)

    def wait_time(self, requests: int, tokens: int, now: float) -> float:
        """Seconds until both pools can serve this call (pure, no side effect).

        ``math.inf`` means the server's room is spoken for by calls in flight.
        """
        busy_requests, busy_tokens = self.in_flight()
        wait = 0.0
        if requests:
            wait = max(
                self.requests.wait_time(requests, now),
                self.server_requests.wait_time(requests, busy_requests, now),
            )
        if tokens:
            wait = max(
                wait,
                self.tokens.wait_time(tokens, now),
                self.server_tokens.wait_time(tokens, busy_tokens, now),
            )
        return wait

    async def acquire(self, requests: int = 1, tokens: int = 0) -> None:
        """Wait until ``requests`` and ``tokens`` are available, then take them.

        The call counts as in flight for the calling task until it reports headers,
        acquires again or ends.
        """
        task = asyncio.current_task()
        if task is not None:
            self._settle(task)
        async with self._lock:
            while True:
                now = self._clock()
                wait = self.wait_time(requests, tokens, now)
                if wait <= _EPSILON:
                    break
                await self._pause(_RECHECK_S if math.isinf(wait) else wait)
            self.requests.take(requests, now)
            self.tokens.take(tokens, now)
            self.server_requests.take(requests, now)
            self.server_tokens.take(tokens, now)
            if task is not None and (requests or tokens):
                self._flights[task] = _Flight(requests, tokens)
                if task not in self._watched:
                    self._watched.add(task)
                    task.add_done_callback(self._task_done)

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` or until an answer or a finished call brings news.

        News can only shorten a wait: an answer may show that the server had
        already counted calls we still held against its room.
        """
        self._news.clear()
        news = asyncio.ensure_future(self._news.wait())
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((news, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (news, sleeper):
                waiter.cancel()
            await asyncio.gather(news, sleeper, return_exceptions=True)

    def _settle(self, task: asyncio.Task[Any]) -> None:
        if self._flights.pop(task, None) is not None:
            self._news.set()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._watched.discard(task)
        self._settle(task)

    def penalize(self, seconds: float, now: float | None = None) -> None:
        """After a 429: let no call through for ``seconds``."""
        at = self._clock() if now is None else now
        until = at + max(0.0, seconds)
        self.requests.hold(until)
        self.tokens.hold(until)

    def update_from_headers(self, headers: Mapping[str, str], now: float | None = None) -> None:
        """Take in ``x-ratelimit-limit-*``, ``-remaining-*`` and ``-reset-*``.

        Called by the task whose call these headers answer: that call stops being
        in flight. A lower limit than ours is adopted; the remaining room, less our
        other calls in flight, holds callers until the reset when it is spent.
        """
        at = self._clock() if now is None else now
        task = asyncio.current_task() if _in_loop() else None
        if task is not None:
            self._settle(task)
        busy_requests, busy_tokens = self.in_flight()
        lowered = {k.lower(): v for k, v in headers.items()}
        pools = (
            ("requests", self.requests, self.server_requests, busy_requests),
            ("tokens", self.tokens, self.server_tokens, busy_tokens),
        )
        for name, bucket, window, busy in pools:
            limit = _number(lowered.get(f"x-ratelimit-limit-{name}"))
            if limit is not None:
                bucket.adopt_limit(limit, at)
            remaining = _number(lowered.get(f"x-ratelimit-remaining-{name}"))
            reset_text = lowered.get(f"x-ratelimit-reset-{name}")
            reset = parse_reset(reset_text) if reset_text else None
            if remaining is not None and reset is not None:
                window.observe(remaining, reset, busy, at)
        self._news.set()

    def snapshot(self, now: float | None = None) -> dict[str, float]:
        """Current levels, for ``embedd status``."""
        at = self._clock() if now is None else now
        server_hold = max(
            (w.reset_at - at for w in (self.server_requests, self.server_tokens)
             if w.remaining is not None and w.remaining <= 0),
            default=0.0,
        )  # fmt: skip
        return {
            "rpm": float(self.rpm),
            "tpm": float(self.tpm),
            "requests_available": round(self.requests.available(at), 3),
            "tokens_available": round(self.tokens.available(at), 3),
            "held_for_s": round(
                max(0.0, self.requests.held_until - at, self.tokens.held_until - at, server_hold),
                3,
            ),
        }


def _in_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None
