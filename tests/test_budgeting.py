"""Budgets in the running pipeline: the daemon's own wiring (`daemon.wire`) on a real store, the in-process emulator,
and an injected wall clock, so a period rollover takes no waiting."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from embedd.config import load_settings
from embedd.daemon import Pipeline, wire
from embedd.emulator import EmulatorConfig, RunningEmulator, start_emulator
from embedd.files.spool import SpoolPaths
from embedd.money.budget import submission_allowed
from embedd.money.ledger import AlertEntry, Ledger, LedgerEntry, read_entries
from embedd.money.prices import cost, format_usd
from embedd.openai.api import OpenAIClient
from embedd.openai.breaker import Breaker
from embedd.openai.limiter import Limiter
from embedd.openai.retry import RetryPolicy
from embedd.pipeline.collector import poll_once
from embedd.pipeline.intake import scan_and_claim
from embedd.pipeline.submitter import submit_once
from embedd.pipeline.synclane import call
from embedd.state.store import Store
from embedd.status import gather, render
from embedd.tokens import Tokenizer
from tests.conftest import TEST_KEY, drop

BATCH_PRICE = Decimal("0.065")
SYNC_PRICE = Decimal("0.13")
# 23:50 UTC: ten minutes before the daily rollover, mid-month.
START = datetime(2030, 3, 14, 23, 50, tzinfo=UTC).timestamp()
TEXT_A = "Budgets keep the batch lane honest about money spent today."
TEXT_B = "A second document that would push the day over its limit."


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class LogRecorder:
    """Stands in for the structured logger: keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def log(event: str, **fields: Any) -> None:
            self.records.append((level, event, fields))

        return log

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _, event, fields in self.records if event == name]


@dataclass
class Rig:
    rt: Pipeline
    emulator: RunningEmulator
    clock: Clock
    log: LogRecorder

    async def batches_created(self) -> int:
        session = self.rt.client._session  # the client's own session, to the emulator
        url = self.emulator.url.removesuffix("/v1") + "/_emulator/state"
        async with session.get(url, headers=self.rt.client._headers) as r:  # keyed too
            state = await r.json()
        return int(state["batches_created"])

    async def collect_all(self, seconds: float = 10.0) -> None:
        """Poll until no batch is in flight, moving the clock a second a round."""
        deadline = time.monotonic() + seconds
        while await self.rt.store.shards_in("submitted", "collecting"):
            assert time.monotonic() < deadline, "batches did not finish"
            self.clock.now += 1
            await poll_once(self.rt.collector)

    def ledger(self) -> list[Any]:
        return list(read_entries(self.rt.paths.ledger))


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, **budget: object) -> AsyncIterator[Rig]:
    """The daemon's stages with the given [budget] keys, the client on an in-process emulator."""
    emulator = await start_emulator(
        EmulatorConfig(validating_s=0.01, in_progress_s=0.01, finalizing_s=0.01)
    )
    lines = [
        "[spool]",
        f"root = {json.dumps(str(tmp_path / 'spool'))}",
        "[batch]",
        'flush_after = "1s"',
        'poll_interval = "1s"',
        # The test's clock runs in 2030, the emulator's in real time: never call a
        # batch stuck because our clock is past its expiry.
        'expiry_grace = "1000000h"',
        "[budget]",
        *(f"{k} = {json.dumps(v)}" for k, v in budget.items()),
    ]
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    settings = load_settings(config, environ={})
    paths = SpoolPaths.from_root(settings.spool_root, settings.spool_state_dir)
    paths.ensure()
    store = await Store.open(paths.state_dir / "embedd.sqlite3")
    session = aiohttp.ClientSession()
    ledger = Ledger(paths.ledger)
    clock = Clock(START)
    log = LogRecorder()
    client = OpenAIClient(
        session,
        emulator.url,
        TEST_KEY,
        limiter=Limiter(settings.limits_rpm, settings.limits_tpm),
        policy=RetryPolicy(0.01, 0.1, 3),
        breaker=Breaker(5, 1.0),
    )
    rt = wire(settings, paths, store, client, Tokenizer(), ledger, log=log, clock=clock)
    try:
        yield Rig(rt, emulator, clock, log)
    finally:
        await session.close()
        await store.close()
        ledger.close()
        await emulator.stop()


def usd(tokens: int, price: Decimal) -> Decimal:
    return cost(tokens, price)


