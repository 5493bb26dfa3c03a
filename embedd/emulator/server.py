"""The emulator's aiohttp application: auth, faults, rate limits and the sync endpoint.

Request flow for every path under ``/v1``: unknown route -> 404 in OpenAI's shape;
no ``Authorization: Bearer sk-...`` (or, with ``auth_header="api-key"`` as Azure
OpenAI takes it, no ``api-key: sk-...``; or not the configured key) -> 401; then the
fault script may answer instead of the handler (429, 5xx with HTML, dropped
connection) or spoil the answer afterwards (truncated body, lost response). Handlers
raise :class:`~embedd.emulator.errors.ApiError`, which becomes OpenAI's error body.

Test-only admin endpoints (they need the key like every other endpoint):
``POST /_emulator/faults`` replaces the fault script; ``GET /_emulator/state``
returns the counters, among them ``tokens_billed`` (every token billed, batches and
sync calls).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from embedd.emulator.config import EmulatorConfig
from embedd.emulator.errors import ApiError, error_body, invalid, unauthorized
from embedd.emulator.faults import FaultPlan, FaultScriptError, RateWindow, format_duration
from embedd.emulator.output import embedding_response
from embedd.emulator.store import Store, new_id
from embedd.emulator.validation import parse_embedding_request

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_NOMINAL_RPM = 10_000  # advertised in headers when no limit is configured (not enforced)
_NOMINAL_TPM = 10_000_000
_HTML = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>emulator</center>\r\n"
    "</body>\r\n</html>\r\n"
)


class Emulator:
    """Everything one running emulator holds: config, store, faults, counters."""

    def __init__(self, config: EmulatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="embedd-emulator-")
            root = Path(self._tmp.name)
        else:
            root = Path(config.data_dir)
        self.store = Store(root)
        self.faults = FaultPlan(config.faults, config.seed)
        self.rpm = _window(config.rpm, _NOMINAL_RPM, config.rate_window_s)
        self.tpm = _window(config.tpm, _NOMINAL_TPM, config.rate_window_s)
        self.counters: Counter[str] = Counter()
        self.by_endpoint: Counter[str] = Counter()
        self.by_metadata: Counter[str] = Counter()
        # How often each batch line (by custom_id) was billed: the test referee of
        # "every text billed once" (GET /_emulator/billed).
        self.billed_lines: Counter[str] = Counter()
        self.locks: dict[str, asyncio.Lock] = {}
        self.stopping = threading.Event()

    def state(self) -> dict[str, Any]:
        """The counters ``GET /_emulator/state`` returns."""
        return {
            "requests_served": self.counters["requests"],
            "requests_by_endpoint": dict(self.by_endpoint),
            "create_batch_calls": self.by_endpoint["POST /v1/batches"],
            "batches_created": self.counters["batches_created"],
            "batches_by_metadata": dict(self.by_metadata),
            "tokens_billed": self.counters["tokens_billed"],
            "rate_limited_429": self.counters["429"],
            "faults_fired": self.counters["faults_fired"],
            "batches": len(self.store.batches),
            "files": len(self.store.files),
            # Per batch, oldest first: what its input was and whether it produced
            # anything we could fetch (the soak's "no content submitted twice").
            "batch_log": [
                {
                    "id": rec.id,
                    "created": rec.created,
                    "input_sha256": rec.input_sha256,
                    "metadata": rec.metadata,
                    "completed": int((rec.output or {}).get("completed") or 0),
                    "files_gone": rec.files_gone,
                }
                for rec in sorted(self.store.batches.values(), key=lambda r: (r.created, r.id))
            ],
        }

    def close(self) -> None:
        """Stop output writers and remove a temporary data directory."""
        self.stopping.set()
        if self._tmp is not None:
            self._tmp.cleanup()


def _window(per_minute: int | None, nominal: int, window_s: float) -> RateWindow:
    """A limit per minute enforced in ``window_s`` slices of its pro-rata share."""
    limit = per_minute or nominal
    share = max(1, math.floor(limit * window_s / 60.0))
    return RateWindow(share, enforced=per_minute is not None, window_s=window_s)


def per_minute(window: RateWindow) -> int:
    """The per-minute limit a window stands for, as OpenAI's headers state it."""
    return round(window.limit * 60.0 / window.window_s)


