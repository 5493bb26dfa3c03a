"""The OpenAI client against a scripted fake server on loopback (the network edge)."""

from __future__ import annotations

import asyncio
import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

from embedd.errors import (
    APIPermanentError,
    APITransientError,
    BreakerOpen,
    EmbeddError,
    OutcomeUnknown,
    SubmissionPaused,
)
from embedd.openai.api import CreateOutcomeUnknown, OpenAIClient, make_session
from embedd.openai.breaker import Breaker
from embedd.openai.limiter import Limiter
from embedd.openai.retry import RetryPolicy

API_KEY = "sk-test-Zq9XvB1t7Hcm3LkP0aWd"
ROUTES = [
    ("POST", r"/v1/files", "upload"),
    ("GET", r"/v1/files", "list_files"),
    ("GET", r"/v1/files/(?P<id>[^/]+)/content", "content"),
    ("GET", r"/v1/files/(?P<id>[^/]+)", "file"),
    ("DELETE", r"/v1/files/(?P<id>[^/]+)", "delete_file"),
    ("POST", r"/v1/batches", "create"),
    ("GET", r"/v1/batches", "list_batches"),
    ("POST", r"/v1/batches/(?P<id>[^/]+)/cancel", "cancel"),
    ("GET", r"/v1/batches/(?P<id>[^/]+)", "batch"),
    ("POST", r"/v1/embeddings", "embeddings"),
]


def error_body(message: str, code: str | None = None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": code}}  # fmt: skip


class FakeOpenAI:
    """A tiny OpenAI stand-in: normal answers, unless a fault is scripted for the op."""

    def __init__(self) -> None:
        self.script: dict[str, list[Any]] = defaultdict(list)
        self.calls: list[tuple[str, str, dict[str, str], bytes]] = []
        self.files: dict[str, bytes] = {}
        self.batches: list[dict[str, Any]] = []
        self.clock = 1_700_000_000
        self.release = asyncio.Event()  # set at teardown: frees handlers told to hang
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def count(self, op: str) -> int:
        return sum(1 for call in self.calls if call[0] == op)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        routed = _route(request.method, request.path)
        if routed is None:
            return web.json_response(error_body("no route"), status=404)
        op, ids = routed
        self.calls.append((op, request.path_qs, dict(request.headers), body))
        fault = self.script[op].pop(0) if self.script[op] else None
        if fault == "drop":
            request.transport.close()  # type: ignore[union-attr]
            raise asyncio.CancelledError
        if isinstance(fault, tuple) and fault[0] == "html":
            page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=fault[1], text=page, content_type="text/html")
        if isinstance(fault, tuple) and fault[0] == "json":
            _, status, payload, headers = fault
            return web.json_response(payload, status=status, headers=headers)
        result = await self.normal(op, request, body, ids)
        if fault == "create_then_hang":
            await self.release.wait()  # the client times out first
        if fault == "create_then_drop":
            request.transport.close()  # type: ignore[union-attr]
            raise asyncio.CancelledError
        if fault == "truncate":
            data = self.files[ids["id"]]
            resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()  # type: ignore[union-attr]
            raise asyncio.CancelledError
        return result

    async def normal(
        self, op: str, request: web.Request, body: bytes, ids: dict[str, str]
    ) -> web.StreamResponse:
        self.clock += 1
        if op == "upload":
            form = await _parse_multipart(request, body)
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = form["file"]
            return web.json_response({"id": file_id, "object": "file", "bytes": len(form["file"]),
                                      "purpose": form["purpose"].decode(),
                                      "filename": form["filename"].decode()})  # fmt: skip
        if op == "create":
            req = json.loads(body)
            batch = {"id": f"batch_{len(self.batches) + 1}", "object": "batch",
                     "created_at": self.clock, "status": "validating", **req}  # fmt: skip
            self.batches.append(batch)
            return web.json_response(batch)
        if op == "list_batches":
            newest_first = list(reversed(self.batches))
            return web.json_response(_page(newest_first, request.query))
        if op == "list_files":
            items = [{"id": k, "purpose": request.query.get("purpose")} for k in self.files]
            return web.json_response(_page(items, request.query))
        if op in ("batch", "cancel"):
            for batch in self.batches:
                if batch["id"] == ids["id"]:
                    return web.json_response(batch)
            return web.json_response(error_body("No batch found"), status=404)
        if op == "content":
            return web.Response(body=self.files[ids["id"]])
        if op == "file":
            return web.json_response({"id": ids["id"], "object": "file"})
        if op == "delete_file":
            return web.json_response({"id": ids["id"], "deleted": True})
        if op == "embeddings":
            return web.json_response({"object": "list", "data": [], "echo": json.loads(body)})
        raise AssertionError(op)


