"""Fault injection and rate-limit windows for the emulator (pure decisions, no I/O).

Fault script format (JSON; given as ``EmulatorConfig.faults`` or posted to
``POST /_emulator/faults``, which replaces the current script)::

    {
      "requests": [
        {"endpoint": "POST /v1/batches", "kind": "server_error", "status": 500, "count": 2},
        {"endpoint": "POST /v1/embeddings", "kind": "rate_limit", "rate": 0.1,
         "retry_after": 1.5},
        {"endpoint": "GET /v1/files/{id}/content", "kind": "truncate", "count": 1},
        {"endpoint": "*", "kind": "drop", "count": 1, "skip": 3}
      ],
      "batches": [
        {"outcome": "expire", "completed_fraction": 0.5, "count": 1},
        {"outcome": "cancel", "completed_fraction": 0.3, "match_metadata": {"shard": "7"}},
        {"outcome": "complete", "failed_line_rate": 0.2, "failed_line_status": 400}
      ]
    }

``requests`` rules are tried in order for every request under ``/v1``; ``endpoint``
is ``"METHOD /v1/route"`` with ``{id}`` for path ids, or ``"*"``. A rule first lets
``skip`` matching calls pass, then fires on the next ``count`` calls; with ``rate``
(0..1) instead it fires at random with that probability, from a generator seeded by
the emulator's ``seed`` and the rule's position; with neither it fires always. Kinds:

- ``rate_limit``: 429 ``rate_limit_exceeded`` with ``Retry-After: retry_after``
- ``insufficient_quota``: 429 ``insufficient_quota``
- ``server_error``: ``status`` (500, 502 or 503) with an HTML body
- ``drop``: the connection is closed without an answer
- ``truncate``: the answer declares its full Content-Length but stops half way
- ``lost_response``: the request is carried out, then the connection is closed
- ``slow``: the request is carried out, and the answer sent ``seconds`` later

``batches`` rules are tried in order when a batch is created; the first that
matches (all of ``match_metadata`` present in the batch's metadata, ``count`` not
used up) sets the batch's fate: ``outcome`` ``complete`` | ``expire`` | ``cancel``
(the last two after ``completed_fraction`` of the lines), with ``failed_line_rate``
of the answered lines failing with ``failed_line_status`` (400 or 500);
``invalid``: the batch fails while ``validating``, ``errors.data[].line`` naming the
lines refused (1-based; ``invalid_line_rate`` of them, at least one), as OpenAI
reports bad input, nothing billed. ``files_gone: true``: the batch ends as its outcome
says, but its output and error files answer 404. ``usage_missing: true``: the batch
object has ``usage: null`` (its lines still report theirs).

Top-level ``list_lag_s``: a new batch appears in ``GET /v1/batches`` only this many
seconds after its creation (``GET /v1/batches/{id}`` finds it at once), as the real
list lags behind creates.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

REQUEST_KINDS = frozenset(
    {
        "rate_limit",
        "insufficient_quota",
        "server_error",
        "drop",
        "truncate",
        "lost_response",
        "slow",
    }
)
BATCH_OUTCOMES = frozenset({"complete", "expire", "cancel", "invalid"})


class FaultScriptError(ValueError):
    """The fault script is not valid."""


@dataclass
class RequestRule:
    """One request-level fault rule."""

    endpoint: str
    kind: str
    count: int | None = None
    rate: float | None = None
    skip: int = 0
    status: int = 500
    retry_after: float = 1.0
    seconds: float = 0.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def fires(self, endpoint: str) -> bool:
        """Decide (and count) whether this rule hits a call to ``endpoint``."""
        if self.endpoint not in ("*", endpoint):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.count is not None:
            if self.count <= 0:
                return False
            self.count -= 1
            return True
        if self.rate is not None:
            return self.rng.random() < self.rate
        return True


@dataclass
class BatchRule:
    """One batch-level fault rule."""

    outcome: str = "complete"
    completed_fraction: float = 0.5
    failed_line_rate: float = 0.0
    failed_line_status: int = 500
    count: int | None = None
    match_metadata: dict[str, str] = field(default_factory=dict)
    invalid_line_rate: float = 0.0
    files_gone: bool = False
    usage_missing: bool = False

    def fires(self, metadata: Mapping[str, str] | None) -> bool:
        """Decide (and count) whether this rule applies to a new batch."""
        meta = metadata or {}
        if any(meta.get(k) != v for k, v in self.match_metadata.items()):
            return False
        if self.count is not None:
            if self.count <= 0:
                return False
            self.count -= 1
        return True


def _number(rule: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = rule.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise FaultScriptError(f"{key} must be a number from {lo} to {hi}, not {value!r}")
    return float(value)


def _optional_int(rule: Mapping[str, Any], key: str) -> int | None:
    value = rule.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FaultScriptError(f"{key} must be a non-negative integer, not {value!r}")
    return value


class FaultPlan:
    """The parsed fault script, with its counters and seeded generators."""

    def __init__(self, script: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        script = script or {}
        if not isinstance(script, Mapping):
            raise FaultScriptError("the fault script must be a JSON object")
        unknown = set(script) - {"requests", "batches", "list_lag_s"}
        if unknown:
            raise FaultScriptError(f"unknown fault script key {sorted(unknown)[0]!r}")
        self.requests = [
            self._request_rule(i, r, seed) for i, r in enumerate(_list(script, "requests"))
        ]
        self.batches = [self._batch_rule(r) for r in _list(script, "batches")]
        self.list_lag_s = _number(script, "list_lag_s", 0.0, 0, 86400)

    @staticmethod
    def _request_rule(position: int, rule: Any, seed: int) -> RequestRule:
        if not isinstance(rule, Mapping):
            raise FaultScriptError("each request rule must be an object")
        kind = rule.get("kind")
        if kind not in REQUEST_KINDS:
            raise FaultScriptError(f"unknown fault kind {kind!r}")
        endpoint = rule.get("endpoint", "*")
        if not isinstance(endpoint, str):
            raise FaultScriptError("endpoint must be a string")
        status = int(_number(rule, "status", 500, 400, 599))
        rate = rule.get("rate")
        return RequestRule(
            endpoint=endpoint,
            kind=kind,
            count=_optional_int(rule, "count"),
            rate=None if rate is None else _number(rule, "rate", 0, 0, 1),
            skip=_optional_int(rule, "skip") or 0,
            status=status,
            retry_after=_number(rule, "retry_after", 1.0, 0, 86400),
            seconds=_number(rule, "seconds", 0.0, 0, 3600),
            rng=random.Random(f"{seed}:{position}"),
        )

    @staticmethod
    def _batch_rule(rule: Any) -> BatchRule:
        if not isinstance(rule, Mapping):
            raise FaultScriptError("each batch rule must be an object")
        outcome = rule.get("outcome", "complete")
        if outcome not in BATCH_OUTCOMES:
            raise FaultScriptError(f"unknown batch outcome {outcome!r}")
        match = rule.get("match_metadata", {})
        if not isinstance(match, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in match.items()
        ):
            raise FaultScriptError("match_metadata must map strings to strings")
        status = int(_number(rule, "failed_line_status", 500, 400, 599))
        gone = rule.get("files_gone", False)
        no_usage = rule.get("usage_missing", False)
        if not isinstance(gone, bool) or not isinstance(no_usage, bool):
            raise FaultScriptError("files_gone and usage_missing must be true or false")
        return BatchRule(
            usage_missing=no_usage,
            invalid_line_rate=_number(rule, "invalid_line_rate", 0.0, 0, 1),
            files_gone=gone,
            outcome=outcome,
            completed_fraction=_number(rule, "completed_fraction", 0.5, 0, 1),
            failed_line_rate=_number(rule, "failed_line_rate", 0.0, 0, 1),
            failed_line_status=status,
            count=_optional_int(rule, "count"),
            match_metadata=dict(match),
        )

    def on_request(self, endpoint: str) -> RequestRule | None:
        """The rule that fires for this call, if any (rules after it are not consulted)."""
        for rule in self.requests:
            if rule.fires(endpoint):
                return rule
        return None

    def on_batch(self, metadata: Mapping[str, str] | None) -> BatchRule | None:
        """The rule that decides a new batch's fate, if any."""
        for rule in self.batches:
            if rule.fires(metadata):
                return rule
        return None


