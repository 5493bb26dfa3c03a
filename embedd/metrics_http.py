"""`GET /metrics` (SPEC §10): the Prometheus text exposition, on aiohttp's server.

Two kinds of families are exposed:

- the event-driven counters, histograms and gauges of `embedd.metrics.REGISTRY`,
  moved by the stages as things happen;
- gauges whose truth is in the state database (queue depth, batches in flight,
  tokens in flight, the oldest pending request, state size, the dedup cache), read at
  scrape time. The database is read asynchronously first; the families are then
  built from that snapshot by `state_families`, a pure function.

`[metrics] listen` (default off) names the address; the server starts with the
daemon, before READY, and closes when it stops.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from embedd import metrics
from embedd.openai.api import OpenAIClient
from embedd.pipeline.gate import SubmissionGate
from embedd.state.states import REQUEST_OPEN, SHARD_IN_FLIGHT
from embedd.state.store import Store
from embedd.state.vectors import cache_bytes

# Requests still waiting in the queue: not yet in a batch, or in one in flight.
QUEUE_STATES = tuple(sorted(REQUEST_OPEN))


@dataclass(frozen=True)
class StateSnapshot:
    """What the state database (and the state folder) say at one scrape."""

    requests: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    tokens_in_flight: int = 0
    tokens_limit: int = 0
    oldest_pending_age: float = 0.0
    state_bytes: int = 0
    dedup_cache_bytes: int = 0


def state_families(snap: StateSnapshot) -> list[Metric]:
    """The scrape-time gauges of SPEC §10 from one snapshot."""
    queue = GaugeMetricFamily(
        "embedd_queue_requests",
        "Requests waiting in the queue, by state (pending: not yet in a batch; planned: "
        "in a batch in flight).",
        labels=["state"],
    )
    for state in QUEUE_STATES:
        queue.add_metric([state], snap.requests.get(state, 0))
    batches = GaugeMetricFamily(
        "embedd_batches",
        "Batches in flight, by status (the API's batch status; planned or uploaded before "
        "the batch exists).",
        labels=["status"],
    )
    for status, count in sorted(snap.batches.items()):
        batches.add_metric([status], count)
    return [
        queue,
        batches,
        GaugeMetricFamily(
            "embedd_queue_tokens_in_flight",
            "Tokens counted against the organisation's enqueued-token limit right now.",
            value=snap.tokens_in_flight,
        ),
        GaugeMetricFamily(
            "embedd_queue_tokens_limit",
            "The enqueued-token limit in use ([batch] queue_tokens, or lower if the API said so).",
            value=snap.tokens_limit,
        ),
        GaugeMetricFamily(
            "embedd_oldest_pending_age_seconds",
            "Age of the oldest request not yet sent (0 when none waits).",
            value=snap.oldest_pending_age,
        ),
        GaugeMetricFamily(
            "embedd_state_bytes",
            "Size of the files in the state folder (database, shards, downloads, vectors).",
            value=snap.state_bytes,
        ),
        GaugeMetricFamily(
            "embedd_dedup_cache_bytes",
            "Size of the stored vectors that deduplication reuses.",
            value=snap.dedup_cache_bytes,
        ),
    ]


def folder_bytes(folder: Path) -> int:
    """Total size of the regular files under `folder` (0 if it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        base = Path(dirpath)
        for name in files:
            try:
                total += (base / name).lstat().st_size
            except OSError:
                continue  # removed while we walked
    return total


@dataclass(frozen=True)
class Sources:
    """What `/metrics` reads at scrape time."""

    store: Store
    client: OpenAIClient
    gate: SubmissionGate
    state_dir: Path
    clock: Callable[[], float]


async def read_snapshot(rt: Sources) -> StateSnapshot:
    """Read the scrape-time gauges from the state database and the state folder."""
    counts = await rt.store.counts()
    batches: dict[str, int] = {}
    for row in await rt.store.shards_in(*SHARD_IN_FLIGHT):
        status = str(row["status"] or row["state"])
        batches[status] = batches.get(status, 0) + 1
    pending = [await rt.store.oldest_pending(lane) for lane in ("batch", "sync")]
    oldest = min((t for t in pending if t is not None), default=None)
    state_dir = rt.state_dir
    state_bytes = await asyncio.to_thread(folder_bytes, state_dir)
    dedup = await asyncio.to_thread(cache_bytes, state_dir / "vectors")
    return StateSnapshot(
        requests=counts["requests"],
        batches=batches,
        tokens_in_flight=await rt.store.queue_tokens_in_flight(),
        tokens_limit=rt.gate.queue_limit,
        oldest_pending_age=0.0 if oldest is None else max(0.0, rt.clock() - oldest),
        state_bytes=state_bytes,
        dedup_cache_bytes=dedup,
    )


async def refresh_live_gauges(rt: Sources) -> None:
    """Gauges of in-process state, brought up to date at scrape time: the breaker
    (its open state lapses into half-open with time, not with an event) and the
    submission pause (the API's auth/quota pause, and a budget hold)."""
    breaker = rt.client.status_snapshot()["breaker"]
    metrics.BREAKER_OPEN.set(breaker["state"] == "open")
    budget = (await rt.store.facts()).get("budget")
    held = isinstance(budget, dict) and budget.get("held_by") is not None
    why = rt.gate.paused_reason
    api_pause = metrics.pause_kind(why) if why else None
    for reason in metrics.PAUSE_REASONS:
        paused = held if reason == "budget" else api_pause == reason
        metrics.SUBMISSION_PAUSED.labels(reason=reason).set(paused)


class _Scrape(Collector):
    """The registry's families followed by one snapshot's state gauges."""

    def __init__(self, snap: StateSnapshot) -> None:
        self._snap = snap

    def collect(self) -> Iterable[Metric]:
        yield from metrics.REGISTRY.collect()
        yield from state_families(self._snap)


def render(snap: StateSnapshot) -> bytes:
    """The text exposition of every family."""
    registry = CollectorRegistry()
    registry.register(_Scrape(snap))
    return generate_latest(registry)


def parse_listen(listen: str) -> tuple[str, int]:
    """`"127.0.0.1:9464"` or `"[::1]:9464"` → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The `/metrics` endpoint of one running daemon."""

    def __init__(self, sources: Sources) -> None:
        self._rt = sources
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, listen: str) -> str:
        """Listen; return the URL of `/metrics` (with the port chosen, for port 0)."""
        host, port = parse_listen(listen)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound = self._runner.addresses[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound[1]}/metrics"

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        await refresh_live_gauges(self._rt)
        body = render(await read_snapshot(self._rt))
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
