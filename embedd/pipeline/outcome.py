"""What happens to each request of an ended batch: the collector's outcome policy.

A pure function of what the batch says (SPEC §4); the collector applies its verdict
in one transaction (`Store.apply_results`). The rules:

    output line        a vector → done (stored as it is read, not in the verdict)
    error-file line    batch_expired / batch_cancelled → requeue (never ran: no try used);
                       retryable (429, 5xx) → retry; anything else → fail (its reason)
    missing line, by the batch's status:
        completed          → retry (counted against max_retries)
        expired, cancelled → requeue (at no cost to retries)
        failed             token_limit_exceeded → requeue all, back off, learn the limit;
                           errors naming lines → those fail for good, the rest requeue;
                           otherwise → retry (counted), so a poison shard cannot loop
        anything else      → left as they are (a given-up shard failed them already)

`retry`: back to pending, the try counted (failed once past `[retry] max_retries`);
`fail`: failed for good; `requeue`: back to pending, no try counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from embedd.pipeline.planner import learn_queue_limit

MISSING = "missing from the batch's output and error files"


@dataclass(frozen=True)
class RequestVerdict:
    """What happens to the requests of one ended batch or sync call (not the done ones:
    their vectors are stored with them)."""

    retry: tuple[tuple[str, str], ...] = ()  # (key, reason)
    fail: tuple[tuple[str, str], ...] = ()  # (key, reason)
    requeue: tuple[str, ...] = ()
    # The batch failed for the organisation's enqueued-token limit: back off new
    # batches; `learned_limit` is the limit its message names, if it names one.
    queue_full: bool = False
    learned_limit: int | None = None

    def __add__(self, other: RequestVerdict) -> RequestVerdict:
        return RequestVerdict(
            self.retry + other.retry,
            self.fail + other.fail,
            self.requeue + other.requeue,
            self.queue_full or other.queue_full,
            self.learned_limit if self.learned_limit is not None else other.learned_limit,
        )

    def unbilled(self) -> set[str]:
        """The keys OpenAI did not embed: neither billed nor counted as done."""
        return {k for k, _ in self.retry} | {k for k, _ in self.fail} | set(self.requeue)


def batch_errors(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `errors.data` list of a batch object (empty when it has none)."""
    return list(((batch.get("errors") or {}).get("data")) or [])


def _queue_full(errors: Sequence[Mapping[str, Any]]) -> bool:
    return any(e.get("code") == "token_limit_exceeded" for e in errors)


def _by_line(errors: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    return {int(e["line"]): e for e in errors if isinstance(e.get("line"), int)}


def needs_line_ids(status: str, errors: Sequence[Mapping[str, Any]]) -> bool:
    """True when judging the batch needs the custom_id of each line of its input file."""
    return status == "failed" and not _queue_full(errors) and bool(_by_line(errors))


def judge_missing(
    status: str,
    missing: Sequence[str],
    errors: Sequence[Mapping[str, Any]] = (),
    ids_by_line: Mapping[int, str] | None = None,
) -> RequestVerdict:
    """The verdict on the requests of a batch with `status` that have no line in its
    output or error file. `errors`: the batch's `errors.data`; `ids_by_line`: the
    custom_id of each (1-based) line of its input file, needed only when
    `needs_line_ids` says so."""
    if status == "completed":
        return RequestVerdict(retry=tuple((k, MISSING) for k in missing))
    if status in ("expired", "cancelled"):
        return RequestVerdict(requeue=tuple(missing))
    if status != "failed":
        return RequestVerdict()
    if _queue_full(errors):
        message = " ".join(str(e.get("message", "")) for e in errors)
        return RequestVerdict(
            requeue=tuple(missing), queue_full=True, learned_limit=learn_queue_limit(message)
        )
    by_line = _by_line(errors)
    if by_line:
        ids = ids_by_line or {}
        bad = {ids[n]: e for n, e in by_line.items() if n in ids}
        return RequestVerdict(
            fail=tuple(
                (k, f"{bad[k].get('code')}: {bad[k].get('message')}") for k in missing if k in bad
            ),
            requeue=tuple(k for k in missing if k not in bad),
        )
    reason = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or "batch failed"
    return RequestVerdict(retry=tuple((k, reason) for k in missing))