def _list(script: Mapping[str, Any], key: str) -> list[Any]:
    value = script.get(key, [])
    if not isinstance(value, list):
        raise FaultScriptError(f"{key} must be a list")
    return value


@dataclass
class RateWindow:
    """A fixed one-minute window of requests or tokens, as OpenAI's headers describe it."""

    limit: int
    enforced: bool = True
    window_s: float = 60.0
    start: float | None = None
    used: int = 0

    def _roll(self, now: float) -> None:
        if self.start is None or now >= self.start + self.window_s:
            self.start = now
            self.used = 0

    def take(self, now: float, amount: int) -> bool:
        """Use ``amount`` from the window if it fits (or is not enforced)."""
        self._roll(now)
        if self.enforced and self.used + amount > self.limit:
            return False
        self.used += amount
        return True

    def remaining(self, now: float) -> int:
        """What is left in the current window."""
        self._roll(now)
        return max(0, self.limit - self.used)

    def reset_in(self, now: float) -> float:
        """Seconds until the window starts afresh."""
        self._roll(now)
        assert self.start is not None  # set by _roll
        return max(0.0, self.start + self.window_s - now)


def format_duration(seconds: float) -> str:
    """Format like OpenAI's reset headers: ``"6ms"``, ``"1s"``, ``"1.5s"``, ``"1m0s"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds - minutes * 60)}s"
