"""Tests for embedd.money.ledger: durable, idempotent appends to a real file."""

from __future__ import annotations

import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from embedd.money.ledger import (
    AlertEntry,
    EntryMaker,
    Ledger,
    LedgerCorrupt,
    LedgerEntry,
    PeriodSpend,
    Totals,
    format_ts,
    make_dedup_entry,
    make_entry,
    parse_line,
    period_spend,
    read_entries,
    to_json_line,
)
from embedd.money.prices import DEFAULT_PRICES

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def usage(batch_id: str, tokens: int = 1000, now: datetime = NOW) -> LedgerEntry:
    return make_entry(
        "batch",
        batch_id=batch_id,
        model="text-embedding-3-large",
        dimensions=3072,
        requests=3,
        tokens=tokens,
        estimated_tokens=tokens,
        dedup_tokens=0,
        emulated=False,
        prices=DEFAULT_PRICES,
        now=now,
    )


def alert(period: str = "2026-11-28") -> AlertEntry:
    return AlertEntry(
        ts=NOW,
        budget="daily",
        period=period,
        limit_usd=Decimal(1),
        spent_usd=Decimal("1.5"),
        next_cost_usd=Decimal(0),
        action="warn",
    )


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_writes_one_line_and_reads_back(tmp_path: Path) -> None:
    """An appended entry is one newline-terminated line that reads back equal."""
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        assert ledger.repair is None
        assert ledger.append(usage("b1")) is True
        assert list(ledger.entries()) == [usage("b1")]
    assert lines(path) == [to_json_line(usage("b1"))]


def test_same_batch_is_written_once(tmp_path: Path) -> None:
    """Appending the same batch_id again writes nothing and returns False."""
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        assert ledger.append(usage("b1")) is True
        assert ledger.append(usage("b1", tokens=5)) is False
        assert ledger.has_usage("b1")
        assert not ledger.has_usage("b2")
    assert len(lines(path)) == 1


def test_idempotency_survives_reopen(tmp_path: Path) -> None:
    """After a restart the keys already in the file are still refused, new ones appended."""
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.append(usage("b1"))
        ledger.append(alert())
    with Ledger(path) as ledger:
        assert ledger.append(usage("b1")) is False
        assert ledger.append(alert()) is False
        assert ledger.append(alert("2026-11-29")) is True
        assert ledger.append(usage("b2")) is True
    assert [e.key for e in read_entries(path)] == [
        ("usage", "b1"),
        ("alert", "daily", "2026-11-28"),
        ("alert", "daily", "2026-11-29"),
        ("usage", "b2"),
    ]


def test_torn_last_line_is_truncated(tmp_path: Path) -> None:
    """A half-written last line is cut off at open; earlier lines and later appends are intact."""
    path = tmp_path / "ledger.jsonl"
    good = to_json_line(usage("b1"))
    torn = to_json_line(usage("b2"))[:40]
    path.write_bytes(good + torn)
    with Ledger(path) as ledger:
        assert ledger.repair == "truncated"
        assert path.read_bytes() == good
        assert not ledger.has_usage("b2")
        assert ledger.append(usage("b2")) is True  # the daemon re-appends it from the DB
    assert [parse_line(raw) for raw in lines(path)] == [usage("b1"), usage("b2")]


def test_torn_line_missing_only_newline_is_completed(tmp_path: Path) -> None:
    """A last line that lost only its newline is completed, not dropped."""
    path = tmp_path / "ledger.jsonl"
    first, second = to_json_line(usage("b1")), to_json_line(usage("b2"))
    path.write_bytes(first + second[:-1])
    with Ledger(path) as ledger:
        assert ledger.repair == "completed"
        assert ledger.has_usage("b2")
        assert ledger.totals().entries == 2
        assert ledger.append(usage("b3")) is True
    assert lines(path) == [first, second, to_json_line(usage("b3"))]


def test_torn_duplicate_line_is_truncated(tmp_path: Path) -> None:
    """A torn last line repeating a written key is removed, so no key appears twice."""
    path = tmp_path / "ledger.jsonl"
    first = to_json_line(usage("b1"))
    path.write_bytes(first + first[:-1])
    with Ledger(path) as ledger:
        assert ledger.repair == "truncated"
    assert path.read_bytes() == first


def test_readers_skip_a_torn_line_without_touching_the_file(tmp_path: Path) -> None:
    """read_entries ignores an unfinished last line and never modifies the file."""
    path = tmp_path / "ledger.jsonl"
    content = to_json_line(usage("b1")) + b'{"ts": "2026'
    path.write_bytes(content)
    assert list(read_entries(path)) == [usage("b1")]
    assert path.read_bytes() == content


def test_missing_ledger_has_no_entries(tmp_path: Path) -> None:
    """Reading a ledger that does not exist yet yields nothing."""
    assert list(read_entries(tmp_path / "nope.jsonl")) == []


def test_corrupt_middle_line_is_reported_with_its_number(tmp_path: Path) -> None:
    """A line that is not an entry is never skipped silently: the error names the line."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(to_json_line(usage("b1")) + b"hello\n" + to_json_line(usage("b2")))
    with pytest.raises(LedgerCorrupt, match="line 2"):
        list(read_entries(path))
    with pytest.raises(LedgerCorrupt, match="line 2"):
        Ledger(path)


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    """Blank lines (a hand edit) do not break reading or opening."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"\n" + to_json_line(usage("b1")) + b"  \n")
    assert list(read_entries(path)) == [usage("b1")]
    with Ledger(path) as ledger:
        assert ledger.totals().entries == 1


def test_entries_filter_by_time(tmp_path: Path) -> None:
    """entries(since, until) keeps since <= ts < until."""
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        for day in range(5):
            ledger.append(usage(f"b{day}", now=NOW + timedelta(days=day)))
        picked = ledger.entries(NOW + timedelta(days=1), NOW + timedelta(days=3))
        assert [e.key[1] for e in picked] == ["b1", "b2"]
        assert ledger.totals(since=NOW + timedelta(days=4)).entries == 1


def test_totals_are_exact_and_match_the_file(tmp_path: Path) -> None:
    """In-memory totals equal the sum of the file's lines exactly, also after reopen."""
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        for i in range(1000):
            ledger.append(usage(f"b{i}", tokens=3))
        ledger.append(alert())
        kept = ledger.totals()
    assert kept.cost_usd == Decimal("0.000195")
    assert kept.alerts == 1
    with Ledger(path) as reopened:
        assert reopened.totals() == kept == Totals.of(read_entries(path))
        assert next(reopened.usage()) == usage("b0", tokens=3)
        assert len(list(reopened.usage())) == 1000


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    """Appends from many threads give whole lines, each key exactly once."""
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:

        def work(worker: int) -> None:
            for i in range(50):
                ledger.append(usage(f"b{i}"))  # all workers race on the same keys
                ledger.append(usage(f"w{worker}-{i}"))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    keys = [parse_line(raw).key for raw in lines(path)]
    assert len(keys) == len(set(keys)) == 50 + 8 * 50


def test_closed_ledger_refuses_appends(tmp_path: Path) -> None:
    """Appending after close is an error, not a silent loss."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.close()
    ledger.close()  # closing twice is harmless
    with pytest.raises(ValueError, match="closed"):
        ledger.append(usage("b1"))


def test_symlinked_ledger_is_refused(tmp_path: Path) -> None:
    """The ledger never follows a symlink out of the spool."""
    target = tmp_path / "elsewhere.jsonl"
    target.write_bytes(b"")
    link = tmp_path / "ledger.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError, match=r"symbolic|Too many levels"):
        Ledger(link)


def test_ledger_file_is_readable_by_the_group_only(tmp_path: Path) -> None:
    """The ledger is created 0o640 like every file the daemon writes, whatever the umask."""
    old = os.umask(0)
    try:
        Ledger(tmp_path / "ledger.jsonl").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ledger.jsonl").stat().st_mode) == 0o640


def test_period_spend_sums_usage_of_the_month_and_of_the_day(tmp_path: Path) -> None:
    """Only usage counts (alerts do not); the day's share is what is stamped from its start."""
    yesterday = usage("b_old", 2_000_000, NOW - timedelta(days=1))
    today = usage("b_new", 1_000_000)
    text = [to_json_line(e).decode() for e in (yesterday, today, alert())]
    spend = period_spend(text, format_ts(NOW.replace(hour=0)))
    assert spend == PeriodSpend(today=Decimal("0.065"), month=Decimal("0.195"))
    assert period_spend([], format_ts(NOW)) == PeriodSpend(Decimal(0), Decimal(0))


def test_remembered_spend_is_forgotten_when_a_line_is_appended(tmp_path: Path) -> None:
    """The spend kept per day and month holds until the ledger changes, and a spend
    computed before an append that happened meanwhile is not kept at all."""
    spend = PeriodSpend(Decimal(1), Decimal(2))
    with Ledger(tmp_path / "ledger.jsonl") as ledger:
        assert ledger.remembered_spend("d", "m") is None
        ledger.remember_spend("d", "m", spend, ledger.generation)
        assert ledger.remembered_spend("d", "m") == spend
        assert ledger.remembered_spend("d2", "m") is None
        before = ledger.generation
        assert ledger.append(usage("b1"))
        assert ledger.remembered_spend("d", "m") is None
        ledger.remember_spend("d", "m", spend, before)  # computed before the append
        assert ledger.remembered_spend("d", "m") is None
        assert not ledger.append(usage("b1"))  # a repeat changes nothing
        ledger.remember_spend("d", "m", spend, ledger.generation)
        assert not ledger.append(usage("b1"))
        assert ledger.remembered_spend("d", "m") == spend


def test_entry_maker_passes_its_settings_once() -> None:
    """EntryMaker makes the same entries as make_entry / make_dedup_entry given the
    same settings, stamped with its clock."""
    maker = EntryMaker(
        "text-embedding-3-large", 3072, False, DEFAULT_PRICES, lambda: NOW.timestamp()
    )
    assert maker.now() == NOW
    made = maker.usage("batch", batch_id="b1", requests=3, tokens=1000, estimated_tokens=1000)
    assert made == usage("b1")
    dedup = maker.dedup("job_1", lane="sync", dedup_tokens=500)
    assert dedup == make_dedup_entry(
        "job_1",
        lane="sync",
        model="text-embedding-3-large",
        dimensions=3072,
        dedup_tokens=500,
        emulated=False,
        prices=DEFAULT_PRICES,
        now=NOW,
    )
    assert maker.dedup("job_1", lane="batch", dedup_tokens=500).dedup_saved_usd == Decimal(
        "0.0000325"
    )
