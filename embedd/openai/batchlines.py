"""The JSONL lines of a batch: encode request lines, parse output and error lines.

Pure functions, no I/O. An output line looks like::

    {"id": "batch_req_…", "custom_id": "r1",
     "response": {"status_code": 200, "request_id": "…",
                  "body": {"object": "list", "data": [{"embedding": "<base64>", …}],
                           "model": "…", "usage": {"prompt_tokens": 5, "total_tokens": 5}}},
     "error": null}

An error-file line has ``response: null`` and ``error: {"code", "message"}``, or a
``response`` whose ``status_code`` is not 200 and whose body is ``{"error": {…}}``.

A line that parses but carries a bad vector (wrong length, NaN, not unit length) is a
retryable *line* error in the result, never an exception: one bad line must not sink
a 0.8 GB output file. A line that is not the documented shape at all raises
:class:`MalformedLine`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import pybase64

from embedd.errors import EmbeddError
from embedd.money.prices import NATIVE_DIMENSIONS

# Models that reject the `dimensions` parameter altogether.
FIXED_DIMENSION_MODELS = frozenset({"text-embedding-ada-002"})

NORM_TOLERANCE = 1e-3

# Line-level statuses that are worth another try (the API's own retryable set).
_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_RETRYABLE_CODES = frozenset(
    {"rate_limit_exceeded", "server_error", "timeout", "internal_error", "batch_expired"}
)

Vector = npt.NDArray[np.float32]

# The fast path of parse_output_line: the embedding's key, then the opening quote of
# its value. The value is cut out and parsed on its own; see _split_embedding.
_EMBEDDING_KEY = re.compile(rb'"embedding"[ \t\n\r]*:[ \t\n\r]*"')
# Stands in for the cut-out value. A NUL character can only come from this escape
# (JSON forbids a raw control character in a string), so finding it where the
# embedding belongs proves the cut was the embedding's whole string.
_PLACEHOLDER = b'"\\u0000"'
_PLACEHOLDER_TEXT = "\x00"


class MalformedLine(EmbeddError):
    """A batch output line is not the JSON shape the Batch API documents."""


class BadVector(ValueError):
    """An embedding that is the wrong length, not finite, or not unit length."""


@dataclass(frozen=True)
class LineResult:
    """One parsed output or error line. ``vector`` is None exactly when it failed."""

    custom_id: str
    vector: Vector | None
    tokens: int | None
    error_status: int | None
    error_code: str | None
    error_message: str | None
    retryable: bool

    @property
    def ok(self) -> bool:
        """True when the line carries a usable vector."""
        return self.vector is not None


def native_dimensions(model: str) -> int:
    """The model's full output size; raises ValueError for an unknown model."""
    try:
        return NATIVE_DIMENSIONS[model]
    except KeyError:
        raise ValueError(f"unknown embedding model {model!r}") from None


def request_body(
    input: str | list[str] | list[int] | list[list[int]], model: str, dimensions: int | None
) -> dict[str, Any]:
    """The ``/v1/embeddings`` request body, shared by batch lines and the sync path."""
    body: dict[str, Any] = {"model": model, "input": input, "encoding_format": "base64"}
    # Unknown models (OpenAI-compatible servers) get `dimensions` whenever one is set.
    native = NATIVE_DIMENSIONS.get(model)
    if dimensions is not None and model not in FIXED_DIMENSION_MODELS and dimensions != native:
        body["dimensions"] = dimensions
    return body


def encode_request_line(
    custom_id: str, input: str | list[int], model: str, dimensions: int | None
) -> bytes:
    """One batch request line, UTF-8 JSON terminated by a newline (orjson: compact,
    non-ASCII text written as UTF-8, not escaped)."""
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": request_body(input, model, dimensions),
    }
    return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)


def request_line_size(
    custom_id: str,
    input: str | list[int] | npt.NDArray[np.uint32],
    model: str,
    dimensions: int | None,
) -> int:
    """The byte length of `encode_request_line(...)` without building the whole line:
    the fixed frame once per shape, plus the input's own JSON encoding."""
    encoded = orjson.dumps(input, option=orjson.OPT_SERIALIZE_NUMPY)
    return _frame_size(len(custom_id), model, dimensions) + len(encoded)


@functools.lru_cache(maxsize=64)
def _frame_size(id_length: int, model: str, dimensions: int | None) -> int:
    # custom ids are request keys (hex): their JSON encoding is as long as they are
    return len(encode_request_line("k" * id_length, "", model, dimensions)) - len('""')


def decode_embedding(value: str | list[float], dimensions: int) -> Vector:
    """A base64 (little-endian float32) or float-list embedding as a checked vector.

    Raises :class:`BadVector` if it is not ``dimensions`` long, not finite or not of
    unit length within 1e-3.
    """
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadVector(f"embedding is not valid base64: {exc}") from None
        if len(raw) % 4:
            raise BadVector(f"base64 embedding has {len(raw)} bytes, not a multiple of 4")
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    elif isinstance(value, list):
        try:
            vector = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise BadVector(f"embedding is not a list of numbers: {exc}") from None
        if vector.ndim != 1:
            raise BadVector("embedding is not a flat list of numbers")
    else:
        raise BadVector(f"embedding is a {type(value).__name__}, not base64 or a list")
    if vector.shape[0] != dimensions:
        raise BadVector(f"embedding has {vector.shape[0]} dimensions, expected {dimensions}")
    if not np.isfinite(vector).all():
        raise BadVector("embedding contains NaN or infinity")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise BadVector(f"embedding has norm {norm:.6f}, expected 1")
    return vector


