"""Check real HTTP traffic against the operations of OpenAI's published description.

:class:`SpecProxy` sits at the network edge between the client under test and the
emulator. For each request it finds the operation its method and path name, checks
the path and query parameters against the operation's ``parameters`` (no undeclared
ones), the content type and body against its ``requestBody`` schema (JSON or
multipart form), forwards the request unchanged, checks the answer against the
operation's 200 schema (or ``ErrorResponse`` for an error status), and returns it
unchanged. Violations are collected in :attr:`SpecProxy.problems`, never raised inside
the server, where the client would only see a 500 and retry.

The matching and checking functions are pure: :func:`check_request` and
:func:`check_response` take values and return lists of problems.

Where the published YAML is absent (a fresh clone), the proxy still referees every
exchange of the operations embedd uses with the official SDK's types
(:mod:`referee`); where it exists, both referees judge.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from functools import cache
from typing import Any

import aiohttp
import referee
import schemas
from aiohttp import web

API_PREFIX = "/v1"
_FORWARDED = ("Authorization", "Content-Type", "OpenAI-Organization", "OpenAI-Project")
_HOP_BY_HOP = frozenset(
    {"content-length", "content-encoding", "transfer-encoding", "connection", "keep-alive"}
)


@dataclass(frozen=True)
class Operation:
    """One operation of the description: where it lives and what it declares."""

    operation_id: str
    method: str
    template: str
    pattern: re.Pattern[str]
    node: dict[str, Any]

    def at(self, *segments: str) -> str:
        """A JSON pointer into this operation."""
        return schemas.pointer("paths", self.template, self.method, *segments)


@dataclass
class Exchange:
    """One request that passed through the proxy and what came back."""

    operation_id: str | None
    method: str
    path: str
    query: dict[str, str]
    request_json: Any
    form: dict[str, Any]
    status: int
    content_type: str
    response: bytes

    def json(self) -> Any:
        """The response body parsed as JSON."""
        return json.loads(self.response)


@cache
def operations() -> tuple[Operation, ...]:
    """Every operation in the description, with a regex for its path template."""
    found = []
    for template, item in schemas.spec()["paths"].items():
        # A few templates carry a fixed query (``?beta=true``); match on the path part.
        parts = [
            re.sub(r"^\{(\w+)\}$", r"(?P<\1>[^/]+)", seg)
            if re.fullmatch(r"\{\w+\}", seg)
            else re.escape(seg)
            for seg in template.split("?", 1)[0].split("/")
        ]
        pattern = re.compile("^" + "/".join(parts) + "$")
        for method, node in item.items():
            if method in ("get", "post", "put", "patch", "delete") and isinstance(node, dict):
                op_id = node.get("operationId") or f"{method} {template}"
                found.append(Operation(op_id, method, template, pattern, node))
    return tuple(found)


def find_operation(method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
    """The operation serving ``method`` on ``path`` (without the ``/v1`` prefix)."""
    for op in operations():
        if op.method == method.lower():
            match = op.pattern.match(path)
            if match:
                return op, match.groupdict()
    return None


def _coerce(raw: str, schema: dict[str, Any]) -> Any:
    """A query/path string as the type its schema declares (left as-is when it does not fit)."""
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        return raw
    if kind == "boolean" and raw in ("true", "false"):
        return raw == "true"
    return raw


def _check_parameters(op: Operation, location: str, given: dict[str, str], label: str) -> list[str]:
    found: list[str] = []
    declared = {
        p["name"]: (i, p)
        for i, p in enumerate(op.node.get("parameters", []))
        if p.get("in") == location
    }
    for name in given:
        if name not in declared:
            found.append(f"{label}: undeclared {location} parameter {name!r}")
    for name, (index, param) in declared.items():
        if name not in given:
            if param.get("required"):
                found.append(f"{label}: missing required {location} parameter {name!r}")
            continue
        value = _coerce(given[name], param.get("schema", {}))
        validator = schemas.validator_at(op.at("parameters", str(index), "schema"), loose=False)
        found += [f"{label}: {location} {name}: {p}" for p in schemas.problems(validator, value)]
    return found


def parse_form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data body as ``{field: text}``; file fields as ``{"filename", "bytes"}``."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    form: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        filename = part.get_filename()
        if filename is not None:
            form[str(name)] = {
                "filename": filename,
                "content_type": part.get_content_type(),
                "bytes": payload,
            }
        else:
            form[str(name)] = payload.decode() if isinstance(payload, bytes) else payload
    return form


def check_request(
    method: str, path: str, query: dict[str, str], headers: dict[str, str], raw: bytes
) -> tuple[Operation | None, Any, dict[str, Any], list[str]]:
    """Check one request; return (operation, JSON body, form fields, problems)."""
    label = f"{method} {path}"
    if not path.startswith(API_PREFIX + "/"):
        return None, None, {}, [f"{label}: not under {API_PREFIX}"]
    found = find_operation(method, path.removeprefix(API_PREFIX))
    if found is None:
        return None, None, {}, [f"{label}: no such operation in the description"]
    op, path_params = found
    label = f"{op.operation_id} ({label})"
    problems = _check_parameters(op, "path", path_params, label)
    problems += _check_parameters(op, "query", query, label)
    auth = headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
        problems.append(f"{label}: no bearer Authorization header")
    content_type = headers.get("Content-Type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    body = op.node.get("requestBody")
    json_body: Any = None
    form: dict[str, Any] = {}
    if body is None:
        if raw:
            problems.append(f"{label}: sends a body, the operation takes none")
        return op, None, {}, problems
    declared = body.get("content", {})
    if media not in declared:
        problems.append(f"{label}: content type {media!r}, expected one of {sorted(declared)}")
        return op, None, {}, problems
    validator = schemas.validator_at(op.at("requestBody", "content", media, "schema"), loose=False)
    if media == "application/json":
        try:
            json_body = json.loads(raw)
        except ValueError:
            return op, None, {}, [*problems, f"{label}: body is not JSON"]
        problems += [f"{label}: body {p}" for p in schemas.problems(validator, json_body)]
    elif media == "multipart/form-data":
        form = parse_form(content_type, raw)
        # A file part is a string of binary format in the schema.
        as_schema = {k: ("<binary>" if isinstance(v, dict) else v) for k, v in form.items()}
        problems += [f"{label}: form {p}" for p in schemas.problems(validator, as_schema)]
    return op, json_body, form, problems


def check_request_sdk(
    method: str, path: str, query: dict[str, str], headers: dict[str, str], raw: bytes
) -> tuple[str | None, Any, dict[str, Any], list[str]]:
    """Check one request with the SDK's types alone; return (operation id, JSON, form, problems)."""
    label = f"{method} {path}"
    found = referee.find_operation(method, path.removeprefix(API_PREFIX))
    if not path.startswith(API_PREFIX + "/") or found is None:
        return None, None, {}, [f"{label}: not an operation embedd uses"]
    op = found[0]
    media = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    json_body: Any = None
    form: dict[str, Any] = {}
    problems: list[str] = []
    if op == "createFile":
        if media != "multipart/form-data":
            problems.append(f"{label}: content type {media!r}, expected multipart/form-data")
        else:
            form = parse_form(headers["Content-Type"], raw)
    elif op in ("createBatch", "createEmbedding"):
        try:
            json_body = json.loads(raw)
        except ValueError:
            problems.append(f"{label}: body is not JSON")
    elif raw:
        problems.append(f"{label}: sends a body, the operation takes none")
    problems += referee.request_problems(op, query, headers, json_body, form)
    return op, json_body, form, problems


