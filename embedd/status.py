"""`embedd status`: what the daemon is doing, read straight from the state database.

It opens the database read-only and creates nothing (WAL lets it read while the
daemon writes; `immutable` when the daemon is stopped; see
`embedd.state.store.connect_readonly`), so it works whether the daemon runs or not, and run
by another user it never leaves a file the daemon cannot write. The queries are the
store's `read_*` functions; this module only formats. `gather` returns plain data;
`render` turns it into text; `--watch` redraws it with a progress bar per batch and
per file.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from embedd.money.budget import period_start
from embedd.money.ledger import format_ts, period_spend
from embedd.money.prices import format_usd
from embedd.state.states import FILE_TRANSITIONS, REQUEST_TRANSITIONS, SHARD_TRANSITIONS
from embedd.state.store import (
    connect_readonly,
    read_active_files,
    read_counts,
    read_facts,
    read_ledger_lines_since,
    read_shards_in_flight,
)

BAR = 24
# The states `render` counts, in the order of their tables (an abandoned shard
# carried nothing and is not shown).
_FILE_STATES = tuple(FILE_TRANSITIONS)
_REQUEST_STATES = tuple(REQUEST_TRANSITIONS)
_SHARD_STATES = tuple(s for s in SHARD_TRANSITIONS if s != "abandoned")


def gather(
    db: Path, *, now: float | None = None, budget: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything `embedd status` shows, as JSON-ready data."""
    now = time.time() if now is None else now
    if not db.exists():
        return {"database": str(db), "running": False, "error": "no state database yet"}
    at = datetime.fromtimestamp(now, UTC)
    day = format_ts(period_start(at, "daily"))
    month = format_ts(period_start(at, "monthly"))
    with connect_readonly(db) as conn:
        counts = read_counts(conn)
        facts = read_facts(conn)
        batches = [
            {
                "shard": r["id"],
                "batch_id": r["batch_id"],
                "state": r["state"],
                "status": r["status"],
                "lines": r["lines"],
                "tokens": r["tokens"],
                "request_counts": json.loads(r["request_counts"]) if r["request_counts"] else None,
                "age_s": round(now - float(r["submitted_at"] or r["created_at"]), 1),
            }
            for r in read_shards_in_flight(conn)
        ]
        files = [
            {
                "job": r["job"],
                "name": r["name"],
                "lane": r["lane"],
                "state": r["state"],
                "pieces": int(r["pieces"]),
                "embedded": int(r["embedded"]),
            }
            for r in read_active_files(conn)
        ]
        spent = period_spend(read_ledger_lines_since(conn, month), day)
    daemon = facts.get("daemon") or {}
    client = facts.get("client") or {}
    return {
        "database": str(db),
        "daemon_pid": daemon.get("pid"),
        "counts": counts,
        "batches": batches,
        "files": files,
        "breaker": client.get("breaker"),
        "paused": (facts.get("paused") or {}).get("reason"),
        "blocked": {
            str(stage): str((hold or {}).get("reason"))
            for stage, hold in (facts.get("blocked") or {}).items()
        },
        "queue_limit": facts.get("queue_limit"),
        "spend_today_usd": format_usd(spent.today),
        "spend_month_usd": format_usd(spent.month),
        "budget": _budget(facts.get("budget"), budget, now),
    }


def _budget(fact: object, limits: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """The budget as the daemon last saw it; `limits` (from the config) win over the
    fact's. A hold whose end has passed is not shown: the daemon resumes at rollover."""
    merged: dict[str, Any] = dict(fact) if isinstance(fact, dict) else {}
    merged.update({k: v for k, v in (limits or {}).items() if v is not None})
    if not merged.get("daily_usd") and not merged.get("monthly_usd"):
        return None
    until = merged.get("paused_until")
    if not isinstance(until, str) or datetime.fromisoformat(until).timestamp() <= now:
        merged["held_by"] = None
        merged["paused_until"] = None
    return merged


def _bar(done: int, total: int) -> str:
    if total <= 0:
        return "[" + " " * BAR + "]"
    filled = round(BAR * min(done, total) / total)
    return "[" + "#" * filled + "." * (BAR - filled) + f"] {done}/{total}"


def render(data: dict[str, Any], *, bars: bool = False) -> str:
    """The status as a person reads it."""
    if data.get("error"):
        return f"embedd status: {data['error']} ({data['database']})"
    c = data["counts"]
    out = [
        "files:    " + _fmt(c["files"], _FILE_STATES),
        "requests: " + _fmt(c["requests"], _REQUEST_STATES),
        "batches:  " + _fmt(c["shards"], _SHARD_STATES),
    ]
    breaker = data.get("breaker")
    if isinstance(breaker, dict):
        out.append(f"breaker:  {breaker.get('state', '?')}")
    if data.get("paused"):
        out.append(f"PAUSED:   {data['paused']}")
    for stage, reason in sorted((data.get("blocked") or {}).items()):
        out.append(f"BLOCKED:  {stage} stage held: {reason} (retried with backoff)")
    budget = data.get("budget") or {}
    out.append(
        f"spent:    today ${data['spend_today_usd']}{_of(budget.get('daily_usd'), 'daily')}, "
        f"this month ${data['spend_month_usd']}{_of(budget.get('monthly_usd'), 'monthly')}"
    )
    if budget.get("held_by"):
        out.append(
            f"PAUSED:   by the {budget['held_by']} budget until {budget['paused_until']} "
            "(work is kept and submitted after the rollover)"
        )
    if data["batches"]:
        out.append("")
        out.append("batches in flight:")
        for b in data["batches"]:
            rc = b["request_counts"] or {}
            done = int(rc.get("completed", 0)) + int(rc.get("failed", 0))
            total = int(rc.get("total", 0)) or b["lines"]
            progress = _bar(done, total) if bars else f"{done}/{total}"
            out.append(
                f"  {b['batch_id'] or b['shard']}  {b['status'] or b['state']:<11} "
                f"{progress}  age {_age(b['age_s'])}"
            )
    if data["files"]:
        out.append("")
        out.append("files in progress:")
        for f in data["files"]:
            progress = (
                _bar(f["embedded"], f["pieces"]) if bars else f"{f['embedded']}/{f['pieces']}"
            )
            out.append(f"  {f['name']:<32} {f['lane']:<5} {f['state']:<8} {progress}")
    return "\n".join(out)


def _of(limit: object, which: str) -> str:
    return f" of ${limit} {which} budget" if limit else ""


def _fmt(counts: dict[str, int], order: tuple[str, ...]) -> str:
    return "  ".join(f"{s} {counts.get(s, 0)}" for s in order)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def status_main(
    db: Path,
    *,
    as_json: bool,
    watch: bool,
    interval: float = 1.0,
    out: TextIO | None = None,
    budget: dict[str, Any] | None = None,
) -> int:
    """`budget`: the configured limits (`daily_usd`, `monthly_usd`, `action`) to show
    even before the daemon has checked a submission against them."""
    stream = out or sys.stdout
    while True:
        data = gather(db, budget=budget)
        if as_json:
            stream.write(json.dumps(data, indent=2) + "\n")
        else:
            if watch:
                stream.write("\x1b[2J\x1b[H")  # clear the screen, cursor home
            stream.write(render(data, bars=watch) + "\n")
        stream.flush()
        if not watch:
            return 0  # "no database yet" is a state, not a failure, for monitoring scripts
        try:
            time.sleep(interval)
        except KeyboardInterrupt:
            return 0