def parse_output_line(line: bytes, dimensions: int) -> LineResult:
    """Parse one line of a batch output or error file (see the module docstring).

    The common line, a 200 with one base64 embedding, takes a fast path that never
    runs the JSON parser over the embedding string; anything else, and any line the
    fast path cannot fully vouch for, takes the exact path. Both give the same result.
    """
    split = _split_embedding(line)
    if split is not None:
        obj, start, end = split
        vector = _fast_vector(memoryview(line)[start:end], dimensions)
        if vector is not None:
            return _interpret(obj, dimensions, vector)
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedLine(f"batch output line is not JSON: {exc}") from None
    return _interpret(obj, dimensions, None)


def _split_embedding(line: bytes) -> tuple[Any, int, int] | None:
    """The line parsed with its embedding string cut out, and where that string's
    bytes are: ``line[start:end]``.

    None when the line is not the plain shape: no ``"embedding": "…"``, an escape
    inside the string, invalid JSON, or the cut string not at
    ``response.body.data[0].embedding``. When the result is not None, ``json.loads``
    of the whole line gives the same object with the string in place (provided the
    string is plain ASCII, which a successful strict base64 decode establishes):
    the bytes before the cut lex the same in both, the cut is one string token in
    both, and the bytes after it are the same.
    """
    match = _EMBEDDING_KEY.search(line)
    if match is None:
        return None
    start = match.end()
    end = line.find(b'"', start)
    if end < 0:
        return None
    if line.find(b"\\", start, end) >= 0:
        return None
    try:
        obj = orjson.loads(b"".join((line[: start - 1], _PLACEHOLDER, line[end + 1 :])))
    except orjson.JSONDecodeError:
        return None
    try:
        if obj["response"]["body"]["data"][0]["embedding"] != _PLACEHOLDER_TEXT:
            return None
    except (KeyError, IndexError, TypeError):
        return None
    return obj, start, end


def _fast_vector(encoded: bytes | memoryview, dimensions: int) -> Vector | None:
    """The vector in ``encoded`` if it passes every check, else None (no reason given).

    Accepts a subset of what :func:`decode_embedding` accepts, with the same result:
    pybase64's ``validate=True`` accepts what ``base64.b64decode(validate=True)`` does
    (SIMD decoder, about 20 times faster on a 3072-dimension vector), and the squared norm
    is finite exactly when every component is (float32 squares cannot overflow a
    float64 sum of 2**31 terms).
    """
    try:
        raw = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 4 * dimensions:
        return None
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    wide = vector.astype(np.float64)
    norm = float(np.sqrt(np.dot(wide, wide)))
    if not abs(norm - 1.0) <= NORM_TOLERANCE:  # also False for NaN
        return None
    return vector


def _interpret(obj: Any, dimensions: int, vector: Vector | None) -> LineResult:
    """The result for a parsed line; ``vector``, when given, is its checked embedding."""
    if not isinstance(obj, dict):
        raise MalformedLine("batch output line is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise MalformedLine("batch output line has no custom_id")
    response = obj.get("response")
    error = obj.get("error")
    if response is None:
        if not isinstance(error, dict):
            raise MalformedLine(f"line {custom_id!r} has neither a response nor an error")
        return _failed(custom_id, None, error)
    if not isinstance(response, dict):
        raise MalformedLine(f"line {custom_id!r}: response is not an object")
    status = response.get("status_code")
    body = response.get("body")
    if not isinstance(status, int) or isinstance(status, bool):
        raise MalformedLine(f"line {custom_id!r}: response has no integer status_code")
    if status != 200:
        inner = body.get("error") if isinstance(body, dict) else None
        return _failed(custom_id, status, inner if isinstance(inner, dict) else error)
    if not isinstance(body, dict):
        raise MalformedLine(f"line {custom_id!r}: 200 response without a body object")
    tokens = _usage_tokens(body.get("usage"))
    data = body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise MalformedLine(f"line {custom_id!r}: response body has no data[0]")
    if vector is None:
        embedding: Any = data[0].get("embedding")
        try:
            vector = decode_embedding(embedding, dimensions)
        except BadVector as exc:
            return LineResult(custom_id, None, tokens, 200, "bad_vector", str(exc), True)
    return LineResult(custom_id, vector, tokens, None, None, None, False)


def _usage_tokens(usage: object) -> int | None:
    if not isinstance(usage, dict):
        return None
    for key in ("prompt_tokens", "total_tokens"):
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _failed(custom_id: str, status: int | None, error: object) -> LineResult:
    code: str | None = None
    message: str | None = None
    if isinstance(error, dict):
        raw_code = error.get("code")
        code = str(raw_code) if raw_code is not None else None
        raw_message = error.get("message")
        message = str(raw_message) if raw_message is not None else None
    retryable = (status in _RETRYABLE_STATUS) or (code in _RETRYABLE_CODES)
    if status is not None and status >= 500:
        retryable = True
    return LineResult(custom_id, None, None, status, code, message, retryable)
