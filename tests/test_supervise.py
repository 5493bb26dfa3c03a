"""SPEC §8 supervision: the verdict table (pure) and the guard against a real state database."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from embedd import metrics
from embedd.errors import (
    APIPermanentError,
    APITransientError,
    ConfigError,
    FatalError,
    SubmissionPaused,
)
from embedd.logs import get_logger
from embedd.pipeline.supervise import Action, Supervisor, backoff, verdict
from embedd.state.store import Store
from embedd.status import render

# ---- verdict: a pure function ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "disk full"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EIO, "I/O error"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_disk_errors_hold_the_stage_and_do_not_count_against_the_unit(
    code: int, reason: str
) -> None:
    """A full or failing disk is not the unit's fault: HOLD, whatever the attempts."""
    v = verdict("deliver", OSError(code, "x"), attempts=99, max_retries=2)
    assert v.action is Action.HOLD
    assert v.reason == reason
    assert not v.counted


@pytest.mark.parametrize(
    ("message", "reason"),
    [("database or disk is full", "disk full"), ("disk I/O error", "I/O error")],
)
def test_sqlite_full_and_io_errors_hold_rather_than_stop(message: str, reason: str) -> None:
    """SQLITE_FULL and SQLITE_IOERR on the state database hold the stage too."""
    v = verdict("intake", sqlite3.OperationalError(message), attempts=1, max_retries=5)
    assert (v.action, v.reason) == (Action.HOLD, reason)


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.DatabaseError("database disk image is malformed"),
        sqlite3.OperationalError("attempt to write a readonly database"),
        FatalError("ledger is corrupt"),
        ConfigError("bad"),
    ],
)
def test_an_unusable_state_database_or_config_is_fatal(error: Exception) -> None:
    """Only daemon-level faults leave the guard."""
    assert verdict("collect", error, attempts=1, max_retries=5).action is Action.FATAL


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.IntegrityError("UNIQUE constraint failed: files.job"),
        sqlite3.ProgrammingError("Error binding parameter 1: type 'dict' is not supported"),
        sqlite3.OperationalError("too many SQL variables"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
        RecursionError("maximum recursion depth exceeded"),
    ],
)
def test_a_database_error_caused_by_one_units_data_is_that_units_failure(
    error: Exception,
) -> None:
    """Only a database the daemon cannot use is fatal: an insert that fails on one
    file's data fails that file (retried, then failed/), never the daemon."""
    assert verdict("intake", error, 1, 1).action is Action.RETRY
    assert verdict("intake", error, 2, 1).action is Action.FAIL


def test_a_busy_database_is_retried_later_without_counting() -> None:
    v = verdict("deliver", sqlite3.OperationalError("database is locked"), 9, 1)
    assert v.action is Action.RETRY
    assert not v.counted


@pytest.mark.parametrize(
    "error", [APITransientError("503"), SubmissionPaused("quota"), TimeoutError("t")]
)
def test_errors_a_stage_handles_by_policy_go_back_to_it(error: Exception) -> None:
    """Transient API errors and pauses keep the stage's own handling (SPEC §4)."""
    if isinstance(error, TimeoutError):
        # A bare TimeoutError is not an API outcome: an unforeseen one, retried.
        assert verdict("sync", error, 1, 5).action is Action.RETRY
        return
    v = verdict("sync", error, attempts=50, max_retries=5)
    assert v.action is Action.PASS
    assert not v.counted


def test_unexpected_errors_retry_with_growing_backoff_then_fail_for_good() -> None:
    """max_retries retries after the first try; then the reason names type and message."""
    error = ValueError("boom\n  at line 3")
    delays = []
    for attempts in (1, 2, 3):
        v = verdict("deliver", error, attempts, max_retries=3, base=1.0, cap=3.0)
        assert v.action is Action.RETRY
        assert v.counted
        delays.append(v.delay)
    assert delays == [1.0, 2.0, 3.0]  # doubling, capped
    final = verdict("deliver", error, 4, max_retries=3)
    assert final.action is Action.FAIL
    assert final.reason == "internal error: ValueError: boom at line 3"
    permanent = verdict("collect", APIPermanentError("404 not found"), 6, max_retries=5)
    assert permanent.reason == "internal error: APIPermanentError: 404 not found"


def test_backoff_is_capped_for_any_attempt() -> None:
    assert backoff(0, 0.5, 10) == 0.5
    assert backoff(10_000, 0.5, 10) == 10


# ---- the guard, against a real SQLite file ------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _guard(tmp_path: Path, max_retries: int = 2) -> tuple[Supervisor, Store, Clock]:
    store = await Store.open(tmp_path / "state.sqlite3")
    clock = Clock()
    return Supervisor(store, get_logger("test"), clock, max_retries, 1.0, 8.0), store, clock


async def _rows(store: Store) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await store._all("SELECT stage, unit, attempts FROM unit_attempts")]


