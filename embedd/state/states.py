"""The life of an input file, a request and a batch shard, written once as data.

The store moves a row only along a transition listed here (its guarded UPDATE
statements take their `WHERE state IN (...)` from `sources`, or check a hand-written
one with `sql_from` when the module loads; tests record every state change the store
makes and compare it with these tables). The state database's CHECK constraints are
frozen SQL in the store's migrations; a test compares them with these tables, so a
state added here without a new migration fails. The named sets below are the only
lists of states elsewhere in the code.

File (one input file, one job):
    claiming ─► queued ─► writing ─► done
        │          │          │
        └──────────┴──────────┴────► failed

Request (one unique input to embed; shared by every record with the same text):
    pending ─► planned ─► done
       ▲          │  └──► failed
       └──────────┘  (re-queued: retryable error, expired, cancelled, queue limit)
    pending ─► done | failed   (sync lane: no shard)
    failed ─► pending          (the same text queued again by a new file: a fresh chance)

Shard (one batch file and the OpenAI batch made from it):
    planned ─► uploaded ─► submitted ─► collecting ─► collected
       │          │ ▲          ▲
       │          ▼ │          │
       │        unknown ───────┘   (create's answer lost and the lookup failed: a
       │          │                 lookup settles it — found, or proven absent)
       └──────────┴──► abandoned  (nothing was left to send)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

FILE_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "claiming": frozenset({"queued", "failed"}),
    "queued": frozenset({"writing", "failed"}),
    "writing": frozenset({"done", "failed"}),
    "done": frozenset(),
    "failed": frozenset(),
}

REQUEST_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "pending": frozenset({"planned", "done", "failed"}),
    "planned": frozenset({"pending", "done", "failed"}),
    "done": frozenset(),
    "failed": frozenset({"pending"}),
}

SHARD_TRANSITIONS: Mapping[str, frozenset[str]] = {
    "planned": frozenset({"uploaded", "abandoned"}),
    "uploaded": frozenset({"submitted", "unknown", "abandoned"}),
    "unknown": frozenset({"submitted", "uploaded", "abandoned"}),
    "submitted": frozenset({"collecting"}),
    "collecting": frozenset({"collected"}),
    "collected": frozenset(),
    "abandoned": frozenset(),
}

# Remote batch statuses after which nothing more will change at OpenAI.
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_STATUSES = frozenset(
    {
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    }
)

# Files being worked on, and files done with (kept until `[state] keep` prunes them).
FILE_ACTIVE = frozenset({"claiming", "queued", "writing"})
FILE_FINISHED = frozenset({"done", "failed"})
# Requests still waiting in the queue: not yet in a batch, or in one in flight.
REQUEST_OPEN = frozenset({"pending", "planned"})
# Shards not collected yet: their batch may still run and bill.
SHARD_IN_FLIGHT = frozenset({"planned", "uploaded", "unknown", "submitted", "collecting"})
# Shards with no batch known to exist yet: they may still be sent, or abandoned.
SHARD_UNSUBMITTED = frozenset({"planned", "uploaded", "unknown"})
# Shards whose input file is at OpenAI and not collected yet.
SHARD_UPLOADED = frozenset({"uploaded", "unknown", "submitted", "collecting"})
# Shards whose story is over.
SHARD_FINISHED = frozenset({"collected", "abandoned"})


def can_move(table: Mapping[str, frozenset[str]], old: str, new: str) -> bool:
    """Whether `old → new` is a legal transition in `table`."""
    return new in table.get(old, frozenset())


def check_sql(column: str, table: Mapping[str, frozenset[str]]) -> str:
    """A CHECK clause that admits exactly the states of `table`."""
    states = ", ".join(f"'{s}'" for s in sorted(table))
    return f"CHECK ({column} IN ({states}))"


def sources(table: Mapping[str, frozenset[str]], new: str) -> tuple[str, ...]:
    """The states from which `new` may be entered, for guarded UPDATE statements."""
    return tuple(sorted(old for old, targets in table.items() if new in targets))


def sql_in(states: Iterable[str]) -> str:
    """`states` as an SQL list for `state IN ...`: `('a', 'b')`, sorted."""
    return "(" + ", ".join(f"'{s}'" for s in sorted(states)) + ")"


def sql_from(table: Mapping[str, frozenset[str]], new: str, *olds: str) -> str:
    """`sql_in(olds)` for an UPDATE that moves rows from `olds` to `new`; `ValueError`
    (when the store module loads) unless every `old → new` is listed in `table`."""
    for old in olds:
        if not can_move(table, old, new):
            raise ValueError(f"{old} -> {new} is not a transition listed in embedd.state.states")
    return sql_in(olds)
