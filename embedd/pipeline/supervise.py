"""Supervised units: one guard around every unit of work, one pure function deciding what follows.

A *unit* is what one stage does for one thing (SPEC §8): claiming an input file
(intake), advancing a shard to its batch (submit), collecting a batch (collect),
writing a file's result (deliver), one `/v1/embeddings` call (sync). The stage's
own code handles what it expects; anything else reaches the guard, which

1. records the attempt in the state database *before* the unit runs — so a unit that
   kills the process (C extension crash, OOM killer, `kill -9`) is known after the
   restart, and after `[retry] max_retries` restarts is quarantined without running;
2. turns any exception into a recorded outcome with :func:`verdict`:

    RETRY   log the traceback once, count `unit_failures_total{stage}`, back the unit
            off (exponential, capped); the stage goes on with its other units
    FAIL    the unit's inputs go to failed/ with "internal error: <Type>: <message>"
    HOLD    the disk is full or failing (ENOSPC, EDQUOT, EIO, EROFS, SQLITE_FULL,
            SQLITE_IOERR): the whole stage waits with backoff, says so once in the
            log (`stage.blocked` / `stage.unblocked`), in `stage_blocked{stage,reason}`
            and in the `blocked` daemon fact that `embedd status` shows; the attempt
            is not counted against the unit, and the stage resumes by itself
    FATAL   the daemon cannot go on (state database unusable — read-only, corrupt, not
            a database —, bad config, broken local state): raised out of the guard,
            the TaskGroup stops the daemon; an SQLite error caused by one unit's data
            (a constraint, a value it cannot bind) is that unit's failure instead
    PASS    an error the stage's own policy handles (`TransientError`: retry later;
            `SubmissionPaused`: pause submission): re-raised to the stage, not counted

`verdict` is a pure function over the tables below, as `retry.py`'s `classify` is for
HTTP answers; `Supervisor` is the one place that applies it.
"""

from __future__ import annotations

import enum
import errno
import sqlite3
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from embedd import metrics
from embedd.crashpoints import fault_point
from embedd.errors import ConfigError, FatalError, SubmissionPaused, TransientError
from embedd.money.ledger import LedgerWriteError
from embedd.state.store import Store

STAGES = ("intake", "submit", "collect", "deliver", "sync", "ledger")


class Action(enum.Enum):
    """What the guard does after a unit raised."""

    RETRY = "retry"  # the same unit again after `delay`
    FAIL = "fail"  # the unit's inputs go to failed/ for good
    HOLD = "hold"  # the stage waits `delay` for the disk; the unit is not to blame
    FATAL = "fatal"  # the daemon cannot go on: let it stop
    PASS = "pass"  # noqa: S105 - not a password; the stage's own handling applies (transient, pause): re-raised


@dataclass(frozen=True)
class Verdict:
    action: Action
    delay: float = 0.0
    reason: str = ""  # for FAIL: the sentence for `failed/`; for HOLD: the cause
    counted: bool = True  # False: this try does not count against the unit's retries


# OS errors that mean "the disk", not "this unit": errno → the reason shown while held.
DISK_ERRNOS: Mapping[int, str] = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only file system",
}

# SQLite's own words for the same conditions (sqlite3 raises OperationalError with them).
SQLITE_DISK_MESSAGES: Mapping[str, str] = {
    "database or disk is full": "disk full",
    "disk i/o error": "I/O error",
}

# Exception types after which nothing can go on (checked with isinstance, in order).
FATAL_TYPES: tuple[type[BaseException], ...] = (ConfigError, FatalError)

# SQLite's words for a state database the daemon cannot use at all (FATAL). Other SQLite
# errors — a constraint, a value it cannot bind — belong to the unit that caused them.
SQLITE_FATAL_MESSAGES = (
    "readonly database",
    "unable to open",
    "malformed",
    "not a database",
    "no such table",
    "no such column",
)

# SQLite busy for longer than busy_timeout: another process holds it; try again later.
SQLITE_BUSY_MESSAGES = ("database is locked", "database table is locked")


def is_fatal(error: BaseException) -> bool:
    """True when the daemon cannot go on: bad config, broken local state, unusable database."""
    if isinstance(error, FATAL_TYPES):
        return True
    if type(error) is sqlite3.DatabaseError:  # "file is not a database", corruption
        return True
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        return any(words in text for words in SQLITE_FATAL_MESSAGES)
    return False


# What each stage already handles on its own, by policy (SPEC §4): handed back to it.
PASS_TYPES: tuple[type[BaseException], ...] = (TransientError, SubmissionPaused)


def backoff(attempts: int, base: float, cap: float) -> float:
    """Delay before try number `attempts + 1`: base, 2·base, 4·base, … at most `cap`."""
    return min(cap, base * (2.0 ** min(max(attempts - 1, 0), 62)))