def _route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for route_method, pattern, op in ROUTES:
        match = re.fullmatch(pattern, path)
        if route_method == method and match:
            return op, match.groupdict()
    return None


async def _parse_multipart(request: web.Request, body: bytes) -> dict[str, bytes]:
    # The body was already read; re-parse it with the stdlib's email parser.
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=policy.default).parsebytes(head + body)
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        fields[str(name)] = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename:
            fields["filename"] = filename.encode()
    return fields


def _page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
    limit = int(query.get("limit", 20))
    start = 0
    if "after" in query:
        start = [item["id"] for item in items].index(query["after"]) + 1
    chunk = items[start : start + limit]
    return {"object": "list", "data": chunk, "first_id": chunk[0]["id"] if chunk else None,
            "last_id": chunk[-1]["id"] if chunk else None,
            "has_more": start + limit < len(items)}  # fmt: skip


class FakeTime:
    """Monotonic and wall clocks that move only when the client sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI()
    runner = web.AppRunner(server.app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield server, f"http://{host}:{port}/v1"
    server.release.set()
    await runner.cleanup()


@pytest.fixture
async def make_client(
    fake: tuple[FakeOpenAI, str],
) -> AsyncIterator[Callable[..., OpenAIClient]]:
    sessions: list[aiohttp.ClientSession] = []
    time = FakeTime()

    def make(
        *,
        retries: int = 5,
        failures: int = 100,
        cooldown: float = 30.0,
        read_timeout: float = 10.0,
        **kw: Any,
    ) -> OpenAIClient:
        timeout = aiohttp.ClientTimeout(total=10, sock_read=read_timeout)
        session = aiohttp.ClientSession(timeout=timeout)
        sessions.append(session)
        client = OpenAIClient(
            session, fake[1], API_KEY,
            limiter=Limiter(rpm=3000, tpm=1_000_000, clock=time, sleep=time.sleep),
            policy=RetryPolicy(max_retries=retries),
            breaker=Breaker(failures=failures, cooldown=cooldown),
            clock=time, sleep=time.sleep, wall_clock=time.wall, **kw,
        )  # fmt: skip
        client.time = time  # type: ignore[attr-defined]
        return client

    yield make
    for session in sessions:
        await session.close()


def sleeps(client: OpenAIClient) -> list[float]:
    return client.time.sleeps  # type: ignore[attr-defined, no-any-return]


Fake = tuple[FakeOpenAI, str]
Factory = Callable[..., OpenAIClient]


async def test_sends_auth_org_and_project_headers(fake: Fake, make_client: Factory) -> None:
    """Every request carries the bearer key and the organisation/project headers."""
    server, _ = fake
    client = make_client(organization="org-1", project="proj_2")
    await client.retrieve_file("file-x")
    headers = server.calls[0][2]
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["OpenAI-Organization"] == "org-1"
    assert headers["OpenAI-Project"] == "proj_2"


async def test_retries_through_faults_then_succeeds(fake: Fake, make_client: Factory) -> None:
    """HTML 502, a dropped connection and a 500 are retried until the call succeeds."""
    server, _ = fake
    client = make_client()
    created = await client.create_batch("file-1", {"shard": "s0"})
    server.script["batch"] += [("html", 502), "drop", ("json", 500, error_body("boom"), {})]
    batch = await client.retrieve_batch(created["id"])
    assert batch["id"] == created["id"]
    assert server.count("batch") == 4
    # aiohttp itself re-sends an idempotent GET once when a pooled connection drops,
    # so the drop may or may not cost one of our retries.
    assert len(sleeps(client)) in (2, 3)
    assert client.status_snapshot()["breaker"]["state"] == "closed"


async def test_gives_up_after_max_retries(fake: Fake, make_client: Factory) -> None:
    """A server that keeps failing gets max_retries + 1 attempts, then APITransientError."""
    server, _ = fake
    client = make_client(retries=3)
    server.script["file"] += [("json", 503, error_body("overloaded"), {})] * 10
    with pytest.raises(APITransientError, match="gave up after 4 attempts") as info:
        await client.retrieve_file("file-1")
    assert info.value.status == 503
    assert server.count("file") == 4
    assert len(sleeps(client)) == 3


async def test_retry_after_is_obeyed(fake: Fake, make_client: Factory) -> None:
    """The wait after a 429 is never shorter than the server's Retry-After."""
    server, _ = fake
    client = make_client()
    limited = error_body("Rate limit reached", code="rate_limit_exceeded")
    server.script["file"] += [
        ("json", 429, limited, {"Retry-After": "7"}),
        ("json", 429, limited, {"retry-after-ms": "2500"}),
    ]
    await client.retrieve_file("file-1")
    assert sleeps(client)[0] >= 7.0
    assert sleeps(client)[1] >= 2.5
    assert server.count("file") == 3


