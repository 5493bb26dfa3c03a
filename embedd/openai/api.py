"""The OpenAI HTTP client: Files, Batches, file content and synchronous embeddings.

Every call takes the same path::

    breaker.allow ─▶ limiter.acquire ─▶ HTTP ─▶ classify ─▶ OK / RETRY / PERMANENT / PAUSE

- OK returns the decoded JSON body (a download returns the bytes written).
- RETRY sleeps ``policy.delay`` (never less than the server's Retry-After) and tries
  again, up to ``policy.max_retries`` times, then raises ``APITransientError``.
- PERMANENT raises ``APIPermanentError`` with OpenAI's status, code and message.
- PAUSE (401, 403, ``insufficient_quota``) records the reason for ``embedd status``
  and raises ``SubmissionPaused``; the caller stops submitting and keeps the work.
- While the breaker is open, ``BreakerOpen`` is raised and nothing is sent.

The API key only ever goes into the ``Authorization`` header (``api-key`` for Azure
OpenAI, with ``[openai] auth_header = "api-key"``). Error messages are
built from the server's answer and scrubbed of anything that looks like a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import structlog

from embedd import metrics
from embedd.crashpoints import crash_point
from embedd.errors import (
    APIPermanentError,
    APITransientError,
    BreakerOpen,
    OutcomeUnknown,
    SubmissionPaused,
)
from embedd.openai.batchlines import request_body
from embedd.openai.breaker import Breaker
from embedd.openai.limiter import Limiter
from embedd.openai.retry import Decision, ExcKind, RetryPolicy, classify, retry_after

_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*]{4,}")
_FILE_NOT_READY = re.compile(
    r"(could not find|cannot find|can't find|not found|does not exist|no such) .*file"
    r"|file.*(not found|could not be found|does not exist|not exist)",
    re.IGNORECASE,
)
# Batches created this long before our first attempt (by the server's clock) are
# not ours; the margin absorbs clock skew between us and the API.
_CLOCK_SKEW_S = 300.0
_CHUNK = 1 << 20
_TRANSPORT_ERRORS = (
    TimeoutError,
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientResponseError,
)


class CreateOutcomeUnknown(OutcomeUnknown, APITransientError):
    """A batch create may have succeeded although its answer was lost; reconcile first."""


@dataclass
class _Outcome:
    """One HTTP attempt, reduced to what classification needs."""

    status: int | None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    exc_kind: str | None = None
    detail: str = ""

    @property
    def error(self) -> dict[str, Any]:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]  # type: ignore[no-any-return]
        return {}

    @property
    def ambiguous(self) -> bool:
        """The request may have reached the server and taken effect."""
        if self.exc_kind in (ExcKind.TIMEOUT, ExcKind.CONNECTION, ExcKind.TRUNCATED):
            return True
        return self.status is not None and self.status >= 500


Send = Callable[[], Awaitable[_Outcome]]


def make_session(ca_file: Path | None, timeout_s: float) -> aiohttp.ClientSession:
    """A TLS-verifying session that honours HTTPS_PROXY/NO_PROXY; call inside a loop.

    ``ca_file`` adds a private CA bundle to the system trust store. ``timeout_s``
    bounds the wait for each read from the socket (big downloads keep reading, so
    there is no total timeout); connecting gives up after 10 s.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    timeout = aiohttp.ClientTimeout(
        total=None, connect=30.0, sock_connect=10.0, sock_read=timeout_s
    )
    connector = aiohttp.TCPConnector(ssl=context, limit=32)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True)


