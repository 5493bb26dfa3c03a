"""Accounting: ledger rows from the state database to `ledger.jsonl`, and dedup lines.

A usage row is stored in the same transaction that applies its results; the line
is appended to the ledger file afterwards and the row marked written. A crash in
between leaves the row unwritten, and `flush_ledger` (at start and after every
collection) appends it — the ledger's own key check makes a repeat harmless.

Entries are stamped with the books' clock (`Books.clock`), the same clock budgets
use to tell which day and month a cost belongs to.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from embedd import metrics
from embedd.books import Books
from embedd.budgeting import check_spend
from embedd.cost import LedgerEntry, entry_row, make_dedup_entry, parse_line


def ledger_time(rt: Books) -> datetime:
    """The time a ledger entry made now is stamped with."""
    return datetime.fromtimestamp(rt.clock(), UTC)


async def flush_ledger(rt: Books) -> int:
    """Append every ledger row not yet in ledger.jsonl; return how many were appended.

    New usage may have crossed a budget: it is checked once the lines are written.
    """
    appended = 0
    usage = False
    for row in await rt.store.unwritten_ledger():
        entry = parse_line(row["line"])
        if await asyncio.to_thread(rt.ledger.append, entry):
            appended += 1
            usage = usage or isinstance(entry, LedgerEntry)
            if isinstance(entry, LedgerEntry):
                metrics.usage(
                    entry.kind,
                    entry.tokens,
                    float(entry.cost_usd),
                    float(entry.saved_usd + entry.dedup_saved_usd),
                )
        await rt.store.mark_ledger_written(row["id"])
    if usage:
        await check_spend(rt)
    return appended


async def record_dedup(rt: Books, job: str, lane: str, tokens: int) -> None:
    """A `kind: "dedup"` ledger line for what deduplication saved one file: no cost.

    Keyed by the job, so delivering the file again after a crash adds no second line.
    """
    s = rt.settings
    entry = make_dedup_entry(
        job,
        lane="sync" if lane == "sync" else "batch",
        model=s.openai_model,
        dimensions=s.openai_dimensions,
        dedup_tokens=tokens,
        emulated=rt.emulated,
        prices=rt.prices,
        now=ledger_time(rt),
    )
    await rt.store.add_ledger(*entry_row(entry))
    await flush_ledger(rt)
