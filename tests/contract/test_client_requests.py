"""Every request embedd sends fits OpenAI's published description, checked on the wire.

The client under test talks to a validating proxy (``openapi_edge.SpecProxy``) in
front of the emulator, so what is checked is exactly what embedd put on the network:
method + path -> operation, path and query parameters, content type and body schema;
and every answer it read, against the operation's response schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openapi_edge
import pytest
import referee
import schemas
from emulator_client import KEY, FakeClock, running
from openapi_edge import check_request, check_response, find_operation, spec_proxy

from embedd.config import load_settings
from embedd.daemon import run_daemon
from embedd.openai.api import OpenAIClient
from embedd.openai.batchlines import encode_request_line
from embedd.openai.breaker import Breaker
from embedd.openai.limiter import Limiter
from embedd.openai.retry import RetryPolicy

# Tests of the YAML-driven wire checker itself need the published file; the client's
# traffic is refereed everywhere (by the SDK's types at least; see openapi_edge).
needs_yaml = pytest.mark.skipif(not schemas.available(), reason=schemas.MISSING)

LARGE = "text-embedding-3-large"
# Every operation the client has a method for.
CLIENT_OPERATIONS = {
    "createFile",
    "retrieveFile",
    "listFiles",
    "downloadFile",
    "deleteFile",
    "createBatch",
    "retrieveBatch",
    "listBatches",
    "cancelBatch",
    "createEmbedding",
}
JSON = {"Authorization": "Bearer sk-test-x", "Content-Type": "application/json"}


def client_for(session: aiohttp.ClientSession, url: str) -> OpenAIClient:
    """A real client with real limiter, retry policy and breaker (no retries needed)."""
    return OpenAIClient(
        session,
        url,
        KEY,
        limiter=Limiter(3000, 1_000_000),
        policy=RetryPolicy(base=0.01, cap=0.05, max_retries=1),
        breaker=Breaker(5, 1.0),
        organization="org-test",
        project="proj-test",
    )


def read_lines(data: bytes) -> list[Any]:
    """JSONL bytes as parsed objects (blank lines skipped)."""
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@needs_yaml
def test_lookup_matches_templates_to_operations() -> None:
    """Paths map to the operation the description names, with their path parameters."""
    found = find_operation("GET", "/files/file-abc/content")
    assert found is not None
    assert (found[0].operation_id, found[1]) == ("downloadFile", {"file_id": "file-abc"})
    cancel = find_operation("POST", "/batches/batch_1/cancel")
    assert cancel is not None
    assert cancel[0].operation_id == "cancelBatch"
    assert find_operation("PUT", "/batches") is None


@needs_yaml
@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "raw", "expected"),
    [
        ("GET", "/v1/batches", {"limit": "5", "order": "asc"}, JSON, b"", "undeclared query"),
        ("GET", "/v1/batches", {"limit": "many"}, JSON, b"", "query limit"),
        ("GET", "/v1/files", {"order": "sideways"}, JSON, b"", "query order"),
        ("GET", "/v1/batches", {}, {}, b"", "Authorization"),
        ("GET", "/v1/batches/b1", {}, JSON, b"{}", "takes none"),
        (
            "POST",
            "/v1/batches",
            {},
            JSON,
            b'{"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "1h"}',
            "body completion_window",
        ),
        (
            "POST",
            "/v1/batches",
            {},
            JSON,
            b'{"endpoint": "/v1/embeddings", "completion_window": "24h"}',
            "input_file_id",
        ),
        ("POST", "/v1/embeddings", {}, JSON, b'{"model": "m", "input": "x", "x": 1}', "body"),
        (
            "POST",
            "/v1/files",
            {},
            {**JSON, "Content-Type": "multipart/form-data; boundary=b"},
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
            b"{}\r\n--b--\r\n",
            "purpose",
        ),
        ("POST", "/v1/files", {}, JSON, b"{}", "content type"),
        ("GET", "/v1/models/x/y", {}, JSON, b"", "no such operation"),
    ],
)
def test_request_check_refuses_what_the_spec_refuses(
    method: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    raw: bytes,
    expected: str,
) -> None:
    """The wire check is not a rubber stamp: each kind of bad request is reported."""
    _, _, _, found = check_request(method, path, query, headers, raw)
    assert any(expected in problem for problem in found), found


@needs_yaml
def test_response_check_refuses_a_batch_without_its_file() -> None:
    """A Batch answer missing input_file_id, or an error answer not in OpenAI's shape, is reported."""
    batch = {"id": "b", "object": "batch", "endpoint": "/v1/embeddings", "status": "completed"}
    batch |= {"completion_window": "24h", "created_at": 1}
    found = find_operation("GET", "/batches/b")
    assert found is not None
    op = found[0]
    missing = check_response(op, 200, "application/json", json.dumps(batch).encode())
    assert any("input_file_id" in problem for problem in missing), missing
    good = json.dumps({**batch, "input_file_id": "f"}).encode()
    assert check_response(op, 200, "application/json", good) == []
    assert check_response(op, 404, "application/json", b'{"detail": "nope"}')
    assert check_response(op, 200, "text/html", good)