async def test_429_without_retry_after_waits_for_ratelimit_reset(
    fake: Fake, make_client: Factory
) -> None:
    """A 429 with only x-ratelimit-reset-* waits at least the exhausted pool's reset."""
    server, _ = fake
    client = make_client()
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m0s",
               "x-ratelimit-limit-requests": "500"}  # fmt: skip
    server.script["file"].append(("json", 429, error_body("slow down"), headers))
    await client.retrieve_file("file-1")
    assert sleeps(client)[0] >= 60.0
    assert client.limiter.requests.capacity == 500.0


async def test_400_raises_permanent_with_openai_details(fake: Fake, make_client: Factory) -> None:
    """A 400 is not retried and carries OpenAI's status, code and message."""
    server, _ = fake
    client = make_client()
    body = error_body("'input' is too long", code="invalid_value")
    server.script["embeddings"].append(("json", 400, body, {}))
    with pytest.raises(APIPermanentError, match="too long") as info:
        await client.embeddings(["x"], "text-embedding-3-large", None, tokens=1)
    assert (info.value.status, info.value.code) == (400, "invalid_value")
    assert server.count("embeddings") == 1


@pytest.mark.parametrize(
    ("status", "code"), [(401, "invalid_api_key"), (403, None), (429, "insufficient_quota")]
)
async def test_auth_and_quota_errors_pause_submission(
    fake: Fake, make_client: Factory, status: int, code: str | None
) -> None:
    """401, 403 and insufficient_quota raise SubmissionPaused with the API's message,
    at once (no retry)."""
    server, _ = fake
    client = make_client()
    server.script["list_files"].append(("json", status, error_body("Access denied", code), {}))
    with pytest.raises(SubmissionPaused) as info:
        await anext(client.list_files())
    assert info.value.status == status
    assert server.count("list_files") == 1
    assert sleeps(client) == []
    assert "Access denied" in info.value.message
    # The pause is the submission gate's (embedd.pipeline.gate), not the client's to keep.
    assert "paused" not in client.status_snapshot()


