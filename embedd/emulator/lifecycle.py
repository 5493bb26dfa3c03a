"""The life of an emulated batch, computed from its record and the clock.

No task sleeps for a batch: its status is a pure function of when it was created,
the configured phase durations, its planned outcome (set by the fault script at
creation) and whether a cancel was asked for. The walk, as a table::

    outcome            phases
    complete           validating -> in_progress -> finalizing -> completed
    expire             validating -> in_progress -> expired   (part of the lines done)
    cancel             validating -> in_progress -> cancelling -> cancelled (part done)
    token_limit        validating -> failed        (errors.data: token_limit_exceeded)
    invalid            validating -> failed        (errors.data[].line: the lines refused)

A cancel request moves a batch still validating or in progress to ``cancelling``
and, one finalizing period later, ``cancelled``. :func:`render_batch` turns a record
into the Batch object of OpenAI's API, with ``null`` for every unset field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

COMPLETION_WINDOW_S = 24 * 3600
ACTIVE = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL_WITH_OUTPUT = frozenset({"completed", "expired", "cancelled"})


@dataclass
class BatchRecord:
    """What the emulator keeps about one batch (stored as JSON)."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    model: str | None
    created: float
    lines: int
    tokens: int
    validating_s: float
    in_progress_s: float
    finalizing_s: float
    outcome: str = "complete"
    completed_fraction: float = 1.0
    failed_line_rate: float = 0.0
    failed_line_status: int = 500
    token_limit: int | None = None
    invalid_lines: list[int] | None = None  # 1-based lines refused while validating
    files_gone: bool = False  # the output and error files answer 404
    usage_missing: bool = False  # the batch object carries no `usage`
    input_sha256: str | None = None  # of the input file's content, for the soak's books
    cancel_requested: float | None = None
    seed: int = 0
    output: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchRecord:
        """Rebuild a record stored by :meth:`to_json`."""
        return cls(**data)


@dataclass(frozen=True)
class Phase:
    """Where a batch stands at one moment."""

    status: str
    times: dict[str, float]  # status name -> when it began ("in_progress" -> ...)
    done_fraction: float  # share of lines processed so far


def phase_at(rec: BatchRecord, now: float) -> Phase:
    """Compute the status of ``rec`` at ``now`` from its timestamps alone."""
    t_valid_end = rec.created + rec.validating_s
    t_run_end = t_valid_end + rec.in_progress_s
    times: dict[str, float] = {}
    cancel_at = rec.cancel_requested
    if rec.outcome == "cancel" and cancel_at is None:
        cancel_at = t_valid_end + rec.in_progress_s * rec.completed_fraction
    if rec.outcome in ("token_limit", "invalid"):
        if now < t_valid_end:
            return Phase("validating", times, 0.0)
        return Phase("failed", {"failed": t_valid_end}, 0.0)
    if cancel_at is not None and cancel_at < t_run_end and now >= cancel_at:
        if cancel_at >= t_valid_end:
            times["in_progress"] = t_valid_end
        done = _progress(rec, cancel_at, t_valid_end)
        times["cancelling"] = cancel_at
        if now < cancel_at + rec.finalizing_s:
            return Phase("cancelling", times, done)
        times["cancelled"] = cancel_at + rec.finalizing_s
        return Phase("cancelled", times, done)
    if now < t_valid_end:
        return Phase("validating", times, 0.0)
    times["in_progress"] = t_valid_end
    if now < t_run_end:
        return Phase("in_progress", times, _progress(rec, now, t_valid_end))
    if rec.outcome == "expire":
        times["expired"] = t_run_end
        return Phase("expired", times, rec.completed_fraction)
    times["finalizing"] = t_run_end
    if now < t_run_end + rec.finalizing_s:
        return Phase("finalizing", times, 1.0)
    times["completed"] = t_run_end + rec.finalizing_s
    return Phase("completed", times, 1.0)


def _progress(rec: BatchRecord, now: float, started: float) -> float:
    if now <= started:
        return 0.0
    if rec.in_progress_s <= 0:
        return 1.0
    share = min(1.0, (now - started) / rec.in_progress_s)
    if rec.outcome in ("expire", "cancel"):
        share = min(share, rec.completed_fraction)
    return share


def lines_done(rec: BatchRecord, fraction: float) -> int:
    """How many lines a batch that got ``fraction`` of the way has answered."""
    return min(rec.lines, math.floor(rec.lines * fraction + 1e-9))


def token_limit_message(model: str | None, limit: int) -> str:
    """OpenAI's wording for a batch refused by the enqueued-token limit."""
    return (
        f"Enqueued token limit reached for {model or 'text-embedding-3-large'} in "
        f"organization org-emulator. Limit: {limit} enqueued tokens. Please try again "
        "once some in_progress batches have been completed."
    )


def _stamp(times: dict[str, float], name: str) -> int | None:
    value = times.get(name)
    return None if value is None else int(value)


def render_batch(rec: BatchRecord, now: float) -> dict[str, Any]:
    """The OpenAI ``Batch`` object for ``rec`` as seen at ``now``."""
    phase = phase_at(rec, now)
    out = rec.output if phase.status in TERMINAL_WITH_OUTPUT else None
    if out is not None:
        counts = {"total": rec.lines, "completed": out["completed"], "failed": out["failed"]}
        input_tokens = int(out["tokens"])
    elif phase.status == "validating" or phase.status == "failed":
        counts = {"total": 0, "completed": 0, "failed": 0}
        input_tokens = 0
    else:
        done = lines_done(rec, phase.done_fraction)
        counts = {"total": rec.lines, "completed": done, "failed": 0}
        input_tokens = 0
    errors = None
    if phase.status == "failed" and rec.outcome == "invalid":
        errors = {
            "object": "list",
            "data": [
                {
                    "code": "invalid_value",
                    "message": "Invalid value for 'input': the input is not valid.",
                    "param": "body.input",
                    "line": line,
                }
                for line in rec.invalid_lines or []
            ],
        }
    elif phase.status == "failed":
        errors = {
            "object": "list",
            "data": [
                {
                    "code": "token_limit_exceeded",
                    "message": token_limit_message(rec.model, rec.token_limit or 0),
                    "param": None,
                    "line": None,
                }
            ],
        }
    return {
        "id": rec.id,
        "object": "batch",
        "endpoint": rec.endpoint,
        "model": rec.model,
        "errors": errors,
        "input_file_id": rec.input_file_id,
        "completion_window": rec.completion_window,
        "status": phase.status,
        "output_file_id": out["output_file_id"] if out else None,
        "error_file_id": out["error_file_id"] if out else None,
        "created_at": int(rec.created),
        "in_progress_at": _stamp(phase.times, "in_progress"),
        "expires_at": int(rec.created) + COMPLETION_WINDOW_S,
        "finalizing_at": _stamp(phase.times, "finalizing"),
        "completed_at": _stamp(phase.times, "completed"),
        "failed_at": _stamp(phase.times, "failed"),
        "expired_at": _stamp(phase.times, "expired"),
        "cancelling_at": _stamp(phase.times, "cancelling"),
        "cancelled_at": _stamp(phase.times, "cancelled"),
        "request_counts": counts,
        "usage": None
        if rec.usage_missing
        else {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens,
        },
        "metadata": rec.metadata,
    }
