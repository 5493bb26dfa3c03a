"""Daily and monthly spending budgets: pure decisions, no I/O, `now` injected.

Periods are UTC calendar days and months. A budget is *crossed* when the spend of
its period, plus the cost about to be incurred, goes over the limit (reaching it
exactly is still within budget). What happens then follows `action`:

* `warn`: the work goes ahead; an alert is due for the period.
* `pause`: the work is held (kept, never failed) until the period rolls over, and an
  alert is due. The daemon asks again before each submission; after a rollover the
  new period starts at zero spend.

An alert carries its period key ("2026-11-28" or "2026-11"); the ledger keeps one
alert line per (budget, period), so `check` can say "alert" every time it is asked
and the alert is still written, logged and shown once. To notice a crossing caused
by usage that arrived after the fact (batch usage is only known at the end), call
`check` with `next_cost = 0` after recording it.

Note: a single submission whose cost alone exceeds a `pause` budget is held every
period; `embedd status` shows the hold and the operator raises the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from embedd.cost import AlertEntry, BudgetAction, BudgetName, as_utc

_BUDGETS: tuple[BudgetName, ...] = ("daily", "monthly")


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """What `Budget.check` decided.

    `allowed`: the work may be submitted now. `held_by`: the budget that holds it
    (monthly wins when both do, since it holds longer). `resume_at`: when the hold
    ends (the rollover of `held_by`). `alerts`: alert entries to append to the
    ledger (one per crossed budget; the ledger drops repeats within a period).
    """

    allowed: bool
    held_by: BudgetName | None = None
    resume_at: datetime | None = None
    alerts: tuple[AlertEntry, ...] = ()


@dataclass(frozen=True, slots=True)
class Budget:
    """`[budget]`: limits in USD per UTC day / month (None: no limit) and the action."""

    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None
    action: BudgetAction = "warn"

    def __post_init__(self) -> None:
        if self.action not in ("warn", "pause"):
            raise ValueError(f"budget action must be 'warn' or 'pause', got {self.action!r}")
        for name in ("daily_usd", "monthly_usd"):
            limit = getattr(self, name)
            if limit is not None and (
                not isinstance(limit, Decimal) or not limit.is_finite() or limit < 0
            ):
                raise ValueError(f"budget {name} must be a Decimal >= 0, got {limit!r}")

    def limit(self, which: BudgetName) -> Decimal | None:
        """The limit of the daily or monthly budget."""
        return self.daily_usd if which == "daily" else self.monthly_usd

    def check(
        self,
        spent_today: Decimal,
        spent_month: Decimal,
        next_cost: Decimal,
        now: datetime,
    ) -> BudgetDecision:
        """Decide whether work costing `next_cost` may be submitted at `now`.

        `spent_today` / `spent_month` are the spend of the UTC day and month of `now`.
        """
        if next_cost < 0:
            raise ValueError(f"next_cost must be >= 0, got {next_cost!r}")
        utc = as_utc(now)
        alerts: list[AlertEntry] = []
        held: list[BudgetName] = []
        spent_of: dict[BudgetName, Decimal] = {"daily": spent_today, "monthly": spent_month}
        for which in _BUDGETS:
            limit = self.limit(which)
            spent = spent_of[which]
            if limit is None or spent + next_cost <= limit:
                continue
            alerts.append(
                AlertEntry(
                    ts=utc,
                    budget=which,
                    period=period_key(utc, which),
                    limit_usd=limit,
                    spent_usd=spent,
                    next_cost_usd=next_cost,
                    action=self.action,
                )
            )
            if self.action == "pause":
                held.append(which)
        if not held:
            return BudgetDecision(allowed=True, alerts=tuple(alerts))
        held_by: BudgetName = "monthly" if "monthly" in held else "daily"
        return BudgetDecision(
            allowed=False,
            held_by=held_by,
            resume_at=next_rollover(utc, held_by),
            alerts=tuple(alerts),
        )


def period_keys(now: datetime) -> tuple[str, str]:
    """The UTC day and month keys of `now`: ("2026-11-28", "2026-11")."""
    utc = as_utc(now)
    return utc.strftime("%Y-%m-%d"), utc.strftime("%Y-%m")


def period_key(now: datetime, which: BudgetName) -> str:
    """The key of the daily or monthly period containing `now`."""
    day, month = period_keys(now)
    return day if which == "daily" else month


def period_start(now: datetime, which: BudgetName) -> datetime:
    """The first instant (UTC) of the day or month containing `now`."""
    day = as_utc(now).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if which == "daily" else day.replace(day=1)


def next_rollover(now: datetime, which: BudgetName) -> datetime:
    """The first instant (UTC) of the next day or month after `now`."""
    start = period_start(now, which)
    if which == "daily":
        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)
