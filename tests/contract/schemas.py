"""Validate bodies against OpenAI's published OpenAPI description (jsonschema 2020-12).

The YAML (~3 MB) is loaded once per process. Responses are checked against a copy
transformed the way SPEC §7 allows: every typed property may also be ``null`` (the
published file leaves out the ``null`` the real API sends), and an embedding may be
a base64 string. Requests are checked against the document as written.
"""

from __future__ import annotations

import copy
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
OPENAPI = SHARED / "openai-openapi.yaml"
BATCH_LINES = SHARED / "openai-batch-lines.yaml"


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


@lru_cache(maxsize=1)
def _documents() -> tuple[Any, Any, Any]:
    spec = _load(OPENAPI)
    loose = _nullable(copy.deepcopy(spec))
    embedding = loose["components"]["schemas"]["Embedding"]["properties"]
    embedding["embedding"] = {"anyOf": [embedding["embedding"], {"type": "string"}]}
    lines = _nullable(_load(BATCH_LINES))
    return spec, loose, lines


def _validator(root: Any, pointer: str) -> Draft202012Validator:
    resource = Resource.from_contents(root, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:openai", resource)
    return Draft202012Validator({"$ref": f"urn:openai#{pointer}"}, registry=registry)


@cache
def _schema_validator(name: str, loose: bool) -> Draft202012Validator:
    spec, relaxed, _ = _documents()
    return _validator(relaxed if loose else spec, f"/components/schemas/{name}")


def validate_request(schema_name: str, body: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``body`` fits the schema as written."""
    _schema_validator(schema_name, False).validate(body)


def validate_response(schema_name: str, body: Any) -> None:
    """Raise unless ``body`` fits the schema, with the allowed ``null``/base64 latitude."""
    _schema_validator(schema_name, True).validate(body)


def validate_batch_line(line: Any) -> None:
    """Check one output or error file line against ``BatchRequestOutput``."""
    _, _, lines = _documents()
    _validator(lines, "/schemas/BatchRequestOutput").validate(line)