async def test_pause_holds_before_crossing_and_resumes_after_rollover(tmp_path: Path) -> None:
    """With `pause`, a batch whose estimate would cross the daily budget is never
    created — counting a batch still in flight — its work stays queued, status says
    until when, one alert line is written; after UTC midnight it goes out."""
    tok = Tokenizer()
    a, b = tok.count(TEXT_A), tok.count(TEXT_B)
    # A alone fits; A and B together do not (by half of B).
    limit = usd(a, BATCH_PRICE) + usd(b, BATCH_PRICE) / 2
    async with rig(tmp_path, daily_usd=str(limit), action="pause") as r:
        rt = r.rt
        drop(rt.paths.root, "a.txt", TEXT_A.encode())
        await scan_and_claim(rt.intake)
        r.clock.now += 2  # past flush_after
        await submit_once(rt.submitter)
        assert await r.batches_created() == 1

        # B while A is in flight (not billed yet): A's estimate counts.
        drop(rt.paths.root, "b.txt", TEXT_B.encode())
        await scan_and_claim(rt.intake)
        r.clock.now += 2
        await submit_once(rt.submitter)
        assert await r.batches_created() == 1
        await r.collect_all()
        await submit_once(rt.submitter)
        assert await r.batches_created() == 1, "B went out over the budget"

        counts = await rt.store.counts()
        assert counts["requests"] == {"done": 1, "pending": 1}, "held work must stay queued"
        fact = (await rt.store.facts())["budget"]
        assert fact["held_by"] == "daily"
        assert fact["paused_until"] == "2030-03-15T00:00:00.000000Z"
        assert Decimal(fact["spent_today_usd"]) == usd(a, BATCH_PRICE)
        status = gather(rt.store.path, now=r.clock.now)
        assert status["budget"]["held_by"] == "daily"
        text = render(status)
        assert "PAUSED:   by the daily budget until 2030-03-15T00:00:00.000000Z" in text
        spent = format_usd(usd(a, BATCH_PRICE))  # 0.00000078, never 7.8E-7
        assert f"today ${spent} of ${fact['daily_usd']} daily budget" in text
        alerts = [e for e in r.ledger() if isinstance(e, AlertEntry)]
        assert [(e.budget, e.period, e.action) for e in alerts] == [
            ("daily", "2030-03-14", "pause")
        ]
        assert len(r.log.events("budget.hold")) == 1
        assert len(r.log.events("budget.crossed")) == 1

        r.clock.now = datetime(2030, 3, 15, 0, 0, 1, tzinfo=UTC).timestamp()
        await submit_once(rt.submitter)
        assert await r.batches_created() == 2, "the held batch did not resume after midnight"
        await r.collect_all()
        assert (await rt.store.facts())["budget"]["held_by"] is None
        assert len(r.log.events("budget.resumed")) == 1
        usage = [e for e in r.ledger() if isinstance(e, LedgerEntry)]
        assert [e.tokens for e in usage] == [a, b]
        assert [e.ts.date().isoformat() for e in usage] == ["2030-03-14", "2030-03-15"]
        assert len([e for e in r.ledger() if isinstance(e, AlertEntry)]) == 1


async def test_warn_submits_logs_and_records_one_alert_per_period(tmp_path: Path) -> None:
    """With `warn`, work goes out over the budget; the crossing is logged and written
    as one alert line per period, however often it is crossed again."""
    async with rig(tmp_path, daily_usd="0.000001", action="warn") as r:
        rt = r.rt
        for name, text in (("a.txt", TEXT_A), ("b.txt", TEXT_B)):
            drop(rt.paths.root, name, text.encode())
            await scan_and_claim(rt.intake)
            r.clock.now += 2
            await submit_once(rt.submitter)
            await r.collect_all()
        assert await r.batches_created() == 2
        alerts = [e for e in r.ledger() if isinstance(e, AlertEntry)]
        assert [(e.budget, e.period, e.action) for e in alerts] == [("daily", "2030-03-14", "warn")]
        assert alerts[0].limit_usd == Decimal("0.000001")
        warnings = [
            f for lvl, ev, f in r.log.records if lvl == "warning" and ev == "budget.crossed"
        ]
        assert len(warnings) == 1
        assert (await rt.store.facts())["budget"]["held_by"] is None


async def test_usage_billed_above_the_estimate_raises_the_alert(tmp_path: Path) -> None:
    """A sync call that fits the budget by its estimate but whose billed usage crosses
    it (the spend is only known after the call) still records the alert."""
    tok = Tokenizer()
    tokens = tok.count(TEXT_A)
    limit = usd(tokens, SYNC_PRICE) - Decimal("0.000000001")
    async with rig(tmp_path, monthly_usd=str(limit), action="pause") as r:
        rt = r.rt
        drop(rt.paths.root, "a.txt", TEXT_A.encode(), sync=True)
        await scan_and_claim(rt.intake)
        [pending] = await rt.store.pending("sync", 10)
        # The estimate says 1 token: allowed. The API bills the real count.
        assert await submission_allowed(rt.books, 1, "sync")
        await call(rt.sync, [pending])
        alerts = [e for e in r.ledger() if isinstance(e, AlertEntry)]
        assert [(e.budget, e.period, e.next_cost_usd) for e in alerts] == [
            ("monthly", "2030-03", Decimal(0))
        ]
        assert alerts[0].spent_usd == usd(tokens, SYNC_PRICE)
        assert not await submission_allowed(rt.books, 1, "sync")
        assert (await rt.store.facts())["budget"]["paused_until"] == "2030-04-01T00:00:00.000000Z"


async def test_no_budget_configured_allows_everything_and_records_nothing(
    tmp_path: Path,
) -> None:
    """Without limits, submission is always allowed and no budget fact is kept."""
    async with rig(tmp_path) as r:
        assert await submission_allowed(r.rt.books, 10**12, "batch")
        assert "budget" not in await r.rt.store.facts()


async def test_status_shows_configured_limits_before_any_check(tmp_path: Path) -> None:
    """Limits passed from the config show in status even before the daemon has
    checked a submission against them; no hold is shown."""
    async with rig(tmp_path) as r:
        db = r.rt.store.path
    data = gather(db, now=START, budget={"daily_usd": "5", "monthly_usd": None, "action": "warn"})
    text = render(data)
    assert "today $0 of $5 daily budget, this month $0" in text
    assert "PAUSED" not in text
