"""Batch JSONL lines: request encoding and output/error line parsing."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.openai.batchlines import (
    BadVector,
    MalformedLine,
    _fast_vector,
    _interpret,
    _split_embedding,
    decode_embedding,
    encode_request_line,
    native_dimensions,
    parse_output_line,
    request_line_size,
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


# The fast path of parse_output_line against the exact one: on every line, both give
# the same result or the same exception. The exact path is json.loads + the checks.
def _exact(line: bytes, dimensions: int) -> Any:
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        return ("raise", f"batch output line is not JSON: {exc}")
    try:
        return ("ok", _interpret(obj, dimensions, None))
    except MalformedLine as exc:
        return ("raise", str(exc))


def _fast(line: bytes, dimensions: int) -> Any:
    try:
        return ("ok", parse_output_line(line, dimensions))
    except MalformedLine as exc:
        return ("raise", str(exc))


def _same(a: Any, b: Any) -> bool:
    if a[0] != b[0] or a[0] == "raise":
        return bool(a == b)
    x, y = a[1], b[1]
    if (x.vector is None) != (y.vector is None):
        return False
    if x.vector is not None and x.vector.tobytes() != y.vector.tobytes():
        return False
    return bool(
        (x.custom_id, x.tokens, x.error_status, x.error_code, x.error_message, x.retryable)
        == (y.custom_id, y.tokens, y.error_status, y.error_code, y.error_message, y.retryable)
    )


_WS = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])


@st.composite
def _lines(draw: st.DrawFn) -> bytes:
    """Output lines as a server might write them: any key order, spacing, escapes."""
    dims = draw(st.sampled_from([4, 8, 5]))
    vector = draw(
        st.lists(st.floats(-1, 1, width=32, allow_nan=False), min_size=dims, max_size=dims)
    )
    arr = np.asarray(vector, dtype=np.float32)
    if draw(st.booleans()) and np.linalg.norm(arr) > 0:
        arr = (arr / np.linalg.norm(arr)).astype(np.float32)
    encoded = base64.b64encode(arr.astype("<f4").tobytes()).decode("ascii")
    embedding: Any = draw(
        st.sampled_from(
            [
                encoded,
                encoded.rstrip("="),
                encoded + "=",
                "A" + encoded,
                encoded.replace("A", "\\/", 1),
                arr.tolist(),
                None,
                "",
            ]
        )
    )
    item = {"object": "embedding", "index": 0, "embedding": embedding}
    body: dict[str, Any] = {
        "object": "list",
        "data": [item, *draw(st.sampled_from([[], [{"embedding": "AAAA"}]]))],
        "model": "m",
        "usage": draw(st.sampled_from([{"prompt_tokens": 3, "total_tokens": 3}, None, {}])),
    }
    response: dict[str, Any] = {
        "status_code": draw(st.sampled_from([200, 200, 500, "200"])),
        "request_id": "req_1",
        "body": body,
    }
    custom_id = draw(st.text(min_size=0, max_size=12))
    obj: dict[str, Any] = {"id": "batch_req_1", "custom_id": custom_id, "response": response}
    obj["error"] = None
    for d in (obj, response, body, item):
        keys = draw(st.permutations(list(d)))
        reordered = {k: d[k] for k in keys}
        d.clear()
        d.update(reordered)
    sep = draw(_WS)
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        separators=("," + sep, ":" + draw(_WS)),
    )
    if encoded and draw(st.booleans()):
        # a decoy: the key's name inside a string before the real one
        text = text.replace('"id": ', '"id": "embedding", "x":', 1)
    return (draw(_WS) + text + "\n").encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None)
@given(line=_lines(), dims=st.sampled_from([4, 5, 8]))
def test_fast_path_agrees_with_exact_path(line: bytes, dims: int) -> None:
    """For any output line, parse_output_line gives exactly what json.loads plus the
    documented checks give: the same vector bytes, fields and error wording."""
    assert _same(_fast(line, dims), _exact(line, dims))


@settings(max_examples=300, deadline=None)
@given(line=_lines(), cut=st.integers(0, 400), junk=st.binary(max_size=3))
def test_fast_path_agrees_on_damaged_lines(line: bytes, cut: int, junk: bytes) -> None:
    """A line cut short or with bytes spliced in raises or reports exactly as before."""
    damaged = line[:cut] + junk + line[cut:] if junk else line[: cut % max(1, len(line))]
    assert _same(_fast(damaged, 4), _exact(damaged, 4))


@pytest.mark.parametrize(
    "text",
    [
        '{"custom_id":"a","response":{"status_code":200,"body":{"data":[{"embedding":"%s"}],'
        '"embedding":"%s"}}}',
        '{"custom_id":"a\\"","response":{"status_code":200,"body":{"data":[{"embedding":"%s"}]}}}',
        '{"custom_id":"a","response":{"status_code":200,"body":{"data":[{"embedding":"%s",'
        '"embedding":"AAAA"}]}}}',
        '{"custom_id":"embedding","response":{"status_code":200,"body":{"data":[{"embedding":"%s"}]}}}',
        '{"custom_id":"a","response":{"status_code":200,"body":{"data":[{"embedding":"%s"}]}}}x',
    ],
)
def test_fast_path_is_not_fooled_by_decoys(text: str) -> None:
    """Duplicate keys, an escaped quote before the key, the key's name as a value and
    trailing junk all give the exact path's answer."""
    vector = b64(unit(8, 3))
    line = (text.replace("%s", vector)).encode()
    assert _same(_fast(line, 8), _exact(line, 8))


def test_plain_output_line_takes_the_fast_path() -> None:
    """A plain 200 line is split without parsing the embedding and decodes to the
    same vector (so the agreement tests above compare two different paths)."""
    vector = unit(3072, 9)
    line = output_line("r1", b64(vector))
    split = _split_embedding(line)
    assert split is not None
    assert _fast_vector(line[split[1] : split[2]], 3072) is not None
    assert np.array_equal(parse_output_line(line, 3072).vector, vector)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(min_size=1).filter(lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
    dims=st.sampled_from([None, 256, 1024]),
)
def test_request_line_size_is_the_encoded_length(text: str, dims: int | None) -> None:
    """The size intake records for a request is exactly the line the submitter writes,
    for any text (escapes, non-ASCII) and for token-id inputs."""
    key = "ab" * 32
    for value in (text, [1, 22, 333, 100_000]):
        line = encode_request_line(key, value, "text-embedding-3-large", dims)
        assert request_line_size(key, value, "text-embedding-3-large", dims) == len(line)
        assert json.loads(line)["body"]["input"] == value
