"""The ledger: its line format, its file `ledger.jsonl`, and the one path a line takes to it.

Entries (pure):

* `LedgerEntry` (`kind` "batch", "sync" or "dedup"): the billed usage of one batch or
  one sync request group, keyed by `batch_id` (a dedup line: what deduplication saved
  one job, keyed by the job);
* `AlertEntry` (`kind` "alert"): a budget was crossed, keyed by (budget, period).

`make_entry` / `make_dedup_entry` (or an `EntryMaker` holding the settings) build
them, `to_json_line` writes one line (money as exact JSON numbers, see
`embedd.files.jsonio`), `parse_line` reads one back, `Totals` sums them, and `format_ts` is
the one timestamp format of the ledger and the state database.

How a line reaches the file: a usage row is stored in the state database in the
same transaction that applies its results (`entry_row`); `flush` appends every row
not yet written and marks it written; `record` does both for an entry made outside
such a transaction (a budget alert). Nothing else writes `ledger.jsonl`.

The file is plain blocking I/O; the daemon runs it in a worker thread, and `embedd report`
only reads. Durability and idempotency:

* Every line is written with one `write()` on an `O_APPEND` descriptor, then
  `fsync`ed before `append` returns; a new file also has its folder fsynced.
* Each entry has a key (`batch_id` for usage lines; budget and period for alerts).
  The keys are loaded once when the `Ledger` is opened, and `append` of an entry
  whose key is already in the file writes nothing and returns False. The daemon can
  therefore re-append every row its database holds at start without double counting.
* A crash can leave a torn last line (no trailing newline). Opening the ledger for
  writing repairs it: when the torn text is nevertheless a complete, valid entry
  with a new key (only the newline was lost) the newline is added; otherwise the
  torn text is truncated away. A truncated line is not lost for good: its row is in
  the state database, and the daemon re-appends unwritten rows at start.
  `repair` tells which of the two happened, so the daemon can log it.
* Readers (`read_entries`) never modify the file, and skip a last line without a
  newline: it may be a line the daemon is writing at this very moment.

A line in the middle of the file that is not a ledger entry (someone edited the
file) raises `LedgerCorrupt` naming the line: money lines are never skipped silently.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, TypeAlias

from embedd import metrics
from embedd.crashpoints import fault_point
from embedd.errors import FatalError
from embedd.files.jsonio import dumps_exact
from embedd.files.spool import FILE_MODE, fsync_dir
from embedd.money.prices import Lane, Price, cost, money, price_for, to_decimal
from embedd.state.store import Store

UsageKind: TypeAlias = Literal["batch", "sync", "dedup"]
BudgetName: TypeAlias = Literal["daily", "monthly"]
BudgetAction: TypeAlias = Literal["warn", "pause"]
EntryKey: TypeAlias = tuple[str, ...]


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
    lane_price = price.on(kind)
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
    lane: Lane,
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


@dataclass(frozen=True, slots=True)
class EntryMaker:
    """`make_entry` and `make_dedup_entry` with the daemon's settings given once:
    the model and dimensions, whether vectors are emulated, the prices, and the clock
    (seconds since the epoch) entries are stamped with — the clock budgets also use to
    tell which day and month a cost belongs to."""

    model: str
    dimensions: int
    emulated: bool
    prices: Mapping[str, Price]
    clock: Callable[[], float]

    def now(self) -> datetime:
        """The time an entry made now is stamped with."""
        return datetime.fromtimestamp(self.clock(), UTC)

    def usage(
        self,
        kind: UsageKind,
        *,
        batch_id: str,
        requests: int,
        tokens: int,
        estimated_tokens: int,
        estimated: bool = False,
    ) -> LedgerEntry:
        """The usage entry of a batch or a sync request group (see `make_entry`)."""
        return make_entry(
            kind,
            batch_id=batch_id,
            model=self.model,
            dimensions=self.dimensions,
            requests=requests,
            tokens=tokens,
            estimated_tokens=estimated_tokens,
            dedup_tokens=0,
            emulated=self.emulated,
            prices=self.prices,
            now=self.now(),
            estimated=estimated,
        )

    def dedup(self, job: str, *, lane: str, dedup_tokens: int) -> LedgerEntry:
        """The dedup entry of one job (see `make_dedup_entry`); `lane` other than
        "sync" counts as batch."""
        return make_dedup_entry(
            job,
            lane="sync" if lane == "sync" else "batch",
            model=self.model,
            dimensions=self.dimensions,
            dedup_tokens=dedup_tokens,
            emulated=self.emulated,
            prices=self.prices,
            now=self.now(),
        )


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
    return to_decimal(_field(obj, name, default), f"field {name!r}")


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


@dataclass(frozen=True, slots=True)
class PeriodSpend:
    """Billed spend (`cost_usd` of usage entries) of a UTC day and of its month."""

    today: Decimal
    month: Decimal


def period_spend(lines: Iterable[str], day_ts: str) -> PeriodSpend:
    """The spend of the ledger `lines` of one month (`Store.LEDGER_SINCE` selects them),
    and of those from `day_ts` (a `format_ts` text) on. Shared by budgets and status."""
    today = month = Decimal(0)
    for line in lines:
        entry = parse_line(line)
        if not isinstance(entry, LedgerEntry):
            continue
        month += entry.cost_usd
        if format_ts(entry.ts) >= day_ts:
            today += entry.cost_usd
    return PeriodSpend(today, month)


Repair = Literal["completed", "truncated"]


class LedgerCorrupt(FatalError):
    """The ledger file holds a line that is not a ledger entry."""


def _open_binary(path: Path) -> BinaryIO | None:
    """`path` opened for reading without following a symlink; None when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    return os.fdopen(fd, "rb")


