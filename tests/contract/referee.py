"""Referee bodies with the official ``openai`` SDK's own types — everywhere.

OpenAI's published YAML (``schemas``) sits beside the repository, not in it, so a
fresh clone does not have it. The SDK is a test dependency, and its pydantic models
and parameter ``TypedDict``s are generated from the same description. What they can
judge is judged here, with or without the YAML:

- responses (``Batch``, ``FileObject``, ``FileDeleted``, ``CreateEmbeddingResponse``,
  ``ErrorObject``, and the list envelopes around them) with
  ``model_validate(..., strict=True)`` — no coercion — and *closed*: a key the model
  does not declare (the SDK keeps it as an "extra") is a problem, so a renamed field
  is caught even where it is optional;
- request bodies and query parameters (``BatchCreateParams``,
  ``EmbeddingCreateParams``, ``FileCreateParams``, ``FileListParams``,
  ``BatchListParams``): no undeclared key, required keys present, each value strictly
  of its declared type. ``input`` is checked by hand against the SDK's declared union
  (str, list of str, list of int, list of lists of int), which pydantic's lazy
  ``Iterable`` validation cannot referee strictly;
- batch lines: the envelope by hand, the body with the models above.

``validate_response``, ``validate_batch_input`` and ``validate_batch_line`` run the
YAML check first where the file exists, then the SDK check; either raises
(``REFUSED`` names both exception types).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, get_args

import jsonschema
import numpy as np
import pydantic
import schemas
from openai import BaseModel as SDKModel
from openai.types import (
    Batch,
    BatchCreateParams,
    BatchListParams,
    CreateEmbeddingResponse,
    EmbeddingCreateParams,
    FileDeleted,
    FileListParams,
    FileObject,
    FilePurpose,
)
from openai.types.shared import ErrorObject


class RefereeError(ValueError):
    """The SDK's types refuse a body."""


REFUSED = (jsonschema.ValidationError, RefereeError)

# The operations embedd uses: id -> (method, path template under /v1).
OPERATIONS: dict[str, tuple[str, str]] = {
    "createFile": ("POST", "/files"),
    "listFiles": ("GET", "/files"),
    "retrieveFile": ("GET", "/files/{file_id}"),
    "deleteFile": ("DELETE", "/files/{file_id}"),
    "downloadFile": ("GET", "/files/{file_id}/content"),
    "createBatch": ("POST", "/batches"),
    "listBatches": ("GET", "/batches"),
    "retrieveBatch": ("GET", "/batches/{batch_id}"),
    "cancelBatch": ("POST", "/batches/{batch_id}/cancel"),
    "createEmbedding": ("POST", "/embeddings"),
}
_PATTERNS = {
    op: (method, re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path) + "$"))
    for op, (method, path) in OPERATIONS.items()
}
_MODELS: dict[str, type[SDKModel]] = {
    "Batch": Batch,
    "OpenAIFile": FileObject,
    "DeleteFileResponse": FileDeleted,
    "CreateEmbeddingResponse": CreateEmbeddingResponse,
}
_LISTS = {"ListBatchesResponse": Batch, "ListFilesResponse": FileObject}
# What each operation answers with on success (None: file content, any bytes).
RESPONSES: dict[str, str | None] = {
    "createFile": "OpenAIFile",
    "listFiles": "ListFilesResponse",
    "retrieveFile": "OpenAIFile",
    "deleteFile": "DeleteFileResponse",
    "downloadFile": None,
    "createBatch": "Batch",
    "listBatches": "ListBatchesResponse",
    "retrieveBatch": "Batch",
    "cancelBatch": "Batch",
    "createEmbedding": "CreateEmbeddingResponse",
}
_BODIES: dict[str, Any] = {
    "createBatch": BatchCreateParams,
    "createEmbedding": EmbeddingCreateParams,
}
_QUERIES: dict[str, Any] = {"listFiles": FileListParams, "listBatches": BatchListParams}