async def test_breaker_opens_after_failures_then_sends_nothing(
    fake: Fake, make_client: Factory
) -> None:
    """After N consecutive failures calls raise BreakerOpen without reaching the server."""
    server, _ = fake
    client = make_client(retries=10, failures=3, cooldown=30.0)
    server.script["file"] += [("json", 500, error_body("down"), {})] * 3
    with pytest.raises(BreakerOpen) as info:
        await client.retrieve_file("file-1")
    assert server.count("file") == 3
    assert info.value.retry_after is not None
    with pytest.raises(BreakerOpen):
        await client.delete_file("file-1")
    assert server.count("delete_file") == 0
    assert client.status_snapshot()["breaker"]["state"] == "open"
    await client.time.sleep(30.0)  # type: ignore[attr-defined]
    assert (await client.retrieve_file("file-1"))["id"] == "file-1"  # the probe
    assert client.status_snapshot()["breaker"]["state"] == "closed"


async def test_breaker_state_changes_are_logged(fake: Fake, make_client: Factory) -> None:
    """Opening and closing the breaker each log one event, so operators see it happen."""
    server, _ = fake
    client = make_client(retries=10, failures=2, cooldown=5.0)
    server.script["file"] += [("json", 500, error_body("down"), {})] * 2
    with structlog.testing.capture_logs() as logs, pytest.raises(BreakerOpen):
        await client.retrieve_file("file-1")
    opened = [e for e in logs if e["event"] == "breaker.open"]
    assert len(opened) == 1
    assert opened[0]["previous"] == "closed"
    await client.time.sleep(5.0)  # type: ignore[attr-defined]
    with structlog.testing.capture_logs() as logs:
        await client.retrieve_file("file-1")
    assert [e["event"] for e in logs if e["event"].startswith("breaker.")] == ["breaker.closed"]


async def test_create_batch_after_lost_response_finds_existing_batch(
    fake: Fake, make_client: Factory
) -> None:
    """A create whose answer is lost is found by metadata; no second batch is created."""
    server, _ = fake
    client = make_client()
    server.batches.append({"id": "batch_old", "created_at": 1, "metadata": {"shard": "s9"}})
    server.script["create"].append("create_then_drop")
    batch = await client.create_batch("file-1", {"shard": "s1", "job": "j1"})
    assert server.count("create") == 1
    assert len(server.batches) == 2
    assert batch["id"] == server.batches[-1]["id"]
    assert batch["metadata"] == {"shard": "s1", "job": "j1"}


async def test_create_batch_after_5xx_without_batch_listed_is_unknown(
    fake: Fake, make_client: Factory
) -> None:
    """A 5xx whose batch is not listed is not proof that none exists (the list lags):
    the outcome is unknown, and no second POST is sent."""
    server, _ = fake
    client = make_client()
    old = [{"id": f"b_old{i}", "created_at": 5, "metadata": {"shard": "s2"}} for i in range(150)]
    server.batches += old  # same metadata but from long before: not ours, never paged to
    server.script["create"].append(("json", 500, error_body("oops"), {}))
    with pytest.raises(CreateOutcomeUnknown, match="listed"):
        await client.create_batch("file-1", {"shard": "s2"})
    assert server.count("create") == 1
    assert server.count("list_batches") == 1  # stopped at the first batch older than us
    assert server.batches[150:] == []


async def test_create_batch_after_timeout_finds_existing_batch(
    fake: Fake, make_client: Factory
) -> None:
    """A create that times out after the server made the batch is not sent again."""
    server, _ = fake
    client = make_client(read_timeout=0.3)
    server.script["create"].append("create_then_hang")
    batch = await client.create_batch("file-1", {"shard": "s6"})
    assert server.count("create") == 1
    assert [b["id"] for b in server.batches] == [batch["id"]]


