"""Validate bodies against OpenAI's published OpenAPI description (jsonschema 2020-12).

The YAML (~3 MB) is loaded once per process. Requests and batch input lines are
checked against the document as written. Responses and batch output lines are
checked against a copy transformed the way SPEC §7 allows: every typed property may
also be ``null`` (the published file leaves out the ``null`` the real API sends), and
an embedding may be a base64 string. That copy is also *closed*: an object schema
that lists its properties accepts no other key, so a renamed field is caught even
where the renamed key is optional.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
OPENAPI = SHARED / "openai-openapi.yaml"
BATCH_LINES = SHARED / "openai-batch-lines.yaml"
MISSING = f"OpenAI's published API description is not in {SHARED} (CI has it)"

# The response schemas embedd reads; each is closed (see the module docstring).
RESPONSE_SCHEMAS = (
    "Batch",
    "ListBatchesResponse",
    "OpenAIFile",
    "ListFilesResponse",
    "DeleteFileResponse",
    "CreateEmbeddingResponse",
    "ErrorResponse",
)


def available() -> bool:
    """Whether the published description is present next to the repository."""
    return OPENAPI.is_file() and BATCH_LINES.is_file()


def _load(path: Path) -> Any:
    with path.open("rb") as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506


def _nullable(node: Any) -> Any:
    """Let every typed property be null; honour OpenAPI 3.0's ``nullable: true``."""
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for schema in props.values():
                if isinstance(schema, dict) and isinstance(schema.get("type"), str):
                    schema["type"] = [schema["type"], "null"]
                    if "enum" in schema:
                        schema["enum"] = [*schema["enum"], None]
        if node.get("nullable") is True and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for value in node.values():
            _nullable(value)
    elif isinstance(node, list):
        for value in node:
            _nullable(value)
    return node


def _close(node: Any, schemas: dict[str, Any], seen: set[str]) -> None:
    """Forbid unlisted keys in every object schema reachable from ``node``.

    Safe only where no ``allOf`` combines object schemas; the reachable response
    schemas have none (``anyOf`` branches are checked one at a time, so closing them
    is fine).
    """
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                _close(schemas[name], schemas, seen)
        assert "allOf" not in node, "closing an allOf schema would reject valid bodies"
        if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close(value, schemas, seen)
    elif isinstance(node, list):
        for value in node:
            _close(value, schemas, seen)


@cache
def _documents() -> tuple[Any, Any, Any, Any]:
    """(spec as written, relaxed+closed spec, batch lines as written, relaxed+closed)."""
    spec = _load(OPENAPI)
    loose = _nullable(copy.deepcopy(spec))
    embedding = loose["components"]["schemas"]["Embedding"]["properties"]
    embedding["embedding"] = {"anyOf": [embedding["embedding"], {"type": "string"}]}
    schemas = loose["components"]["schemas"]
    seen = set(RESPONSE_SCHEMAS)
    for name in RESPONSE_SCHEMAS:
        _close(schemas[name], schemas, seen)
    lines = _load(BATCH_LINES)
    loose_lines = _nullable(copy.deepcopy(lines))
    _close(loose_lines["schemas"]["BatchRequestOutput"], {}, set())
    return spec, loose, lines, loose_lines


def spec() -> Any:
    """The published description as written (a parsed YAML document; do not modify)."""
    return _documents()[0]


def escape(segment: str) -> str:
    """One JSON-pointer segment (``/v1/files`` becomes ``~1v1~1files``)."""
    return segment.replace("~", "~0").replace("/", "~1")


def pointer(*segments: str) -> str:
    """A JSON pointer built from raw segments."""
    return "".join("/" + escape(s) for s in segments)


@cache
def _registry() -> Registry[Any]:
    spec_doc, loose_doc, lines_doc, loose_lines = _documents()
    return Registry().with_resources(
        (uri, Resource.from_contents(doc, default_specification=DRAFT202012))
        for uri, doc in (
            ("urn:openai", spec_doc),
            ("urn:openai-loose", loose_doc),
            ("urn:lines", lines_doc),
            ("urn:lines-loose", loose_lines),
        )
    )


def _ref(where: str, *, loose: bool, lines: bool = False) -> dict[str, str]:
    root = ("urn:lines" if lines else "urn:openai") + ("-loose" if loose else "")
    return {"$ref": f"{root}#{where}"}


@cache
def validator_at(where: str, *, loose: bool, lines: bool = False) -> Draft202012Validator:
    """A validator for the schema at JSON pointer ``where`` in one of the documents."""
    return Draft202012Validator(_ref(where, loose=loose, lines=lines), registry=_registry())


@cache
def _batch_input_validator() -> Draft202012Validator:
    """``BatchRequestInput`` plus what it leaves unsaid: the keys, the URL, the body."""
    schema = {
        "allOf": [_ref(pointer("schemas", "BatchRequestInput"), loose=False, lines=True)],
        "required": ["custom_id", "method", "url", "body"],
        "propertyNames": {"enum": ["custom_id", "method", "url", "body"]},
        "properties": {
            "url": {"const": "/v1/embeddings"},
            "body": _ref(pointer("components", "schemas", "CreateEmbeddingRequest"), loose=False),
        },
    }
    return Draft202012Validator(schema, registry=_registry())


def problems(validator: Draft202012Validator, body: Any) -> list[str]:
    """Every violation of ``body``, as ``path: message`` lines (empty when it fits)."""
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(body)
    ]


def validate_request(schema_name: str, body: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` fits the schema as written."""
    validator_at(pointer("components", "schemas", schema_name), loose=False).validate(body)


def validate_response(schema_name: str, body: Any) -> None:
    """Raise unless ``body`` fits the (closed) schema, with the allowed ``null``/base64 latitude."""
    validator_at(pointer("components", "schemas", schema_name), loose=True).validate(body)


def validate_batch_input(line: Any) -> None:
    """Check one batch input line: ``BatchRequestInput``, and its body as an embeddings request.

    The published ``BatchRequestInput`` names neither ``body`` nor any required key,
    so the four keys, the URL and the body's ``CreateEmbeddingRequest`` are added here.
    """
    _batch_input_validator().validate(line)


def validate_batch_line(line: Any) -> None:
    """Check one output or error file line against ``BatchRequestOutput``.

    A response's ``body`` is what ``/v1/embeddings`` answers: a
    ``CreateEmbeddingResponse`` for status 200, else an ``ErrorResponse``.
    """
    validator_at(pointer("schemas", "BatchRequestOutput"), loose=True, lines=True).validate(line)
    response = line.get("response")
    if isinstance(response, dict) and "body" in response:
        name = "CreateEmbeddingResponse" if response.get("status_code") == 200 else "ErrorResponse"
        validate_response(name, response["body"])
