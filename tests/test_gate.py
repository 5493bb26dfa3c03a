"""The submission gate (embedd.pipeline.gate): the one owner of pause, queue limit and backoff,
on a real state database; its facts are what `embedd status` reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from embedd.logs import get_logger
from embedd.pipeline.gate import SubmissionGate
from embedd.state.store import Store
from embedd.status import gather


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Steps:
    """A backoff without jitter: attempt n waits 10·n seconds."""

    def delay(self, attempt: int, retry_after: float | None) -> float:
        return 10.0 * attempt


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "embedd.sqlite3")
    yield s
    await s.close()


def make_gate(store: Store, clock: Clock, queue_limit: int = 1000) -> SubmissionGate:
    return SubmissionGate(
        store,
        clock,
        get_logger("test.gate"),
        queue_limit=queue_limit,
        pause_for=60.0,
        backoff=Steps(),
    )


async def test_a_pause_holds_for_its_time_shows_in_status_and_ends_on_resume(
    store: Store,
) -> None:
    clock = Clock()
    gate = make_gate(store, clock)
    assert gate.may_submit()
    assert not gate.paused()
    assert gate.paused_reason is None
    with capture_logs() as logs:
        await gate.pause("HTTP 401 invalid_api_key")
        await gate.pause("HTTP 401 invalid_api_key")  # the same reason again: logged once
    assert [e["event"] for e in logs] == ["submission.paused"]
    assert gate.paused()
    assert not gate.may_submit()
    assert gate.paused_reason == "HTTP 401 invalid_api_key"
    assert gather(store.path, now=clock.now)["paused"] == "HTTP 401 invalid_api_key"
    assert (await store.facts())["paused"] == {
        "reason": "HTTP 401 invalid_api_key",
        "until": 1060.0,
    }
    clock.now = 1060.0  # its time is up: new work may try (the reason stays until one works)
    assert not gate.paused()
    assert gate.may_submit()
    assert gate.paused_reason == "HTTP 401 invalid_api_key"
    await gate.resume()
    assert gate.paused_reason is None
    assert gather(store.path, now=clock.now)["paused"] is None


async def test_a_full_queue_learns_a_lower_limit_once_and_backs_off_longer_each_time(
    store: Store,
) -> None:
    clock = Clock()
    gate = make_gate(store, clock, queue_limit=1000)
    first = await gate.queue_full(400)
    assert gate.queue_limit == 400
    assert (await store.facts())["queue_limit"] == 400
    assert not gate.may_submit()
    assert not gate.paused()
    clock.now += first
    assert gate.may_submit()
    second = await gate.queue_full(900)  # higher than what we know: not learned
    assert gate.queue_limit == 400
    assert (first, second) == (10.0, 20.0)  # the second in a row waits longer
    assert not gate.may_submit()
    assert gather(store.path, now=clock.now)["queue_limit"] == 400


async def test_a_learned_limit_is_restored_at_start_never_raised(store: Store) -> None:
    clock = Clock()
    gate = make_gate(store, clock, queue_limit=1000)
    gate.restore({"queue_limit": 300})
    assert gate.queue_limit == 300
    gate.restore({"queue_limit": 5000})
    assert gate.queue_limit == 300
    gate.restore({})
    assert gate.queue_limit == 300
