"""The official ``openai`` SDK drives the emulator, and every answer fits the SDK's own models.

Each raw response body is validated with the SDK's pydantic model in strict mode
(``model_validate(..., strict=True)``: no coercion, unlike the SDK's lenient default
construction). The SDK talks through the validating proxy, so its requests double as
a check that the wire checker accepts what OpenAI's own client sends. None of this
needs the published YAML: without it the proxy referees with the SDK's types alone.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import referee
from emulator_client import KEY, FakeClock, embedding_line, jsonl, running
from openapi_edge import SpecProxy, spec_proxy

from embedd.emulator import embed_text
from embedd.openai.batchlines import decode_embedding

openai = pytest.importorskip("openai")
from openai.types import Batch, CreateEmbeddingResponse, FileDeleted, FileObject  # noqa: E402

LARGE = "text-embedding-3-large"


@asynccontextmanager
async def sdk(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Any, SpecProxy]]:
    """An AsyncOpenAI client (no retries) behind the validating proxy, on a fresh emulator."""
    async with (
        running(tmp_path, **settings) as (emu, _),
        spec_proxy(emu.url) as proxy,
        openai.AsyncOpenAI(base_url=proxy.url, api_key=KEY, max_retries=0) as client,
    ):
        yield client, proxy


def raw_json(raw: Any) -> Any:
    """The JSON body of an SDK raw response, as it came over the wire."""
    return json.loads(raw.http_response.content)


async def test_files_fit_the_sdk_models(tmp_path: Path) -> None:
    """files.create/retrieve/content/delete answers validate strictly as FileObject/FileDeleted."""
    content = jsonl(embedding_line(f"r{i}", f"line {i}") for i in range(3))
    async with sdk(tmp_path) as (client, proxy):
        raw = await client.files.with_raw_response.create(
            file=("input.jsonl", content, "application/jsonl"), purpose="batch"
        )
        created = FileObject.model_validate(raw_json(raw), strict=True)
        assert (created.purpose, created.bytes, created.filename) == (
            "batch",
            len(content),
            "input.jsonl",
        )
        raw = await client.files.with_raw_response.retrieve(created.id)
        assert FileObject.model_validate(raw_json(raw), strict=True) == created
        assert (await client.files.content(created.id)).content == content
        listed = [f.id async for f in client.files.list(purpose="batch")]
        assert listed == [created.id]
        raw = await client.files.with_raw_response.delete(created.id)
        deleted = FileDeleted.model_validate(raw_json(raw), strict=True)
        assert (deleted.id, deleted.deleted) == (created.id, True)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.files.retrieve(created.id)
    assert missing.value.status_code == 404
    assert proxy.problems == []


async def test_batches_fit_the_sdk_models(tmp_path: Path) -> None:
    """batches.create/retrieve/list (paged)/cancel answers validate strictly as Batch."""
    clock = FakeClock()
    phases = {"validating_s": 1, "in_progress_s": 1, "finalizing_s": 1}
    async with sdk(tmp_path, clock=clock, **phases) as (client, proxy):
        upload = await client.files.create(
            file=("in.jsonl", jsonl(embedding_line(f"r{i}", f"t {i}") for i in range(4))),
            purpose="batch",
        )
        created = []
        for n in range(5):
            raw = await client.batches.with_raw_response.create(
                input_file_id=upload.id,
                endpoint="/v1/embeddings",
                completion_window="24h",
                metadata={"embedd_shard": f"s{n}"},
            )
            batch = Batch.model_validate(raw_json(raw), strict=True)
            assert (batch.status, batch.metadata) == ("validating", {"embedd_shard": f"s{n}"})
            created.append(batch.id)
            clock.advance(0.25)
        raw = await client.batches.with_raw_response.cancel(created[-1])
        assert Batch.model_validate(raw_json(raw), strict=True).status == "cancelling"
        clock.advance(5)
        # Page size 2 for 5 batches: the SDK follows `after` cursors for three pages.
        listed = [b.id async for b in client.batches.list(limit=2)]
        assert listed == created[::-1]
        pages = proxy.of("listBatches")
        assert len(pages) == 3
        for page in pages:
            for item in page.json()["data"]:
                Batch.model_validate(item, strict=True)
        raw = await client.batches.with_raw_response.retrieve(created[0])
        done = Batch.model_validate(raw_json(raw), strict=True)
        assert done.status == "completed"
        assert done.request_counts is not None
        assert done.request_counts.completed == 4
        cancelled = await client.batches.retrieve(created[-1])
        assert cancelled.status == "cancelled"
        for file_id in (done.output_file_id, cancelled.error_file_id):
            assert file_id is not None
            data = (await client.files.content(file_id)).content
            lines = [json.loads(line) for line in data.splitlines()]
            assert len(lines) == 4
            for line in lines:
                referee.validate_batch_line(line)
    assert proxy.problems == []


async def test_embeddings_fit_the_sdk_models(tmp_path: Path) -> None:
    """Float and base64 answers, with and without dimensions, validate strictly."""
    texts = ["the quick brown fox", "jumps over the lazy dog"]
    async with sdk(tmp_path) as (client, proxy):
        for dims in (None, 256):
            extra = {} if dims is None else {"dimensions": dims}
            raw = await client.embeddings.with_raw_response.create(
                input=texts, model=LARGE, encoding_format="float", **extra
            )
            floats = CreateEmbeddingResponse.model_validate(raw_json(raw), strict=True)
            assert [len(item.embedding) for item in floats.data] == [dims or 3072] * 2
            assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
            b64 = await client.embeddings.create(
                input=texts, model=LARGE, encoding_format="base64", **extra
            )
            # Asked for explicitly, base64 comes back untouched as a string.
            for as_float, as_b64 in zip(floats.data, b64.data, strict=True):
                assert isinstance(as_b64.embedding, str)
                np.testing.assert_array_equal(
                    decode_embedding(as_b64.embedding, dims or 3072),
                    np.asarray(as_float.embedding, dtype=np.float32),
                )
    assert proxy.problems == []


async def test_sdk_base64_decoding_equals_embedds(tmp_path: Path) -> None:
    """The SDK's own base64 decoding of an emulator vector equals embedd's and embed_text's."""
    text = "contract tests keep the emulator honest"
    async with sdk(tmp_path) as (client, proxy):
        # Without encoding_format the SDK asks for base64 and decodes it itself.
        raw = await client.embeddings.with_raw_response.create(
            input=text, model=LARGE, dimensions=1024
        )
        decoded_by_sdk = raw.parse().data[0].embedding
    (request,) = proxy.of("createEmbedding")
    assert request.request_json["encoding_format"] == "base64"
    wire = raw_json(raw)["data"][0]["embedding"]
    assert isinstance(wire, str)
    ours = decode_embedding(wire, 1024)
    np.testing.assert_array_equal(np.asarray(decoded_by_sdk, dtype=np.float32), ours)
    np.testing.assert_array_equal(ours, embed_text(text, 1024))
    decoded = {**raw_json(raw), "data": [{**raw_json(raw)["data"][0], "embedding": decoded_by_sdk}]}
    CreateEmbeddingResponse.model_validate(decoded, strict=True)


async def test_sdk_maps_emulator_errors(tmp_path: Path) -> None:
    """Emulator refusals reach the SDK as its typed errors, with OpenAI's code and param."""
    async with sdk(tmp_path) as (client, proxy):
        with pytest.raises(openai.NotFoundError) as model:
            await client.embeddings.create(input="x", model="text-embedding-9")
        with pytest.raises(openai.BadRequestError) as dims:
            await client.embeddings.create(input="x", model=LARGE, dimensions=4000)
        with pytest.raises(openai.NotFoundError) as batch:
            await client.batches.retrieve("batch_missing")
        bad_key = openai.AsyncOpenAI(base_url=proxy.url, api_key="not-a-key", max_retries=0)
        async with bad_key:
            with pytest.raises(openai.AuthenticationError) as auth:
                await bad_key.files.list()
    assert (model.value.code, model.value.param) == ("model_not_found", "model")
    assert (dims.value.status_code, dims.value.param) == (400, "dimensions")
    assert batch.value.status_code == 404
    assert auth.value.code == "invalid_api_key"
    assert proxy.problems == []