EMULATOR_KEY = web.AppKey("emulator", Emulator)
TRUNCATE = web.RequestKey("emulator_truncate", bool)  # the truncate fault applies


def emulator_of(request: web.Request) -> Emulator:
    """The :class:`Emulator` serving ``request``."""
    return request.app[EMULATOR_KEY]


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A compact JSON response with a request id."""
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _authorised(request: web.Request, key: str | None, auth_header: str) -> bool:
    if auth_header == "api-key":
        token = request.headers.get("api-key", "")
        if not token:
            raise unauthorized(has_key=False)
    else:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized(has_key=False)
    if key is None:
        return token.startswith("sk-")
    return hmac.compare_digest(token.encode(), key.encode())


def drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # aiohttp treats a cancelled handler as a lost client


async def _truncated(request: web.Request, response: web.Response) -> web.StreamResponse:
    """Send the headers of ``response`` with its full length, then half of its body."""
    body = bytes(response.body) if isinstance(response.body, bytes | bytearray) else b""
    stream = web.StreamResponse(status=response.status, headers=response.headers)
    stream.content_length = len(body)
    await stream.prepare(request)
    await stream.write(body[: len(body) // 2])
    return drop_connection(request)


def _fault_response(emu: Emulator, kind: str, status: int, retry_after: float) -> web.Response:
    if kind == "rate_limit":
        emu.counters["429"] += 1
        wait = max(retry_after, 0.0)
        return json_response(
            error_body(
                "Rate limit reached for requests. Please try again in "
                f"{format_duration(wait)}. Visit https://platform.openai.com/account/"
                "rate-limits to learn more.",
                type_="requests",
                code="rate_limit_exceeded",
            ),
            status=429,
            headers={
                "Retry-After": str(math.ceil(wait)),
                "retry-after-ms": str(round(wait * 1000)),
            },
        )
    if kind == "insufficient_quota":
        emu.counters["429"] += 1
        return json_response(
            error_body(
                "You exceeded your current quota, please check your plan and billing details.",
                type_="insufficient_quota",
                code="insufficient_quota",
            ),
            status=429,
        )
    reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
    text = _HTML.format(status=status, reason=reason.get(status, "Error"))
    return web.Response(text=text, status=status, content_type="text/html")


@web.middleware
async def openai_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth, route errors, faults and error bodies for every ``/v1`` request."""
    emu = emulator_of(request)
    if request.path.startswith("/_emulator/"):
        # Test-only, but keyed like every other endpoint: a fault script is no less
        # powerful than an API call.
        try:
            if not _authorised(request, emu.config.api_key, emu.config.auth_header):
                raise unauthorized(has_key=True)
        except ApiError as exc:
            return json_response(exc.body(), status=exc.status)
        return await handler(request)
    emu.counters["requests"] += 1
    resource = request.match_info.route.resource
    if resource is None or not request.path.startswith("/v1/"):
        return json_response(
            error_body(f"Invalid URL ({request.method} {request.path})"), status=404
        )
    try:
        if not _authorised(request, emu.config.api_key, emu.config.auth_header):
            raise unauthorized(has_key=True)
    except ApiError as exc:
        return json_response(exc.body(), status=exc.status)
    endpoint = f"{request.method} {resource.canonical}"
    emu.by_endpoint[endpoint] += 1
    rule = emu.faults.on_request(endpoint)
    if rule is not None:
        emu.counters["faults_fired"] += 1
        if rule.kind == "drop":
            return drop_connection(request)
        if rule.kind not in ("truncate", "lost_response", "slow"):
            return _fault_response(emu, rule.kind, rule.status, rule.retry_after)
        request[TRUNCATE] = rule.kind == "truncate"
    try:
        response = await handler(request)
    except ApiError as exc:
        response = json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:  # aiohttp's own refusals (e.g. 405, body too large)
        response = json_response(error_body(exc.reason or "Invalid request"), status=exc.status)
    if rule is not None and rule.kind == "lost_response":
        return drop_connection(request)
    if rule is not None and rule.kind == "slow":
        await asyncio.sleep(rule.seconds)  # done and billed; the answer comes late
    if request.get(TRUNCATE) and isinstance(response, web.Response):
        return await _truncated(request, response)
    if not response.prepared:
        response.headers["x-request-id"] = new_id("req_")
    return response


