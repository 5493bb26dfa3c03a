"""Every emulator response fits OpenAI's published schemas (SPEC §7 latitude only) and
the official SDK's models (strict, closed). Only the test of the YAML transform itself
needs the published file; the rest run everywhere, refereed by the SDK at least."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referee
import schemas
from emulator_client import FakeClock, embedding_line, jsonl, running
from openai.types import EmbeddingCreateParams

needs_yaml = pytest.mark.skipif(not schemas.available(), reason=schemas.MISSING)


@needs_yaml
def test_transform_keeps_the_schema_strict() -> None:
    """The null latitude does not let a wrong enum or a missing required key through."""
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate_response(
            "DeleteFileResponse", {"id": "f", "object": "batch", "deleted": True}
        )
    with pytest.raises(jsonschema.ValidationError):
        schemas.validate_response("Batch", {"id": "b", "object": "batch"})


async def test_files_and_batches_fit_their_schemas(tmp_path: Path) -> None:
    """File, list, batch (every status on the walk), cancel and delete responses validate."""
    clock = FakeClock()
    settings: dict[str, Any] = {"validating_s": 1, "in_progress_s": 1, "finalizing_s": 1}
    async with running(tmp_path, clock=clock, **settings) as (_, api):
        up = await api.upload(jsonl(embedding_line(f"r{i}", f"doc {i}") for i in range(4)))
        referee.validate_response("OpenAIFile", up.body)
        referee.validate_response(
            "OpenAIFile", (await api.call("GET", f"/files/{up.body['id']}")).body
        )
        referee.validate_response("ListFilesResponse", (await api.call("GET", "/files")).body)
        batch = (await api.create_batch(up.body["id"], {"shard": "a"})).body
        seen = set()
        for _ in range(4):
            body = (await api.call("GET", f"/batches/{batch['id']}")).body
            referee.validate_response("Batch", body)
            seen.add(body["status"])
            clock.advance(1)
        assert seen == {"validating", "in_progress", "finalizing", "completed"}
        for line in await api.lines(body["output_file_id"]):
            referee.validate_batch_line(line)
        other = (await api.create_batch(up.body["id"])).body
        cancelled = (await api.call("POST", f"/batches/{other['id']}/cancel")).body
        referee.validate_response("Batch", cancelled)
        clock.advance(2)
        listed = (await api.call("GET", "/batches", params={"limit": 1})).body
        referee.validate_response("ListBatchesResponse", listed)
        for line in await api.lines(listed["data"][0]["error_file_id"]):
            referee.validate_batch_line(line)
        deleted = (await api.call("DELETE", f"/files/{up.body['id']}")).body
        referee.validate_response("DeleteFileResponse", deleted)


async def test_failed_and_expired_batches_fit(tmp_path: Path) -> None:
    """A token-limit failure, an expired batch and failed lines all validate."""
    script = {"batches": [{"outcome": "expire", "count": 1, "failed_line_rate": 0.5}]}
    async with running(tmp_path, faults=script, enqueued_token_limit=1000, in_progress_s=50) as (
        _,
        api,
    ):
        up = await api.upload(jsonl(embedding_line(f"r{i}", "x y z") for i in range(6)))
        expired = (await api.create_batch(up.body["id"])).body
        referee.validate_response("Batch", expired)
        big = await api.upload(jsonl([embedding_line("big", "word " * 2000)]))
        failed = (await api.create_batch(big.body["id"])).body
        failed = await api.wait_batch(failed["id"], {"failed"})
        referee.validate_response("Batch", failed)
        assert failed["errors"]["data"][0]["code"] == "token_limit_exceeded"


async def test_embeddings_and_errors_fit(tmp_path: Path) -> None:
    """Float and base64 embedding responses and error bodies validate."""
    async with running(tmp_path) as (_, api):
        request = {"model": "text-embedding-3-small", "input": ["a b", "c"], "dimensions": 64}
        if schemas.available():
            schemas.validate_request("CreateEmbeddingRequest", request)
        assert referee.params_problems(EmbeddingCreateParams, request) == []
        floats = (await api.call("POST", "/embeddings", json_body=request)).body
        referee.validate_response("CreateEmbeddingResponse", floats)
        b64 = await api.call(
            "POST", "/embeddings", json_body={**request, "encoding_format": "base64"}
        )
        referee.validate_response("CreateEmbeddingResponse", b64.body)
        for item in b64.body["data"]:
            assert isinstance(item["embedding"], str)
            assert len(base64.b64decode(item["embedding"])) == 4 * 64
        errors = [
            await api.call("POST", "/embeddings", json_body={"model": "nope", "input": "x"}),
            await api.call("GET", "/files", key=None),
            await api.call("GET", "/batches/batch_missing"),
            await api.call("GET", "/nothing-here"),
        ]
        for reply in errors:
            assert reply.status >= 400
            referee.validate_response("ErrorResponse", reply.body)


async def real_bodies(tmp_path: Path) -> dict[str, Any]:
    """One real emulator answer for each response schema embedd reads."""
    async with running(tmp_path) as (_, api):
        up = await api.upload(jsonl([embedding_line("r1", "one"), embedding_line("r2", "two")]))
        batch = (await api.create_batch(up.body["id"], {"embedd_shard": "s"})).body
        done = await api.wait_batch(batch["id"], {"completed"})
        request = {"model": "text-embedding-3-large", "input": "x", "dimensions": 8}
        bodies = {
            "Batch": done,
            "ListBatchesResponse": (await api.call("GET", "/batches")).body,
            "OpenAIFile": up.body,
            "ListFilesResponse": (await api.call("GET", "/files")).body,
            "CreateEmbeddingResponse": (
                await api.call("POST", "/embeddings", json_body=request)
            ).body,
            "ErrorResponse": (await api.call("GET", "/batches/batch_missing")).body,
            "DeleteFileResponse": (await api.call("DELETE", f"/files/{up.body['id']}")).body,
        }
        line = (await api.lines(done["output_file_id"]))[0]
    return {**bodies, "line": line}


def _required(name: str) -> list[str]:
    """The keys schema ``name`` requires: the SDK's (and the YAML's, where it exists)."""
    keys = set(referee.required_keys(name))
    if schemas.available():
        keys |= set(schemas.spec()["components"]["schemas"][name]["required"])
    return sorted(keys)


async def test_dropping_or_renaming_a_field_fails(tmp_path: Path) -> None:
    """Deep copies of real answers with one required key dropped, or any key renamed, fail."""
    bodies = await real_bodies(tmp_path)
    line = bodies.pop("line")
    assert set(bodies) == set(schemas.RESPONSE_SCHEMAS)
    for name, body in bodies.items():
        referee.validate_response(name, body)
        for key in _required(name):
            broken = copy.deepcopy(body)
            del broken[key]
            with pytest.raises(referee.REFUSED, match=repr(key)):
                referee.validate_response(name, broken)
        for key in body:
            renamed = copy.deepcopy(body)
            renamed[key + "_renamed"] = renamed.pop(key)
            with pytest.raises(referee.REFUSED):
                referee.validate_response(name, renamed)
    # The example the issue asks for, spelled out: a Batch without its input file.
    batch = copy.deepcopy(bodies["Batch"])
    del batch["input_file_id"]
    with pytest.raises(referee.REFUSED, match="'input_file_id'"):
        referee.validate_response("Batch", batch)
    # Nested too: an output line whose embedding response lost its usage.
    referee.validate_batch_line(line)
    broken_line = copy.deepcopy(line)
    del broken_line["response"]["body"]["usage"]
    with pytest.raises(referee.REFUSED, match="'usage'"):
        referee.validate_batch_line(broken_line)
