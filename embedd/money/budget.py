"""Daily and monthly spending budgets, and the daemon's money at run time.

The decision (`Budget.check`) is pure: no I/O, `now` injected. Periods are UTC
calendar days and months. A budget is *crossed* when the spend of its period, plus
the cost about to be incurred, goes over the limit (reaching it exactly is still
within budget). What happens then follows `action`:

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

At run time (`submission_allowed`, `check_spend`): each period's spend is the sum of
`cost_usd` of the usage rows in the state database since the period started (UTC day
and month of `rt.clock()`; `embedd.money.ledger.period_spend`, the same sum `embedd status`
shows), plus the estimated cost of batches submitted but not billed yet (a batch's
usage is only known when it ends; without this, two batches could each pass a check
the pair crosses). The submission's own cost is its tokens at the lane's price.

What the daemon does with a decision:

* an alert is logged as a warning and appended to the ledger once per budget and
  period (the ledger's key makes a repeat a no-op, also across restarts);
* `pause`: `False` — the caller keeps the work queued and asks again later; after the
  rollover the new period starts at zero and the work goes out;
* the state (limits, spend, hold and its end) is the daemon fact `budget`, which
  `embedd status` shows; it is written only when it changes.

New usage reaches the ledger through `flush_ledger`, which then calls `check_spend`:
asked again with nothing to submit, so a crossing caused by usage that came in above
its estimate also raises the alert. Entries are stamped with the books' clock
(`entry_maker`), the clock budgets use to tell which day and month a cost belongs to.

Known limit: sync calls in flight (at most a handful, seconds long) are not counted
until their reply is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from embedd.money import ledger
from embedd.money.books import Books
from embedd.money.ledger import (
    AlertEntry,
    BudgetAction,
    BudgetName,
    EntryMaker,
    LedgerEntry,
    as_utc,
    entry_row,
    format_ts,
    period_spend,
)
from embedd.money.prices import format_usd, lane_cost
from embedd.state.states import SHARD_IN_FLIGHT

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


# ---- at run time ------------------------------------------------------------------

FACT = "budget"


@dataclass(frozen=True, slots=True)
class Spend:
    """Billed spend of the UTC day and month of `now`, and the estimate of unbilled batches."""

    today: Decimal
    month: Decimal
    in_flight: Decimal


def entry_maker(rt: Books) -> EntryMaker:
    """Ledger entries for this daemon: its model, dimensions, prices and clock."""
    s = rt.settings
    return EntryMaker(s.openai_model, s.openai_dimensions, rt.emulated, rt.prices, rt.clock)


def ledger_time(rt: Books) -> datetime:
    """The time a ledger entry made now is stamped with."""
    return datetime.fromtimestamp(rt.clock(), UTC)


async def flush_ledger(rt: Books) -> int:
    """Append every ledger row not yet in ledger.jsonl; return how many were appended.

    New usage may have crossed a budget: it is checked once the lines are written.
    """
    appended = await ledger.flush(rt.store, rt.ledger)
    if any(isinstance(entry, LedgerEntry) for entry in appended):
        await check_spend(rt)
    return len(appended)


async def record_dedup(rt: Books, job: str, lane: str, tokens: int) -> None:
    """A `kind: "dedup"` ledger line for what deduplication saved one file: no cost.

    Keyed by the job, so delivering the file again after a crash adds no second line.
    """
    entry = entry_maker(rt).dedup(job, lane=lane, dedup_tokens=tokens)
    await rt.store.add_ledger(*entry_row(entry))
    await flush_ledger(rt)


def budget_of(rt: Books) -> Budget | None:
    """The configured budget, or None when neither limit is set."""
    s = rt.settings
    if s.budget_daily_usd is None and s.budget_monthly_usd is None:
        return None
    return Budget(s.budget_daily_usd, s.budget_monthly_usd, s.budget_action)  # type: ignore[arg-type]


async def spend(rt: Books, now: datetime) -> Spend:
    """What the day and month of `now` have cost so far, and what is in flight."""
    day_ts = format_ts(period_start(now, "daily"))
    month_ts = format_ts(period_start(now, "monthly"))
    billed = rt.ledger.remembered_spend(day_ts, month_ts)
    if billed is None:
        generation = rt.ledger.generation
        billed = period_spend(await rt.store.ledger_lines_since(month_ts), day_ts)
        rt.ledger.remember_spend(day_ts, month_ts, billed, generation)
    # Shards whose batch may still bill: planned and submitted but not yet collected.
    tokens = sum(int(r["tokens"]) for r in await rt.store.shards_in(*SHARD_IN_FLIGHT))
    in_flight = lane_cost(rt.prices, rt.settings.openai_model, tokens, "batch")
    return Spend(billed.today, billed.month, in_flight)


async def submission_allowed(rt: Books, tokens: int, lane: str) -> bool:
    """True when submitting `tokens` more on `lane` keeps within the budgets.

    With `warn` this is always True (an alert is recorded when a budget is crossed);
    with `pause` it is False while the submission would cross one.
    """
    budget = budget_of(rt)
    if budget is None:
        return True
    now = ledger_time(rt)
    current = await spend(rt, now)
    decision = budget.check(
        current.today + current.in_flight,
        current.month + current.in_flight,
        lane_cost(rt.prices, rt.settings.openai_model, tokens, lane),
        now,
    )
    await _act(rt, budget, now, current, decision)
    return decision.allowed


async def check_spend(rt: Books) -> None:
    """After usage was recorded: alert if the billed spend alone crossed a budget."""
    budget = budget_of(rt)
    if budget is None:
        return
    now = ledger_time(rt)
    current = await spend(rt, now)
    decision = budget.check(current.today, current.month, Decimal(0), now)
    # Only the next submission decides about a hold; this refreshes the spend shown.
    await _act(rt, budget, now, current, decision, decides_hold=False)


async def _act(
    rt: Books,
    budget: Budget,
    now: datetime,
    current: Spend,
    decision: BudgetDecision,
    *,
    decides_hold: bool = True,
) -> None:
    """Record the decision's alerts; publish the budget fact if it changed."""
    for alert in decision.alerts:
        await _alert(rt, alert)
    fact = _fact(budget, current, decision)
    previous = (await rt.store.facts()).get(FACT)
    before = previous if isinstance(previous, dict) else {}
    if not decides_hold:
        fact["held_by"] = before.get("held_by")
        fact["paused_until"] = before.get("paused_until")
    elif decision.held_by is not None and before.get("held_by") is None:
        rt.log.warning(
            "budget.hold",
            budget=decision.held_by,
            until=fact["paused_until"],
            spent_today_usd=fact["spent_today_usd"],
            spent_month_usd=fact["spent_month_usd"],
        )
    elif decision.held_by is None and before.get("held_by") is not None:
        rt.log.info("budget.resumed", at=format_ts(now))
    if fact != previous:
        await rt.store.set_fact(FACT, fact)


async def _alert(rt: Books, alert: AlertEntry) -> None:
    """Log and record an alert, once per budget and period."""
    if alert.key in rt.ledger:
        return
    rt.log.warning(
        "budget.crossed",
        budget=alert.budget,
        period=alert.period,
        limit_usd=format_usd(alert.limit_usd),
        spent_usd=format_usd(alert.spent_usd),
        next_cost_usd=format_usd(alert.next_cost_usd),
        action=alert.action,
    )
    await ledger.record(rt.store, rt.ledger, alert)


def _fact(budget: Budget, current: Spend, decision: BudgetDecision) -> dict[str, Any]:
    """The `budget` daemon fact: JSON-ready, money as exact decimal strings."""

    def usd(value: Decimal | None) -> str | None:
        return None if value is None else format_usd(value)

    return {
        "action": budget.action,
        "daily_usd": usd(budget.daily_usd),
        "monthly_usd": usd(budget.monthly_usd),
        "spent_today_usd": usd(current.today),
        "spent_month_usd": usd(current.month),
        "in_flight_usd": usd(current.in_flight),
        "held_by": decision.held_by,
        "paused_until": format_ts(decision.resume_at) if decision.resume_at else None,
    }
