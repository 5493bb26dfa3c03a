"""The emulator over loopback: endpoints, rejections, paging, persistence, faults."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from contract.emulator_client import KEY, FakeClock, embedding_line, jsonl, running

LARGE = "text-embedding-3-large"


def assert_error_shape(body: Any) -> dict[str, Any]:
    """OpenAI's error body: exactly message, type, param, code under "error"."""
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


async def test_batch_walks_through_its_states(tmp_path: Path) -> None:
    """A batch is validating, then in_progress, finalizing and completed as time passes."""
    clock = FakeClock()
    async with running(
        tmp_path, clock=clock, validating_s=10, in_progress_s=10, finalizing_s=10
    ) as (_, api):
        up = await api.upload(jsonl(embedding_line(f"r{i}", f"doc {i}") for i in range(3)))
        batch = (await api.create_batch(up.body["id"])).body
        seen = [batch["status"]]
        for _ in range(3):
            clock.advance(10)
            seen.append((await api.call("GET", f"/batches/{batch['id']}")).body["status"])
        assert seen == ["validating", "in_progress", "finalizing", "completed"]
        final = (await api.call("GET", f"/batches/{batch['id']}")).body
        assert final["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert final["error_file_id"] is None
        assert final["output_file_id"]
        assert final["completed_at"] == final["created_at"] + 30
        assert final["usage"]["input_tokens"] > 0


async def test_output_is_shuffled_but_complete(tmp_path: Path) -> None:
    """Every custom_id comes back exactly once, in an order other than the input's."""
    ids = [f"req-{i}" for i in range(40)]
    async with running(tmp_path) as (_, api):
        up = await api.upload(jsonl(embedding_line(c, f"text number {c}") for c in ids))
        batch = (await api.create_batch(up.body["id"])).body
        done = await api.wait_batch(batch["id"], {"completed"})
        lines = await api.lines(done["output_file_id"])
    got = [line["custom_id"] for line in lines]
    assert sorted(got) == sorted(ids)
    assert got != ids
    for line in lines:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200
        assert line["error"] is None
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        assert len(body["data"][0]["embedding"]) == 3072


async def test_base64_equals_float_and_dimensions_hold(tmp_path: Path) -> None:
    """base64 output decodes to the float output; dimensions are honoured; norms are 1."""
    body = {"model": LARGE, "input": ["alpha beta", "gamma"], "dimensions": 256}
    async with running(tmp_path) as (_, api):
        floats = (await api.call("POST", "/embeddings", json_body=body)).body
        b64 = await api.call("POST", "/embeddings", json_body={**body, "encoding_format": "base64"})
    assert b64.status == 200
    for f_item, b_item in zip(floats["data"], b64.body["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b_item["embedding"]), dtype="<f4")
        as_float = np.asarray(f_item["embedding"], dtype=np.float32)
        assert decoded.shape == (256,)
        np.testing.assert_array_equal(decoded, as_float)
        assert abs(float(np.linalg.norm(decoded)) - 1) < 1e-4


async def test_token_id_inputs_embed_like_their_text(tmp_path: Path) -> None:
    """An input of token ids is decoded and embedded as the text it spells."""
    from embedd.emulator.vectors import encoding

    tokens = encoding().encode_ordinary("hello world")
    async with running(tmp_path) as (_, api):
        by_text = await api.call(
            "POST", "/embeddings", json_body={"model": LARGE, "input": "hello world"}
        )
        by_ids = await api.call(
            "POST", "/embeddings", json_body={"model": LARGE, "input": [tokens]}
        )
    assert by_ids.status == 200
    assert by_ids.body["data"][0]["embedding"] == by_text.body["data"][0]["embedding"]
    assert by_ids.body["usage"]["prompt_tokens"] == len(tokens)


REJECTED = [
    ({"model": "text-embedding-9", "input": "x"}, 404, "model_not_found"),
    ({"model": LARGE, "input": "x", "dimensions": 3073}, 400, None),
    ({"model": LARGE, "input": "x", "dimensions": 0}, 400, None),
    ({"model": "text-embedding-ada-002", "input": "x", "dimensions": 512}, 400, None),
    ({"model": LARGE, "input": ["x"] * 2049}, 400, None),
    ({"model": LARGE, "input": "word " * 8200}, 400, None),
    ({"model": LARGE, "input": ["a " * 8000] * 38}, 400, "max_tokens_per_request"),
    ({"model": LARGE, "input": ""}, 400, None),
    ({"model": LARGE, "input": ["ok", ""]}, 400, None),
    ({"model": LARGE, "input": []}, 400, None),
    ({"model": LARGE, "input": [1, "a"]}, 400, None),
    ({"model": LARGE, "input": "x", "encoding_format": "hex"}, 400, None),
    ({"model": LARGE, "input": "x", "temperature": 1}, 400, None),
    ({"input": "x"}, 400, None),
    ({"model": LARGE}, 400, None),
]


@pytest.mark.parametrize(("body", "status", "code"), REJECTED)
async def test_embeddings_rejects_what_openai_rejects(
    tmp_path: Path, body: dict[str, Any], status: int, code: str | None
) -> None:
    """Invalid embedding requests get OpenAI's status and error body."""
    async with running(tmp_path) as (_, api):
        reply = await api.call("POST", "/embeddings", json_body=body)
    assert reply.status == status
    assert assert_error_shape(reply.body)["code"] == code


BAD_FILES = [
    ([embedding_line("a", "x"), embedding_line("a", "y")], "duplicate"),
    ([{**embedding_line("a", "x"), "url": "/v1/chat/completions"}], "url"),
    ([{**embedding_line("a", "x"), "method": "GET"}], "method"),
    ([{"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}], "body"),
    ([embedding_line("a", "x"), embedding_line("b", "y", model="text-embedding-3-small")], "model"),
]


@pytest.mark.parametrize(("lines", "word"), BAD_FILES)
async def test_upload_rejects_invalid_batch_files(
    tmp_path: Path, lines: list[dict[str, Any]], word: str
) -> None:
    """A batch file that is not valid /v1/embeddings input is refused at upload."""
    async with running(tmp_path) as (_, api):
        reply = await api.upload(jsonl(lines))
    assert reply.status == 400
    assert word in assert_error_shape(reply.body)["message"]


async def test_upload_rejects_too_many_lines(tmp_path: Path) -> None:
    """More than 50,000 requests in one batch file is refused."""
    lines = (json.dumps(embedding_line(f"{i}", "x"), separators=(",", ":")) for i in range(50_001))
    async with running(tmp_path) as (_, api):
        reply = await api.upload(("\n".join(lines) + "\n").encode())
    assert reply.status == 400
    assert "50000" in assert_error_shape(reply.body)["message"]


async def test_batch_create_rejections(tmp_path: Path) -> None:
    """Unknown file, wrong endpoint, window or metadata are refused with OpenAI's shape."""
    async with running(tmp_path) as (_, api):
        up = await api.upload(jsonl([embedding_line("a", "x")]))
        base = {
            "input_file_id": up.body["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        }
        cases = [
            ({**base, "input_file_id": "file-missing"}, 404),
            ({**base, "endpoint": "/v1/chat/completions"}, 400),
            ({**base, "completion_window": "1h"}, 400),
            ({**base, "metadata": {f"k{i}": "v" for i in range(17)}}, 400),
            ({**base, "metadata": {"k": 1}}, 400),
        ]
        for body, status in cases:
            reply = await api.call("POST", "/batches", json_body=body)
            assert reply.status == status, body
            assert_error_shape(reply.body)
        missing = await api.call("GET", "/batches/batch_nope")
        assert missing.status == 404


async def test_unauthorised_requests_get_401(tmp_path: Path) -> None:
    """No key, a key without sk-, or not the configured key: 401 with OpenAI's body."""
    async with running(tmp_path, key=None) as (_, api):
        assert (await api.call("GET", "/files")).status == 401
        err = assert_error_shape((await api.call("GET", "/files", key="bad-key")).body)
        assert err["code"] == "invalid_api_key"
        assert "bad-key" not in err["message"]
        assert (await api.call("GET", "/files", key="sk-anything")).status == 200
    async with running(tmp_path, key=None, api_key="sk-the-one") as (_, api):
        assert (await api.call("GET", "/files", key="sk-other")).status == 401
        assert (await api.call("GET", "/files", key="sk-the-one")).status == 200


async def test_batches_page_newest_first(tmp_path: Path) -> None:
    """GET /v1/batches pages with after/limit, newest first, with has_more and ids."""
    clock = FakeClock()
    async with running(tmp_path, clock=clock) as (_, api):
        up = await api.upload(jsonl([embedding_line("a", "x")]))
        created = []
        for _ in range(5):
            clock.advance(1)
            created.append((await api.create_batch(up.body["id"])).body["id"])
        first = (await api.call("GET", "/batches", params={"limit": 2})).body
        assert [b["id"] for b in first["data"]] == created[::-1][:2]
        assert first["has_more"]
        assert first["last_id"] == created[3]
        rest = (
            await api.call("GET", "/batches", params={"limit": 10, "after": first["last_id"]})
        ).body
        assert [b["id"] for b in rest["data"]] == created[::-1][2:]
        assert rest["has_more"] is False
        assert rest["first_id"] == created[2]
        files = (await api.call("GET", "/files", params={"purpose": "batch", "limit": 1})).body
        assert [f["id"] for f in files["data"]] == [up.body["id"]]
        assert files["has_more"] is False
        outputs = (await api.call("GET", "/files", params={"purpose": "batch_output"})).body
        assert len(outputs["data"]) == 5
        assert outputs["first_id"] != up.body["id"]


async def test_files_roundtrip_and_delete(tmp_path: Path) -> None:
    """An uploaded file reads back byte for byte and is gone after DELETE."""
    content = jsonl([embedding_line("a", "x"), embedding_line("b", "y")])
    async with running(tmp_path) as (_, api):
        up = (await api.upload(content)).body
        assert up["bytes"] == len(content)
        assert up["purpose"] == "batch"
        got = await api.call("GET", f"/files/{up['id']}/content")
        assert got.raw == content
        assert got.headers["Content-Length"] == str(len(content))
        deleted = await api.call("DELETE", f"/files/{up['id']}")
        assert deleted.body == {"id": up["id"], "object": "file", "deleted": True}
        assert (await api.call("GET", f"/files/{up['id']}")).status == 404


async def test_batches_survive_a_restart(tmp_path: Path) -> None:
    """A restarted emulator on the same data_dir still has its files and batches."""
    clock = FakeClock()
    settings: dict[str, Any] = {"validating_s": 5, "in_progress_s": 5, "finalizing_s": 5}
    async with running(tmp_path, clock=clock, **settings) as (_, api):
        up = await api.upload(jsonl([embedding_line("a", "x")]))
        batch = (await api.create_batch(up.body["id"], {"shard": "s1"})).body
    clock.advance(60)
    async with running(tmp_path, clock=clock, **settings) as (_, api):
        again = await api.wait_batch(batch["id"], {"completed"})
        assert again["metadata"] == {"shard": "s1"}
        assert [line["custom_id"] for line in await api.lines(again["output_file_id"])] == ["a"]
        listed = (await api.call("GET", "/batches")).body["data"]
        assert [b["id"] for b in listed] == [batch["id"]]


async def _set_faults(api: Any, script: dict[str, Any]) -> None:
    reply = await api.call("POST", "/_emulator/faults", json_body=script)
    assert reply.status == 200, reply.body


async def test_fault_http_kinds(tmp_path: Path) -> None:
    """Scripted 429s (with Retry-After), quota 429, HTML 5xx and drops are observable."""
    script = {
        "requests": [
            {"endpoint": "GET /v1/files", "kind": "rate_limit", "count": 1, "retry_after": 2},
            {"endpoint": "GET /v1/files", "kind": "insufficient_quota", "count": 1},
            {"endpoint": "GET /v1/files", "kind": "server_error", "status": 502, "count": 1},
            # A dropped POST: clients do not silently retry it as they may a GET.
            {"endpoint": "POST /v1/embeddings", "kind": "drop", "count": 1},
        ]
    }
    async with running(tmp_path) as (_, api):
        await _set_faults(api, script)
        limited = await api.call("GET", "/files")
        assert limited.status == 429
        assert limited.headers["Retry-After"] == "2"
        assert assert_error_shape(limited.body)["code"] == "rate_limit_exceeded"
        quota = await api.call("GET", "/files")
        assert assert_error_shape(quota.body)["code"] == "insufficient_quota"
        html = await api.call("GET", "/files")
        assert html.status == 502
        assert html.headers["Content-Type"].startswith("text/html")
        body = {"model": LARGE, "input": "x"}
        with pytest.raises(aiohttp.ClientError):
            await api.call("POST", "/embeddings", json_body=body)
        assert (await api.call("POST", "/embeddings", json_body=body)).status == 200
        state = (await api.call("GET", "/_emulator/state")).body
        assert state["rate_limited_429"] == 2
        assert state["faults_fired"] == 4


async def test_fault_truncated_download_and_lost_create(tmp_path: Path) -> None:
    """A truncated download fails on the client; a lost create still creates the batch."""
    async with running(tmp_path) as (_, api):
        up = await api.upload(jsonl([embedding_line("a", "x")]))
        await _set_faults(
            api,
            {
                "requests": [
                    {"endpoint": "GET /v1/files/{id}/content", "kind": "truncate", "count": 1},
                    {"endpoint": "POST /v1/batches", "kind": "lost_response", "count": 1},
                ]
            },
        )
        with pytest.raises(aiohttp.ClientPayloadError):
            await api.call("GET", f"/files/{up.body['id']}/content")
        with pytest.raises(aiohttp.ClientError):
            await api.create_batch(up.body["id"], {"shard": "lost"})
        state = (await api.call("GET", "/_emulator/state")).body
        assert state["create_batch_calls"] == 1
        assert state["batches_created"] == 1
        assert state["batches_by_metadata"] == {'{"shard": "lost"}': 1}
        assert len((await api.call("GET", "/batches")).body["data"]) == 1


async def test_fault_expired_and_failed_lines(tmp_path: Path) -> None:
    """An expired batch returns part of its lines; the rest are batch_expired errors."""
    lines = [embedding_line(f"r{i}", f"t {i}") for i in range(10)]
    script = {
        "batches": [
            {"outcome": "expire", "completed_fraction": 0.5, "count": 1},
            {"outcome": "complete", "failed_line_rate": 1.0, "failed_line_status": 400},
        ]
    }
    async with running(tmp_path, faults=script) as (_, api):
        up = await api.upload(jsonl(lines))
        expired = await api.wait_batch(
            (await api.create_batch(up.body["id"])).body["id"], {"expired"}
        )
        assert expired["request_counts"] == {"total": 10, "completed": 5, "failed": 5}
        errors = await api.lines(expired["error_file_id"])
        assert {e["error"]["code"] for e in errors} == {"batch_expired"}
        assert len(await api.lines(expired["output_file_id"])) == 5
        failing = await api.wait_batch(
            (await api.create_batch(up.body["id"])).body["id"], {"completed"}
        )
        assert failing["output_file_id"] is None
        assert failing["request_counts"]["failed"] == 10
        bad = await api.lines(failing["error_file_id"])
        assert {b["response"]["status_code"] for b in bad} == {400}
        assert_error_shape(bad[0]["response"]["body"])


async def test_token_limit_fails_batch(tmp_path: Path) -> None:
    """Tokens in flight over the enqueued limit fail the new batch with OpenAI's message."""
    clock = FakeClock()
    async with running(tmp_path, clock=clock, enqueued_token_limit=5, in_progress_s=100) as (
        _,
        api,
    ):
        up = await api.upload(jsonl([embedding_line("a", "one two three")]))
        first = (await api.create_batch(up.body["id"])).body
        second = (await api.create_batch(up.body["id"])).body
        clock.advance(1)
        assert (await api.call("GET", f"/batches/{first['id']}")).body["status"] == "in_progress"
        failed = (await api.call("GET", f"/batches/{second['id']}")).body
    assert failed["status"] == "failed"
    error = failed["errors"]["data"][0]
    assert error["code"] == "token_limit_exceeded"
    assert "Limit: 5 enqueued tokens" in error["message"]


async def test_cancel_gives_partial_output(tmp_path: Path) -> None:
    """Cancelling a running batch ends it cancelled, unfinished lines as batch_cancelled."""
    clock = FakeClock()
    async with running(tmp_path, clock=clock, in_progress_s=10, finalizing_s=1) as (_, api):
        up = await api.upload(jsonl(embedding_line(f"r{i}", "x") for i in range(10)))
        batch = (await api.create_batch(up.body["id"])).body
        clock.advance(3)
        cancelling = (await api.call("POST", f"/batches/{batch['id']}/cancel")).body
        assert cancelling["status"] == "cancelling"
        clock.advance(2)
        done = (await api.call("GET", f"/batches/{batch['id']}")).body
        assert done["status"] == "cancelled"
        assert done["request_counts"] == {"total": 10, "completed": 3, "failed": 7}
        again = await api.call("POST", f"/batches/{batch['id']}/cancel")
        assert again.status == 200
        assert again.body["status"] == "cancelled"


async def test_rpm_window_answers_429_with_headers(tmp_path: Path) -> None:
    """Past the RPM limit /v1/embeddings answers 429; every answer has x-ratelimit headers."""
    async with running(tmp_path, rpm=2) as (_, api):
        body = {"model": LARGE, "input": "x"}
        ok = await api.call("POST", "/embeddings", json_body=body)
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        assert ok.headers["x-ratelimit-limit-tokens"]
        await api.call("POST", "/embeddings", json_body=body)
        limited = await api.call("POST", "/embeddings", json_body=body)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert assert_error_shape(limited.body)["code"] == "rate_limit_exceeded"


async def test_bad_fault_script_is_refused(tmp_path: Path) -> None:
    """An invalid fault script is answered 400 and leaves the old one in place."""
    async with running(tmp_path) as (_, api):
        reply = await api.call("POST", "/_emulator/faults", json_body={"requests": [{"kind": "?"}]})
        assert reply.status == 400
        assert (await api.call("GET", "/files")).status == 200


async def test_unknown_route_is_404_in_openai_shape(tmp_path: Path) -> None:
    """Paths the API does not serve answer 404 with OpenAI's error body."""
    async with running(tmp_path) as (_, api):
        reply = await api.call("GET", "/models")
    assert reply.status == 404
    assert "Invalid URL" in assert_error_shape(reply.body)["message"]


def test_key_is_fake() -> None:
    """The test key is a fake one, never a real secret."""
    assert KEY.startswith("sk-test")


async def test_control_endpoints_need_the_key(tmp_path: Path) -> None:
    """`/_emulator/*` answers 401 like every other endpoint without a valid key."""
    async with running(tmp_path, key="sk-the-one", api_key="sk-the-one") as (_, api):
        for key in (None, "sk-another"):
            state = await api.call("GET", "/_emulator/state", key=key)
            assert state.status == 401
            assert_error_shape(state.body)
            faults = await api.call("POST", "/_emulator/faults", json_body={}, key=key)
            assert faults.status == 401
        assert (await api.call("GET", "/_emulator/state")).status == 200


async def test_list_lag_hides_new_batches_from_the_list_only(tmp_path: Path) -> None:
    """With `list_lag_s`, a new batch is missing from GET /v1/batches until it is that
    old, while GET /v1/batches/{id} finds it at once."""
    clock = FakeClock()
    async with running(tmp_path, clock=clock, validating_s=100) as (_, api):
        await _set_faults(api, {"list_lag_s": 5})
        up = await api.upload(jsonl([embedding_line("a", "x")]))
        batch = (await api.create_batch(up.body["id"], {"shard": "s"})).body
        assert (await api.call("GET", "/batches")).body["data"] == []
        assert (await api.call("GET", f"/batches/{batch['id']}")).status == 200
        clock.advance(5)
        listed = (await api.call("GET", "/batches")).body["data"]
        assert [b["id"] for b in listed] == [batch["id"]]


async def test_invalid_lines_fail_the_batch_while_validating(tmp_path: Path) -> None:
    """The `invalid` outcome fails the batch in `validating` and names the refused
    lines (1-based) in errors.data[].line; nothing is billed."""
    lines = [embedding_line(f"r{i}", f"t {i}") for i in range(20)]
    script = {"batches": [{"outcome": "invalid", "invalid_line_rate": 0.2}]}
    clock = FakeClock()
    async with running(tmp_path, faults=script, clock=clock, validating_s=10) as (_, api):
        up = await api.upload(jsonl(lines))
        batch = (await api.create_batch(up.body["id"])).body
        assert batch["status"] == "validating"
        clock.advance(10)
        failed = (await api.call("GET", f"/batches/{batch['id']}")).body
        assert failed["status"] == "failed"
        data = failed["errors"]["data"]
        numbers = [e["line"] for e in data]
        assert numbers
        assert all(1 <= n <= 20 for n in numbers)
        assert len(set(numbers)) == len(numbers) < 20
        assert {e["code"] for e in data} == {"invalid_value"}
        assert failed["output_file_id"] is None
        assert failed["error_file_id"] is None
        assert failed["usage"]["input_tokens"] == 0
        assert (await api.call("GET", "/_emulator/state")).body["tokens_billed"] == 0


async def test_files_gone_answer_404(tmp_path: Path) -> None:
    """`files_gone`: a completed batch names output and error files that answer 404;
    its lines are billed all the same."""
    lines = [embedding_line(f"r{i}", f"t {i}") for i in range(10)]
    script = {"batches": [{"outcome": "complete", "failed_line_rate": 0.3, "files_gone": True}]}
    async with running(tmp_path, faults=script) as (_, api):
        up = await api.upload(jsonl(lines))
        done = await api.wait_batch(
            (await api.create_batch(up.body["id"])).body["id"], {"completed"}
        )
        for kind in ("output_file_id", "error_file_id"):
            assert done[kind]
            gone = await api.call("GET", f"/files/{done[kind]}/content")
            assert gone.status == 404
            assert_error_shape(gone.body)
        state = (await api.call("GET", "/_emulator/state")).body
        assert state["tokens_billed"] == done["usage"]["input_tokens"] > 0