def check_response(op: Operation | None, status: int, content_type: str, raw: bytes) -> list[str]:
    """Check one answer against the operation's 200 schema or ``ErrorResponse``."""
    if op is None:
        return []
    label = f"{op.operation_id} -> {status}"
    media = content_type.split(";", 1)[0].strip().lower()
    if status >= 400:
        where = schemas.pointer("components", "schemas", "ErrorResponse")
    else:
        content = op.node.get("responses", {}).get(str(status), {}).get("content")
        if not content:
            return [f"{label}: status {status} is not documented"]
        schema = content.get("application/json", {}).get("schema", {})
        if schema.get("type") == "string":
            return []  # file content: any bytes (batch lines are checked by the tests)
        where = op.at("responses", str(status), "content", "application/json", "schema")
    if media != "application/json":
        return [f"{label}: content type {media!r} is not JSON"]
    try:
        body = json.loads(raw)
    except ValueError:
        return [f"{label}: body is not JSON"]
    validator = schemas.validator_at(where, loose=True)
    return [f"{label}: {p}" for p in schemas.problems(validator, body)]


@dataclass
class SpecProxy:
    """A validating reverse proxy in front of ``upstream`` (a base URL ending in ``/v1``)."""

    upstream: str
    url: str = ""
    exchanges: list[Exchange] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None
    # Called with the operation id before a request is forwarded (e.g. to snapshot
    # files the client is about to see change).
    on_request: Callable[[str | None], None] | None = None

    def operations_seen(self) -> set[str]:
        """The operation ids that were called."""
        return {e.operation_id for e in self.exchanges if e.operation_id}

    def of(self, operation_id: str) -> list[Exchange]:
        """The exchanges of one operation, in order."""
        return [e for e in self.exchanges if e.operation_id == operation_id]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {k: request.headers[k] for k in _FORWARDED if k in request.headers}
        query = dict(request.query)
        if len(query) != len(request.query):
            self.problems.append(f"{request.method} {request.path}: repeated query parameter")
        op: Operation | None = None
        if schemas.available():
            op, json_body, form, found = check_request(
                request.method, request.path, query, headers, raw
            )
            op_id = op.operation_id if op else None
            if op_id in referee.OPERATIONS:
                found += referee.request_problems(op_id, query, headers, json_body, form)
        else:
            op_id, json_body, form, found = check_request_sdk(
                request.method, request.path, query, headers, raw
            )
        self.problems += found
        if self.on_request is not None:
            self.on_request(op_id)
        target = self.upstream.removesuffix(API_PREFIX) + request.path_qs
        assert self.session is not None, "serve the proxy with spec_proxy()"
        async with self.session.request(
            request.method, target, headers=headers, data=raw or None
        ) as resp:
            body = await resp.read()
            out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
            status, content_type = resp.status, resp.headers.get("Content-Type", "")
        self.problems += check_response(op, status, content_type, body)
        self.problems += referee.answer_problems(op_id, status, content_type, body)
        self.exchanges.append(
            Exchange(
                op_id, request.method, request.path, query,
                json_body, form, status, content_type, body,
            )
        )  # fmt: skip
        return web.Response(status=status, body=body, headers=out_headers)


@asynccontextmanager
async def spec_proxy(upstream: str) -> AsyncIterator[SpecProxy]:
    """Serve a :class:`SpecProxy` for ``upstream`` on a loopback port; ``.url`` ends in /v1."""
    proxy = SpecProxy(upstream)
    app = web.Application(client_max_size=256 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    proxy.session = aiohttp.ClientSession()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        proxy.url = f"http://127.0.0.1:{port}{API_PREFIX}"
        yield proxy
    finally:
        await runner.cleanup()
        await proxy.session.close()