def disk_reason(error: BaseException) -> str | None:
    """The hold reason if `error` is a full or failing disk (OS or SQLite), else None."""
    if isinstance(error, OSError) and error.errno is not None and error.errno in DISK_ERRNOS:
        return DISK_ERRNOS[error.errno]
    if isinstance(error, sqlite3.OperationalError):
        text = str(error).lower()
        for words, reason in SQLITE_DISK_MESSAGES.items():
            if words in text:
                return reason
    return None


def describe(error: BaseException) -> str:
    """`<ExcType>: <message>`, one line, bounded."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def verdict(
    stage: str,
    error: BaseException,
    attempts: int,
    max_retries: int,
    *,
    base: float = 1.0,
    cap: float = 60.0,
) -> Verdict:
    """What follows `error` in a unit of `stage` that has now been tried `attempts` times.

    Precedence: a full or failing disk holds the stage (whatever the unit); a broken
    state database or configuration is fatal; transient errors and pauses go back to
    the stage, whose own retry and pause logic handles them; anything else is retried
    until `attempts` exceeds `max_retries`, then fails the unit for good.
    """
    del stage  # every stage follows the same table today; kept for per-stage rules
    hold = disk_reason(error)
    if hold is not None:
        return Verdict(Action.HOLD, backoff(attempts, base, cap), hold, counted=False)
    if is_fatal(error):
        return Verdict(Action.FATAL, 0.0, describe(error))
    if isinstance(error, sqlite3.OperationalError) and any(
        words in str(error).lower() for words in SQLITE_BUSY_MESSAGES
    ):
        return Verdict(Action.RETRY, backoff(attempts, base, cap), describe(error), counted=False)
    if isinstance(error, PASS_TYPES):
        return Verdict(Action.PASS, 0.0, describe(error), counted=False)
    if attempts > max_retries:
        return Verdict(Action.FAIL, 0.0, f"internal error: {describe(error)}")
    return Verdict(Action.RETRY, backoff(attempts, base, cap), describe(error))


def crashed_reason(attempts: int, error: str | None) -> str:
    """The failed/ reason of a unit quarantined at start, before it runs again."""
    if error:
        return f"internal error: {error} (tried {attempts} times)"
    return (
        f"internal error: processing it crashed the daemon {attempts} times; "
        "it was set aside so the daemon could go on"
    )


GiveUp = Callable[[str], Awaitable[None]]

MAX_BACKOFFS = 10_000  # backed-off units remembered before the expired ones are dropped


@dataclass
class Supervisor:
    """The guard every stage applies to each of its units. One per daemon.

    Units run with `record=True` (the default) have their tries kept in the state
    database; a stage's loop-level step (`record=False`) keeps them in memory only,
    since it is no input's unit and runs again whatever happens.
    """

    store: Store
    log: Any
    clock: Callable[[], float]
    max_retries: int
    base: float = 1.0
    cap: float = 60.0
    _not_before: dict[tuple[str, str], float] = field(default_factory=dict)
    _tries: dict[tuple[str, str], int] = field(default_factory=dict)  # units not recorded
    # stage → (reason, held until, refusals in a row, since): the stages held now
    _held: dict[str, tuple[str, float, int, float]] = field(default_factory=dict)

    def held(self, stage: str) -> str | None:
        """The reason `stage` is held now, or None."""
        hold = self._held.get(stage)
        return hold[0] if hold is not None else None

    def waiting(self, stage: str, unit: str) -> bool:
        """True while the unit (or its whole stage) is backed off."""
        now = self.clock()
        hold = self._held.get(stage)
        if hold is not None and now < hold[1]:
            return True
        return now < self._not_before.get((stage, unit), 0.0)

    async def run(
        self,
        stage: str,
        unit: str,
        work: Callable[[], Awaitable[Any]],
        give_up: GiveUp | None = None,
        *,
        record: bool = True,
    ) -> bool:
        """Run one unit under the guard; True if it finished, False if it failed, was
        backed off or was given up. Raises what `verdict` calls FATAL or PASS (and
        cancellation)."""
        if self.waiting(stage, unit):
            return False
        if len(self._not_before) > MAX_BACKOFFS:
            now = self.clock()  # units that went away meanwhile (done by another path)
            self._not_before = {k: t for k, t in self._not_before.items() if t > now}
        key = (stage, unit)
        if record:
            try:
                attempts, last_error = await self.store.unit_started(stage, unit, self.clock())
            except Exception as exc:  # a failure to record is judged too
                return await self._judge(stage, unit, exc, 0, give_up, record)
            if attempts > self.max_retries + 1:
                # Tried max_retries + 1 times without an outcome: it killed the process
                # each time (an exception would have been judged then). Never again.
                reason = crashed_reason(attempts - 1, last_error)
                await self._give_up(stage, unit, reason, give_up, record)
                return False
        else:
            attempts = self._tries[key] = self._tries.get(key, 0) + 1
        try:
            if record:
                fault_point(stage)
            await work()
        except Exception as exc:  # the guard's whole purpose
            return await self._judge(stage, unit, exc, attempts, give_up, record)
        self._not_before.pop(key, None)
        await self._forget(stage, unit, record)
        await self._unblock(stage)
        return True

    async def _judge(
        self,
        stage: str,
        unit: str,
        exc: Exception,
        attempts: int,
        give_up: GiveUp | None,
        record: bool,
    ) -> bool:
        v = verdict(stage, exc, attempts, self.max_retries, base=self.base, cap=self.cap)
        if v.action is Action.FATAL:
            raise exc
        if not v.counted and attempts:
            # Not the unit's fault: take the try back.
            if record:
                await self.book(self.store.unit_not_tried(stage, unit))
            else:
                self._tries[(stage, unit)] = attempts - 1
        if v.action is Action.PASS:
            raise exc
        if v.action is Action.HOLD:
            # The ledger is its own stage: whoever appended, only the ledger waits (the
            # rows are safe in the database; the daemon's ledger step flushes them later).
            held = "ledger" if isinstance(exc, LedgerWriteError) else stage
            until = await self._block(held, v.reason, exc)
            self._not_before[(stage, unit)] = until
            return False
        metrics.UNIT_FAILURES.labels(stage=stage).inc()
        if v.action is Action.FAIL:
            self.log.error(
                "unit.failed",
                stage=stage,
                unit=unit,
                attempts=attempts,
                error=describe(exc),
                traceback=_traceback(exc),
            )
            await self._give_up(stage, unit, v.reason, give_up, record)
            return False
        self.log.error(
            "unit.retry",
            stage=stage,
            unit=unit,
            attempts=attempts,
            delay_s=round(v.delay, 3),
            error=describe(exc),
            traceback=_traceback(exc),
        )
        if record:
            await self.book(self.store.unit_error(stage, unit, v.reason))
        self._not_before[(stage, unit)] = self.clock() + v.delay
        return False

    async def book(self, step: Awaitable[None]) -> None:
        """Bookkeeping in the state database (tries, facts for `embedd status`): a full
        disk must not turn it into a crash. Only an unusable database is raised."""
        try:
            await step
        except Exception as exc:  # judged: only a broken database is raised
            if disk_reason(exc) is None and is_fatal(exc):
                raise
            self.log.debug("unit.bookkeeping_failed", error=describe(exc))

    async def _forget(self, stage: str, unit: str, record: bool) -> None:
        self._tries.pop((stage, unit), None)
        if record:
            await self.book(self.store.unit_finished(stage, unit))

    async def _give_up(
        self, stage: str, unit: str, reason: str, give_up: GiveUp | None, record: bool
    ) -> None:
        if give_up is not None:
            try:
                await give_up(reason)
            except Exception as exc:  # tried again after a backoff
                v = verdict(stage, exc, 0, self.max_retries, base=self.base, cap=self.cap)
                if v.action is Action.FATAL:
                    raise
                self.log.error(
                    "unit.give_up_failed",
                    stage=stage,
                    unit=unit,
                    error=describe(exc),
                    traceback=_traceback(exc),
                )
                if v.action is Action.HOLD:
                    held = "ledger" if isinstance(exc, LedgerWriteError) else stage
                    await self._block(held, v.reason, exc)
                self._not_before[(stage, unit)] = self.clock() + self.cap
                return
        self.log.error("unit.quarantined", stage=stage, unit=unit, reason=reason)
        self._not_before.pop((stage, unit), None)
        await self._forget(stage, unit, record)

    async def _block(self, stage: str, reason: str, exc: Exception) -> float:
        now = self.clock()
        old = self._held.get(stage)
        times = old[2] + 1 if old is not None else 1
        since = old[3] if old is not None else now
        # The stage's own backoff grows with each refusal in a row, whatever the unit.
        delay = backoff(times, self.base, self.cap)
        self._held[stage] = (reason, now + delay, times, since)
        if old is None or old[0] != reason:
            self.log.error("stage.blocked", stage=stage, reason=reason, error=describe(exc))
            if old is not None:
                metrics.STAGE_BLOCKED.labels(stage=stage, reason=old[0]).set(0)
            metrics.STAGE_BLOCKED.labels(stage=stage, reason=reason).set(1)
            await self.publish()
        return now + delay

    async def _unblock(self, stage: str) -> None:
        old = self._held.pop(stage, None)
        if old is None:
            return
        self.log.info("stage.unblocked", stage=stage, reason=old[0], refusals=old[2])
        metrics.STAGE_BLOCKED.labels(stage=stage, reason=old[0]).set(0)
        await self.publish()

    async def publish(self) -> None:
        """The `blocked` daemon fact for `embedd status` (best effort: the database may
        be on the full disk itself)."""
        fact = {stage: {"reason": h[0], "since": h[3]} for stage, h in self._held.items()}
        try:
            await self.store.set_fact("blocked", fact or None)
        except Exception as exc:  # shown again on the next change
            self.log.debug("stage.fact_failed", error=describe(exc))


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()
