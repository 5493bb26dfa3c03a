"""The collector's outcome policy (embedd.pipeline.outcome, SPEC §4) as a table: the batch's
status and errors in, the verdict on its unanswered requests out."""

from __future__ import annotations

from typing import Any

import pytest

from embedd.pipeline.outcome import (
    MISSING,
    RequestVerdict,
    batch_errors,
    judge_missing,
    needs_line_ids,
)

LIMIT_MESSAGE = (
    "Enqueued token limit reached for text-embedding-3-small in organization org-x. "
    "Limit: 3,000,000 enqueued tokens. Please try again once some in_progress batches "
    "have been completed."
)
K = ["k1", "k2", "k3"]

CASES: list[tuple[str, str, list[dict[str, Any]], dict[int, str], RequestVerdict]] = [
    ("completed: missing lines retried", "completed", [], {}, RequestVerdict(retry=tuple((k, MISSING) for k in K))),
    ("expired: missing lines requeued at no cost", "expired", [], {}, RequestVerdict(requeue=tuple(K))),
    ("cancelled: missing lines requeued at no cost", "cancelled", [], {}, RequestVerdict(requeue=tuple(K))),
    (
        "failed for the queue limit: requeued, back off, the limit learned",
        "failed",
        [{"code": "token_limit_exceeded", "message": LIMIT_MESSAGE}],
        {},
        RequestVerdict(requeue=tuple(K), queue_full=True, learned_limit=3_000_000),
    ),
    (
        "failed for the queue limit, no number in the message: back off only",
        "failed",
        [{"code": "token_limit_exceeded", "message": "too many tokens enqueued"}],
        {},
        RequestVerdict(requeue=tuple(K), queue_full=True, learned_limit=None),
    ),
    (
        "failed naming lines: those fail for good, the rest requeued",
        "failed",
        [{"code": "invalid_request", "message": "bad input", "line": 2}],
        {1: "k1", 2: "k2", 3: "k3"},
        RequestVerdict(fail=(("k2", "invalid_request: bad input"),), requeue=("k1", "k3")),
    ),
    (
        "failed naming a line beyond the file: nothing fails",
        "failed",
        [{"code": "invalid_request", "message": "bad", "line": 9}],
        {1: "k1", 2: "k2", 3: "k3"},
        RequestVerdict(requeue=tuple(K)),
    ),
    (
        "failed otherwise: retried with the batch's reasons (counted)",
        "failed",
        [{"code": "a", "message": "one"}, {"code": "b", "message": "two"}],
        {},
        RequestVerdict(retry=tuple((k, "a: one; b: two") for k in K)),
    ),
    ("failed without errors: retried", "failed", [], {}, RequestVerdict(retry=tuple((k, "batch failed") for k in K))),
    ("a given-up shard (no status): left alone", "None", [], {}, RequestVerdict()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "errors", "ids", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_verdict_on_missing_requests(
    status: str, errors: list[dict[str, Any]], ids: dict[int, str], want: RequestVerdict
) -> None:
    assert judge_missing(status, K, errors, ids) == want


def test_line_ids_are_needed_only_when_a_failed_batch_names_lines() -> None:
    named = [{"code": "x", "message": "y", "line": 1}]
    assert needs_line_ids("failed", named)
    assert not needs_line_ids("completed", named)
    assert not needs_line_ids("failed", [{"code": "x", "message": "y"}])
    # The queue limit wins: everything is requeued, no line is looked up.
    assert not needs_line_ids("failed", [*named, {"code": "token_limit_exceeded"}])


def test_a_batch_without_errors_has_an_empty_error_list() -> None:
    assert batch_errors({"errors": None}) == []
    assert batch_errors({}) == []
    assert batch_errors({"errors": {"data": [{"code": "x"}]}}) == [{"code": "x"}]


def test_verdicts_add_up_and_name_what_was_not_billed() -> None:
    lines = RequestVerdict(retry=(("a", "500"),), fail=(("b", "400"),))
    missing = RequestVerdict(requeue=("c",), queue_full=True, learned_limit=10)
    both = lines + missing
    assert both == RequestVerdict(
        retry=(("a", "500"),),
        fail=(("b", "400"),),
        requeue=("c",),
        queue_full=True,
        learned_limit=10,
    )
    assert both.unbilled() == {"a", "b", "c"}
