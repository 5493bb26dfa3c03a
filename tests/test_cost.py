"""Tests for embedd.money.prices (prices, exact money), embedd.files.jsonio and the ledger's line
format in embedd.money.ledger."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedd.errors import ConfigError
from embedd.files.jsonio import dumps_exact
from embedd.money.ledger import (
    AlertEntry,
    LedgerEntry,
    Totals,
    entry_id,
    entry_row,
    format_ts,
    from_json,
    make_dedup_entry,
    make_entry,
    parse_line,
    to_json_line,
)
from embedd.money.prices import DEFAULT_PRICES, Price, cost, format_usd, money, price_for

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LARGE = "text-embedding-3-large"


def usage(kind: str = "batch", tokens: int = 1000, **kw: object) -> LedgerEntry:
    args: dict[str, object] = {
        "batch_id": "batch_1",
        "model": LARGE,
        "dimensions": 3072,
        "requests": 10,
        "tokens": tokens,
        "estimated_tokens": tokens,
        "dedup_tokens": 0,
        "emulated": False,
        "prices": DEFAULT_PRICES,
        "now": NOW,
    }
    args.update(kw)
    return make_entry(kind, **args)  # type: ignore[arg-type]


def test_cost_is_exact_per_token() -> None:
    """One token of text-embedding-3-large costs exactly $0.000000065 on the batch lane."""
    assert cost(1, Decimal("0.065")) == Decimal("0.000000065")
    assert cost(8_123_456, Decimal("0.065")) == Decimal("0.52802464")
    assert cost(0, Decimal("0.13")) == 0


def test_cost_refuses_negative_or_non_int_tokens() -> None:
    """Token counts are whole, non-negative numbers."""
    with pytest.raises(ValueError, match="tokens"):
        cost(-1, Decimal("0.13"))
    with pytest.raises(ValueError, match="tokens"):
        cost(True, Decimal("0.13"))


def test_thousand_small_entries_sum_without_drift() -> None:
    """1,000 entries of 3 tokens sum to exactly the cost of 3,000 tokens (no float drift)."""
    entries = [usage(tokens=3, batch_id=f"b{i}") for i in range(1000)]
    total = Totals.of(entries)
    assert total.cost_usd == cost(3000, Decimal("0.065")) == Decimal("0.000195")
    assert total.standard_cost_usd == Decimal("0.00039")
    assert format_usd(total.cost_usd) == "0.000195"
    assert total.tokens == 3000
    assert total.entries == 1000


def test_batch_entry_saves_half() -> None:
    """A batch entry costs the batch price, and saves exactly half of the sync price."""
    entry = usage("batch", tokens=8_123_456)
    assert entry.cost_usd == Decimal("0.52802464")
    assert entry.standard_cost_usd == Decimal("1.05604928")
    assert entry.saved_usd == entry.cost_usd
    assert entry.standard_cost_usd == entry.cost_usd * 2


def test_sync_entry_saves_nothing() -> None:
    """A sync entry costs the standard price and saves nothing."""
    entry = usage("sync", tokens=1000, dedup_tokens=500)
    assert entry.cost_usd == entry.standard_cost_usd == Decimal("0.00013")
    assert entry.saved_usd == 0
    assert entry.dedup_saved_usd == Decimal("0.000065")


def test_dedup_saving_uses_the_lane_price() -> None:
    """Deduplicated tokens on the batch lane are valued at the batch price."""
    entry = usage("batch", dedup_tokens=2_000_000)
    assert entry.dedup_saved_usd == Decimal("0.13")


def test_make_entry_validates_its_inputs() -> None:
    """Bad kinds, empty ids, negative counts, naive times and unknown models are refused."""
    with pytest.raises(ValueError, match="kind"):
        usage("alert")
    with pytest.raises(ValueError, match="batch_id"):
        usage(batch_id="")
    with pytest.raises(ValueError, match="requests"):
        usage(requests=-1)
    with pytest.raises(ValueError, match="aware"):
        usage(now=datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match=r"cost\.prices"):
        usage(model="text-embedding-9")


def test_make_entry_stores_utc() -> None:
    """An entry made with a non-UTC clock stores the same instant in UTC."""
    local = datetime(2026, 11, 28, 7, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert usage(now=local).ts == NOW
    assert usage(now=local).ts.tzinfo == UTC


def test_price_for_names_missing_model() -> None:
    """A model without a price is a configuration error that names the table."""
    assert price_for(DEFAULT_PRICES, LARGE) == Price(Decimal("0.13"), Decimal("0.065"))
    with pytest.raises(ConfigError, match="no price for model 'x'"):
        price_for(DEFAULT_PRICES, "x")


def test_price_refuses_negative_or_float() -> None:
    """Prices are non-negative Decimals, never floats."""
    with pytest.raises(ValueError, match="standard"):
        Price(Decimal("-1"), Decimal(0))
    with pytest.raises(ValueError, match="batch"):
        Price(Decimal(1), 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("0.528000"), "0.528"),
        (Decimal("7.8E-7"), "0.00000078"),
        (Decimal("3"), "3"),
        (Decimal("0"), "0"),
        (Decimal("-0.000"), "0"),
        (Decimal("1E+6"), "1000000"),
        (Decimal("0.0000000000005"), "0"),  # half-to-even at the 12th place
        (Decimal("0.0000000000015"), "0.000000000002"),
        (Decimal("-0.25"), "-0.25"),
    ],
)
def test_format_usd(value: Decimal, text: str) -> None:
    """Money is written fixed-point, <= 12 places, without trailing zeros or exponent."""
    assert format_usd(value) == text
    assert Decimal(json.loads(text, parse_float=Decimal)) == money(value)


def test_dumps_exact_writes_decimals_as_numbers_and_refuses_floats() -> None:
    """Exact JSON keeps Decimals as numbers and never lets a float in."""
    text = dumps_exact({"a": Decimal("0.1"), "b": [1, None, True, "x"]})
    assert text == '{"a": 0.1, "b": [1, null, true, "x"]}'
    assert json.loads(text, parse_float=Decimal)["a"] == Decimal("0.1")
    with pytest.raises(TypeError, match="float"):
        dumps_exact({"a": 0.1})
    with pytest.raises(TypeError):
        dumps_exact(Decimal("NaN"))


def test_json_line_matches_the_spec_shape() -> None:
    """A usage line is one JSON object with the SPEC §6 fields and a newline."""
    line = to_json_line(usage(tokens=8_123_456, requests=20000))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    obj = json.loads(line)
    assert list(obj)[:2] == ["ts", "kind"]
    assert obj["ts"] == "2026-11-28T12:00:00.000000Z"
    assert obj["cost_usd"] == 0.52802464
    assert b'"cost_usd": 0.52802464,' in line
    assert set(obj) == {
        "ts",
        "kind",
        "batch_id",
        "model",
        "dimensions",
        "requests",
        "tokens",
        "estimated_tokens",
        "cost_usd",
        "standard_cost_usd",
        "saved_usd",
        "dedup_tokens",
        "dedup_saved_usd",
        "emulated",
    }


def test_spec_example_line_parses_with_defaults() -> None:
    """The SPEC's example line (no estimate, no dedup saving) reads back, missing fields 0."""
    line = (
        '{"ts": "2026-11-28T12:00:00Z", "kind": "batch", "batch_id": "batch_x", '
        '"model": "text-embedding-3-large", "dimensions": 3072, "requests": 20000, '
        '"tokens": 8123456, "cost_usd": 0.528, "standard_cost_usd": 1.056, '
        '"saved_usd": 0.528, "dedup_tokens": 0, "emulated": false}'
    )
    entry = parse_line(line)
    assert isinstance(entry, LedgerEntry)
    assert entry.cost_usd == Decimal("0.528")
    assert entry.estimated_tokens == 0
    assert entry.dedup_saved_usd == 0
    assert entry.ts == NOW


