"""The life of an input file, a request and a batch shard, written once as data.

The state database's CHECK constraints are generated from these tables, and the
store refuses any transition that is not listed here, so the code, the schema and
this page cannot drift apart.

File (one input file, one job):
    claiming ─► queued ─► writing ─► done
        │          │          │
        └──────────┴──────────┴────► failed

Request (one unique input to embed; shared by every record with the same text):
    pending ─► planned ─► done
       ▲          │  └──► failed
       └──────────┘  (re-queued: retryable error, expired, cancelled, queue limit)
    pending ─► done | failed   (sync lane: no shard)

Shard (one batch file and the OpenAI batch made from it):
    planned ─► uploaded ─► submitted ─► collecting ─► collected
       │          │ ▲          ▲
       │          ▼ │          │
       │        unknown ───────┘   (create's answer lost and the lookup failed: a
       │          │                 lookup settles it — found, or proven absent)
       └──────────┴──► abandoned  (nothing was left to send)
"""

from __future__ import annotations

from collections.abc import Mapping

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
    "failed": frozenset(),
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

FILE_ACTIVE = frozenset({"claiming", "queued", "writing"})
SHARD_IN_FLIGHT = frozenset({"planned", "uploaded", "unknown", "submitted", "collecting"})


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
