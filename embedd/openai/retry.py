"""What to do after an API call failed, and how long to wait before the next try.

Pure functions only. :func:`classify` turns an HTTP outcome into a :class:`Decision`
by looking it up in the tables below; :class:`RetryPolicy` computes the backoff
(exponential, full jitter, capped, never shorter than what the server asked for).

Precedence, most specific first:

1. a status or error ``code`` that means "stop submitting" (401, 403,
   ``insufficient_quota``) → PAUSE, whatever the headers say;
2. ``x-should-retry: true|false`` from the server → RETRY / PERMANENT;
3. the error code table, then the status table (408/409/429/5xx RETRY, other
   4xx and 3xx PERMANENT);
4. no status at all: the transport failure kind (connection, timeout, ...) → RETRY;
5. a 2xx whose body could not be read (truncated, HTML) → RETRY.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from embedd.openai.limiter import parse_reset


class Decision(enum.Enum):
    """What the caller does next."""

    OK = "ok"
    RETRY = "retry"  # same request again after a backoff
    PERMANENT = "permanent"  # the request itself is wrong; repeating cannot help
    PAUSE = "pause"  # key, organisation or quota problem: stop submitting, keep the work


class ExcKind(enum.StrEnum):
    """Transport-level failures that produced no usable HTTP answer."""

    CONNECTION = "connection"  # refused, reset, dropped before the response
    TIMEOUT = "timeout"
    TRUNCATED = "truncated"  # body shorter than Content-Length, or cut mid-stream
    HTML = "html"  # an HTML error page from a proxy or load balancer
    BAD_BODY = "bad_body"  # a body that is not the JSON the API promises


# Status codes with a fixed meaning. Anything else: 5xx RETRY, 4xx PERMANENT.
STATUS_TABLE: Mapping[int, Decision] = {
    400: Decision.PERMANENT,
    401: Decision.PAUSE,
    403: Decision.PAUSE,
    404: Decision.PERMANENT,
    408: Decision.RETRY,
    409: Decision.RETRY,
    413: Decision.PERMANENT,
    415: Decision.PERMANENT,
    422: Decision.PERMANENT,
    429: Decision.RETRY,
}

# Error codes (from OpenAI's ``{"error": {"code": ...}}``) that override the status.
CODE_TABLE: Mapping[str, Decision] = {
    "insufficient_quota": Decision.PAUSE,
    "billing_hard_limit_reached": Decision.PAUSE,
    "account_deactivated": Decision.PAUSE,
    "invalid_api_key": Decision.PAUSE,
    "rate_limit_exceeded": Decision.RETRY,
}

EXC_TABLE: Mapping[str, Decision] = {kind.value: Decision.RETRY for kind in ExcKind}


def classify(
    status: int | None,
    error_code: str | None,
    headers: Mapping[str, str],
    exc_kind: str | None,
) -> Decision:
    """Decide what follows an API call outcome (see the module docstring for order)."""
    if status is None:
        if exc_kind is None:
            raise ValueError("classify needs a status or an exception kind")
        return EXC_TABLE.get(exc_kind, Decision.RETRY)
    if 200 <= status < 300:
        # A success status with an unreadable body is a transport failure in disguise.
        return Decision.RETRY if exc_kind else Decision.OK
    by_code = CODE_TABLE.get(error_code or "")
    by_status = STATUS_TABLE.get(status)
    if by_status is None:
        # The API never redirects: a 3xx means a proxy or a wrong base URL.
        by_status = Decision.RETRY if status >= 500 else Decision.PERMANENT
    if Decision.PAUSE in (by_code, by_status):
        return Decision.PAUSE  # sticky: no header turns a refused key into a retry
    should = (_header(headers, "x-should-retry") or "").strip().lower()
    if should in ("true", "false"):
        return Decision.RETRY if should == "true" else Decision.PERMANENT
    return by_code if by_code is not None else by_status


def retry_after(
    headers: Mapping[str, str], status: int | None = None, wall_now: float | None = None
) -> float | None:
    """Seconds the server asked us to wait, or None if it did not say.

    ``retry-after-ms`` wins over ``retry-after`` (seconds, or an HTTP date when
    ``wall_now``, the current Unix time, is given). For a 429 without either, the
    ``x-ratelimit-reset-*`` time of the exhausted pool is used (of both, if neither
    or both are exhausted: the longer).
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    seconds = _header(headers, "retry-after")
    if seconds is not None:
        try:
            return max(0.0, float(seconds))
        except ValueError:
            if wall_now is not None:
                try:
                    return max(0.0, parsedate_to_datetime(seconds).timestamp() - wall_now)
                except (TypeError, ValueError):
                    pass
    if status != 429:
        return None
    resets: list[float] = []
    exhausted: list[float] = []
    for pool in ("requests", "tokens"):
        text = _header(headers, f"x-ratelimit-reset-{pool}")
        value = parse_reset(text) if text else None
        if value is None:
            continue
        resets.append(value)
        if (_header(headers, f"x-ratelimit-remaining-{pool}") or "").strip() == "0":
            exhausted.append(value)
    chosen = exhausted or resets
    return max(chosen) if chosen else None


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, capped, honouring the server's wait.

    ``delay(attempt)`` for attempt 0, 1, 2, ... draws uniformly from
    ``[0, min(cap, base * 2**attempt)]``. A server's Retry-After is a floor: we
    never come back sooner than asked, even when that is longer than ``cap``.
    """

    base: float = 1.0
    cap: float = 60.0
    max_retries: int = 5
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.cap, self.base * (2.0 ** min(attempt, 62)))
        jittered = self.rng.uniform(0.0, ceiling)
        if retry_after is not None and retry_after > jittered:
            return retry_after
        return jittered

    def should_retry(self, attempt: int) -> bool:
        """True while ``attempt`` (retries already made) is below ``max_retries``."""
        return attempt < self.max_retries


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, val in headers.items():
        if key.lower() == name:
            return val
    return None
