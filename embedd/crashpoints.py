"""Named crash points: a test-only hook that kills the daemon at one chosen step.

`EMBEDD_CRASH_AT=name` (or `name:N`, the N-th time the step is reached) makes the
process send itself SIGKILL at `crash_point(name)` — no cleanup, no `finally`, no
flush, exactly what power loss or `kill -9` does there. The crash tests start the
daemon with it, restart it without, and check that nothing was lost or paid twice.

The points, in pipeline order:

    after_claim            inbox/NAME renamed to work/JOB, not yet parsed or queued
    during_plan            a shard's batch file durable under its name, the shard not yet recorded
    after_upload           the shard's file uploaded, its file id not yet recorded
    after_batch_create     the batch created at OpenAI, its id not yet recorded
    during_download        the first chunk of a batch's output file on disk, the rest not
    during_collect_vectors a slice's vectors written to the segments, not yet synced or indexed
    after_collect_vectors  every vector stored and indexed, verdicts and ledger row not yet
    during_outbox_write    NAME.json written, NAME.npy not yet
    after_outbox_write     NAME.npy written, the input not yet moved to done/
    during_recovery        start-up reconcile found a shard's batch, has not recorded it
    during_parse           a claimed file's bytes read, not yet parsed (every try: a poison file)

`EMBEDD_FAULT_AT=name` (or `name:N`) is the chaos hook: `fault_point(name)` raises an
unexpected exception the first N times (default once) it is reached. The names are
the supervised stages (`intake`, `submit`, `collect`, `deliver`, `sync`, `ledger`:
raised inside that stage's unit guard, embedd.pipeline.supervise) and a few edges that raise
the OS error a real failure would:

    open_input     PermissionError (EACCES) opening an input that has no read permission
                   bit: a daemon running as root sees what any other user would
    watch          the file watcher fails inside an ExceptionGroup (inotify limits)
    outbox_enospc  OSError(ENOSPC) writing a result into outbox/
    ledger_enospc  OSError(ENOSPC) appending to ledger.jsonl
    state_full     SQLite's "database or disk is full" storing a claimed file's records

The variable is read once, at import, into a module-level frozen value rather than
going through `Settings`: it is not configuration a user may set (it kills the
daemon), it must cost nothing when unset (one comparison with None), and the only
way to change it is to start a new process — which is precisely how the tests use
it. The per-point hit counter is process-local state for the same reason.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass

ENV = "EMBEDD_CRASH_AT"

POINTS = frozenset(
    {
        "after_claim",
        "during_plan",
        "after_upload",
        "after_batch_create",
        "during_download",
        "during_collect_vectors",
        "after_collect_vectors",
        "during_outbox_write",
        "after_outbox_write",
        "during_recovery",
        "during_parse",
    }
)

FAULT_ENV = "EMBEDD_FAULT_AT"

FAULTS = frozenset(
    {
        "intake",
        "submit",
        "collect",
        "deliver",
        "sync",
        "ledger",
        "open_input",
        "watch",
        "outbox_enospc",
        "ledger_enospc",
        "state_full",
    }
)


class InjectedFault(RuntimeError):
    """An unexpected failure injected by EMBEDD_FAULT_AT (test-only)."""


@dataclass(frozen=True)
class CrashSpec:
    """Kill the process the `nth` time `name` is reached."""

    name: str
    nth: int = 1


def parse_spec(value: str | None) -> CrashSpec | None:
    """`"name"` or `"name:N"` → a spec; empty → None. An unknown name is an error,
    so a typo in a test cannot silently turn a crash test into a plain run."""
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={value!r}: unknown crash point; known: {sorted(POINTS)}")
    nth = int(count) if count else 1
    if nth < 1:
        raise ValueError(f"{ENV}={value!r}: the count must be 1 or more")
    return CrashSpec(name, nth)


def parse_fault(value: str | None) -> CrashSpec | None:
    """`"name"` or `"name:N"` for EMBEDD_FAULT_AT (N: how many times it raises)."""
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={value!r}: unknown fault point; known: {sorted(FAULTS)}")
    times = int(count) if count else 1
    if times < 1:
        raise ValueError(f"{FAULT_ENV}={value!r}: the count must be 1 or more")
    return CrashSpec(name, times)


_SPEC = parse_spec(os.environ.get(ENV))
_FAULT = parse_fault(os.environ.get(FAULT_ENV))
_hits: Counter[str] = Counter()
_faults: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """Raise here if `EMBEDD_FAULT_AT` names this point and its count is not used up."""
    if _FAULT is None or _FAULT.name != name:
        return
    _faults[name] += 1
    if _faults[name] > _FAULT.nth:
        return
    n = _faults[name]
    sys.stderr.write(f"embedd: fault point {name} reached (#{n}), raising\n")
    if name == "open_input":
        raise PermissionError(errno.EACCES, f"injected fault #{n}: permission denied")
    if name == "watch":
        raise ExceptionGroup(
            "unhandled errors in a TaskGroup",
            [InjectedFault(f"injected fault #{n}: OS file watch limit reached")],
        )
    if name == "state_full":
        raise sqlite3.OperationalError(f"database or disk is full (injected fault #{n})")
    if name.endswith("_enospc"):
        raise OSError(errno.ENOSPC, f"injected fault #{n}: no space left on device")
    raise InjectedFault(f"injected fault #{n} at {name}")


def crash_point(name: str) -> None:
    """SIGKILL this process here if `EMBEDD_CRASH_AT` names this point (and count)."""
    if _SPEC is None or _SPEC.name != name:
        return
    _hits[name] += 1
    if _hits[name] < _SPEC.nth:
        return
    # One line so the test can tell this death from any other; then die hard.
    sys.stderr.write(f"embedd: crash point {name} reached (#{_hits[name]}), SIGKILL\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