async def read_json(request: web.Request) -> Any:
    """The JSON body of a request, or OpenAI's 400 for one that does not parse."""
    try:
        return json.loads(await request.read())
    except ValueError:
        raise invalid(
            "We could not parse the JSON body of your request. (HINT: This likely means "
            "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON.)"
        ) from None


def _limit_headers(emu: Emulator, now: float) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(per_minute(emu.rpm)),
        "x-ratelimit-remaining-requests": str(emu.rpm.remaining(now)),
        "x-ratelimit-reset-requests": format_duration(emu.rpm.reset_in(now)),
        "x-ratelimit-limit-tokens": str(per_minute(emu.tpm)),
        "x-ratelimit-remaining-tokens": str(emu.tpm.remaining(now)),
        "x-ratelimit-reset-tokens": format_duration(emu.tpm.reset_in(now)),
    }


def _rate_limited(
    emu: Emulator, now: float, model: str, what: str, window: RateWindow, requested: int
) -> ApiError:
    emu.counters["429"] += 1
    wait = window.reset_in(now)
    label = "requests per min (RPM)" if what == "requests" else "tokens per min (TPM)"
    headers = _limit_headers(emu, now)
    headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return ApiError(
        429,
        f"Rate limit reached for {model} in organization org-emulator on {label}: "
        f"Limit {per_minute(window)}, Used {window.used}, Requested {requested}. Please try again "
        f"in {format_duration(wait)}. Visit https://platform.openai.com/account/rate-limits "
        "to learn more.",
        type_=what,
        code="rate_limit_exceeded",
        headers=headers,
    )


async def create_embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings``: validate, rate-limit, embed."""
    emu = emulator_of(request)
    body = await read_json(request)
    try:
        req = await asyncio.to_thread(parse_embedding_request, body)
    except ApiError as exc:
        exc.headers.update(_limit_headers(emu, emu.clock()))
        raise
    now = emu.clock()
    if not emu.rpm.take(now, 1):
        raise _rate_limited(emu, now, req.model, "requests", emu.rpm, 1)
    if not emu.tpm.take(now, req.total_tokens):
        raise _rate_limited(emu, now, req.model, "tokens", emu.tpm, req.total_tokens)
    result = await asyncio.to_thread(embedding_response, req)
    emu.counters["tokens_billed"] += req.total_tokens
    return json_response(result, headers=_limit_headers(emu, emu.clock()))


async def set_faults(request: web.Request) -> web.StreamResponse:
    """``POST /_emulator/faults``: replace the fault script."""
    emu = emulator_of(request)
    try:
        emu.faults = FaultPlan(await read_json(request), emu.config.seed)
    except (FaultScriptError, ApiError) as exc:
        return json_response(error_body(str(exc)), status=400)
    return json_response({"ok": True})


async def get_billed(request: web.Request) -> web.StreamResponse:
    """``GET /_emulator/billed``: custom_id → how many times a batch billed that line."""
    return json_response(dict(emulator_of(request).billed_lines))


async def get_state(request: web.Request) -> web.StreamResponse:
    """``GET /_emulator/state``: the counters."""
    return json_response(emulator_of(request).state())
