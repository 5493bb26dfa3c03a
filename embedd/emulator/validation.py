"""What the emulated API accepts: embedding request bodies and batch input files.

Pure checks, no I/O beyond reading the uploaded file line by line. Each refusal is
an :class:`~embedd.emulator.errors.ApiError` worded like OpenAI's. Limits are the
real API's: 2048 inputs and 300,000 tokens a request, 8192 tokens an input, 50,000
requests (or inputs) and 200 MB a batch file, one model and one URL a file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedd.emulator.errors import ApiError, invalid, invalid_value, model_not_found
from embedd.emulator.vectors import count_tokens, decode_tokens

MODELS: dict[str, int] = {
    "text-embedding-3-large": 3072,
    "text-embedding-3-small": 1536,
    "text-embedding-ada-002": 1536,
}
FIXED_DIMENSION_MODELS = frozenset({"text-embedding-ada-002"})
MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
MAX_INPUT_TOKENS = 8192
MAX_BATCH_LINES = 50_000
MAX_BATCH_BYTES = 200 * 1024 * 1024
EMBEDDINGS_URL = "/v1/embeddings"
_KEYS = frozenset({"input", "model", "encoding_format", "dimensions", "user"})


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated ``POST /v1/embeddings`` body."""

    model: str
    texts: tuple[str, ...]
    tokens: tuple[int, ...]
    dimensions: int
    encoding_format: str

    @property
    def total_tokens(self) -> int:
        """Tokens billed for the whole request."""
        return sum(self.tokens)


@dataclass(frozen=True)
class BatchFileSummary:
    """What an uploaded batch input file holds, as found while checking it."""

    lines: int
    inputs: int
    model: str | None
    tokens: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split_input(raw: Any) -> list[str | list[int]]:
    """Normalise ``input`` to a list of strings or token lists, or refuse it."""
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif isinstance(raw, list) and raw and all(_is_int(t) for t in raw):
        items = [list(raw)]
    elif isinstance(raw, list) and raw and all(isinstance(t, str) for t in raw):
        items = list(raw)
    elif (
        isinstance(raw, list)
        and raw
        and all(isinstance(t, list) and t and all(_is_int(x) for x in t) for t in raw)
    ):
        items = [list(t) for t in raw]
    else:
        raise invalid_value("input")
    if len(items) > MAX_INPUTS:
        raise invalid(
            f"'$.input' is too long. The maximum number of inputs is {MAX_INPUTS}.",
            param="input",
        )
    if any(item == "" for item in items):
        raise invalid_value("input")
    return items


def _materialise(item: str | list[int]) -> tuple[str, int]:
    """Return the text of one input and its token count."""
    if isinstance(item, str):
        return item, count_tokens(item)
    try:
        return decode_tokens(item), len(item)
    except (KeyError, ValueError, OverflowError):
        raise invalid_value("input") from None


def _dimensions(model: str, body: dict[str, Any]) -> int:
    native = MODELS[model]
    if "dimensions" not in body:
        return native
    raw = body["dimensions"]
    if model in FIXED_DIMENSION_MODELS:
        raise invalid("This model does not support specifying dimensions.", param="dimensions")
    if not _is_int(raw):
        raise invalid_value("dimensions")
    if raw < 1:
        raise invalid(
            f"Invalid value for 'dimensions' = {raw}. Must be greater than 0.",
            param="dimensions",
        )
    if raw > native:
        raise invalid(
            f"Invalid value for 'dimensions' = {raw}. Must be less than or equal to {native}.",
            param="dimensions",
        )
    return int(raw)


