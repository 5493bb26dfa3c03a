"""Prices, exact cost arithmetic and the ledger's line format: pure, no I/O.

Money is `Decimal` from the price table to the ledger file; a float never touches it.

How money is written in JSON (the ledger, `embedd report --format json`): as a JSON
*number* in plain fixed-point notation, with at most 12 decimal places, trailing zeros
dropped and never an exponent — `0.528`, `0.00000078`, `3`. Costs are rounded to
12 places once, half-to-even, when an entry is made (`money`); with OpenAI's prices
(at most 3 decimals per 1M tokens) a cost has at most 9 places, so nothing is rounded
at all. Because the text is the exact decimal, a reader that parses numbers as
decimals (`json.loads(line, parse_float=Decimal)`) gets the exact value back, and
one that parses floats gets the nearest float, which prints as the same text.

A ledger line is one of two kinds of entry:

* `LedgerEntry` (`kind` "batch" or "sync"): the billed usage of one batch or one
  sync request group, keyed by `batch_id`;
* `AlertEntry` (`kind` "alert"): a budget was crossed, keyed by (budget, period).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, InvalidOperation
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from embedd.errors import ConfigError

MONEY_PLACES = 12
_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
# Enough digits that tokens x price is never rounded; Inexact traps if it ever were.
_EXACT = Context(prec=60, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, Inexact])

UsageKind: TypeAlias = Literal["batch", "sync", "dedup"]
BudgetName: TypeAlias = Literal["daily", "monthly"]
BudgetAction: TypeAlias = Literal["warn", "pause"]
EntryKey: TypeAlias = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens on the synchronous API (`standard`) and the Batch API (`batch`)."""

    standard: Decimal
    batch: Decimal

    def __post_init__(self) -> None:
        for name in ("standard", "batch"):
            value = getattr(self, name)
            if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
                raise ValueError(f"price {name} must be a finite Decimal >= 0, got {value!r}")


DEFAULT_PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "text-embedding-3-large": Price(Decimal("0.13"), Decimal("0.065")),
        "text-embedding-3-small": Price(Decimal("0.02"), Decimal("0.01")),
        "text-embedding-ada-002": Price(Decimal("0.10"), Decimal("0.05")),
    }
)


def _decimal(value: object, what: str) -> Decimal:
    """A Decimal from a config or JSON value; floats go through their shortest repr."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float | str):
        # repr() of a float is the shortest text that reads back as it: 0.065 -> "0.065".
        try:
            result = Decimal(repr(value) if isinstance(value, float) else value.strip())
        except InvalidOperation:
            raise ValueError(f"{what} must be a number, got {value!r}") from None
    else:
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not result.is_finite():
        raise ValueError(f"{what} must be finite, got {value!r}")
    return result


def price_for(prices: Mapping[str, Price], model: str) -> Price:
    """The price of `model`, or `ConfigError` naming the missing `[cost.prices]` entry."""
    try:
        return prices[model]
    except KeyError:
        raise ConfigError(f"no price for model {model!r}: add it to [cost.prices]") from None


def cost(tokens: int, price_per_million: Decimal) -> Decimal:
    """The exact USD cost of `tokens` at `price_per_million` (no rounding at all)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
    return _EXACT.multiply(Decimal(tokens), price_per_million).scaleb(-6, _EXACT)