async def test_create_batch_retries_file_not_found_after_upload(
    fake: Fake, make_client: Factory
) -> None:
    """ "File not found" right after an upload is retried like a 5xx."""
    server, _ = fake
    client = make_client()
    missing = error_body("Could not find file file-1.", param="input_file_id")
    server.script["create"] += [("json", 404, missing, {}), ("json", 400, missing, {})]
    batch = await client.create_batch("file-1", {"shard": "s3"})
    assert batch["input_file_id"] == "file-1"
    assert server.count("create") == 3
    assert server.count("list_batches") == 0  # a refusal is not ambiguous


async def test_create_batch_file_never_appears_is_permanent(
    fake: Fake, make_client: Factory
) -> None:
    """A file that stays missing through every retry is a permanent error."""
    server, _ = fake
    client = make_client(retries=2)
    missing = error_body("No such File object: file-9", param="input_file_id")
    server.script["create"] += [("json", 404, missing, {})] * 3
    with pytest.raises(APIPermanentError) as info:
        await client.create_batch("file-9", {"shard": "s4"})
    assert info.value.status == 404


async def test_create_batch_unknown_outcome_when_lookup_keeps_failing(
    fake: Fake, make_client: Factory
) -> None:
    """If the lookup after an ambiguous failure fails too, the caller must reconcile."""
    server, _ = fake
    client = make_client(retries=1)
    server.script["create"].append(("json", 502, error_body("bad gateway"), {}))
    server.script["list_batches"] += [("json", 503, error_body("busy"), {})] * 5
    with pytest.raises(OutcomeUnknown) as info:
        await client.create_batch("file-1", {"shard": "s5"})
    assert isinstance(info.value, CreateOutcomeUnknown)
    assert isinstance(info.value, APITransientError)
    assert server.count("create") == 1


async def test_create_batch_breaker_opening_after_ambiguity_is_unknown(
    fake: Fake, make_client: Factory
) -> None:
    """If the breaker opens after an ambiguous create, the outcome is reported unknown."""
    server, _ = fake
    client = make_client(failures=2)
    server.script["create"].append(("json", 500, error_body("oops"), {}))
    server.script["list_batches"].append(("json", 500, error_body("oops"), {}))
    with pytest.raises(CreateOutcomeUnknown, match="breaker open"):
        await client.create_batch("file-1", {"shard": "s7"})
    assert server.count("create") == 1
    assert server.count("list_batches") == 1
    assert server.batches == []


async def test_upload_sends_multipart_file(
    fake: Fake, make_client: Factory, tmp_path: Path
) -> None:
    """upload_file posts the file's exact bytes, its name and the purpose."""
    server, _ = fake
    client = make_client()
    path = tmp_path / "shard.jsonl"
    content = b'{"custom_id": "a"}\n' * 5000
    path.write_bytes(content)
    server.script["upload"].append("drop")
    result = await client.upload_file(path, "shard-0001.jsonl")
    assert result["purpose"] == "batch"
    assert result["filename"] == "shard-0001.jsonl"
    assert server.files[result["id"]] == content
    assert server.count("upload") == 2  # the dropped attempt was retried by the client


async def test_download_retried_after_truncation_is_byte_identical(
    fake: Fake, make_client: Factory, tmp_path: Path
) -> None:
    """A cut download and a 502 are retried from scratch; the result is byte-identical."""
    server, _ = fake
    client = make_client()
    data = bytes(range(256)) * 20_000  # ~5 MB, several chunks
    server.files["file-out"] = data
    server.script["content"] += ["truncate", ("html", 502)]
    dest = tmp_path / "out.jsonl"
    written = await client.download_file("file-out", dest)
    assert written == len(data)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    assert server.count("content") == 3


async def test_download_missing_file_is_permanent(
    fake: Fake, make_client: Factory, tmp_path: Path
) -> None:
    """A 404 on file content raises permanently and leaves nothing behind."""
    server, _ = fake
    client = make_client()
    server.script["content"].append(("json", 404, error_body("No such File object"), {}))
    with pytest.raises(APIPermanentError):
        await client.download_file("file-zz", tmp_path / "x.jsonl")
    assert list(tmp_path.iterdir()) == []


