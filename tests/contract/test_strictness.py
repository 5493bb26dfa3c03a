"""The emulator rejects what OpenAI rejects, with OpenAI's status and error body (SPEC §7).

Two kinds of check. Differential: for request bodies, the published schema is the
oracle: a body the schema refuses must be refused by the emulator with a 400
``invalid_request_error``, and a body it accepts (within the documented limits) must
be served. Each body carries the schema's verdict, written out, so these run in a
fresh clone too; where the YAML exists a test checks every verdict against it, and
the SDK's parameter types cross-check them everywhere. Limits the schema cannot express (file size, inputs a batch) are checked
one by one. Rejections already covered in ``tests/test_emulator.py`` (per-request
inputs and tokens, per-input tokens, lines a batch file, unknown model, 401) are not
repeated here, but every error body here is validated as an ``ErrorResponse``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import referee
import schemas
from emulator_client import Reply, embedding_line, jsonl, running
from openai.types import BatchCreateParams, EmbeddingCreateParams

from embedd.emulator.validation import MAX_BATCH_BYTES

# The differential tests run everywhere from the verdicts written below; one test
# checks those verdicts against the published schema, and needs the file.
needs_yaml = pytest.mark.skipif(not schemas.available(), reason=schemas.MISSING)

LARGE = "text-embedding-3-large"
GOOD = {"model": LARGE, "input": "hello"}

# Each body with its verdict under the published schema (checked against the YAML where
# it exists, and against the SDK's types everywhere): served (True) or refused.
EMBEDDING_BODIES: list[tuple[Any, bool]] = [
    (GOOD, True),
    (
        {**GOOD, "input": ["a", "b"], "encoding_format": "base64", "dimensions": 8, "user": "u-1"},
        True,
    ),
    ({**GOOD, "input": [1, 2, 3]}, True),
    ({**GOOD, "input": [[1, 2], [3]]}, True),
    ({**GOOD, "encoding_format": "float"}, True),
    ({**GOOD, "encoding_format": None}, False),
    ({**GOOD, "encoding_format": ""}, False),
    ({**GOOD, "encoding_format": "FLOAT"}, False),
    ({**GOOD, "dimensions": "8"}, False),
    ({**GOOD, "dimensions": True}, False),
    ({**GOOD, "dimensions": -1}, False),
    ({**GOOD, "dimensions": None}, False),
    ({**GOOD, "user": 5}, False),
    ({**GOOD, "user": None}, False),
    ({**GOOD, "model": 5}, False),
    ({**GOOD, "model": None}, False),
    ({**GOOD, "input": None}, False),
    ({**GOOD, "input": 7}, False),
    ({**GOOD, "input": [[]]}, False),
    ({**GOOD, "input": [["a"]]}, False),
    ({**GOOD, "input": {"text": "a"}}, False),
    ({**GOOD, "input": [1, "a"]}, False),
    ({**GOOD, "stream": True}, False),
    ({"input": "hello"}, False),
    ({"model": LARGE}, False),
    (["hello"], False),
    ("hello", False),
]


def spec_accepts(schema: str, body: Any) -> bool:
    """Whether the published request schema accepts ``body`` as written."""
    validator = schemas.validator_at(schemas.pointer("components", "schemas", schema), loose=False)
    return not schemas.problems(validator, body)


def assert_openai_error(reply: Reply, status: int) -> dict[str, Any]:
    """The status is ``status`` and the body is OpenAI's ErrorResponse with all four keys."""
    assert reply.status == status, reply.body
    referee.validate_response("ErrorResponse", reply.body)
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert reply.body["error"]["message"]
    return dict(reply.body["error"])


@pytest.mark.parametrize(
    ("body", "accepted"), EMBEDDING_BODIES, ids=[json.dumps(b)[:60] for b, _ in EMBEDDING_BODIES]
)
async def test_embeddings_agree_with_the_schema(tmp_path: Path, body: Any, accepted: bool) -> None:
    """An embeddings body is served exactly when the published schema accepts it."""
    async with running(tmp_path) as (_, api):
        reply = await api.call("POST", "/embeddings", json_body=body)
    if accepted:
        assert reply.status == 200, reply.body
        referee.validate_response("CreateEmbeddingResponse", reply.body)
    else:
        assert assert_openai_error(reply, 400)["type"] == "invalid_request_error"


def batch_bodies(file_id: str) -> list[tuple[dict[str, Any], bool]]:
    """Batch-create bodies around a valid one, each changing one field, with the verdict
    of the published schema (served or refused)."""
    good = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    expiry = {"anchor": "created_at", "seconds": 3600}
    return [
        (good, True),
        ({**good, "metadata": {"embedd_shard": "s"}}, True),
        ({**good, "metadata": None}, True),
        ({**good, "metadata": {"k": 1}}, False),
        ({**good, "metadata": ["k"]}, False),
        ({**good, "output_expires_after": expiry}, True),
        ({**good, "output_expires_after": {**expiry, "seconds": 60}}, False),
        ({**good, "output_expires_after": {**expiry, "seconds": 3_000_000}}, False),
        ({**good, "output_expires_after": {**expiry, "anchor": "now"}}, False),
        ({**good, "output_expires_after": {"anchor": "created_at"}}, False),
        ({**good, "output_expires_after": "1h"}, False),
        ({**good, "completion_window": "48h"}, False),
        ({**good, "completion_window": None}, False),
        ({**good, "endpoint": "/v1/embedding"}, False),
        ({**good, "input_file_id": 12}, False),
        ({key: value for key, value in good.items() if key != "endpoint"}, False),
        ({key: value for key, value in good.items() if key != "input_file_id"}, False),
    ]


