"""Budgets at run time: may this submission go out, given what was spent?

The decision is `embedd.budget.Budget.check` (pure); this module feeds it and acts on
it. Each period's spend is the sum of `cost_usd` of the usage rows in the state
database since the period started (UTC day and month of `rt.clock()`), plus the
estimated cost of batches submitted but not billed yet (a batch's usage is only known
when it ends; without this, two batches could each pass a check the pair crosses).
The submission's own cost is its tokens at the lane's price.

What the daemon does with a decision:

* an alert is logged as a warning and appended to the ledger once per budget and
  period (the ledger's key makes a repeat a no-op, also across restarts);
* `pause`: `False` — the caller keeps the work queued and asks again later; after the
  rollover the new period starts at zero and the work goes out;
* the state (limits, spend, hold and its end) is the daemon fact `budget`, which
  `embedd status` shows; it is written only when it changes.

After usage is recorded, `check_spend` asks again with nothing to submit, so a
crossing caused by usage that came in above its estimate also raises the alert.

Known limit: sync calls in flight (at most a handful, seconds long) are not counted
until their reply is recorded.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from embedd.books import Books
from embedd.budget import Budget, BudgetDecision, period_start
from embedd.cost import (
    AlertEntry,
    LedgerEntry,
    Totals,
    cost,
    entry_row,
    format_ts,
    format_usd,
    money,
    parse_line,
    price_for,
)
from embedd.ledger import Ledger

FACT = "budget"
# Shards whose batch may still bill: planned and submitted but not yet collected.
_UNBILLED = ("planned", "uploaded", "unknown", "submitted", "collecting")


@dataclass(frozen=True, slots=True)
class Spend:
    """Billed spend of the UTC day and month of `now`, and the estimate of unbilled batches."""

    today: Decimal
    month: Decimal
    in_flight: Decimal


@dataclass(frozen=True, slots=True)
class _Memo:
    key: tuple[str, str, Totals]
    today: Decimal
    month: Decimal


# The period sums only change when a ledger line is appended; remember them per
# ledger so a check (once a second while held, once per sync call) does not re-read
# the month's rows each time. Keyed weakly: a closed daemon's entry goes with it.
_MEMO: weakref.WeakKeyDictionary[Ledger, _Memo] = weakref.WeakKeyDictionary()


def budget_of(rt: Books) -> Budget | None:
    """The configured budget, or None when neither limit is set."""
    s = rt.settings
    if s.budget_daily_usd is None and s.budget_monthly_usd is None:
        return None
    return Budget(s.budget_daily_usd, s.budget_monthly_usd, s.budget_action)  # type: ignore[arg-type]


def now_of(rt: Books) -> datetime:
    """The runtime's wall clock as an aware UTC datetime."""
    return datetime.fromtimestamp(rt.clock(), UTC)


def lane_cost(rt: Books, tokens: int, lane: str) -> Decimal:
    """The estimated cost of `tokens` on `lane` (batch or sync) for the configured model."""
    price = price_for(rt.prices, rt.settings.openai_model)
    return money(cost(max(tokens, 0), price.batch if lane == "batch" else price.standard))


async def spend(rt: Books, now: datetime) -> Spend:
    """What the day and month of `now` have cost so far, and what is in flight."""
    day_ts = format_ts(period_start(now, "daily"))
    month_ts = format_ts(period_start(now, "monthly"))
    key = (day_ts, month_ts, rt.ledger.totals())
    memo = _MEMO.get(rt.ledger)
    if memo is None or memo.key != key:
        today = month = Decimal(0)
        for line in await rt.store.ledger_lines_since(month_ts):
            entry = parse_line(line)
            if not isinstance(entry, LedgerEntry):
                continue
            month += entry.cost_usd
            if format_ts(entry.ts) >= day_ts:
                today += entry.cost_usd
        memo = _Memo(key, today, month)
        _MEMO[rt.ledger] = memo
    tokens = sum(int(r["tokens"]) for r in await rt.store.shards_in(*_UNBILLED))
    return Spend(memo.today, memo.month, lane_cost(rt, tokens, "batch"))


async def submission_allowed(rt: Books, tokens: int, lane: str) -> bool:
    """True when submitting `tokens` more on `lane` keeps within the budgets.

    With `warn` this is always True (an alert is recorded when a budget is crossed);
    with `pause` it is False while the submission would cross one.
    """
    budget = budget_of(rt)
    if budget is None:
        return True
    now = now_of(rt)
    current = await spend(rt, now)
    decision = budget.check(
        current.today + current.in_flight,
        current.month + current.in_flight,
        lane_cost(rt, tokens, lane),
        now,
    )
    await _act(rt, budget, now, current, decision)
    return decision.allowed


async def check_spend(rt: Books) -> None:
    """After usage was recorded: alert if the billed spend alone crossed a budget."""
    budget = budget_of(rt)
    if budget is None:
        return
    now = now_of(rt)
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
    ident, ts, kind, line = entry_row(alert)
    await rt.store.add_ledger(ident, ts, kind, line)
    await asyncio.to_thread(rt.ledger.append, alert)
    await rt.store.mark_ledger_written(ident)


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