async def test_list_batches_follows_pages(fake: Fake, make_client: Factory) -> None:
    """list_batches yields every batch across pages, newest first."""
    server, _ = fake
    client = make_client()
    server.batches += [{"id": f"b{i}", "created_at": i, "metadata": {}} for i in range(5)]
    ids = [batch["id"] async for batch in client.list_batches(limit=2)]
    assert ids == ["b4", "b3", "b2", "b1", "b0"]
    assert server.count("list_batches") == 3


async def test_list_files_filters_by_purpose(fake: Fake, make_client: Factory) -> None:
    """list_files asks for the given purpose and yields every file."""
    server, _ = fake
    client = make_client()
    server.files.update({"file-a": b"", "file-b": b""})
    files = [f async for f in client.list_files()]
    assert [f["id"] for f in files] == ["file-a", "file-b"]
    assert "purpose=batch" in server.calls[0][1]


async def test_embeddings_body_and_token_charge(fake: Fake, make_client: Factory) -> None:
    """The sync call asks for base64 and charges the caller's token count to the TPM bucket."""
    client = make_client()
    result = await client.embeddings([[1, 2, 3]], "text-embedding-3-large", 1024, tokens=40_000)
    assert result["echo"] == {"model": "text-embedding-3-large", "input": [[1, 2, 3]],
                              "encoding_format": "base64", "dimensions": 1024}  # fmt: skip
    assert client.status_snapshot()["limiter"]["tokens_available"] == 960_000.0


async def test_cancel_batch_returns_batch(fake: Fake, make_client: Factory) -> None:
    """cancel_batch posts to the cancel route and returns the batch object."""
    server, _ = fake
    client = make_client()
    created = await client.create_batch("file-1", {"shard": "c"})
    assert (await client.cancel_batch(created["id"]))["id"] == created["id"]
    assert server.count("cancel") == 1


async def test_api_key_never_in_errors_or_logs(fake: Fake, make_client: Factory) -> None:
    """No exception string or log line contains the API key, even if the server echoes it."""
    server, _ = fake
    client = make_client(retries=1, logger=structlog.get_logger("test"))
    echo = error_body(f"Incorrect API key provided: {API_KEY}", code="invalid_api_key")
    scripts: list[tuple[str, Any]] = [
        ("file", ("json", 401, echo, {})),
        ("file", ("json", 400, error_body(f"bad {API_KEY}"), {})),
        ("file", ("json", 500, error_body(f"oops {API_KEY}"), {})),
        ("file", ("json", 500, error_body(f"oops {API_KEY}"), {})),
    ]
    for op, fault in scripts:
        server.script[op].append(fault)
    errors: list[EmbeddError] = []
    with capture_logs() as logs:
        for _ in range(3):
            try:
                await client.retrieve_file("file-1")
            except EmbeddError as exc:
                errors.append(exc)
    assert [type(e) for e in errors] == [SubmissionPaused, APIPermanentError, APITransientError]
    assert len(logs) >= 3  # paused, retry, gave up
    everything = " ".join(str(e) + repr(e) for e in errors) + repr(logs)
    assert everything.count("[redacted]") >= 3
    assert API_KEY not in everything
    assert API_KEY[3:] not in everything
    assert API_KEY not in json.dumps(client.status_snapshot())


async def test_make_session_verifies_tls_and_honours_env(tmp_path: Path) -> None:
    """make_session builds a verifying, proxy-aware session; a missing CA file is an error."""
    session = make_session(None, timeout_s=120.0)
    try:
        assert session.trust_env
        assert session.timeout.sock_read == 120.0
        assert session.timeout.sock_connect == 10.0
    finally:
        await session.close()
    with pytest.raises(FileNotFoundError):
        make_session(tmp_path / "missing.pem", timeout_s=1.0)
