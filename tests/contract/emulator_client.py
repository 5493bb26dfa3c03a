"""A small HTTP helper for tests that drive the emulator over loopback."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from embedd.emulator import EmulatorConfig, RunningEmulator, start_emulator

KEY = "sk-test-emulator"


@dataclass
class Reply:
    """One HTTP answer: status, parsed body (JSON when it parses) and headers."""

    status: int
    body: Any
    headers: Any
    raw: bytes


def embedding_line(custom_id: str, text: Any, **body: Any) -> dict[str, Any]:
    """A batch input line for /v1/embeddings."""
    payload = {"model": "text-embedding-3-large", "input": text, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": payload}


def jsonl(lines: Iterable[dict[str, Any]]) -> bytes:
    """Encode lines as JSONL bytes."""
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class Api:
    """Calls the emulator with a fake key."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str | None = KEY) -> None:
        self.session = session
        self.url = url
        self.root = url.removesuffix("/v1")
        self.key = key

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Any = None,
        params: dict[str, Any] | None = None,
        key: str | None = "",
    ) -> Reply:
        """Send one request to ``/v1`` + path (or the root for ``/_emulator``)."""
        use_key = self.key if key == "" else key
        headers = {"Authorization": f"Bearer {use_key}"} if use_key is not None else {}
        base = self.root if path.startswith("/_emulator") else self.url
        async with self.session.request(
            method, base + path, json=json_body, data=data, params=params, headers=headers
        ) as resp:
            raw = await resp.read()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            return Reply(resp.status, body, resp.headers, raw)

    async def upload(self, content: bytes, filename: str = "input.jsonl") -> Reply:
        """Upload a batch input file."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file", io.BytesIO(content), filename=filename, content_type="application/jsonl"
        )
        return await self.call("POST", "/files", data=form)

    async def create_batch(self, file_id: str, metadata: dict[str, str] | None = None) -> Reply:
        """Create a /v1/embeddings batch for an uploaded file."""
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        }
        if metadata is not None:
            body["metadata"] = metadata
        return await self.call("POST", "/batches", json_body=body)

    async def wait_batch(self, batch_id: str, statuses: set[str], within: float = 20) -> Any:
        """Poll a batch until its status is one of ``statuses`` (deadline, no fixed sleep)."""
        deadline = time.monotonic() + within
        while True:
            reply = await self.call("GET", f"/batches/{batch_id}")
            assert reply.status == 200, reply.body
            if reply.body["status"] in statuses:
                return reply.body
            assert time.monotonic() < deadline, f"batch stuck in {reply.body['status']}"
            await asyncio.sleep(0.01)

    async def lines(self, file_id: str) -> list[dict[str, Any]]:
        """Download a file and parse its JSONL."""
        reply = await self.call("GET", f"/files/{file_id}/content")
        assert reply.status == 200
        return [json.loads(line) for line in reply.raw.splitlines() if line.strip()]


@asynccontextmanager
async def running(
    data_dir: Path,
    key: str | None = KEY,
    clock: Callable[[], float] = time.time,
    **settings: Any,
) -> AsyncIterator[tuple[RunningEmulator, Api]]:
    """Start an emulator on ``data_dir`` (instant batch walk unless told otherwise)."""
    settings.setdefault("validating_s", 0)
    settings.setdefault("in_progress_s", 0)
    settings.setdefault("finalizing_s", 0)
    config = EmulatorConfig(data_dir=data_dir, **settings)
    async with await start_emulator(config, clock=clock) as emu, aiohttp.ClientSession() as session:
        yield emu, Api(session, emu.url, key)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds
