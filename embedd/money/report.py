"""`embedd report`: cost aggregation (pure) and rendering as a table, CSV or JSON.

Rows are grouped by period (UTC day `2026-11-28`, ISO week `2026-W48` starting on
Monday, or month `2026-11`), model and whether the vectors were emulated (emulator
"costs" are shown apart, marked, so they are never taken for real spend). A total
row comes last; its sums equal the sums over the ledger's usage lines, exactly.
`--since` and `--until` are UTC dates and both are inclusive. Alert lines are not
usage and are left out.

Formats: `table` is for people (money at display precision, totals last); `csv`
(header + rows, exact decimals, opens in a spreadsheet) and `json` (money as exact
JSON numbers, see `embedd.files.jsonio`) are for programs.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Literal, TypeAlias

from embedd.files.jsonio import dumps_exact
from embedd.money.ledger import Entry, LedgerCorrupt, LedgerEntry, Totals, read_entries
from embedd.money.prices import format_usd

Grouping: TypeAlias = Literal["day", "week", "month"]
Format: TypeAlias = Literal["table", "csv", "json"]
TOTAL = "total"

_PCT = Decimal("0.1")
_RATIO = Decimal("0.0001")


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One line of the report: a period x model (x emulated) group, or the total.

    `standard_cost_usd` is what the synchronous API would have cost; `saving_pct`
    is `saved / standard` in percent (one decimal); `estimate_accuracy` is the local
    tiktoken estimate over the billed tokens (None when either is unknown / zero).
    """

    period: str
    model: str
    emulated: bool
    entries: int
    requests: int
    tokens: int
    cost_usd: Decimal
    standard_cost_usd: Decimal
    saved_usd: Decimal
    saving_pct: Decimal | None
    dedup_tokens: int
    dedup_saved_usd: Decimal
    estimated_tokens: int
    estimate_accuracy: Decimal | None


def period_of(day: date, by: Grouping) -> str:
    """The label of the period containing `day`: `2026-11-28`, `2026-W48`, `2026-11`."""
    if by == "day":
        return day.isoformat()
    if by == "week":
        year, week, _ = day.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{day.year:04d}-{day.month:02d}"


def _row(sums: Totals, period: str, model: str, emulated: bool) -> ReportRow:
    """The report row of `sums` (over usage entries only)."""
    saving = None
    if sums.standard_cost_usd:
        pct = sums.saved_usd / sums.standard_cost_usd * 100
        saving = pct.quantize(_PCT, rounding=ROUND_HALF_EVEN)
    accuracy = None
    if sums.tokens and sums.estimated_tokens:
        ratio = Decimal(sums.estimated_tokens) / Decimal(sums.tokens)
        accuracy = ratio.quantize(_RATIO, rounding=ROUND_HALF_EVEN)
    return ReportRow(
        period=period,
        model=model,
        emulated=emulated,
        entries=sums.entries,
        requests=sums.requests,
        tokens=sums.tokens,
        cost_usd=sums.cost_usd,
        standard_cost_usd=sums.standard_cost_usd,
        saved_usd=sums.saved_usd,
        saving_pct=saving,
        dedup_tokens=sums.dedup_tokens,
        dedup_saved_usd=sums.dedup_saved_usd,
        estimated_tokens=sums.estimated_tokens,
        estimate_accuracy=accuracy,
    )


def aggregate(
    entries: Iterable[Entry],
    by: Grouping = "day",
    since: date | None = None,
    until: date | None = None,
) -> list[ReportRow]:
    """Usage entries grouped by period and model, sorted, with the total row last.

    `since` / `until` are inclusive UTC dates. No usage in range gives `[]`.
    """
    groups: dict[tuple[str, str, bool], Totals] = {}
    total = Totals()
    for entry in entries:
        if not isinstance(entry, LedgerEntry):
            continue
        day = entry.ts.date()  # entries carry UTC times
        if (since is not None and day < since) or (until is not None and day > until):
            continue
        key = (period_of(day, by), entry.model, entry.emulated)
        groups[key] = groups.get(key, Totals()).add(entry)
        total = total.add(entry)
    if not groups:
        return []
    # Labels sort chronologically as text (zero-padded); real spend before emulated.
    rows = [_row(groups[key], *key) for key in sorted(groups)]
    # The total is marked emulated only when every group is.
    rows.append(_row(total, TOTAL, "all models", all(key[2] for key in groups)))
    return rows