def find_operation(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """The operation id serving ``method`` on ``path`` (without ``/v1``), with its path params."""
    for op, (op_method, pattern) in _PATTERNS.items():
        match = pattern.match(path)
        if match and op_method == method.upper():
            return op, match.groupdict()
    return None


# ------------------------------------------------------------------------ responses


def _loc(parts: tuple[Any, ...]) -> str:
    return "/".join(repr(p) if isinstance(p, str) else str(p) for p in parts) or "<root>"


def _extras(value: Any, where: tuple[Any, ...]) -> list[str]:
    """Keys an SDK model kept as extras (it does not declare them), at any depth."""
    found: list[str] = []
    if isinstance(value, SDKModel):
        for key in value.model_extra or {}:
            found.append(f"{_loc((*where, key))}: not a field of {type(value).__name__}")
        for name in type(value).model_fields:
            found += _extras(getattr(value, name), (*where, name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _extras(item, (*where, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            found += _extras(item, (*where, key))
    return found


def _model_problems(model: type[SDKModel], body: Any, where: tuple[Any, ...] = ()) -> list[str]:
    try:
        parsed = model.model_validate(body, strict=True)
    except pydantic.ValidationError as exc:
        return [f"{_loc((*where, *e['loc']))}: {e['msg']}" for e in exc.errors()]
    return _extras(parsed, where)


def _closed_keys(body: dict[str, Any], allowed: set[str], required: set[str]) -> list[str]:
    found = [f"{_loc((k,))}: undeclared key" for k in sorted(set(body) - allowed)]
    return found + [f"{_loc((k,))}: Field required" for k in sorted(required - set(body))]


def _decoded_embeddings(body: Any) -> tuple[Any, list[str]]:
    """A base64 embedding (asked for with ``encoding_format``; the SDK decodes it before
    its model sees it) as the floats it encodes, or a problem if it encodes none."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return body, []
    found: list[str] = []
    data = []
    for i, item in enumerate(body["data"]):
        if isinstance(item, dict) and isinstance(item.get("embedding"), str):
            try:
                raw = base64.b64decode(item["embedding"], validate=True)
            except ValueError:
                raw = b"?"
            if len(raw) % 4:
                found.append(f"'data'/{i}/'embedding': not base64 of float32 values")
            floats = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<f4").tolist()
            item = {**item, "embedding": floats}
        data.append(item)
    return {**body, "data": data}, found


def response_problems(name: str, body: Any) -> list[str]:
    """Why the SDK's types refuse ``body`` as schema ``name`` (empty when they accept it)."""
    if name == "CreateEmbeddingResponse":
        body, found = _decoded_embeddings(body)
        return found + _model_problems(CreateEmbeddingResponse, body)
    if name in _MODELS:
        return _model_problems(_MODELS[name], body)
    if not isinstance(body, dict):
        return [f"<root>: {name} is not an object"]
    if name == "ErrorResponse":
        found = _closed_keys(body, {"error"}, {"error"})
        if "error" in body:
            found += _model_problems(ErrorObject, body["error"], ("error",))
            # The SDK types these four; a real error body always carries all of them.
            if isinstance(body["error"], dict):
                keys = {"message", "type", "param", "code"}
                found += _closed_keys(body["error"], set(body["error"]), keys)
        return found
    item = _LISTS[name]
    allowed = {"object", "data", "first_id", "last_id", "has_more"}
    found = _closed_keys(body, allowed, {"object", "data", "has_more"})
    if body.get("object") != "list":
        found.append(f"'object': {body.get('object')!r} is not 'list'")
    if not isinstance(body.get("has_more"), bool):
        found.append("'has_more': not a boolean")
    for key in ("first_id", "last_id"):
        if body.get(key) is not None and not isinstance(body[key], str):
            found.append(f"{_loc((key,))}: not a string")
    data = body.get("data")
    if not isinstance(data, list):
        return [*found, "'data': not an array"]
    for i, entry in enumerate(data):
        found += _model_problems(item, entry, ("data", i))
    return found


def required_keys(name: str) -> list[str]:
    """The keys the SDK requires in schema ``name``."""
    if name in _MODELS:
        return [n for n, f in _MODELS[name].model_fields.items() if f.is_required()]
    if name == "ErrorResponse":
        return ["error"]
    return ["object", "data", "has_more"]


def _raise(found: list[str], what: str) -> None:
    if found:
        raise RefereeError(f"{what}: " + "; ".join(found))


# ------------------------------------------------------------------------- requests


def _input_problems(value: Any) -> list[str]:
    """``input`` as the SDK declares it: str, [str], [int] or [[int]] (no bools)."""

    def ints(items: Any) -> bool:
        return isinstance(items, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in items
        )

    if isinstance(value, str):
        return []
    if isinstance(value, list) and (
        all(isinstance(i, str) for i in value) or ints(value) or all(ints(i) for i in value)
    ):
        return []
    return [
        f"'input': {json.dumps(value)[:40]} is not a string or an array of strings, tokens or token arrays"
    ]


def params_problems(params_type: Any, body: Any) -> list[str]:
    """A JSON body (or coerced query) against an SDK parameter TypedDict, closed and strict."""
    if not isinstance(body, dict):
        return ["<root>: not an object"]
    allowed = set(params_type.__annotations__)
    found = _closed_keys(body, allowed, set())  # required keys: pydantic reports them
    checked = {k: v for k, v in body.items() if k in allowed}
    if "input" in checked:
        found += _input_problems(checked.pop("input"))
        checked["input"] = "x"  # judged above
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(params_type)
    try:
        adapter.validate_python(checked, strict=True)
    except pydantic.ValidationError as exc:
        found += [f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return found


def _coerce_query(params_type: Any, query: dict[str, str]) -> dict[str, Any]:
    ints = {k for k, t in params_type.__annotations__.items() if "int" in str(t)}
    return {k: int(v) if k in ints and v.lstrip("-").isdigit() else v for k, v in query.items()}


def request_problems(
    op: str, query: dict[str, str], headers: dict[str, str], json_body: Any, form: dict[str, Any]
) -> list[str]:
    """Why the SDK's parameter types refuse this request (empty when they accept it)."""
    label = f"{op} (sdk)"
    found: list[str] = []
    auth = headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
        found.append("no bearer Authorization header")
    if op in _QUERIES:
        found += params_problems(_QUERIES[op], _coerce_query(_QUERIES[op], query))
    elif query:
        found.append(f"undeclared query parameters {sorted(query)}")
    if op in _BODIES:
        found += params_problems(_BODIES[op], json_body)
    if op == "createFile":
        found += _closed_keys(form, {"file", "purpose", "expires_after"}, {"file", "purpose"})
        if "purpose" in form and form["purpose"] not in get_args(FilePurpose):
            found.append(f"'purpose': {form['purpose']!r} is not a FilePurpose")
        if "file" in form and not isinstance(form["file"], dict):
            found.append("'file': not a file part")
    return [f"{label}: {p}" for p in found]


def answer_problems(op: str | None, status: int, content_type: str, raw: bytes) -> list[str]:
    """Why the SDK's models refuse the answer to ``op`` (an error: ``ErrorResponse``)."""
    if op is None:
        return []
    name = "ErrorResponse" if status >= 400 else RESPONSES[op]
    if name is None:
        return []
    label = f"{op} -> {status} (sdk)"
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return [f"{label}: content type {content_type!r} is not JSON"]
    try:
        body = json.loads(raw)
    except ValueError:
        return [f"{label}: body is not JSON"]
    return [f"{label}: {p}" for p in response_problems(name, body)]


# ---------------------------------------------------------------------- batch lines


def batch_input_problems(line: Any) -> list[str]:
    """One batch input line: exactly the four keys, POST /v1/embeddings, an embeddings body."""
    if not isinstance(line, dict):
        return ["<root>: not an object"]
    keys = {"custom_id", "method", "url", "body"}
    found = _closed_keys(line, keys, keys)
    if not isinstance(line.get("custom_id"), str):
        found.append("'custom_id': not a string")
    if line.get("method") != "POST":
        found.append("'method': not 'POST'")
    if line.get("url") != "/v1/embeddings":
        found.append("'url': not '/v1/embeddings'")
    return found + [f"'body'/{p}" for p in params_problems(EmbeddingCreateParams, line.get("body"))]


def batch_line_problems(line: Any) -> list[str]:
    """One output or error file line: its envelope, and the body of its response."""
    if not isinstance(line, dict):
        return ["<root>: not an object"]
    keys = {"id", "custom_id", "response", "error"}
    found = _closed_keys(line, keys, keys)
    for key in ("id", "custom_id"):
        if not isinstance(line.get(key), str):
            found.append(f"{_loc((key,))}: not a string")
    response, error = line.get("response"), line.get("error")
    if (response is None) == (error is None):
        found.append("exactly one of 'response' and 'error' must be set")
    if isinstance(error, dict):
        found += _closed_keys(error, {"code", "message"}, {"code", "message"})
        found += [f"'error': {k} is not a string" for k in ("code", "message")
                  if not isinstance(error.get(k), str)]  # fmt: skip
    if isinstance(response, dict):
        found += _closed_keys(
            response, {"status_code", "request_id", "body"}, {"status_code", "request_id", "body"}
        )
        status = response.get("status_code")
        if not isinstance(status, int) or isinstance(status, bool):
            found.append("'response'/'status_code': not an integer")
        if not isinstance(response.get("request_id"), str):
            found.append("'response'/'request_id': not a string")
        name = "CreateEmbeddingResponse" if status == 200 else "ErrorResponse"
        found += [f"'response'/'body'/{p}" for p in response_problems(name, response.get("body"))]
    elif response is not None:
        found.append("'response': not an object")
    return found


# ------------------------------------------------------- the YAML, then the SDK


def validate_response(name: str, body: Any) -> None:
    """Raise (``REFUSED``) unless ``body`` fits schema ``name``: the YAML's, where it exists,
    and the SDK's always."""
    if schemas.available():
        schemas.validate_response(name, body)
    _raise(response_problems(name, body), name)


def validate_batch_input(line: Any) -> None:
    """Raise (``REFUSED``) unless ``line`` is a batch input line of an embeddings request."""
    if schemas.available():
        schemas.validate_batch_input(line)
    _raise(batch_input_problems(line), "batch input line")


def validate_batch_line(line: Any) -> None:
    """Raise (``REFUSED``) unless ``line`` is a valid output or error file line."""
    if schemas.available():
        schemas.validate_batch_line(line)
    _raise(batch_line_problems(line), "batch output line")