async def test_batch_create_agrees_with_the_schema(tmp_path: Path) -> None:
    """A batch-create body is accepted exactly when the published schema accepts it."""
    async with running(tmp_path) as (_, api):
        upload = await api.upload(jsonl([embedding_line("a", "x")]))
        disagree = []
        for body, accepted in batch_bodies(upload.body["id"]):
            reply = await api.call("POST", "/batches", json_body=body)
            if reply.status != (200 if accepted else 400):
                disagree.append((body, reply.status))
            elif accepted:
                referee.validate_response("Batch", reply.body)
            else:
                assert assert_openai_error(reply, 400)["type"] == "invalid_request_error"
    assert disagree == []


@needs_yaml
def test_the_written_verdicts_are_the_published_schemas() -> None:
    """Every verdict above is what the published schema says of its body."""
    wrong = [
        (schema, body)
        for schema, cases in (
            ("CreateEmbeddingRequest", EMBEDDING_BODIES),
            ("CreateBatchRequest", batch_bodies("file-x")),
        )
        for body, accepted in cases
        if spec_accepts(schema, body) != accepted
    ]
    assert wrong == []


def test_the_written_verdicts_agree_with_the_sdk_types() -> None:
    """Where the SDK's parameter types can judge, they agree: every body served is one
    they accept, and every body they refuse is refused. (They accept a few bodies the
    schema refuses — an empty token array, a negative size — which they cannot express.)"""
    for params, cases in (
        (EmbeddingCreateParams, EMBEDDING_BODIES),
        (BatchCreateParams, batch_bodies("file-x")),
    ):
        for body, accepted in cases:
            sdk_refuses = bool(referee.params_problems(params, body))
            assert not (accepted and sdk_refuses), body
    refused_by_sdk = [
        b for b, _ in EMBEDDING_BODIES if referee.params_problems(EmbeddingCreateParams, b)
    ]
    assert len(refused_by_sdk) >= 18  # the SDK's types judge most of them


async def _big_file(limit: int) -> AsyncIterator[bytes]:
    """Valid JSONL lines, a little over ``limit`` bytes in all, in 1 MiB chunks."""
    line = (json.dumps(embedding_line("x", "y" * 1000)) + "\n").encode()
    chunk = line * ((1 << 20) // len(line))
    sent = 0
    while sent <= limit:
        yield chunk
        sent += len(chunk)


async def test_batch_file_over_200_mb_is_refused(tmp_path: Path) -> None:
    """An upload over 200 MB is refused with a 400 naming the file, and nothing is kept."""
    async with running(tmp_path) as (_, api):
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", _big_file(MAX_BATCH_BYTES), filename="big.jsonl")
        reply = await api.call("POST", "/files", data=form)
        error = assert_openai_error(reply, 400)
        assert (error["type"], error["param"]) == ("invalid_request_error", "file")
        assert "too large" in error["message"]
        assert (await api.call("GET", "/files")).body["data"] == []
    assert not list((tmp_path / "files").glob("*.part"))


async def test_batch_file_over_50000_inputs_is_refused(tmp_path: Path) -> None:
    """An embeddings batch file with over 50,000 inputs in few lines is refused with a 400."""
    lines = [embedding_line(f"r{i}", ["x"] * 2048) for i in range(25)]  # 51,200 inputs
    async with running(tmp_path) as (_, api):
        reply = await api.upload(jsonl(lines))
        error = assert_openai_error(reply, 400)
    assert error["param"] == "file"
    assert "50000" in error["message"]


async def test_upload_form_rejections(tmp_path: Path) -> None:
    """A file upload without purpose or file, or not multipart, is a 400 in OpenAI's shape."""
    async with running(tmp_path) as (_, api):
        no_purpose = aiohttp.FormData()
        no_purpose.add_field("file", jsonl([embedding_line("a", "x")]), filename="a.jsonl")
        no_file = aiohttp.FormData()
        no_file.add_field("purpose", "batch")
        replies = [
            await api.call("POST", "/files", data=no_purpose),
            await api.call("POST", "/files", data=no_file),
            await api.call("POST", "/files", json_body={"purpose": "batch"}),
        ]
        for reply in replies:
            assert assert_openai_error(reply, 400)["type"] == "invalid_request_error"


async def test_list_parameter_rejections(tmp_path: Path) -> None:
    """List limits outside the documented ranges are a 400 naming the parameter."""
    async with running(tmp_path) as (_, api):
        for path, params in [
            ("/batches", {"limit": "0"}),
            ("/batches", {"limit": "101"}),
            ("/batches", {"limit": "ten"}),
            ("/files", {"order": "sideways"}),
        ]:
            error = assert_openai_error(await api.call("GET", path, params=params), 400)
            assert error["param"] == next(iter(params)), (path, params)


async def test_refusals_of_missing_things(tmp_path: Path) -> None:
    """Unknown ids and routes are 404s, a cancel of a finished batch a 409, all in OpenAI's shape."""
    async with running(tmp_path) as (_, api):
        upload = await api.upload(jsonl([embedding_line("a", "x")]))
        batch = (await api.create_batch(upload.body["id"])).body
        await api.wait_batch(batch["id"], {"completed"})
        assert_openai_error(await api.call("POST", f"/batches/{batch['id']}/cancel"), 409)
        for method, path in [
            ("GET", "/files/file-nope"),
            ("GET", "/files/file-nope/content"),
            ("DELETE", "/files/file-nope"),
            ("GET", "/batches/batch_nope"),
            ("POST", "/batches/batch_nope/cancel"),
            ("GET", "/nothing"),
        ]:
            assert_openai_error(await api.call(method, path), 404)