class OpenAIClient:
    """Calls the OpenAI API through the breaker, limiter and retry policy."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        limiter: Limiter,
        policy: RetryPolicy,
        breaker: Breaker,
        organization: str | None = None,
        project: str | None = None,
        auth_header: str = "authorization",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        logger: Any = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        # Azure OpenAI takes the key as `api-key: KEY`; OpenAI as a bearer token.
        if auth_header == "api-key":
            self._headers = {"api-key": api_key}
        else:
            self._headers = {"Authorization": f"Bearer {api_key}"}
        if organization:
            self._headers["OpenAI-Organization"] = organization
        if project:
            self._headers["OpenAI-Project"] = project
        self.limiter = limiter
        self.policy = policy
        self.breaker = breaker
        self._clock = clock
        self._sleep = sleep
        self._wall = wall_clock
        self._log = logger if logger is not None else structlog.get_logger("embedd.openai.api")

    # ----------------------------------------------------------------- the pipeline

    def _scrub(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return _KEY_PATTERN.sub("sk-[redacted]", text)

    def _describe(self, op: str, outcome: _Outcome) -> str:
        err = outcome.error
        parts = [op]
        if outcome.status is not None:
            parts.append(f"HTTP {outcome.status}")
        if outcome.exc_kind:
            parts.append(str(outcome.exc_kind))
        if err.get("code"):
            parts.append(f"code={err['code']}")
        message = err.get("message") or outcome.detail
        text = ": ".join([" ".join(parts), str(message)]) if message else " ".join(parts)
        return self._scrub(text)

    async def _call(
        self,
        op: str,
        send: Send,
        *,
        tokens: int = 0,
        before_retry: Callable[[_Outcome], Awaitable[Any]] | None = None,
        reclassify: Callable[[_Outcome, Decision], Decision] | None = None,
    ) -> Any:
        """Run ``send`` through breaker, limiter and retry policy; return the body.

        ``before_retry`` runs after an ambiguous failure, before the next attempt; a
        non-None result ends the call with that result (create_batch's lookup).
        """
        attempt = 0
        while True:
            now = self._clock()
            if not self.breaker.allow(now):
                wait = self.breaker.retry_in(now)
                raise BreakerOpen(
                    f"{op}: circuit breaker open, next probe in {wait:.1f}s", retry_after=wait
                )
            await self.limiter.acquire(1, tokens)
            started = time.perf_counter()
            outcome = await send()
            metrics.api_call(op, outcome.status, time.perf_counter() - started)
            code = outcome.error.get("code")
            decision = classify(
                outcome.status, code if isinstance(code, str) else None,
                outcome.headers, outcome.exc_kind,
            )  # fmt: skip
            if reclassify is not None:
                decision = reclassify(outcome, decision)
            if outcome.status is not None:
                self.limiter.update_from_headers(outcome.headers, self._clock())
            if decision is Decision.OK:
                self._breaker_outcome(ok=True)
                return outcome.body
            server_wait = retry_after(outcome.headers, outcome.status, self._wall())
            message = self._describe(op, outcome)
            if decision is Decision.PERMANENT:
                self._breaker_outcome(ok=True)  # the server is alive and answering
                raise APIPermanentError(message, status=outcome.status, code=code)
            if decision is Decision.PAUSE:
                self._breaker_outcome(ok=True)
                self._log.error("api.paused", op=op, status=outcome.status, reason=message)
                raise SubmissionPaused(message, status=outcome.status, code=code)
            # RETRY. A 429 is the server throttling us, not failing: it feeds the
            # limiter, not the breaker.
            if outcome.status == 429:
                self.limiter.penalize(server_wait or 1.0, self._clock())
            else:
                self._breaker_outcome(ok=False)
            if outcome.ambiguous and before_retry is not None:
                found = await before_retry(outcome)
                if found is not None:
                    return found
            if not self.policy.should_retry(attempt):
                self._log.warning("api.gave_up", op=op, attempts=attempt + 1, error=message)
                raise APITransientError(
                    f"{message} (gave up after {attempt + 1} attempts)",
                    status=outcome.status, code=code, retry_after=server_wait,
                )  # fmt: skip
            delay = self.policy.delay(attempt, server_wait)
            self._log.info("api.retry", op=op, attempt=attempt + 1, delay_s=delay, error=message)
            attempt += 1
            await self._sleep(delay)

    def _breaker_outcome(self, *, ok: bool) -> None:
        """Feed the breaker one outcome; log when that changes its state."""
        now = self._clock()
        before = self.breaker.state(now)
        if ok:
            self.breaker.record_success()
        else:
            self.breaker.record_failure(now)
        after = self.breaker.state(now)
        metrics.BREAKER_OPEN.set(after == "open")
        if after != before:
            self._log.warning(
                f"breaker.{after}",
                previous=before,
                consecutive_failures=self.breaker.consecutive_failures,
                cooldown_s=self.breaker.cooldown,
            )

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        form: Callable[[], tuple[aiohttp.FormData, BinaryIO]] | None = None,
    ) -> _Outcome:
        """One HTTP attempt returning JSON, with transport failures folded in."""
        handle: BinaryIO | None = None
        try:
            data = None
            if form is not None:
                data, handle = form()
            async with self._session.request(
                method, self._base + path, headers=self._headers,
                json=json_body, params=params, data=data,
            ) as resp:  # fmt: skip
                raw = await resp.read()
                return _decode(resp.status, dict(resp.headers), raw)
        except _TRANSPORT_ERRORS as exc:
            return _transport_failure(exc)
        finally:
            if handle is not None:
                handle.close()

    # ---------------------------------------------------------------------- files

    async def upload_file(
        self, path: Path, filename: str, purpose: str = "batch"
    ) -> dict[str, Any]:
        """``POST /files`` (multipart), streaming ``path`` from disk."""

        def form() -> tuple[aiohttp.FormData, BinaryIO]:
            handle = path.open("rb")
            data = aiohttp.FormData()
            data.add_field("purpose", purpose)
            data.add_field("file", handle, filename=filename, content_type="application/jsonl")
            return data, handle

        result: dict[str, Any] = await self._call(
            "upload_file", lambda: self._send("POST", "/files", form=form)
        )
        return result

    async def retrieve_file(self, file_id: str) -> dict[str, Any]:
        """``GET /files/{id}``."""
        return await self._json("retrieve_file", "GET", f"/files/{file_id}")

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        """``DELETE /files/{id}``."""
        return await self._json("delete_file", "DELETE", f"/files/{file_id}")

    async def list_files(self, purpose: str | None = "batch") -> AsyncIterator[dict[str, Any]]:
        """Every file (of ``purpose``, if given), following ``after`` cursors."""
        params = {"purpose": purpose} if purpose else {}
        async for item in self._pages("list_files", "/files", params, 10000):
            yield item

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream ``GET /files/{id}/content`` to ``dest``; return the bytes written.

        The body goes to ``dest.name + ".part"`` in chunks, is fsynced and renamed into
        place only when complete; a cut or short download starts again from scratch.
        """
        part = dest.with_name(dest.name + ".part")

        async def send() -> _Outcome:
            try:
                return await self._download_once(f"/files/{file_id}/content", part, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()

        written: int = await self._call("download_file", send)
        return written

    async def _download_once(self, path: str, part: Path, dest: Path) -> _Outcome:
        try:
            async with self._session.get(self._base + path, headers=self._headers) as resp:
                headers = dict(resp.headers)
                if resp.status != 200:
                    return _decode(resp.status, headers, await resp.read())
                expected = resp.content_length
                written = 0
                with part.open("wb") as out:
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                        crash_point("during_download")
                    out.flush()
                    os.fsync(out.fileno())
                if expected is not None and written != expected:
                    return _Outcome(
                        200, headers, exc_kind=ExcKind.TRUNCATED,
                        detail=f"got {written} of {expected} bytes",
                    )  # fmt: skip
                _publish(part, dest)
                return _Outcome(200, headers, body=written)
        except _TRANSPORT_ERRORS as exc:
            return _transport_failure(exc)

    # -------------------------------------------------------------------- batches

    async def create_batch(
        self,
        input_file_id: str,
        metadata: dict[str, str],
        endpoint: str = "/v1/embeddings",
        completion_window: str = "24h",
    ) -> dict[str, Any]:
        """``POST /batches``, never creating a second batch for the same ``metadata``.

        Batch creation has no idempotency key. After an ambiguous failure (timeout,
        lost connection, 5xx) the batch may exist anyway, so before any retry the
        recent batches are searched for one with our exact ``metadata``; if none is
        listed, that proves nothing (the list lags behind creates), so
        ``CreateOutcomeUnknown`` is raised rather than POSTing again: the caller holds
        the shard until a later lookup settles it. A "file not found" answer right
        after the upload is retried like a 5xx (the file is not visible yet).
        """
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": metadata,
        }
        since = self._wall() - _CLOCK_SKEW_S
        ambiguous = False

        async def lookup(outcome: _Outcome) -> dict[str, Any] | None:
            nonlocal ambiguous
            ambiguous = True
            try:
                found = await self.find_batch(metadata, since)
            except (APITransientError, BreakerOpen) as exc:
                raise CreateOutcomeUnknown(
                    f"create_batch outcome unknown and the lookup failed: {exc}",
                    status=outcome.status,
                ) from None
            if found is None:
                # Not proof that no batch was made: a new batch can take a while to
                # appear in the list. A second POST now could make a duplicate.
                raise CreateOutcomeUnknown(
                    "create_batch outcome unknown: no batch with our metadata is listed yet",
                    status=outcome.status,
                )
            self._log.info("api.create_batch.recovered", batch_id=found.get("id"))
            return found

        def file_not_ready(outcome: _Outcome, decision: Decision) -> Decision:
            if decision is Decision.PERMANENT and outcome.status in (400, 404):
                err = outcome.error
                if err.get("param") == "input_file_id" or _FILE_NOT_READY.search(
                    str(err.get("message") or "")
                ):
                    return Decision.RETRY
            return decision

        try:
            result: dict[str, Any] = await self._call(
                "create_batch",
                lambda: self._send("POST", "/batches", json_body=body),
                before_retry=lookup,
                reclassify=file_not_ready,
            )
        except (APITransientError, BreakerOpen) as exc:
            # Giving up (or the breaker opening) after an ambiguous attempt must not
            # look like "nothing happened": the caller has to reconcile first.
            if ambiguous and not isinstance(exc, CreateOutcomeUnknown):
                raise CreateOutcomeUnknown(
                    f"{exc.message}; a batch may exist with metadata {metadata}",
                    status=getattr(exc, "status", None),
                    retry_after=exc.retry_after,
                ) from None
            if isinstance(exc, APITransientError) and exc.status in (400, 404):
                raise APIPermanentError(exc.message, status=exc.status, code=exc.code) from None
            raise
        return result

    async def find_batch(self, metadata: Mapping[str, str], since: float) -> dict[str, Any] | None:
        """The newest batch whose ``metadata`` equals ours, created at or after ``since``."""
        async for batch in self.list_batches():
            created = batch.get("created_at")
            if isinstance(created, int | float) and created < since:
                return None  # the list is newest first: everything further is older
            if batch.get("metadata") == dict(metadata):
                return batch
        return None

    async def retrieve_batch(self, batch_id: str) -> dict[str, Any]:
        """``GET /batches/{id}``."""
        return await self._json("retrieve_batch", "GET", f"/batches/{batch_id}")

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """``POST /batches/{id}/cancel``."""
        return await self._json("cancel_batch", "POST", f"/batches/{batch_id}/cancel")

    async def list_batches(self, limit: int = 100) -> AsyncIterator[dict[str, Any]]:
        """Every batch, newest first, following ``after`` cursors."""
        async for item in self._pages("list_batches", "/batches", {}, limit):
            yield item

    # ----------------------------------------------------------------- embeddings

    async def embeddings(
        self,
        inputs: list[str] | list[list[int]],
        model: str,
        dimensions: int | None,
        tokens: int,
    ) -> dict[str, Any]:
        """``POST /embeddings`` (sync path); ``tokens`` is charged to the TPM bucket."""
        body = request_body(inputs, model, dimensions)
        result: dict[str, Any] = await self._call(
            "embeddings",
            lambda: self._send("POST", "/embeddings", json_body=body),
            tokens=tokens,
        )
        return result

    # -------------------------------------------------------------------- helpers

    async def _json(self, op: str, method: str, path: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(op, lambda: self._send(method, path))
        return result

    async def _pages(
        self, op: str, path: str, params: Mapping[str, str], limit: int
    ) -> AsyncIterator[dict[str, Any]]:
        after: str | None = None
        while True:
            query = {**params, "limit": str(limit)}
            if after:
                query["after"] = after
            page = await self._call(op, functools.partial(self._send, "GET", path, params=query))
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise APIPermanentError(f"{op}: list response has no data array")
            for item in data:
                yield item
            last = page.get("last_id") or (data[-1].get("id") if data else None)
            if not page.get("has_more") or not data or not last or last == after:
                return
            after = last

    def status_snapshot(self) -> dict[str, Any]:
        """Breaker state and limiter levels, for ``embedd status``. (A pause is not the
        client's: it raises `SubmissionPaused`, and the submission gate keeps it.)"""
        now = self._clock()
        return {
            "breaker": self.breaker.snapshot(now),
            "limiter": self.limiter.snapshot(now),
        }


def _decode(status: int, headers: dict[str, str], raw: bytes) -> _Outcome:
    """Turn a complete HTTP answer into an outcome; non-JSON bodies become exc kinds."""
    try:
        body = json.loads(raw) if raw else None
    except (UnicodeDecodeError, ValueError):
        head = raw[:200].lstrip().lower()
        kind = ExcKind.HTML if head.startswith((b"<", b"<!doctype")) else ExcKind.BAD_BODY
        return _Outcome(status, headers, None, kind, f"{kind} response body")
    if 200 <= status < 300 and not isinstance(body, dict):
        return _Outcome(status, headers, None, ExcKind.BAD_BODY, "response is not an object")
    return _Outcome(status, headers, body)


def _transport_failure(exc: BaseException) -> _Outcome:
    """A failure below HTTP as an outcome: retried, and ambiguous for creates."""
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return _Outcome(None, exc_kind=ExcKind.TIMEOUT, detail=type(exc).__name__)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return _Outcome(None, exc_kind=ExcKind.TRUNCATED, detail=str(exc))
    # Refused, reset, disconnected, or an answer that is not valid HTTP: either way
    # we do not know what the server did with the request.
    return _Outcome(None, exc_kind=ExcKind.CONNECTION, detail=str(exc))


def _publish(part: Path, dest: Path) -> None:
    """Rename a complete, fsynced download into place and make the rename durable."""
    part.replace(dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