def test_from_json_accepts_float_money_exactly() -> None:
    """A line parsed with plain floats still yields the exact decimal written."""
    obj = json.loads(to_json_line(usage(tokens=3)))
    assert isinstance(obj["cost_usd"], float)
    assert from_json(obj) == usage(tokens=3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "refund"}, "kind"),
        ({"tokens": -5}, "tokens"),
        ({"tokens": 1.5}, "tokens"),
        ({"emulated": "no"}, "emulated"),
        ({"ts": "2026-11-28 12:00"}, "ts"),
        ({"cost_usd": "lots"}, "cost_usd"),
        ({"cost_usd": True}, "cost_usd"),
        ({"model": None}, "model"),
    ],
)
def test_from_json_rejects_bad_fields(change: dict[str, object], message: str) -> None:
    """A malformed line is refused with the name of the bad field."""
    obj = json.loads(to_json_line(usage()))
    obj.update(change)
    with pytest.raises(ValueError, match=message):
        from_json(obj)


def test_from_json_requires_fields() -> None:
    """A line missing a required field is refused, naming it."""
    obj = json.loads(to_json_line(usage()))
    del obj["batch_id"]
    with pytest.raises(ValueError, match="missing field 'batch_id'"):
        from_json(obj)


def test_parse_line_rejects_non_objects() -> None:
    """Text that is not a JSON object is not an entry."""
    with pytest.raises(ValueError, match="not JSON"):
        parse_line(b'{"ts": ')
    with pytest.raises(ValueError, match="object"):
        parse_line(b"[1, 2]")