def _parse(raw: bytes, path: Path, lineno: int) -> Entry:
    try:
        return parse_line(raw)
    except ValueError as exc:
        raise LedgerCorrupt(f"{path} line {lineno} is not a ledger entry: {exc}") from None


def read_entries(
    path: Path, since: datetime | None = None, until: datetime | None = None
) -> Iterator[Entry]:
    """Stream the entries of the ledger at `path` with `since <= ts < until`.

    Reads line by line and never writes; a missing file has no entries; a last line
    without a newline (torn, or being written) is skipped; blank lines are ignored.
    """
    handle = _open_binary(path)
    if handle is None:
        return
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return
            if not raw.strip():
                continue
            entry = _parse(raw, path, lineno)
            if since is not None and entry.ts < since:
                continue
            if until is not None and entry.ts >= until:
                continue
            yield entry


class LedgerWriteError(OSError):
    """ledger.jsonl could not be written (disk full, I/O error); nothing torn was left."""


class Ledger:
    """The ledger at `path`, open for appending (thread-safe); see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: set[EntryKey] = set()
        self._totals = Totals()
        # The spend of a period only changes when a line is appended: remembered per
        # (day, month) until then, so a budget check does not re-read the month each time.
        self._generation = 0  # lines remembered so far
        self._spend: dict[tuple[str, str, int], PeriodSpend] = {}
        created = not path.exists()
        self._fd = os.open(
            path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE
        )
        try:
            self.repair: Repair | None = self._load()
            if created:
                fsync_dir(path.parent)
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> Repair | None:
        """Scan the file once for keys and totals; repair a torn last line."""
        good_end = 0  # offset just after the last complete line
        tail = b""
        with os.fdopen(os.dup(self._fd), "rb") as handle:
            handle.seek(0)
            for lineno, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    tail = raw
                    break
                good_end += len(raw)
                if raw.strip():
                    self._remember(_parse(raw, self.path, lineno))
        if not tail:
            return None
        try:
            entry: Entry | None = parse_line(tail)
        except ValueError:
            entry = None
        if entry is not None and entry.key not in self._keys:
            # Only the newline was lost: finish the line rather than drop a good entry.
            self._write(b"\n")
            self._remember(entry)
            return "completed"
        os.ftruncate(self._fd, good_end)
        os.fsync(self._fd)
        return "truncated"

    def _remember(self, entry: Entry) -> None:
        self._keys.add(entry.key)
        self._totals = self._totals.add(entry)
        self._generation += 1
        self._spend.clear()

    @property
    def generation(self) -> int:
        """Changes whenever a line is appended (read it before computing a spend)."""
        with self._lock:
            return self._generation

    def remembered_spend(self, day_ts: str, month_ts: str) -> PeriodSpend | None:
        """The spend kept by `remember_spend` for this day and month, unless a line was
        appended since."""
        with self._lock:
            return self._spend.get((day_ts, month_ts, self._generation))

    def remember_spend(
        self, day_ts: str, month_ts: str, spend: PeriodSpend, generation: int
    ) -> None:
        """Keep `spend` of this day and month, computed at `generation`, until the next
        line is appended (nothing is kept if one was appended meanwhile)."""
        with self._lock:
            self._spend = {(day_ts, month_ts, generation): spend}

    def _write(self, data: bytes) -> None:
        """Append `data` and fsync; on failure cut the file back so no torn line stays."""
        size = os.fstat(self._fd).st_size
        try:
            fault_point("ledger_enospc")
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            # A partial line (disk full) would glue onto the next one; remove it.
            os.ftruncate(self._fd, size)
            raise LedgerWriteError(exc.errno, exc.strerror, str(self.path)) from exc

    def append(self, entry: Entry) -> bool:
        """Append `entry` durably; False (and nothing written) if its key is already there."""
        with self._lock:
            if self._fd < 0:
                raise ValueError("ledger is closed")
            if entry.key in self._keys:
                return False
            self._write(to_json_line(entry))
            self._remember(entry)
            return True

    def __contains__(self, key: object) -> bool:
        """True if an entry with this key (`LedgerEntry.key`, `AlertEntry.key`) is written."""
        with self._lock:
            return key in self._keys

    def has_usage(self, batch_id: str) -> bool:
        """True if the usage line of this batch or sync request group is written."""
        return ("usage", batch_id) in self

    def entries(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> Iterator[Entry]:
        """Stream the written entries with `since <= ts < until`, line by line."""
        return read_entries(self.path, since, until)

    def usage(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> Iterator[LedgerEntry]:
        """Stream only the usage entries (no alerts) with `since <= ts < until`."""
        for entry in self.entries(since, until):
            if isinstance(entry, LedgerEntry):
                yield entry

    def totals(self, since: datetime | None = None, until: datetime | None = None) -> Totals:
        """Sums over the ledger; kept in memory when unbounded, else streamed from the file."""
        if since is None and until is None:
            with self._lock:
                return self._totals
        return Totals.of(self.entries(since, until))

    def close(self) -> None:
        """Close the file; later appends raise."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def flush(store: Store, ledger: Ledger) -> list[Entry]:
    """Append every ledger row of `store` not yet in the file, mark each written, and
    return the entries appended now (a row already in the file is only marked).

    Rows are stored in the transaction that applies their results; a crash before the
    append leaves them unwritten, and the next flush (at start, after every collection)
    appends them — the ledger's key check makes a repeat harmless.
    """
    appended: list[Entry] = []
    for row in await store.unwritten_ledger():
        entry = parse_line(row["line"])
        if await asyncio.to_thread(ledger.append, entry):
            appended.append(entry)
            if isinstance(entry, LedgerEntry):
                metrics.usage(
                    entry.kind,
                    entry.tokens,
                    float(entry.cost_usd),
                    float(entry.saved_usd + entry.dedup_saved_usd),
                )
        await store.mark_ledger_written(row["id"])
    return appended


async def record(store: Store, ledger: Ledger, entry: Entry) -> bool:
    """Store `entry`'s row, append its line and mark it written; False when its key was
    already in the file (nothing appended). For entries made outside a transaction
    that applies results, such as a budget alert."""
    ident, ts, kind, line = entry_row(entry)
    await store.add_ledger(ident, ts, kind, line)
    appended = await asyncio.to_thread(ledger.append, entry)
    await store.mark_ledger_written(ident)
    return appended
