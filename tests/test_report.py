"""Tests for embedd.money.report: aggregation, the three formats and `embedd report`."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.money.ledger import AlertEntry, Ledger, LedgerEntry, Totals, make_entry
from embedd.money.prices import DEFAULT_PRICES
from embedd.money.report import TOTAL, aggregate, period_of, render, report_main

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MONEY = ("cost_usd", "standard_cost_usd", "saved_usd", "dedup_saved_usd")
COUNTS = ("entries", "requests", "tokens", "dedup_tokens", "estimated_tokens")


def usage(
    batch_id: str,
    kind: str = "batch",
    tokens: int = 1000,
    now: datetime = NOW,
    model: str = "text-embedding-3-large",
    emulated: bool = False,
    estimated: int | None = None,
) -> LedgerEntry:
    return make_entry(
        kind,  # type: ignore[arg-type]
        batch_id=batch_id,
        model=model,
        dimensions=3072,
        requests=2,
        tokens=tokens,
        estimated_tokens=tokens if estimated is None else estimated,
        dedup_tokens=tokens // 10,
        emulated=emulated,
        prices=DEFAULT_PRICES,
        now=now,
    )


def test_pure_batch_ledger_saves_fifty_percent() -> None:
    """A ledger of batch lines reports a 50.0% saving."""
    rows = aggregate([usage("a", tokens=7), usage("b", tokens=1_234_567)])
    assert rows[-1].period == TOTAL
    assert rows[-1].saving_pct == Decimal("50.0")


def test_sync_only_ledger_saves_nothing() -> None:
    """A ledger of sync lines reports a 0.0% saving."""
    rows = aggregate([usage("a", kind="sync"), usage("b", kind="sync")])
    assert rows[-1].saving_pct == Decimal("0.0")


def test_mixed_ledger_saving() -> None:
    """Equal batch and sync tokens save a quarter of the sync price."""
    rows = aggregate([usage("a", kind="sync"), usage("b")])
    assert rows[-1].saving_pct == Decimal("25.0")


def test_zero_token_rows_have_no_percentages() -> None:
    """Without billed tokens, saving and estimate accuracy are unknown, not 0."""
    (row, total) = aggregate([usage("a", tokens=0)])
    assert row.saving_pct is None
    assert row.estimate_accuracy is None
    assert "-" in render([row, total], "table").splitlines()[-1]


def test_estimate_accuracy_is_estimated_over_billed() -> None:
    """Estimate accuracy is the local estimate divided by the billed tokens."""
    rows = aggregate([usage("a", tokens=1000, estimated=1013)])
    assert rows[0].estimate_accuracy == Decimal("1.0130")
    assert "101.3%" in render(rows, "table")


@pytest.mark.parametrize(
    ("day", "by", "label"),
    [
        (date(2026, 11, 28), "day", "2026-11-28"),
        (date(2026, 11, 28), "week", "2026-W48"),
        (date(2026, 11, 23), "week", "2026-W48"),  # Monday starts the ISO week
        (date(2026, 11, 22), "week", "2026-W47"),  # Sunday ends the one before
        (date(2024, 12, 30), "week", "2025-W01"),  # ISO year differs from calendar year
        (date(2026, 11, 28), "month", "2026-11"),
    ],
)
def test_period_labels(day: date, by: str, label: str) -> None:
    """Periods are UTC days, ISO weeks (Monday first) and months."""
    assert period_of(day, by) == label  # type: ignore[arg-type]


def test_groups_by_period_and_model_and_emulation() -> None:
    """Rows split by period, model and emulation, in order, with the total last."""
    entries = [
        usage("a", now=NOW),
        usage("b", now=NOW + timedelta(days=1)),
        usage("c", now=NOW, model="text-embedding-3-small"),
        usage("d", now=NOW, emulated=True),
        usage("e", now=NOW),
    ]
    rows = aggregate(entries, "day")
    assert [(r.period, r.model, r.emulated, r.entries) for r in rows] == [
        ("2026-11-28", "text-embedding-3-large", False, 2),
        ("2026-11-28", "text-embedding-3-large", True, 1),
        ("2026-11-28", "text-embedding-3-small", False, 1),
        ("2026-11-29", "text-embedding-3-large", False, 1),
        (TOTAL, "all models", False, 5),
    ]
    assert len(aggregate(entries, "month")) == 4
    assert "text-embedding-3-large (emulated)" in render(rows, "table")


def test_since_and_until_are_inclusive_days() -> None:
    """--since and --until keep whole UTC days at both ends."""
    entries = [usage(f"b{i}", now=NOW + timedelta(days=i)) for i in range(5)]
    rows = aggregate(entries, "day", since=date(2026, 11, 29), until=date(2026, 11, 30))
    assert [r.period for r in rows] == ["2026-11-29", "2026-11-30", TOTAL]
    assert aggregate(entries, "day", since=date(2027, 1, 1)) == []


def test_alerts_are_not_usage() -> None:
    """Alert lines do not change any report number."""
    alert = AlertEntry(NOW, "daily", "2026-11-28", Decimal(1), Decimal(2), Decimal(0), "warn")
    assert aggregate([alert]) == []
    assert aggregate([alert, usage("a")]) == aggregate([usage("a")])


def test_table_is_aligned_with_totals_last() -> None:
    """The table has a header, aligned columns, display money and the total row last."""
    rows = aggregate([usage("a", tokens=8_123_456), usage("b", tokens=12)], "day")
    text = render(rows, "table")
    out = text.splitlines()
    assert out[0].split()[:2] == ["period", "model"]
    assert out[-1].startswith("total")
    assert out[-2].startswith("---")
    assert len({len(line) for line in out}) == 1  # every line as wide: columns align
    assert "$0.53" in out[-1]  # cents from a cent up
    assert "8,123,468" in out[-1]
    assert "50.0%" in out[-1]


def test_table_shows_tiny_amounts_readably() -> None:
    """A fraction of a cent is shown with two significant digits, not as $0.00."""
    text = render(aggregate([usage("a", tokens=12)]), "table")
    assert "$0.00000078" in text
    assert "$0.00" + " " not in text


def test_csv_parses_back_exactly() -> None:
    """The CSV has a header and exact decimals that sum to the total row."""
    entries = [usage(f"b{i}", tokens=3, now=NOW + timedelta(hours=i)) for i in range(100)]
    text = render(aggregate(entries, "day"), "csv")
    records = list(csv.DictReader(io.StringIO(text)))
    assert records[-1]["period"] == TOTAL
    assert sum(Decimal(r["cost_usd"]) for r in records[:-1]) == Decimal(records[-1]["cost_usd"])
    assert Decimal(records[-1]["cost_usd"]) == Decimal("0.0000195")
    assert records[0]["emulated"] == "false"
    assert records[-1]["saving_pct"] == "50.0"


def test_json_is_exact() -> None:
    """JSON money reads back as the exact decimal sums."""
    rows = aggregate([usage("a", tokens=3), usage("b", tokens=5)])
    doc = json.loads(render(rows, "json"), parse_float=Decimal)
    assert doc["total"]["cost_usd"] == Decimal("0.00000052")
    assert doc["total"]["saving_pct"] == Decimal("50.0")
    assert len(doc["rows"]) == 1


def test_render_refuses_unknown_format() -> None:
    """An unknown format is an error, not an empty report."""
    with pytest.raises(ValueError, match="xml"):
        render(aggregate([usage("a")]), "xml")  # type: ignore[arg-type]


entry_lists = st.lists(
    st.builds(
        lambda i, kind, tokens, day, model, emulated: usage(
            f"b{i}", kind, tokens, NOW + timedelta(days=day), model, emulated
        ),
        st.integers(0, 10**6),
        st.sampled_from(["batch", "sync"]),
        st.integers(0, 10**10),
        st.integers(-400, 400),
        st.sampled_from(sorted(DEFAULT_PRICES)),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(entries=entry_lists, by=st.sampled_from(["day", "week", "month"]))
def test_totals_equal_the_ledger_in_every_grouping_and_format(
    entries: list[LedgerEntry], by: str
) -> None:
    """For any ledger, rows and total row sum exactly to the ledger lines, in CSV and JSON too."""
    expected = Totals.of(entries)
    rows = aggregate(entries, by)  # type: ignore[arg-type]
    *groups, total = rows
    for name in MONEY + COUNTS:
        assert getattr(total, name) == getattr(expected, name)
        assert sum(getattr(r, name) for r in groups) == getattr(expected, name)
    records = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    doc = json.loads(render(rows, "json"), parse_float=Decimal)
    assert len(doc["rows"]) == len(groups) == len(records) - 1
    for name in MONEY:
        assert Decimal(records[-1][name]) == getattr(expected, name)
        assert sum(Decimal(r[name]) for r in records[:-1]) == getattr(expected, name)
        assert Decimal(doc["total"][name]) == getattr(expected, name)
    for name in COUNTS:
        assert int(records[-1][name]) == doc["total"][name] == getattr(expected, name)
    assert render(rows, "table").splitlines()[-1].startswith(TOTAL)


def write_ledger(path: Path, entries: list[LedgerEntry]) -> None:
    with Ledger(path) as ledger:
        for entry in entries:
            ledger.append(entry)


def test_report_main_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`embedd report` prints the table of the ledger and exits 0."""
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, [usage("a"), usage("b", now=NOW + timedelta(days=40))])
    assert report_main(["--by", "month"], path) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["period", "-------", "2026-11", "2027-01",
                                                 "-------", "total"]  # fmt: skip


def test_report_main_csv_with_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--format csv with --since/--until reports only those days."""
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, [usage(f"b{i}", now=NOW + timedelta(days=i)) for i in range(3)])
    argv = ["--since", "2026-11-29", "--until", "2026-11-29", "--format", "csv"]
    assert report_main(argv, path) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["period"] for r in records] == ["2026-11-29", TOTAL]


def test_empty_ledger_prints_a_friendly_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No ledger yet is not an error: one friendly line, exit 0."""
    assert report_main([], tmp_path / "ledger.jsonl") == 0
    out = capsys.readouterr().out
    assert out.startswith("No costs recorded yet")
    assert out.count("\n") == 1
    assert report_main(["--since", "2030-01-01"], tmp_path / "ledger.jsonl") == 0
    assert "from 2030-01-01" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--by", "year"], "invalid choice: 'year'"),
        (["--since", "yesterday"], "not a date"),
        (["--format", "xml"], "invalid choice: 'xml'"),
        (["--since", "2026-12-01", "--until", "2026-11-01"], "is after --until"),
        (["extra"], "unrecognized arguments"),
    ],
)
def test_bad_usage_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    """Bad usage exits 2 with a clear message on stderr."""
    assert report_main(argv, tmp_path / "ledger.jsonl") == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: embedd report" in err


def test_corrupt_ledger_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged ledger is reported with its line number, exit 1."""
    path = tmp_path / "ledger.jsonl"
    path.write_text("not json\n")
    assert report_main([], path) == 1
    assert "line 1" in capsys.readouterr().err
