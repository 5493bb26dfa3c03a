"""The emulator's pure parts: vectors, batch walk, fault plans, rate windows, file checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedd.emulator import embed_text
from embedd.emulator.errors import ApiError
from embedd.emulator.faults import FaultPlan, FaultScriptError, RateWindow, format_duration
from embedd.emulator.lifecycle import BatchRecord, lines_done, phase_at
from embedd.emulator.validation import MAX_BATCH_BYTES, scan_batch_file
from embedd.emulator.vectors import embed_texts


def test_vectors_are_unit_float32_of_the_asked_size() -> None:
    """Every vector is float32, of the requested length, with unit L2 norm."""
    for dims in (1, 3, 256, 3072):
        vector = embed_text("some words here", dims)
        assert vector.dtype == np.float32
        assert vector.shape == (dims,)
        assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    assert abs(float(np.linalg.norm(embed_text("", 8))) - 1) < 1e-5


def test_shared_words_are_closer() -> None:
    """Texts that share words are closer than unrelated texts; equal texts are identical."""
    a = embed_text("the quick brown fox jumps over the lazy dog", 1024)
    b = embed_text("the quick brown fox sleeps under the lazy dog", 1024)
    c = embed_text("quarterly revenue grew in the asian markets", 1024)
    assert float(a @ b) > float(a @ c) + 0.3
    np.testing.assert_array_equal(
        a, embed_text("the quick brown fox jumps over the lazy dog", 1024)
    )
    assert float(a @ embed_text("The quick brown fox jumps over the lazy dog!", 1024)) < 1.0


def test_batch_embedding_matches_single() -> None:
    """Embedding many texts at once gives the same rows as one at a time."""
    texts = [f"text number {i} with words" for i in range(700)]
    matrix = embed_texts(texts, 64)
    for i in (0, 511, 512, 699):
        np.testing.assert_array_equal(matrix[i], embed_text(texts[i], 64))


def test_vectors_are_the_same_in_another_process() -> None:
    """Vectors do not depend on the process (no salted hash())."""
    code = "from embedd.emulator import embed_text; print(embed_text('héllo wörld 42', 16).tobytes().hex())"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == embed_text("héllo wörld 42", 16).tobytes().hex()


def _record(**changes: object) -> BatchRecord:
    base = BatchRecord(
        id="batch_x",
        input_file_id="file-x",
        endpoint="/v1/embeddings",
        completion_window="24h",
        metadata=None,
        model="text-embedding-3-large",
        created=100.0,
        lines=10,
        tokens=50,
        validating_s=1,
        in_progress_s=10,
        finalizing_s=1,
    )
    for key, value in changes.items():
        setattr(base, key, value)
    return base


@pytest.mark.parametrize(
    ("changes", "now", "status"),
    [
        ({}, 100.5, "validating"),
        ({}, 105, "in_progress"),
        ({}, 111.5, "finalizing"),
        ({}, 112, "completed"),
        ({"outcome": "expire", "completed_fraction": 0.4}, 111, "expired"),
        ({"outcome": "token_limit"}, 100.5, "validating"),
        ({"outcome": "token_limit"}, 101, "failed"),
        ({"cancel_requested": 103.0}, 103.5, "cancelling"),
        ({"cancel_requested": 103.0}, 104, "cancelled"),
        ({"cancel_requested": 100.2}, 101.5, "cancelled"),
        ({"outcome": "cancel", "completed_fraction": 0.5}, 106.5, "cancelling"),
    ],
)
def test_batch_status_follows_the_clock(
    changes: dict[str, object], now: float, status: str
) -> None:
    """The status table: each outcome walks its states by timestamps alone."""
    assert phase_at(_record(**changes), now).status == status


def test_partial_progress_counts_lines() -> None:
    """A batch cancelled 30% into its run has answered 3 of 10 lines."""
    rec = _record(cancel_requested=104.0)
    assert lines_done(rec, phase_at(rec, 200).done_fraction) == 3
    assert "in_progress" not in phase_at(_record(cancel_requested=100.5), 200).times


def test_fault_rules_count_skip_and_rate() -> None:
    """count fires N times after skip; rate is reproducible from the seed."""
    plan = FaultPlan(
        {"requests": [{"endpoint": "POST /v1/batches", "kind": "drop", "skip": 1, "count": 2}]}
    )
    hits = [plan.on_request("POST /v1/batches") is not None for _ in range(5)]
    assert hits == [False, True, True, False, False]
    assert plan.on_request("GET /v1/files") is None
    script = {"requests": [{"kind": "server_error", "rate": 0.5}]}
    first, second = FaultPlan(script, seed=7), FaultPlan(script, seed=7)
    runs = [first.on_request("*") is not None for _ in range(50)]
    again = [second.on_request("*") is not None for _ in range(50)]
    assert runs == again
    assert 5 < sum(again) < 45


def test_batch_rules_match_metadata() -> None:
    """A batch rule applies only to batches whose metadata matches, count times."""
    plan = FaultPlan({"batches": [{"outcome": "expire", "match_metadata": {"s": "1"}, "count": 1}]})
    assert plan.on_batch({"s": "2"}) is None
    rule = plan.on_batch({"s": "1", "x": "y"})
    assert rule is not None
    assert rule.outcome == "expire"
    assert plan.on_batch({"s": "1"}) is None


@pytest.mark.parametrize(
    "script",
    [
        {"requests": [{"kind": "boom"}]},
        {"batches": [{"outcome": "maybe"}]},
        {"other": []},
        {"requests": [{"kind": "drop", "rate": 2}]},
    ],
)
def test_bad_fault_scripts_are_refused(script: dict[str, object]) -> None:
    """Unknown kinds, outcomes, keys and out-of-range numbers are refused."""
    with pytest.raises(FaultScriptError):
        FaultPlan(script)


def test_rate_window_and_reset_format() -> None:
    """A window refuses past its limit, then resets after a minute; durations read like OpenAI's."""
    window = RateWindow(limit=2)
    assert window.take(0, 1)
    assert window.take(1, 1)
    assert not window.take(2, 1)
    assert window.remaining(2) == 0
    assert window.reset_in(2) == 58
    assert window.take(60, 1)
    assert window.remaining(60) == 1
    assert [format_duration(s) for s in (0.006, 1, 1.5, 60, 61.2)] == [
        "6ms",
        "1s",
        "1.5s",
        "1m0s",
        "1m1s",
    ]


