"""Batch JSONL lines: request encoding and output/error line parsing."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import pytest

from embedd.batchlines import (
    BadVector,
    MalformedLine,
    decode_embedding,
    encode_request_line,
    native_dimensions,
    parse_output_line,
)


def unit(dimensions: int, seed: int = 0) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    return vector / np.linalg.norm(vector)


def b64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def output_line(custom_id: str, embedding: Any, tokens: int = 7) -> bytes:
    line = {
        "id": "batch_req_1",
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": "req_1",
            "body": {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                "model": "text-embedding-3-large",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        },
        "error": None,
    }
    return json.dumps(line).encode() + b"\n"


def test_native_dimensions_of_known_models() -> None:
    """Each supported model reports its full output size; unknown models are refused."""
    assert native_dimensions("text-embedding-3-large") == 3072
    assert native_dimensions("text-embedding-3-small") == 1536
    assert native_dimensions("text-embedding-ada-002") == 1536
    with pytest.raises(ValueError, match="unknown"):
        native_dimensions("gpt-4o")


def test_request_line_shape_and_newline() -> None:
    """A request line is one JSON object with the batch envelope, ending in a newline."""
    line = encode_request_line("r-1", "héllo\nworld", "text-embedding-3-large", 1024)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1  # the newline inside the text is escaped
    assert json.loads(line) == {
        "custom_id": "r-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {
            "model": "text-embedding-3-large",
            "input": "héllo\nworld",
            "encoding_format": "base64",
            "dimensions": 1024,
        },
    }


@pytest.mark.parametrize(
    ("model", "dimensions", "sent"),
    [
        ("text-embedding-3-large", 3072, None),
        ("text-embedding-3-large", None, None),
        ("text-embedding-3-large", 256, 256),
        ("text-embedding-3-small", 1536, None),
        ("text-embedding-3-small", 512, 512),
        ("text-embedding-ada-002", 1536, None),
        ("text-embedding-ada-002", 512, None),
    ],
)
def test_dimensions_only_when_not_native(model: str, dimensions: int | None, sent: int) -> None:
    """`dimensions` is sent only when it differs from native size, never for ada-002."""
    body = json.loads(encode_request_line("x", [1, 2, 3], model, dimensions))["body"]
    assert body.get("dimensions") == sent
    assert body["input"] == [1, 2, 3]


def test_round_trip_base64_output_line() -> None:
    """A base64 output line decodes to the exact float32 vector with its token usage."""
    vector = unit(256, seed=1)
    result = parse_output_line(output_line("r-1", b64(vector), tokens=12), 256)
    assert result.ok
    assert result.custom_id == "r-1"
    assert result.tokens == 12
    assert result.vector is not None
    assert result.vector.dtype == np.float32
    assert np.array_equal(result.vector, vector)
    assert not result.retryable


def test_float_list_embedding_is_accepted() -> None:
    """An embedding returned as a JSON float list parses like base64."""
    vector = unit(64, seed=2)
    result = parse_output_line(output_line("r-2", vector.tolist()), 64)
    assert result.vector is not None
    assert np.allclose(result.vector, vector)


@pytest.mark.parametrize(
    ("embedding", "reason"),
    [
        (b64(unit(128)), "dimensions"),
        (b64(unit(256) * 2), "norm"),
        (b64(np.full(256, np.nan, dtype=np.float32)), "NaN"),
        ("!!!not base64!!!", "base64"),
        ("QUJD", "multiple of 4"),
        (None, "not base64 or a list"),
        ([[0.1]], "flat"),
        (["a"] * 256, "numbers"),
    ],
)
def test_bad_vector_is_a_retryable_line_error(embedding: Any, reason: str) -> None:
    """A wrong-length, non-unit, non-finite or undecodable vector fails the line, retryably."""
    result = parse_output_line(output_line("r-3", embedding), 256)
    assert result.vector is None
    assert result.retryable
    assert result.error_code == "bad_vector"
    assert reason in (result.error_message or "")


def test_error_file_line_with_error_object() -> None:
    """An error-file line (response null, error object) carries code and message."""
    line = {
        "id": "batch_req_2",
        "custom_id": "r-4",
        "response": None,
        "error": {"code": "batch_expired", "message": "This request could not be executed"},
    }
    result = parse_output_line(json.dumps(line).encode(), 3072)
    assert (result.custom_id, result.vector, result.error_code) == ("r-4", None, "batch_expired")
    assert result.retryable


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, "invalid_request_error", False),
        (429, "rate_limit_exceeded", True),
        (500, "server_error", True),
        (503, None, True),
    ],
)
def test_non_200_response_line(status: int, code: str | None, retryable: bool) -> None:
    """A line whose response status is not 200 reports the body's error and retryability."""
    line = {
        "custom_id": "r-5",
        "response": {
            "status_code": status,
            "body": {"error": {"code": code, "message": "nope", "type": "x"}},
        },
        "error": None,
    }
    result = parse_output_line(json.dumps(line).encode(), 3072)
    assert result.error_status == status
    assert result.error_code == code
    assert result.error_message == "nope"
    assert result.retryable is retryable
    assert result.tokens is None


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'{"response": null, "error": {}}',
        b'{"custom_id": "a", "response": null, "error": null}',
        b'{"custom_id": "a", "response": [], "error": null}',
        b'{"custom_id": "a", "response": {"status_code": "200"}}',
        b'{"custom_id": "a", "response": {"status_code": 200, "body": null}}',
        b'{"custom_id": "a", "response": {"status_code": 200, "body": {"data": []}}}',
        b"\xff\xfe",
    ],
)
def test_malformed_line_raises_clear_error(raw: bytes) -> None:
    """A line that is not the documented shape raises MalformedLine, not a KeyError."""
    with pytest.raises(MalformedLine):
        parse_output_line(raw, 3072)


def test_decode_embedding_rejects_wrong_type() -> None:
    """decode_embedding refuses values that are neither base64 nor lists."""
    with pytest.raises(BadVector):
        decode_embedding(3.0, 1)  # type: ignore[arg-type]


def test_parsing_is_fast_for_full_size_vectors() -> None:
    """2,000 base64 lines of 3072 dimensions parse in well under two seconds."""
    line = output_line("r", b64(unit(3072, seed=5)))
    start = time.perf_counter()
    for _ in range(2000):
        assert parse_output_line(line, 3072).ok
    assert time.perf_counter() - start < 2.0