def money(value: Decimal) -> Decimal:
    """`value` rounded (half-to-even) to the ledger's 12 decimal places."""
    return value.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def format_usd(value: Decimal) -> str:
    """The JSON-number text for an amount: fixed-point, <= 12 places, no trailing zeros."""
    text = format(money(value), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def dumps_exact(obj: object) -> str:
    """JSON text like `json.dumps`, but `Decimal` is written as an exact number.

    Floats are refused: money must never pass through one.
    """
    if isinstance(obj, Decimal):
        return format_usd(obj) if obj.is_finite() else _refuse(obj)
    if obj is None or isinstance(obj, bool | int | str):
        return json.dumps(obj)
    if isinstance(obj, Mapping):
        items = (f"{json.dumps(str(k))}: {dumps_exact(v)}" for k, v in obj.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(dumps_exact(v) for v in obj) + "]"
    return _refuse(obj)


def dumps_document(obj: object, indent: int = 2, _level: int = 0) -> str:
    """Indented JSON like `json.dumps(obj, indent=2, allow_nan=False)`, except that a
    `Decimal` is written as an exact number (see `dumps_exact`).

    For documents that hold money next to other data (a manifest's `cost_usd` beside
    a record's `meta`, which may have floats of its own): floats stay as json writes
    them, money never becomes one. Strings are ASCII-escaped as json does by default.
    """
    if isinstance(obj, Decimal):
        return format_usd(obj) if obj.is_finite() else _refuse(obj)
    inner = "\n" + " " * (indent * (_level + 1))
    outer = "\n" + " " * (indent * _level)
    if isinstance(obj, Mapping):
        if not obj:
            return "{}"
        items = (
            f"{json.dumps(str(k))}: {dumps_document(v, indent, _level + 1)}" for k, v in obj.items()
        )
        return "{" + inner + ("," + inner).join(items) + outer + "}"
    if isinstance(obj, list | tuple):
        if not obj:
            return "[]"
        values = (dumps_document(v, indent, _level + 1) for v in obj)
        return "[" + inner + ("," + inner).join(values) + outer + "]"
    return json.dumps(obj, allow_nan=False)


def _refuse(obj: object) -> str:
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} as exact JSON")


def format_ts(ts: datetime) -> str:
    """RFC 3339 in UTC, fixed width: `2026-11-28T12:00:00.000000Z`.

    Always with microseconds, so that the text of two times sorts like the times
    (the state database compares them as text).
    """
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def as_utc(now: datetime) -> datetime:
    """`now` in UTC; a naive datetime is refused (`ValueError`)."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """The billed usage of one batch, or one sync request group (`batch_id` names it)."""

    ts: datetime
    kind: UsageKind
    batch_id: str
    model: str
    dimensions: int
    requests: int
    tokens: int
    estimated_tokens: int
    cost_usd: Decimal
    standard_cost_usd: Decimal
    saved_usd: Decimal
    dedup_tokens: int
    dedup_saved_usd: Decimal
    emulated: bool
    # Tokens are the local count, not the API's `usage` (a batch reported none).
    estimated: bool = False

    @property
    def key(self) -> EntryKey:
        """The ledger's idempotency key: one line per batch or request group, and one
        dedup line per job (a dedup entry's `batch_id` holds the job id, written `job`)."""
        if self.kind == "dedup":
            return ("dedup", self.batch_id)
        return ("usage", self.batch_id)


@dataclass(frozen=True, slots=True)
class AlertEntry:
    """A budget was crossed in `period` ("2026-11-28" daily, "2026-11" monthly).

    `spent_usd` is what was spent in the period before the submission that crossed it;
    `next_cost_usd` is that submission's estimated cost (0 when usage arriving after
    the fact pushed the spend over).
    """

    ts: datetime
    budget: BudgetName
    period: str
    limit_usd: Decimal
    spent_usd: Decimal
    next_cost_usd: Decimal
    action: BudgetAction
    kind: Literal["alert"] = field(default="alert", init=False)

    @property
    def key(self) -> EntryKey:
        """The ledger's idempotency key: one alert per budget and period."""
        return ("alert", self.budget, self.period)


Entry: TypeAlias = LedgerEntry | AlertEntry


def make_entry(
    kind: UsageKind,
    *,
    batch_id: str,
    model: str,
    dimensions: int,
    requests: int,
    tokens: int,
    estimated_tokens: int,
    dedup_tokens: int,
    emulated: bool,
    prices: Mapping[str, Price],
    now: datetime,
    estimated: bool = False,
) -> LedgerEntry:
    """The ledger entry for billed usage.

    batch: cost at the batch price, `standard_cost_usd` at the sync price, `saved_usd`
    the difference. sync: cost is the standard price, nothing saved. `dedup_saved_usd`
    is what the deduplicated tokens would have cost on the same lane.
    """
    if kind not in ("batch", "sync"):
        raise ValueError(f"kind must be 'batch' or 'sync', got {kind!r}")
    if not batch_id:
        raise ValueError("batch_id must not be empty")
    for name, value in (
        ("dimensions", dimensions),
        ("requests", requests),
        ("estimated_tokens", estimated_tokens),
        ("dedup_tokens", dedup_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    price = price_for(prices, model)
    lane_price = price.batch if kind == "batch" else price.standard
    standard = money(cost(tokens, price.standard))
    charged = money(cost(tokens, lane_price))
    return LedgerEntry(
        ts=as_utc(now),
        kind=kind,
        batch_id=batch_id,
        model=model,
        dimensions=dimensions,
        requests=requests,
        tokens=tokens,
        estimated_tokens=estimated_tokens,
        cost_usd=charged,
        standard_cost_usd=standard,
        saved_usd=standard - charged,
        dedup_tokens=dedup_tokens,
        dedup_saved_usd=money(cost(dedup_tokens, lane_price)),
        emulated=emulated,
        estimated=estimated,
    )


def make_dedup_entry(
    job: str,
    *,
    lane: Literal["batch", "sync"],
    model: str,
    dimensions: int,
    dedup_tokens: int,
    emulated: bool,
    prices: Mapping[str, Price],
    now: datetime,
) -> LedgerEntry:
    """What deduplication saved one job: a `kind: "dedup"` line, no tokens, no cost.

    `dedup_saved_usd` is what the deduplicated tokens would have cost on `lane`.
    """
    if not job:
        raise ValueError("job must not be empty")
    entry = make_entry(
        lane,
        batch_id=job,
        model=model,
        dimensions=dimensions,
        requests=0,
        tokens=0,
        estimated_tokens=0,
        dedup_tokens=dedup_tokens,
        emulated=emulated,
        prices=prices,
        now=now,
    )
    return replace(entry, kind="dedup")


def to_json_line(entry: Entry) -> bytes:
    """One ledger line: a JSON object, exact money, `\\n`-terminated, UTF-8."""
    obj: dict[str, object] = {}
    for f in fields(entry):
        value = getattr(entry, f.name)
        obj[f.name] = format_ts(value) if isinstance(value, datetime) else value
    if obj.get("estimated") is False:
        del obj["estimated"]  # only a line from the local count says so
    if obj.get("kind") == "dedup":
        obj = {"job" if k == "batch_id" else k: v for k, v in obj.items()}
    # `ts` and `kind` first so a person reading the file sees them at once.
    ordered = {"ts": obj.pop("ts"), "kind": obj.pop("kind"), **obj}
    return (dumps_exact(ordered) + "\n").encode()


def entry_id(entry: Entry) -> str:
    """The entry's key as one string, for the state database: `usage:batch_abc`,
    `alert:daily:2026-11-28`."""
    return ":".join(entry.key)


def entry_row(entry: Entry) -> tuple[str, str, str, str]:
    """(id, ts, kind, line) of `entry`, the shape of the state database's ledger rows."""
    return entry_id(entry), format_ts(entry.ts), entry.kind, to_json_line(entry).decode()


def _field(obj: Mapping[str, Any], name: str, default: object = None) -> object:
    if name in obj:
        return obj[name]
    if default is None:
        raise ValueError(f"missing field {name!r}")
    return default


def _int(obj: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = _field(obj, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"field {name!r} must be an int >= 0, got {value!r}")
    return value


def _str(obj: Mapping[str, Any], name: str, choices: Iterable[str] = ()) -> str:
    value = _field(obj, name)
    allowed = tuple(choices)
    if not isinstance(value, str) or (allowed and value not in allowed):
        wanted = " | ".join(allowed) if allowed else "a string"
        raise ValueError(f"field {name!r} must be {wanted}, got {value!r}")
    return value


def _money_field(obj: Mapping[str, Any], name: str, default: Decimal | None = None) -> Decimal:
    return _decimal(_field(obj, name, default), f"field {name!r}")


def _ts(obj: Mapping[str, Any]) -> datetime:
    text = _str(obj, "ts")
    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(f"field 'ts' must be an RFC 3339 time with offset, got {text!r}") from None


def from_json(obj: Mapping[str, Any]) -> Entry:
    """The entry a parsed ledger line describes; `ValueError` says what is wrong.

    Money may arrive as `Decimal` (best: `parse_float=Decimal`), int, float or string.
    `estimated_tokens`, `dedup_tokens` and `dedup_saved_usd` default to 0 when absent;
    unknown keys are ignored so that older readers accept newer lines.
    """
    kind = _str(obj, "kind", ("batch", "sync", "dedup", "alert"))
    if kind == "alert":
        return AlertEntry(
            ts=_ts(obj),
            budget=_str(obj, "budget", ("daily", "monthly")),  # type: ignore[arg-type]
            period=_str(obj, "period"),
            limit_usd=_money_field(obj, "limit_usd"),
            spent_usd=_money_field(obj, "spent_usd"),
            next_cost_usd=_money_field(obj, "next_cost_usd", Decimal(0)),
            action=_str(obj, "action", ("warn", "pause")),  # type: ignore[arg-type]
        )
    emulated = _field(obj, "emulated")
    if not isinstance(emulated, bool):
        raise ValueError(f"field 'emulated' must be true or false, got {emulated!r}")
    return LedgerEntry(
        ts=_ts(obj),
        kind=kind,  # type: ignore[arg-type]
        batch_id=_str(obj, "job" if kind == "dedup" else "batch_id"),
        model=_str(obj, "model"),
        dimensions=_int(obj, "dimensions"),
        requests=_int(obj, "requests"),
        tokens=_int(obj, "tokens"),
        estimated_tokens=_int(obj, "estimated_tokens", 0),
        cost_usd=_money_field(obj, "cost_usd"),
        standard_cost_usd=_money_field(obj, "standard_cost_usd"),
        saved_usd=_money_field(obj, "saved_usd"),
        dedup_tokens=_int(obj, "dedup_tokens", 0),
        dedup_saved_usd=_money_field(obj, "dedup_saved_usd", Decimal(0)),
        emulated=emulated,
        estimated=obj.get("estimated") is True,
    )


def parse_line(line: bytes | str) -> Entry:
    """The entry on one ledger line, money parsed as exact decimals; `ValueError` if bad."""
    try:
        obj = json.loads(line, parse_float=Decimal)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return from_json(obj)


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over usage entries (alerts are only counted)."""

    entries: int = 0
    alerts: int = 0
    requests: int = 0
    tokens: int = 0
    estimated_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    standard_cost_usd: Decimal = Decimal(0)
    saved_usd: Decimal = Decimal(0)
    dedup_tokens: int = 0
    dedup_saved_usd: Decimal = Decimal(0)

    def add(self, entry: Entry) -> Totals:
        """These totals with `entry` counted too."""
        if isinstance(entry, AlertEntry):
            return Totals(**{**_as_dict(self), "alerts": self.alerts + 1})
        return Totals(
            entries=self.entries + (entry.kind != "dedup"),
            alerts=self.alerts,
            requests=self.requests + entry.requests,
            tokens=self.tokens + entry.tokens,
            estimated_tokens=self.estimated_tokens + entry.estimated_tokens,
            cost_usd=self.cost_usd + entry.cost_usd,
            standard_cost_usd=self.standard_cost_usd + entry.standard_cost_usd,
            saved_usd=self.saved_usd + entry.saved_usd,
            dedup_tokens=self.dedup_tokens + entry.dedup_tokens,
            dedup_saved_usd=self.dedup_saved_usd + entry.dedup_saved_usd,
        )

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Totals:
        """The totals of `entries`."""
        result = cls()
        for entry in entries:
            result = result.add(entry)
        return result


def _as_dict(totals: Totals) -> dict[str, Any]:
    return {f.name: getattr(totals, f.name) for f in fields(totals)}