def test_encoded_request_lines_fit_batch_request_input() -> None:
    """encode_request_line writes BatchRequestInput lines whose body is a CreateEmbeddingRequest."""
    cases: list[tuple[str | list[int], str, int | None]] = [
        ("plain text", LARGE, None),
        ("with dimensions ü 中文", LARGE, 1024),
        ([15339, 1917], "text-embedding-3-small", 256),
        ("fixed-size model", "text-embedding-ada-002", 512),
    ]
    for text, model, dims in cases:
        line = json.loads(encode_request_line("c-1", text, model, dims))
        referee.validate_batch_input(line)
        assert line["body"]["encoding_format"] == "base64"
    bad = json.loads(encode_request_line("c-1", "x", LARGE, 256))
    bad["body"]["encoding"] = "base64"
    with pytest.raises(referee.REFUSED):
        referee.validate_batch_input(bad)


async def test_every_client_method_fits_the_spec(tmp_path: Path) -> None:
    """Each OpenAIClient method sends a request the description accepts and reads a valid answer."""
    clock = FakeClock()
    phases: dict[str, Any] = {"validating_s": 1, "in_progress_s": 1, "finalizing_s": 1}
    shard = tmp_path / "shard.jsonl"
    shard.write_bytes(
        b"".join(encode_request_line(f"r{i}", f"text {i}", LARGE, 256) for i in range(3))
    )
    async with (
        running(tmp_path / "emu", clock=clock, **phases) as (emu, _),
        spec_proxy(emu.url) as proxy,
        aiohttp.ClientSession() as session,
    ):
        client = client_for(session, proxy.url)
        uploaded = await client.upload_file(shard, "embedd-shard.jsonl")
        assert (await client.retrieve_file(uploaded["id"]))["id"] == uploaded["id"]
        assert uploaded["id"] in [f["id"] async for f in client.list_files()]
        kept = await client.create_batch(uploaded["id"], {"embedd_shard": "s-1"})
        clock.advance(1)  # newest first: the second batch is listed first
        dropped = await client.create_batch(uploaded["id"], {"embedd_shard": "s-2"})
        await client.cancel_batch(dropped["id"])
        clock.advance(10)
        listed = [b["id"] async for b in client.list_batches(limit=1)]
        assert listed == [dropped["id"], kept["id"]]
        assert (await client.find_batch({"embedd_shard": "s-1"}, clock() - 600))["id"] == kept["id"]
        done = await client.retrieve_batch(kept["id"])
        cancelled = await client.retrieve_batch(dropped["id"])
        assert (done["status"], cancelled["status"]) == ("completed", "cancelled")
        for file_id in (done["output_file_id"], cancelled["error_file_id"]):
            dest = tmp_path / f"{file_id}.jsonl"
            await client.download_file(file_id, dest)
            assert len(read_lines(dest.read_bytes())) == 3
        await client.embeddings(["alpha beta", "gamma"], LARGE, 256, tokens=3)
        await client.embeddings([[15339, 1917]], "text-embedding-3-small", None, tokens=2)
        assert (await client.delete_file(uploaded["id"]))["deleted"] is True
    assert proxy.problems == []
    assert proxy.operations_seen() == CLIENT_OPERATIONS
    assert any("after" in e.query for e in proxy.of("listBatches")), "paging was not exercised"
    for exchange in proxy.of("createFile"):
        assert exchange.form["purpose"] == "batch"
        for line in read_lines(exchange.form["file"]["bytes"]):
            referee.validate_batch_input(line)
    downloaded = [line for e in proxy.of("downloadFile") for line in read_lines(e.response)]
    for line in downloaded:
        referee.validate_batch_line(line)
    assert {line["error"]["code"] for line in downloaded if line["error"]} == {"batch_cancelled"}