def test_alert_round_trips_and_keys_by_period() -> None:
    """An alert line reads back equal, keyed by budget and period."""
    alert = AlertEntry(
        ts=NOW,
        budget="daily",
        period="2026-11-28",
        limit_usd=Decimal("1.00"),
        spent_usd=Decimal("0.99"),
        next_cost_usd=Decimal("0.02"),
        action="pause",
    )
    line = to_json_line(alert)
    assert json.loads(line)["kind"] == "alert"
    assert parse_line(line) == alert
    assert alert.key == ("alert", "daily", "2026-11-28")
    assert entry_id(alert) == "alert:daily:2026-11-28"


def test_entry_row_has_the_store_shape() -> None:
    """entry_row gives (id, ts, kind, line) and the line reads back to the entry."""
    entry = usage(batch_id="batch_9")
    ident, ts, kind, line = entry_row(entry)
    assert (ident, ts, kind) == ("usage:batch_9", "2026-11-28T12:00:00.000000Z", "batch")
    assert parse_line(line) == entry


@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)))
def test_timestamp_text_sorts_like_time(a: datetime, b: datetime) -> None:
    """Ledger timestamps compare as text in the same order as the instants."""
    assert (format_ts(a) < format_ts(b)) == (a < b)


@given(
    kind=st.sampled_from(["batch", "sync"]),
    model=st.sampled_from(sorted(DEFAULT_PRICES)),
    tokens=st.integers(0, 10**12),
    estimated=st.integers(0, 10**12),
    dedup=st.integers(0, 10**9),
    emulated=st.booleans(),
    batch_id=st.text(min_size=1, max_size=20),
    ts=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_every_entry_round_trips(
    kind: str,
    model: str,
    tokens: int,
    estimated: int,
    dedup: int,
    emulated: bool,
    batch_id: str,
    ts: datetime,
) -> None:
    """Any usage entry survives to_json_line -> parse_line unchanged, money exact."""
    entry = usage(
        kind,
        tokens=tokens,
        estimated_tokens=estimated,
        dedup_tokens=dedup,
        emulated=emulated,
        model=model,
        batch_id=batch_id,
        now=ts,
    )
    assert entry.standard_cost_usd == entry.cost_usd + entry.saved_usd
    line = to_json_line(entry)
    assert line.count(b"\n") == 1
    assert parse_line(line) == entry


def test_dedup_line_names_its_job_and_costs_nothing() -> None:
    """A dedup entry is `kind: "dedup"` with `job`, never a `batch_id`; it parses
    back equal, is keyed by its job, and is no entry in the totals' count."""
    entry = make_dedup_entry(
        "job_1",
        lane="batch",
        model=LARGE,
        dimensions=3072,
        dedup_tokens=1_000_000,
        emulated=False,
        prices=DEFAULT_PRICES,
        now=NOW,
    )
    line = json.loads(to_json_line(entry))
    assert (line["kind"], line["job"], line["tokens"], line["cost_usd"]) == ("dedup", "job_1", 0, 0)
    assert "batch_id" not in line
    assert "estimated" not in line
    assert Decimal(str(line["dedup_saved_usd"])) == Decimal("0.065")
    assert parse_line(to_json_line(entry)) == entry
    assert entry.key == ("dedup", "job_1")
    totals = Totals.of([entry])
    assert (totals.entries, totals.dedup_tokens, totals.cost_usd) == (0, 1_000_000, 0)


def test_estimated_flag_is_written_only_when_true() -> None:
    """A line from the local count says `"estimated": true`; others carry no flag."""
    args = {
        "batch_id": "batch_1",
        "model": LARGE,
        "dimensions": 3072,
        "requests": 2,
        "tokens": 10,
        "estimated_tokens": 10,
        "dedup_tokens": 0,
        "emulated": True,
        "prices": DEFAULT_PRICES,
        "now": NOW,
    }
    exact = make_entry("batch", **args)  # type: ignore[arg-type]
    guessed = make_entry("batch", estimated=True, **args)  # type: ignore[arg-type]
    assert "estimated" not in json.loads(to_json_line(exact))
    assert json.loads(to_json_line(guessed))["estimated"] is True
    assert parse_line(to_json_line(guessed)).estimated is True  # type: ignore[union-attr]
