"""Accounting: ledger rows from the state database to `ledger.jsonl`, and dedup lines.

A usage row is stored in the same transaction that applies its results; the line
is appended to the ledger file afterwards and the row marked written. A crash in
between leaves the row unwritten, and `flush_ledger` (at start and after every
collection) appends it — the ledger's own key check makes a repeat harmless.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from embedd.cost import entry_row, make_entry, parse_line
from embedd.runtime import Runtime


async def flush_ledger(rt: Runtime) -> int:
    """Append every ledger row not yet in ledger.jsonl; return how many were appended."""
    appended = 0
    for row in await rt.store.unwritten_ledger():
        entry = parse_line(row["line"])
        if await asyncio.to_thread(rt.ledger.append, entry):
            appended += 1
        await rt.store.mark_ledger_written(row["id"])
    return appended


async def record_dedup(rt: Runtime, job: str, lane: str, tokens: int) -> None:
    """A ledger line for what deduplication saved one file: no requests, no cost."""
    s = rt.settings
    entry = make_entry(
        "sync" if lane == "sync" else "batch",
        batch_id=f"dedup:{job}",
        model=s.openai_model,
        dimensions=s.openai_dimensions,
        requests=0,
        tokens=0,
        estimated_tokens=0,
        dedup_tokens=tokens,
        emulated=rt.emulated,
        prices=rt.prices,
        now=datetime.now(UTC),
    )
    await rt.store.add_ledger(*entry_row(entry))
    await flush_ledger(rt)