async def test_a_failing_unit_is_backed_off_retried_and_forgotten_once_it_succeeds(
    tmp_path: Path,
) -> None:
    """The try is recorded before the unit runs; a failure backs only that unit off; a
    success removes the record. Another unit of the stage is not held up meanwhile."""
    guard, store, clock = await _guard(tmp_path)
    seen: list[int] = []
    before = metrics.UNIT_FAILURES.labels(stage="deliver")._value.get()

    async def flaky() -> None:
        seen.append(len(await _rows(store)))  # recorded before running
        if len(seen) == 1:
            raise KeyError("first time only")

    async def fine() -> None:
        return None

    try:
        assert not await guard.run("deliver", "job:a", flaky)
        assert metrics.UNIT_FAILURES.labels(stage="deliver")._value.get() == before + 1
        assert await _rows(store) == [("deliver", "job:a", 1)]
        assert not await guard.run("deliver", "job:a", flaky)  # still backed off
        assert seen == [1]
        assert await guard.run("deliver", "job:b", fine)  # the stage goes on
        clock.now += 1.0
        assert await guard.run("deliver", "job:a", flaky)
        assert seen == [1, 1]
        assert await _rows(store) == []
    finally:
        await store.close()


async def test_a_unit_that_keeps_failing_is_given_up_with_an_internal_error_reason(
    tmp_path: Path,
) -> None:
    """After max_retries retries the unit's give-up runs with "internal error: ..."."""
    guard, store, clock = await _guard(tmp_path, max_retries=2)
    reasons: list[str] = []

    async def broken() -> None:
        raise RuntimeError("always")

    async def give_up(reason: str) -> None:
        reasons.append(reason)

    try:
        for _ in range(3):
            await guard.run("intake", "job:x", broken, give_up)
            clock.now += 100
        assert reasons == ["internal error: RuntimeError: always"]
        assert await _rows(store) == []
    finally:
        await store.close()


async def test_a_unit_that_killed_the_process_too_often_is_quarantined_without_running(
    tmp_path: Path,
) -> None:
    """Tries recorded by earlier processes that never reported back (kill -9 inside the
    unit): once max_retries + 1 of them are on record, the unit does not run again."""
    guard, store, _ = await _guard(tmp_path, max_retries=1)
    for _ in range(2):  # two processes died inside this unit
        await store.unit_started("intake", "job:poison", 0.0)
    ran: list[bool] = []
    reasons: list[str] = []

    async def poison() -> None:
        ran.append(True)

    async def give_up(reason: str) -> None:
        reasons.append(reason)

    try:
        assert not await guard.run("intake", "job:poison", poison, give_up)
        assert ran == []
        assert reasons
        assert "crashed the daemon 2 times" in reasons[0]
        assert await _rows(store) == []
    finally:
        await store.close()


async def test_a_full_disk_holds_the_stage_says_so_once_and_ends_by_itself(
    tmp_path: Path,
) -> None:
    """ENOSPC holds the whole stage (every unit waits), does not count against the unit,
    shows in the metric and the `blocked` fact that `embedd status` renders, and the
    first success after it ends the hold."""
    guard, store, clock = await _guard(tmp_path, max_retries=0)
    full = [True]

    async def write() -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")

    gauge = metrics.STAGE_BLOCKED.labels(stage="deliver", reason="disk full")
    try:
        for _ in range(3):  # with max_retries = 0 an ordinary error would fail the unit
            assert not await guard.run("deliver", "job:a", write)
            assert not await guard.run("deliver", "job:b", write)  # held: not even tried
            clock.now += 100
        assert guard.held("deliver") == "disk full"
        assert gauge._value.get() == 1
        facts = await store.facts()
        assert facts["blocked"]["deliver"]["reason"] == "disk full"
        assert await _rows(store) == [("deliver", "job:a", 0)]
        text = render(
            {
                "counts": {"files": {}, "requests": {}, "shards": {}},
                "batches": [],
                "files": [],
                "blocked": {"deliver": "disk full"},
                "spend_today_usd": "0",
                "spend_month_usd": "0",
            }
        )
        assert "BLOCKED:  deliver stage held: disk full" in text
        full[0] = False
        assert await guard.run("deliver", "job:a", write)
        assert guard.held("deliver") is None
        assert gauge._value.get() == 0
        assert (await store.facts())["blocked"] is None
    finally:
        await store.close()


async def test_a_unit_that_finishes_every_time_never_accumulates_tries(tmp_path: Path) -> None:
    """A unit run again and again (polling a batch in flight) starts afresh each time:
    its finished tries never add up to a quarantine."""
    guard, store, _ = await _guard(tmp_path, max_retries=1)
    runs: list[int] = []

    async def poll() -> None:
        runs.append(1)

    try:
        for _ in range(5):
            assert await guard.run("collect", "shard:s", poll)
        assert len(runs) == 5
        assert await _rows(store) == []
    finally:
        await store.close()


async def test_an_unusable_database_leaves_the_guard(tmp_path: Path) -> None:
    """A daemon-level fault is not swallowed: the TaskGroup must see it."""
    guard, store, _ = await _guard(tmp_path)

    async def corrupt() -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    try:
        with pytest.raises(sqlite3.DatabaseError):
            await guard.run("collect", "shard:s", corrupt)
    finally:
        await store.close()
