"""Prometheus metrics (SPEC §10): the event-driven families, in one registry.

Counters and histograms move when something happens, so the stage that sees the
event updates them here. Gauges whose truth is in the state database (queue depth,
batches in flight, state bytes, …) are not kept here: they are read from the
database at scrape time.

Every family lives in `REGISTRY`, not in prometheus-client's global default one, so
that one process can hold several daemons (the tests do) without name clashes and
`/metrics` shows only embedd's own families.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

FILES = Counter(
    "embedd_files",
    "Input files finished, by lane and outcome (done or failed).",
    ["lane", "outcome"],
    registry=REGISTRY,
)
RECORDS = Counter(
    "embedd_records",
    "Records finished, by lane and outcome (embedded, cached or failed).",
    ["lane", "outcome"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "embedd_tokens",
    "Tokens billed by the API, by lane.",
    ["lane"],
    registry=REGISTRY,
)
COST = Counter(
    "embedd_cost_usd",
    "Money spent, in USD, by lane.",
    ["lane"],
    registry=REGISTRY,
)
SAVED = Counter(
    "embedd_saved_usd",
    "Money saved, in USD: the batch discount against the synchronous price, plus "
    "deduplicated tokens not billed at all.",
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "embedd_api_requests",
    "HTTP calls to the API, by operation and status code (or 'error' with no answer).",
    ["op", "code"],
    registry=REGISTRY,
)
API_DURATION = Histogram(
    "embedd_api_request_duration_seconds",
    "Time of one HTTP call to the API, by operation.",
    ["op"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    "embedd_breaker_open",
    "1 while the circuit breaker is open (no call leaves the process), else 0.",
    registry=REGISTRY,
)
SUBMISSION_PAUSED = Gauge(
    "embedd_submission_paused",
    "1 while batch submission is paused, by reason (auth, quota, budget).",
    ["reason"],
    registry=REGISTRY,
)
TURNAROUND = Histogram(
    "embedd_batch_turnaround_seconds",
    "Time from a batch's submission to its collection.",
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800),
    registry=REGISTRY,
)
UNIT_FAILURES = Counter(
    "embedd_unit_failures",
    "Unexpected failures of one unit of work (retried or final), by stage.",
    ["stage"],
    registry=REGISTRY,
)
STAGE_BLOCKED = Gauge(
    "embedd_stage_blocked",
    "1 while a stage is held (disk full, I/O error), by stage and reason.",
    ["stage", "reason"],
    registry=REGISTRY,
)


PAUSE_REASONS = ("auth", "quota", "budget")
_QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached")


def pause_kind(message: str) -> str:
    """The `submission_paused` label of an API pause: "quota" for a spent quota or
    billing limit, else "auth" (a refused key, organisation or project)."""
    return "quota" if any(code in message for code in _QUOTA_CODES) else "auth"


def api_call(op: str, status: int | None, seconds: float) -> None:
    """One HTTP attempt to the API: its status ("error" with no answer) and duration."""
    API_REQUESTS.labels(op=op, code=str(status) if status is not None else "error").inc()
    API_DURATION.labels(op=op).observe(max(0.0, seconds))


def file_finished(lane: str, outcome: str, records: dict[str, int]) -> None:
    """An input file reached `done` or `failed`; `records` counts its records by outcome."""
    FILES.labels(lane=lane, outcome=outcome).inc()
    for record_outcome, count in records.items():
        if count:
            RECORDS.labels(lane=lane, outcome=record_outcome).inc(count)


def usage(lane: str, tokens: int, cost_usd: float, saved_usd: float) -> None:
    """A usage line reached the ledger: billed tokens, money spent and saved."""
    TOKENS.labels(lane=lane).inc(max(tokens, 0))
    COST.labels(lane=lane).inc(max(cost_usd, 0.0))
    SAVED.inc(max(saved_usd, 0.0))