def write_config(tmp_path: Path, base_url: str) -> Path:
    """A daemon config for a fast in-process run against ``base_url``."""
    config = tmp_path / "config.toml"
    config.write_text(
        "[spool]\n"
        f'root = "{tmp_path / "spool"}"\n'
        'scan_interval = "1s"\n'
        "[openai]\n"
        f'base_url = "{base_url}"\n'
        "dimensions = 256\n"
        "[batch]\n"
        'flush_after = "0.1s"\n'
        'poll_interval = "0.05s"\n'
    )
    return config


async def test_daemon_pipeline_requests_fit_the_spec(tmp_path: Path) -> None:
    """A whole daemon run (batch and sync lanes) sends only requests the description accepts."""
    settings = load_settings(write_config(tmp_path, "http://127.0.0.1:9/v1"), environ={})
    spool = settings.spool_root
    docs = {
        "notes.jsonl": b'{"id": "a", "text": "the first note"}\n{"id": "b", "text": "second"}\n',
        "letter.txt": "Grüße aus Köln — a letter.\n".encode(),
    }
    for folder in ("inbox", "inbox/sync", "tmp"):
        (spool / folder).mkdir(parents=True, exist_ok=True)
    for name, data in docs.items():
        (spool / "inbox" / name).write_bytes(data)
    (spool / "tmp" / "quick.txt").write_bytes(b"answer me now")
    os.rename(spool / "tmp" / "quick.txt", spool / "inbox" / "sync" / "quick.txt")
    shard_files: dict[str, bytes] = {}

    def snapshot_shards(operation_id: str | None) -> None:
        # The collector deletes a shard file once its batch is in; read it while uploading.
        if operation_id == "createFile":
            for shard in (settings.spool_state_dir / "shards").glob("*.jsonl"):
                shard_files[shard.name] = shard.read_bytes()

    async with running(tmp_path / "emu") as (emu, _), spec_proxy(emu.url) as proxy:
        proxy.on_request = snapshot_shards
        settings = load_settings(write_config(tmp_path, proxy.url), environ={})
        assert await run_daemon(settings, KEY, until_idle=True) == 0
    outbox = sorted(p.name for p in (spool / "outbox").glob("*.npy"))
    assert outbox == ["letter.txt.npy", "notes.jsonl.npy", "quick.txt.npy"]
    assert np.load(spool / "outbox" / "notes.jsonl.npy").shape == (2, 256)
    assert proxy.problems == []
    used = proxy.operations_seen()
    assert {"createFile", "createBatch", "retrieveBatch", "downloadFile"} <= used
    assert {"listBatches", "createEmbedding"} <= used
    assert used <= CLIENT_OPERATIONS
    assert all(b.request_json["metadata"]["embedd_shard"] for b in proxy.of("createBatch"))
    sent = [line for e in proxy.of("createFile") for line in read_lines(e.form["file"]["bytes"])]
    on_disk = [line for data in shard_files.values() for line in read_lines(data)]
    assert on_disk, "the submitter left no shard file to check"
    assert sorted(map(json.dumps, on_disk)) == sorted(map(json.dumps, sent))
    for line in sent:
        referee.validate_batch_input(line)
        assert line["body"]["dimensions"] == 256
    for exchange in proxy.of("downloadFile"):
        for line in read_lines(exchange.response):
            referee.validate_batch_line(line)
    for exchange in proxy.of("createEmbedding"):
        assert exchange.request_json["encoding_format"] == "base64"