_COLUMNS = (
    "period",
    "model",
    "emulated",
    "entries",
    "requests",
    "tokens",
    "cost_usd",
    "standard_cost_usd",
    "saved_usd",
    "saving_pct",
    "dedup_tokens",
    "dedup_saved_usd",
    "estimated_tokens",
    "estimate_accuracy",
)


def _exact(row: ReportRow) -> dict[str, object]:
    return {name: getattr(row, name) for name in _COLUMNS}


def _csv_cell(name: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal) and name.endswith("_usd"):
        return format_usd(value)
    return str(value)  # percentages and ratios keep their fixed places: "50.0"


def _usd(value: Decimal) -> str:
    """Money for people: cents from a cent up, two significant digits below."""
    if value == 0:
        return "$0"
    sign = "-" if value < 0 else ""
    size = abs(value)
    if size >= Decimal("0.01"):
        return f"{sign}${size:,.2f}"
    # 0.00000078 -> "$0.00000078": keep two significant digits of a tiny amount.
    places = -size.adjusted() + 1
    return f"{sign}${size:.{places}f}"


def _pct(value: Decimal | None) -> str:
    return "-" if value is None else f"{value}%"


def _table(rows: list[ReportRow]) -> str:
    header = (
        "period",
        "model",
        "requests",
        "tokens",
        "cost",
        "sync cost",
        "saved",
        "saving",
        "dedup tokens",
        "dedup saved",
        "estimate",
    )
    cells = [header]
    for row in rows:
        model = f"{row.model} (emulated)" if row.emulated else row.model
        accuracy = "-"
        if row.estimate_accuracy is not None:
            accuracy = _pct((row.estimate_accuracy * 100).quantize(_PCT, ROUND_HALF_EVEN))
        cells.append(
            (
                row.period,
                model,
                f"{row.requests:,}",
                f"{row.tokens:,}",
                _usd(row.cost_usd),
                _usd(row.standard_cost_usd),
                _usd(row.saved_usd),
                _pct(row.saving_pct),
                f"{row.dedup_tokens:,}",
                _usd(row.dedup_saved_usd),
                accuracy,
            )
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        parts = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(cells[0]), rule, *(fmt(line) for line in cells[1:-1]), rule, fmt(cells[-1])]
    return "\n".join(lines) + "\n"


def render(rows: list[ReportRow], fmt: Format = "table") -> str:
    """The report as text: an aligned `table`, `csv` with a header, or `json`.

    `json` is `{"rows": [...], "total": {...}}` with exact money; the last of `rows`
    must be the total row, as `aggregate` returns it.
    """
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for row in rows:
            writer.writerow(_csv_cell(k, v) for k, v in _exact(row).items())
        return buffer.getvalue()
    if fmt == "json":
        body = {"rows": [_exact(r) for r in rows[:-1]], "total": _exact(rows[-1]) if rows else None}
        return dumps_exact(body) + "\n"
    if fmt == "table":
        return _table(rows) if rows else ""
    raise ValueError(f"unknown report format {fmt!r}")


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedd report",
        description="Cost report from the ledger: requests, tokens, cost, what the "
        "synchronous API would have cost, and the saving.",
    )
    parser.add_argument("--by", choices=("day", "week", "month"), default="day")
    parser.add_argument("--since", type=_date, metavar="DATE", help="first UTC day (inclusive)")
    parser.add_argument("--until", type=_date, metavar="DATE", help="last UTC day (inclusive)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    # Resolved by the embedd CLI before it calls us; accepted so it may be passed through.
    parser.add_argument("--config", metavar="PATH", help="config file (its spool holds the ledger)")
    return parser


def report_main(argv: list[str], ledger_path: Path) -> int:
    """`embedd report ...`: print the report of `ledger_path`; the exit code (0, 1, 2)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the reason
        return exc.code if isinstance(exc.code, int) else 2
    if args.since and args.until and args.since > args.until:
        parser.print_usage(sys.stderr)
        print(
            f"embedd report: error: --since {args.since} is after --until {args.until}",
            file=sys.stderr,
        )
        return 2
    try:
        rows = aggregate(read_entries(ledger_path), args.by, args.since, args.until)
    except (LedgerCorrupt, OSError) as exc:
        print(f"embedd report: {exc}", file=sys.stderr)
        return 1
    if not rows:
        span = ""
        if args.since or args.until:
            span = f" from {args.since or 'the start'} to {args.until or 'today'}"
        print(f"No costs recorded yet{span} (ledger: {ledger_path}).")
        return 0
    sys.stdout.write(render(rows, args.format))
    return 0
