"""The circuit breaker state machine, driven by explicit timestamps."""

from __future__ import annotations

import pytest

from embedd.openai.breaker import CLOSED, HALF_OPEN, OPEN, TRANSITIONS, Breaker


def tripped(now: float = 0.0, failures: int = 3, cooldown: float = 30.0) -> Breaker:
    breaker = Breaker(failures=failures, cooldown=cooldown)
    for _ in range(failures):
        breaker.record_failure(now)
    return breaker


def test_stays_closed_below_threshold() -> None:
    """N-1 consecutive failures keep the breaker closed and calls flowing."""
    breaker = Breaker(failures=3, cooldown=30.0)
    breaker.record_failure(0.0)
    breaker.record_failure(1.0)
    assert breaker.state(1.0) == CLOSED
    assert breaker.allow(1.0)


def test_success_resets_the_consecutive_count() -> None:
    """Failures separated by a success do not add up."""
    breaker = Breaker(failures=2, cooldown=30.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    breaker.record_failure(1.0)
    assert breaker.state(1.0) == CLOSED


def test_opens_after_n_consecutive_failures_and_refuses_calls() -> None:
    """The Nth consecutive failure opens the breaker; nothing is allowed until cooldown."""
    breaker = tripped(now=10.0)
    assert breaker.state(10.0) == OPEN
    assert breaker.opened_at == 10.0
    assert not breaker.allow(10.0)
    assert not breaker.allow(39.9)
    assert breaker.retry_in(20.0) == pytest.approx(20.0)


def test_half_open_after_cooldown_allows_exactly_one_probe() -> None:
    """After the cooldown exactly one call is allowed through as a probe."""
    breaker = tripped(now=0.0)
    assert breaker.state(30.0) == HALF_OPEN
    assert breaker.allow(30.0)
    assert not breaker.allow(30.0)
    assert not breaker.allow(45.0)


def test_probe_success_closes() -> None:
    """A successful probe closes the breaker and clears the failure count."""
    breaker = tripped()
    assert breaker.allow(30.0)
    breaker.record_success()
    assert breaker.state(30.0) == CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.opened_at is None
    assert breaker.allow(30.0)


def test_probe_failure_reopens_for_a_full_cooldown() -> None:
    """A failed probe opens the breaker again, timed from the probe's failure."""
    breaker = tripped()
    assert breaker.allow(30.0)
    breaker.record_failure(31.0)
    assert breaker.state(31.0) == OPEN
    assert breaker.opened_at == 31.0
    assert not breaker.allow(60.0)
    assert breaker.allow(61.0)


def test_late_failures_do_not_extend_the_cooldown() -> None:
    """Failures of calls sent before the trip leave opened_at unchanged."""
    breaker = tripped(now=0.0)
    breaker.record_failure(5.0)
    assert breaker.opened_at == 0.0
    assert breaker.allow(30.0)


def test_lost_probe_is_replaced_after_a_cooldown() -> None:
    """A probe that never reports back does not wedge the breaker half-open."""
    breaker = tripped(now=0.0)
    assert breaker.allow(30.0)
    assert not breaker.allow(59.0)
    assert breaker.allow(60.0)


def test_snapshot_reports_state_for_status() -> None:
    """The status snapshot names the state, count and time to the next probe."""
    breaker = tripped(now=0.0)
    assert breaker.snapshot(10.0) == {
        "state": OPEN,
        "consecutive_failures": 3,
        "opened_at": 0.0,
        "retry_in_s": 20.0,
    }


def test_transition_table_covers_every_state_and_event() -> None:
    """Every (state, event) the code can fire has an entry, and targets are states."""
    states = {CLOSED, OPEN, HALF_OPEN}
    for state in states:
        for event in ("success", "failure", "trip"):
            assert TRANSITIONS[(state, event)] in states
    assert TRANSITIONS[(OPEN, "cooldown")] == HALF_OPEN


def test_rejects_nonsense_settings() -> None:
    """A threshold below one or a negative cooldown is refused."""
    with pytest.raises(ValueError, match="failures"):
        Breaker(failures=0, cooldown=1.0)
    with pytest.raises(ValueError, match="cooldown"):
        Breaker(failures=1, cooldown=-1.0)
