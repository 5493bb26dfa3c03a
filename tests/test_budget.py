"""Tests for embedd.money.budget: decisions at limits and rollovers, with an injected `now`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from embedd.money.budget import Budget, next_rollover, period_key, period_keys, period_start
from embedd.money.ledger import Ledger, read_entries

NOW = datetime(2026, 11, 28, 15, 30, tzinfo=UTC)
D = Decimal


def test_no_limits_always_allows() -> None:
    """Without limits every submission is allowed and no alert is due."""
    decision = Budget().check(D(10**6), D(10**6), D(10**6), NOW)
    assert decision.allowed
    assert decision.alerts == ()
    assert decision.held_by is None


def test_reaching_the_limit_exactly_is_allowed() -> None:
    """Spending exactly the limit is within budget: no hold, no alert."""
    budget = Budget(daily_usd=D("1.00"), action="pause")
    decision = budget.check(D("0.60"), D("0.60"), D("0.40"), NOW)
    assert decision.allowed
    assert decision.alerts == ()


def test_pause_holds_the_submission_that_would_cross() -> None:
    """With pause, the submission that would go over is held until UTC midnight."""
    budget = Budget(daily_usd=D("1.00"), action="pause")
    decision = budget.check(D("0.60"), D("0.60"), D("0.400000000001"), NOW)
    assert not decision.allowed
    assert decision.held_by == "daily"
    assert decision.resume_at == datetime(2026, 11, 29, tzinfo=UTC)
    (alert,) = decision.alerts
    assert (alert.budget, alert.period, alert.action) == ("daily", "2026-11-28", "pause")
    assert alert.limit_usd == D("1.00")
    assert alert.spent_usd == D("0.60")
    assert alert.next_cost_usd == D("0.400000000001")


def test_warn_never_holds_but_alerts() -> None:
    """With warn, work goes ahead over the limit and an alert is due."""
    budget = Budget(daily_usd=D(1), monthly_usd=D(5), action="warn")
    decision = budget.check(D(3), D(6), D(1), NOW)
    assert decision.allowed
    assert decision.resume_at is None
    assert [(a.budget, a.period) for a in decision.alerts] == [
        ("daily", "2026-11-28"),
        ("monthly", "2026-11"),
    ]


def test_monthly_hold_lasts_until_next_month() -> None:
    """A crossed monthly budget holds until the first of next month, and wins over daily."""
    budget = Budget(daily_usd=D(1), monthly_usd=D(20), action="pause")
    decision = budget.check(D("0.9"), D("19.9"), D("0.2"), NOW)
    assert not decision.allowed
    assert decision.held_by == "monthly"
    assert decision.resume_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert len(decision.alerts) == 2


def test_usage_after_the_fact_triggers_the_alert() -> None:
    """Checking with next_cost 0 after usage pushed spend over the limit still alerts."""
    budget = Budget(monthly_usd=D(5), action="pause")
    decision = budget.check(D(0), D("5.01"), D(0), NOW)
    assert not decision.allowed
    assert decision.alerts[0].period == "2026-11"
    assert budget.check(D(0), D(5), D(0), NOW).allowed


def test_rollover_starts_a_new_period() -> None:
    """After the day rolls over, spend starts at zero and work is allowed again."""
    budget = Budget(daily_usd=D(1), action="pause")
    held = budget.check(D(1), D(1), D("0.1"), NOW)
    assert not held.allowed
    assert held.resume_at is not None
    after = budget.check(D(0), D(1), D("0.1"), held.resume_at)
    assert after.allowed


def test_alert_is_written_once_per_period(tmp_path: Path) -> None:
    """Repeated checks in one period append one alert line; the next day appends another."""
    budget = Budget(daily_usd=D(1), action="warn")
    with Ledger(tmp_path / "ledger.jsonl") as ledger:
        written = []
        for minutes in (0, 1, 2):
            decision = budget.check(D(2), D(2), D(0), NOW + timedelta(minutes=minutes))
            written += [ledger.append(a) for a in decision.alerts]
        tomorrow = budget.check(D(2), D(2), D(0), NOW + timedelta(days=1))
        written += [ledger.append(a) for a in tomorrow.alerts]
    assert written == [True, False, False, True]
    periods = [getattr(e, "period", None) for e in read_entries(tmp_path / "ledger.jsonl")]
    assert periods == ["2026-11-28", "2026-11-29"]


def test_period_keys_use_utc() -> None:
    """Period keys are UTC day and month, whatever the clock's zone."""
    assert period_keys(NOW) == ("2026-11-28", "2026-11")
    late_in_new_york = datetime(2026, 11, 30, 21, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert period_keys(late_in_new_york) == ("2026-12-01", "2026-12")
    assert period_key(late_in_new_york, "monthly") == "2026-12"


@pytest.mark.parametrize(
    ("now", "which", "expected"),
    [
        (datetime(2026, 11, 28, 15, 30, tzinfo=UTC), "daily", datetime(2026, 11, 29, tzinfo=UTC)),
        (datetime(2026, 11, 28, tzinfo=UTC), "daily", datetime(2026, 11, 29, tzinfo=UTC)),
        (
            datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC),
            "daily",
            datetime(2026, 12, 1, tzinfo=UTC),
        ),
        (datetime(2028, 2, 28, 12, tzinfo=UTC), "daily", datetime(2028, 2, 29, tzinfo=UTC)),
        (datetime(2026, 11, 1, tzinfo=UTC), "monthly", datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, tzinfo=UTC), "monthly", datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, tzinfo=UTC), "daily", datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_next_rollover(now: datetime, which: str, expected: datetime) -> None:
    """The next rollover is the next UTC midnight or first of the month, strictly after now."""
    assert next_rollover(now, which) == expected  # type: ignore[arg-type]
    assert period_start(expected, which) == expected  # type: ignore[arg-type]
    assert period_start(now, which) <= now < expected  # type: ignore[arg-type]


def test_invalid_budgets_and_clocks_are_refused() -> None:
    """Unknown actions, negative or float limits, negative costs and naive clocks are errors."""
    with pytest.raises(ValueError, match="action"):
        Budget(action="stop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="daily_usd"):
        Budget(daily_usd=D(-1))
    with pytest.raises(ValueError, match="monthly_usd"):
        Budget(monthly_usd=5.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="next_cost"):
        Budget().check(D(0), D(0), D(-1), NOW)
    with pytest.raises(ValueError, match="aware"):
        Budget().check(D(0), D(0), D(0), datetime(2026, 1, 1))