def test_batch_file_over_200_mb_is_refused(tmp_path: Path) -> None:
    """A batch file over 200 MB is refused before it is read."""
    path = tmp_path / "big.jsonl"
    with path.open("wb") as handle:
        handle.truncate(MAX_BATCH_BYTES + 1)  # sparse: no 200 MB written to disk
    with pytest.raises(ApiError) as info:
        scan_batch_file(path)
    assert info.value.status == 400
    assert "too large" in info.value.message


def test_scan_without_token_counts_agrees_on_lines_and_inputs(tmp_path: Path) -> None:
    """Skipping the token count (no enqueued-token limit) changes nothing else the scan
    reports: the same lines, inputs and model, for every shape of `input`."""
    bodies = [
        {"model": "text-embedding-3-large", "input": "one text"},
        {"model": "text-embedding-3-large", "input": ["two", "texts"]},
        {"model": "text-embedding-3-large", "input": [101, 202, 303]},
        {"model": "text-embedding-3-large", "input": [[1, 2], [3]]},
        {"model": "text-embedding-3-large", "input": []},
    ]
    path = tmp_path / "shapes.jsonl"
    path.write_text(
        "".join(
            json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": b})
            + "\n"
            for i, b in enumerate(bodies)
        )
    )
    counted = scan_batch_file(path)
    quick = scan_batch_file(path, count=False)
    assert (quick.lines, quick.inputs, quick.model) == (
        counted.lines,
        counted.inputs,
        counted.model,
    )
    assert counted.tokens > 0
    assert quick.tokens == 0