@needs_yaml
def test_every_client_operation_is_in_the_description() -> None:
    """The operations the client must use all exist in the published description."""
    assert {op.operation_id for op in openapi_edge.operations()} >= CLIENT_OPERATIONS


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "raw", "expected"),
    [
        ("GET", "/v1/batches", {"limit": "5", "order": "asc"}, JSON, b"", "'order': undeclared"),
        ("GET", "/v1/batches", {"limit": "many"}, JSON, b"", "'limit'"),
        ("GET", "/v1/files", {"order": "sideways"}, JSON, b"", "'order'"),
        ("GET", "/v1/batches", {}, {}, b"", "Authorization"),
        ("GET", "/v1/batches/b1", {}, JSON, b"{}", "takes none"),
        (
            "POST",
            "/v1/batches",
            {},
            JSON,
            b'{"input_file_id": "f", "endpoint": "/v1/embeddings", "completion_window": "1h"}',
            "'completion_window'",
        ),
        (
            "POST",
            "/v1/batches",
            {},
            JSON,
            b'{"endpoint": "/v1/embeddings", "completion_window": "24h"}',
            "'input_file_id': Field required",
        ),
        ("POST", "/v1/embeddings", {}, JSON, b'{"model": "m", "input": "x", "x": 1}', "'x'"),
        ("POST", "/v1/embeddings", {}, JSON, b'{"model": "m", "input": [1, "a"]}', "'input'"),
        (
            "POST",
            "/v1/files",
            {},
            {**JSON, "Content-Type": "multipart/form-data; boundary=b"},
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
            b"{}\r\n--b--\r\n",
            "'purpose'",
        ),
        ("POST", "/v1/files", {}, JSON, b"{}", "content type"),
        ("GET", "/v1/models/x/y", {}, JSON, b"", "not an operation"),
    ],
)
def test_sdk_request_check_refuses_what_the_sdk_types_refuse(
    method: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    raw: bytes,
    expected: str,
) -> None:
    """Without the YAML, the wire check by the SDK's types is no rubber stamp either."""
    _, _, _, found = openapi_edge.check_request_sdk(method, path, query, headers, raw)
    assert any(expected in problem for problem in found), found


def test_sdk_response_check_refuses_a_batch_without_its_file() -> None:
    """The SDK's Batch model refuses an answer without input_file_id, one with a renamed
    key, and an error answer not in OpenAI's shape."""
    batch = {"id": "b", "object": "batch", "endpoint": "/v1/embeddings", "status": "completed"}
    batch |= {"completion_window": "24h", "created_at": 1}
    raw = json.dumps(batch).encode()
    missing = referee.answer_problems("retrieveBatch", 200, "application/json", raw)
    assert any("'input_file_id': Field required" in problem for problem in missing), missing
    good = {**batch, "input_file_id": "f"}
    assert (
        referee.answer_problems("retrieveBatch", 200, "application/json", json.dumps(good).encode())
        == []
    )
    renamed = {**good, "metadata_renamed": None}
    found = referee.answer_problems(
        "retrieveBatch", 200, "application/json", json.dumps(renamed).encode()
    )
    assert any("not a field of Batch" in problem for problem in found), found
    assert referee.answer_problems("retrieveBatch", 404, "application/json", b'{"detail": "nope"}')
    assert referee.answer_problems("retrieveBatch", 200, "text/html", json.dumps(good).encode())