def parse_embedding_request(body: Any) -> EmbeddingRequest:
    """Check a ``POST /v1/embeddings`` body the way OpenAI does and return it parsed."""
    if not isinstance(body, dict):
        raise invalid("We could not parse the JSON body of your request.")
    for key in body:
        if key not in _KEYS:
            raise invalid(f"Unrecognized request argument supplied: {key}")
    if "model" not in body:
        raise invalid("you must provide a model parameter")
    model = body["model"]
    if not isinstance(model, str):
        raise invalid_value("model")
    if model not in MODELS:
        raise model_not_found(model)
    if "input" not in body:
        raise invalid("'input' is a required property", param="input")
    # An optional field that is present must have its type: null is not "absent".
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid_value("encoding_format")
    if "user" in body and not isinstance(body["user"], str):
        raise invalid_value("user")
    dimensions = _dimensions(model, body)
    texts: list[str] = []
    tokens: list[int] = []
    for item in _split_input(body["input"]):
        text, count = _materialise(item)
        if count > MAX_INPUT_TOKENS:
            raise invalid(
                f"This model's maximum context length is {MAX_INPUT_TOKENS} tokens, however "
                f"you requested {count} tokens ({count} in your prompt; 0 for the "
                "completion). Please reduce your prompt; or completion length."
            )
        texts.append(text)
        tokens.append(count)
    total = sum(tokens)
    if total > MAX_REQUEST_TOKENS:
        raise ApiError(
            400,
            f"Requested {total} tokens, max {MAX_REQUEST_TOKENS} tokens per request",
            type_="max_tokens_per_request",
            code="max_tokens_per_request",
        )
    return EmbeddingRequest(model, tuple(texts), tuple(tokens), dimensions, fmt)


def estimate_body(body: Any) -> tuple[int, int]:
    """(inputs, tokens) of a batch line's body, counting what can be counted."""
    raw = body.get("input") if isinstance(body, dict) else None
    items: Sequence[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if items and all(_is_int(t) for t in items):
        return 1, len(items)
    tokens = 0
    for item in items:
        if isinstance(item, str):
            tokens += count_tokens(item)
        elif isinstance(item, list):
            tokens += len(item)
    return max(len(items), 1), tokens


def count_inputs(body: Any) -> int:
    """How many embedding inputs a batch line's body holds (as `estimate_body` counts)."""
    raw = body.get("input") if isinstance(body, dict) else None
    if isinstance(raw, list) and raw and not all(_is_int(t) for t in raw):
        return len(raw)
    return 1


def _line_error(number: int, message: str) -> ApiError:
    return invalid(f"Invalid batch input file, line {number}: {message}", param="file")


def check_batch_line(number: int, line: bytes, seen: set[str]) -> dict[str, Any]:
    """Check one line of a batch input file for ``/v1/embeddings``; return it parsed."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise _line_error(number, "not valid JSON.") from None
    if not isinstance(obj, dict):
        raise _line_error(number, "each line must be a JSON object.")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _line_error(number, "'custom_id' must be a non-empty string.")
    if custom_id in seen:
        raise _line_error(number, f"duplicate custom_id '{custom_id}'; custom_id must be unique.")
    seen.add(custom_id)
    if obj.get("method") != "POST":
        raise _line_error(number, "'method' must be 'POST'.")
    if obj.get("url") != EMBEDDINGS_URL:
        raise _line_error(number, f"'url' must be '{EMBEDDINGS_URL}' for this file.")
    if not isinstance(obj.get("body"), dict):
        raise _line_error(number, "'body' must be a JSON object.")
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        raise _line_error(number, f"unexpected key '{sorted(extra)[0]}'.")
    return obj


def scan_batch_file(path: Path, *, count: bool = True) -> BatchFileSummary:
    """Check a whole uploaded batch input file without holding it in memory.

    Tokens are counted only with `count` (tiktoken is most of the scan's time); the
    count serves the enqueued-token limit alone, and lines are counted again, as
    billed, when the batch runs.
    """
    size = path.stat().st_size
    if size > MAX_BATCH_BYTES:
        raise invalid(
            f"File is too large: {size} bytes; the maximum for a batch file is "
            f"{MAX_BATCH_BYTES} bytes.",
            param="file",
        )
    seen: set[str] = set()
    lines = inputs = tokens = 0
    model: str | None = None
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            obj = check_batch_line(number, line, seen)
            lines += 1
            body_model = obj["body"].get("model")
            if model is None and isinstance(body_model, str):
                model = body_model
            elif isinstance(body_model, str) and body_model != model:
                raise _line_error(number, "all requests in a batch must use the same model.")
            if count:
                n_inputs, n_tokens = estimate_body(obj["body"])
                tokens += n_tokens
            else:
                n_inputs = count_inputs(obj["body"])
            inputs += n_inputs
            if lines > MAX_BATCH_LINES or inputs > MAX_BATCH_LINES:
                raise invalid(
                    f"Invalid batch input file: more than {MAX_BATCH_LINES} requests or "
                    "embedding inputs.",
                    param="file",
                )
    if lines == 0:
        raise invalid("Invalid batch input file: the file is empty.", param="file")
    return BatchFileSummary(lines=lines, inputs=inputs, model=model, tokens=tokens)
