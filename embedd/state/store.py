"""The queue: every SQL statement embedd runs against its state database.

SQLite through aiosqlite, WAL, `synchronous=FULL`. One connection, one writer task
at a time (an asyncio lock), explicit `BEGIN IMMEDIATE` / `COMMIT`: a transaction is
all-or-nothing across a crash, and a cancelled caller never leaves one open — the
commit and the rollback are shielded from cancellation.

Schema history lives in `MIGRATIONS` (literal SQL, frozen once released); `PRAGMA
user_version` says how far a database has come. A fresh database runs every migration
in order, so an old database that is migrated ends up exactly like a new one. `SCHEMA`
is where they lead, written out to read; a test checks that a database built through
every migration and one built from `SCHEMA` have the same tables, columns, CHECKs and
indexes, and that the state CHECKs admit exactly the states of embedd.state.states.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import operator
import secrets
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite
import numpy as np
import numpy.typing as npt
import orjson

from embedd.crashpoints import fault_point
from embedd.errors import FatalError
from embedd.pipeline.outcome import RequestVerdict
from embedd.state.states import (
    FILE_ACTIVE,
    FILE_FINISHED,
    FILE_TRANSITIONS,
    REQUEST_TRANSITIONS,
    SHARD_IN_FLIGHT,
    SHARD_TRANSITIONS,
    SHARD_UPLOADED,
    sources,
    sql_from,
    sql_in,
)
from embedd.state.vectors import (
    SegmentInfo,
    SegmentReader,
    SegmentWriter,
    VectorLike,
    remove_segments,
    segment_files,
)

MIGRATIONS: tuple[str, ...] = (
    # 1: the first schema. Every migration is literal SQL, frozen once released: the
    # CHECK lists are written out, not generated from embedd.state.states, so a change to the
    # state tables needs a new migration (a test compares the live schema with them).
    """
    CREATE TABLE files (
        job TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        lane TEXT NOT NULL CHECK (lane IN ('batch', 'sync')),
        state TEXT NOT NULL CHECK (state IN ('claiming', 'done', 'failed', 'queued', 'writing')),
        sha256 TEXT,
        size INTEGER,
        records INTEGER,
        tokens INTEGER,
        claimed_at REAL NOT NULL,
        queued_at REAL,
        completed_at REAL,
        reason TEXT,
        result TEXT
    );
    CREATE INDEX files_state ON files(state);
    CREATE TABLE records (
        job TEXT NOT NULL REFERENCES files(job),
        idx INTEGER NOT NULL,
        rid TEXT NOT NULL,
        meta TEXT,
        tokens INTEGER NOT NULL,
        chunks INTEGER NOT NULL,
        cached INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job, idx)
    );
    CREATE TABLE pieces (
        job TEXT NOT NULL,
        idx INTEGER NOT NULL,
        chunk INTEGER NOT NULL,
        key TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (job, idx, chunk)
    );
    CREATE INDEX pieces_key ON pieces(key);
    CREATE TABLE requests (
        key TEXT PRIMARY KEY,
        input TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        qtokens INTEGER NOT NULL,
        nbytes INTEGER NOT NULL,
        lane TEXT NOT NULL CHECK (lane IN ('batch', 'sync')),
        state TEXT NOT NULL CHECK (state IN ('done', 'failed', 'pending', 'planned')),
        shard TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        queued_at REAL NOT NULL
    );
    CREATE INDEX requests_pending ON requests(state, lane, queued_at);
    CREATE INDEX requests_shard ON requests(shard);
    CREATE TABLE vectors (
        key TEXT PRIMARY KEY,
        vector BLOB NOT NULL,
        tokens INTEGER,
        origin TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE shards (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('abandoned', 'collected', 'collecting', 'planned', 'submitted', 'uploaded')),
        path TEXT NOT NULL,
        lines INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        qtokens INTEGER NOT NULL,
        file_id TEXT,
        batch_id TEXT UNIQUE,
        status TEXT,
        request_counts TEXT,
        created_at REAL NOT NULL,
        submitted_at REAL,
        expires_at REAL,
        polled_at REAL,
        ended_at REAL,
        final TEXT,
        error TEXT
    );
    CREATE INDEX shards_state ON shards(state);
    CREATE TABLE ledger (
        id TEXT PRIMARY KEY,
        ts TEXT NOT NULL,
        kind TEXT NOT NULL,
        line TEXT NOT NULL,
        written INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE daemon (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    """,
    # supervised units (SPEC §8): tries recorded before each run, so a unit that kills
    # the process is known after the restart; removed when the unit finishes.
    """
    CREATE TABLE unit_attempts (
        stage TEXT NOT NULL,
        unit TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        started_at REAL NOT NULL,
        PRIMARY KEY (stage, unit)
    );
    """,
    # Shards whose create had an unknown outcome (SQLite cannot alter a CHECK, so the
    # table is rebuilt); each shard's own membership (the ledger of a resumed
    # collection counts from it); remote deletes retried until done; and batches found
    # for a shard that already has one (cancelled, billed, deleted).
    """
    CREATE TABLE shards_new (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('abandoned', 'collected', 'collecting', 'planned', 'submitted', 'unknown', 'uploaded')),
        path TEXT NOT NULL,
        lines INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        qtokens INTEGER NOT NULL,
        file_id TEXT,
        batch_id TEXT UNIQUE,
        status TEXT,
        request_counts TEXT,
        created_at REAL NOT NULL,
        submitted_at REAL,
        expires_at REAL,
        polled_at REAL,
        ended_at REAL,
        final TEXT,
        error TEXT,
        unknown_since REAL,
        lookup_at REAL,
        lookups INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO shards_new (id, state, path, lines, bytes, tokens, qtokens, file_id, batch_id,
        status, request_counts, created_at, submitted_at, expires_at, polled_at, ended_at,
        final, error)
        SELECT id, state, path, lines, bytes, tokens, qtokens, file_id, batch_id, status,
        request_counts, created_at, submitted_at, expires_at, polled_at, ended_at, final, error
        FROM shards;
    DROP TABLE shards;
    ALTER TABLE shards_new RENAME TO shards;
    CREATE INDEX shards_state ON shards(state);
    CREATE TABLE shard_members (
        shard TEXT NOT NULL,
        key TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        PRIMARY KEY (shard, key)
    );
    INSERT INTO shard_members (shard, key, tokens)
        SELECT shard, key, tokens FROM requests WHERE shard IS NOT NULL AND state = 'planned';
    CREATE TABLE remote_deletes (
        file_id TEXT PRIMARY KEY,
        shard TEXT,
        kind TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        error TEXT,
        created_at REAL NOT NULL
    );
    CREATE TABLE stray_batches (
        batch_id TEXT PRIMARY KEY,
        shard TEXT NOT NULL,
        status TEXT,
        found_at REAL NOT NULL,
        settled_at REAL
    );
    """,
    # vectors move out of the database into segment files under state/vectors/
    # (SPEC §9): `vectors` keeps where each key's row is, `segments` what each file
    # holds and when it was last used. The old blobs are dropped: the dedup cache
    # starts empty, and the vectors of files not yet delivered are embedded again.
    # `staged`: the requests of a file being claimed, stored in batches (SPEC §9).
    """
    DROP TABLE vectors;
    CREATE TABLE vectors (
        key TEXT PRIMARY KEY,
        segment INTEGER NOT NULL,
        row INTEGER NOT NULL,
        tokens INTEGER,
        origin TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX vectors_segment ON vectors(segment);
    CREATE TABLE segments (
        id INTEGER PRIMARY KEY,
        dims INTEGER NOT NULL,
        capacity INTEGER NOT NULL,
        rows INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        used_at REAL NOT NULL
    );
    CREATE TABLE staged (
        job TEXT NOT NULL,
        key TEXT NOT NULL,
        input TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        qtokens INTEGER NOT NULL,
        nbytes INTEGER NOT NULL,
        PRIMARY KEY (job, key)
    );
    UPDATE requests SET state = 'pending', shard = NULL WHERE state = 'done' AND key IN (
        SELECT p.key FROM pieces p JOIN files f ON f.job = p.job
        WHERE f.state IN ('queued', 'writing'));
    """,
    # A request's text moves to its own table (`requests.input` stays, always ''): the
    # planner's reads and a shard's 20,000-row state update touch small rows, not pages
    # full of texts. A request's text goes with it (the trigger), so every path that
    # deletes a request still deletes its text (with secure_delete). And the membership
    # of shards already pruned (it was kept forever) goes.
    """
    CREATE TABLE request_texts (
        key TEXT PRIMARY KEY,
        input TEXT NOT NULL
    );
    INSERT INTO request_texts (key, input) SELECT key, input FROM requests;
    UPDATE requests SET input = '';
    CREATE TRIGGER requests_text_gone AFTER DELETE ON requests BEGIN
        DELETE FROM request_texts WHERE key = old.key;
    END;
    DELETE FROM shard_members WHERE shard NOT IN (SELECT id FROM shards);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

# The schema `MIGRATIONS` lead to, written out in one place to read (tables in the
# order of the flow). Databases are built by the migrations; a test builds one from
# this text too and compares the two (tables, columns, CHECKs, indexes), and compares
# the state CHECKs with embedd.state.states. A new migration updates this text as well.
SCHEMA = """
CREATE TABLE files (
    job TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    lane TEXT NOT NULL CHECK (lane IN ('batch', 'sync')),
    state TEXT NOT NULL CHECK (state IN ('claiming', 'done', 'failed', 'queued', 'writing')),
    sha256 TEXT,
    size INTEGER,
    records INTEGER,
    tokens INTEGER,
    claimed_at REAL NOT NULL,
    queued_at REAL,
    completed_at REAL,
    reason TEXT,
    result TEXT
);
CREATE INDEX files_state ON files(state);
CREATE TABLE records (
    job TEXT NOT NULL REFERENCES files(job),
    idx INTEGER NOT NULL,
    rid TEXT NOT NULL,
    meta TEXT,
    tokens INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    cached INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, idx)
);
CREATE TABLE pieces (
    job TEXT NOT NULL,
    idx INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    key TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (job, idx, chunk)
);
CREATE INDEX pieces_key ON pieces(key);
CREATE TABLE staged (
    job TEXT NOT NULL,
    key TEXT NOT NULL,
    input TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    qtokens INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    PRIMARY KEY (job, key)
);
CREATE TABLE requests (
    key TEXT PRIMARY KEY,
    input TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    qtokens INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    lane TEXT NOT NULL CHECK (lane IN ('batch', 'sync')),
    state TEXT NOT NULL CHECK (state IN ('done', 'failed', 'pending', 'planned')),
    shard TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    queued_at REAL NOT NULL
);
CREATE INDEX requests_pending ON requests(state, lane, queued_at);
CREATE INDEX requests_shard ON requests(shard);
CREATE TABLE shards (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('abandoned', 'collected', 'collecting', 'planned', 'submitted', 'unknown', 'uploaded')),
    path TEXT NOT NULL,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    qtokens INTEGER NOT NULL,
    file_id TEXT,
    batch_id TEXT UNIQUE,
    status TEXT,
    request_counts TEXT,
    created_at REAL NOT NULL,
    submitted_at REAL,
    expires_at REAL,
    polled_at REAL,
    ended_at REAL,
    final TEXT,
    error TEXT,
    unknown_since REAL,
    lookup_at REAL,
    lookups INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX shards_state ON shards(state);
CREATE TABLE shard_members (
    shard TEXT NOT NULL,
    key TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    PRIMARY KEY (shard, key)
);
CREATE TABLE stray_batches (
    batch_id TEXT PRIMARY KEY,
    shard TEXT NOT NULL,
    status TEXT,
    found_at REAL NOT NULL,
    settled_at REAL
);
CREATE TABLE remote_deletes (
    file_id TEXT PRIMARY KEY,
    shard TEXT,
    kind TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    error TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE vectors (
    key TEXT PRIMARY KEY,
    segment INTEGER NOT NULL,
    row INTEGER NOT NULL,
    tokens INTEGER,
    origin TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX vectors_segment ON vectors(segment);
CREATE TABLE segments (
    id INTEGER PRIMARY KEY,
    dims INTEGER NOT NULL,
    capacity INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    used_at REAL NOT NULL
);
CREATE TABLE ledger (
    id TEXT PRIMARY KEY,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    line TEXT NOT NULL,
    written INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE unit_attempts (
    stage TEXT NOT NULL,
    unit TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    started_at REAL NOT NULL,
    PRIMARY KEY (stage, unit)
);
CREATE TABLE daemon (
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE request_texts (
    key TEXT PRIMARY KEY,
    input TEXT NOT NULL
);
CREATE TRIGGER requests_text_gone AFTER DELETE ON requests BEGIN
    DELETE FROM request_texts WHERE key = old.key;
END;
"""
_ACTIVE_SQL = sql_in(FILE_ACTIVE)
# Guards of the request moves written by hand below, checked against embedd.state.states
# when this module loads (files and shards move through `move_file` / `move_shard`).
_REVIVE = sql_from(REQUEST_TRANSITIONS, "pending", "failed")  # a new file queues it again
_TO_PLANNED = sql_from(REQUEST_TRANSITIONS, "planned", "pending")
_PLANNED_BACK = sql_from(REQUEST_TRANSITIONS, "pending", "planned")  # or on to failed
_ABANDONABLE = sql_in(sources(SHARD_TRANSITIONS, "abandoned"))


def db_text(text: str) -> str:
    """`text` as SQLite can store it: lone surrogates (a file name that is not valid
    UTF-8 comes as surrogate escapes) are written as `\\udcff` escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def new_id(prefix: str) -> str:
    """A time-ordered random id: `job_0193f1c2a8b4_5f2e91d0`."""
    return f"{prefix}_{int(time.time() * 1000):012x}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class NewRecord:
    """A record of a claimed file, with the inputs its vector is made of."""

    rid: str
    meta: Mapping[str, Any] | None
    tokens: int
    pieces: Sequence[tuple[str, int]]  # (request key, tokens) for each chunk
    cached: bool


@dataclass(frozen=True)
class NewRequest:
    """A unique input to embed."""

    key: str
    input: str | list[int]  # token ids may come already in their stored form (encode_input)
    tokens: int
    qtokens: int
    nbytes: int


@dataclass(frozen=True)
class Pending(NewRequest):
    """A request waiting to be planned into a shard or a sync call."""

    queued_at: float
    attempts: int


class Store:
    """The state database. Create with `await Store.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        self._lock = asyncio.Lock()
        self.vectors_dir = path.parent / "vectors"
        self.segments = SegmentWriter(self.vectors_dir)
        # Held around a segment write (and, for `add_vectors`, until the index rows
        # naming it commit) and while segments are dropped: a segment is never
        # dropped under a write in flight.
        self._vector_lock = asyncio.Lock()
        # Segments holding rows written by a `VectorWriter` but not yet indexed:
        # never dropped, though no index row names them yet.
        self._writing: collections.Counter[int] = collections.Counter()

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = aiosqlite.Row
            store = cls(db, path)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=10000")
            # Deleted texts are overwritten, not left in free pages (SPEC §9).
            await db.execute("PRAGMA secure_delete=ON")
            # 16 MiB of pages (not 2): a shard's 20,000-row update and a claim's inserts
            # keep their index pages cached instead of spilling and reading them again.
            await db.execute("PRAGMA cache_size=-16384")
            await store._migrate()
            await store._resume_segments()
        except BaseException:
            # aiosqlite's worker thread is not a daemon: a connection left open here
            # would keep the process alive after the error is reported.
            await db.close()
            raise
        return store

    async def close(self) -> None:
        self.segments.close()
        await self._db.close()

    async def _resume_segments(self) -> None:
        row = await self._one(
            "SELECT id, dims, capacity, rows, bytes FROM segments ORDER BY id DESC LIMIT 1"
        )
        last = None if row is None else SegmentInfo(*(int(v) for v in row))
        on_disk = await asyncio.to_thread(segment_files, self.vectors_dir)
        await asyncio.to_thread(self.segments.resume, last, max(on_disk, default=0))

    async def _migrate(self) -> None:
        async with self._db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise FatalError(
                f"state database {self.path} has schema {version}, newer than this embedd "
                f"({SCHEMA_VERSION}); upgrade embedd or restore a backup"
            )
        for number in range(version, SCHEMA_VERSION):
            async with self.transaction() as db:
                await db.executescript_in_tx(MIGRATIONS[number])
                await db.execute(f"PRAGMA user_version = {number + 1}")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Tx]:
        """`BEGIN IMMEDIATE` … `COMMIT`, rolled back on any error or cancellation."""
        async with self._lock:
            try:
                # A statement handed to aiosqlite runs even if its caller is cancelled,
                # so a cancelled BEGIN (or COMMIT) may still take effect: every path out
                # of here with an error queues a ROLLBACK behind it.
                await asyncio.shield(self._db.execute("BEGIN IMMEDIATE"))
                yield _Tx(self._db)
                await asyncio.shield(self._db.execute("COMMIT"))
            except BaseException:
                await self._rollback()
                raise

    async def _rollback(self) -> None:
        try:
            await asyncio.shield(self._db.execute("ROLLBACK"))
        except sqlite3.OperationalError:
            # Nothing was open (BEGIN failed, or a cancelled COMMIT completed after all);
            # anything else is a real failure.
            if self._db.in_transaction:
                raise

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        async with self._lock, self._db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Row | None:
        async with self._lock, self._db.execute(sql, params) as cur:
            return await cur.fetchone()

    async def probe(self) -> bool:
        """A cheap query that proves the database answers (the watchdog's health check)."""
        row = await self._one("SELECT 1")
        return row is not None

    # ---- files -------------------------------------------------------------------

    async def begin_claim(self, job: str, name: str, lane: str, now: float) -> None:
        """Record the intent to claim `name` before the file is moved."""
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO files (job, name, lane, state, claimed_at) VALUES (?, ?, ?, 'claiming', ?)",
                (job, name, lane, now),
            )

    async def files_in(self, *states: str) -> list[aiosqlite.Row]:
        marks = ",".join("?" * len(states))
        return await self._all(
            f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY claimed_at", states
        )

    async def file(self, job: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM files WHERE job = ?", (job,))

    async def forget_claim(self, job: str) -> None:
        """The file vanished before it was claimed: nothing to keep."""
        async with self.transaction() as tx:
            await tx.execute("DELETE FROM files WHERE job = ? AND state = 'claiming'", (job,))

    async def queue_file(
        self,
        job: str,
        *,
        sha256: str,
        size: int,
        records: Sequence[NewRecord],
        requests: Sequence[NewRequest],
        lane: str,
        now: float,
    ) -> tuple[int, int, int]:
        """Store a claimed file's records and requests and mark it queued, in one step.

        A thin wrapper for tests and benchmarks: the file as the one and last batch of
        `queue_staged`, the path intake takes (so `NewRecord.cached` is recomputed, as
        intake does). Returns (records, tokens, cached records)."""
        return await self.queue_staged(
            job, last=(0, records, requests), sha256=sha256, size=size, lane=lane, now=now
        )

    async def clear_claim(self, job: str) -> None:
        """Forget what an interrupted claim of `job` stored, to store it again."""
        async with self.transaction() as tx:
            for table in ("pieces", "records", "staged"):
                await tx.execute(f"DELETE FROM {table} WHERE job = ?", (job,))

    async def stage(
        self,
        job: str,
        first: int,
        records: Sequence[NewRecord],
        requests: Sequence[NewRequest],
    ) -> None:
        """Store one batch of a file being claimed: its records (numbered from `first`),
        their pieces, and its requests set aside until `queue_staged`."""
        async with self.transaction() as tx:
            await _insert_records(tx, job, first, records)
            await tx.with_rows(
                ("job", "key", "input", "tokens", "qtokens", "nbytes"),
                [
                    (job, q.key, encode_input(q.input), q.tokens, q.qtokens, q.nbytes)
                    for q in requests
                ],
                "INSERT OR IGNORE INTO staged (job, key, input, tokens, qtokens, nbytes) "
                "SELECT job, key, input, tokens, qtokens, nbytes FROM v",
            )

    async def queue_staged(
        self,
        job: str,
        *,
        last: tuple[int, Sequence[NewRecord], Sequence[NewRequest]] | None = None,
        sha256: str,
        size: int,
        lane: str,
        now: float,
    ) -> tuple[int, int, int]:
        """Queue a file whose batches are all staged, in one transaction: store the
        `last` batch (first index, records, requests: it goes straight to the queue,
        so a file of one batch never writes its texts twice), mark records whose every
        piece was embedded or queued before (or earlier in this file) as cached, turn
        the requests into pending ones, and mark the file queued.
        Returns (records, tokens, cached records)."""
        async with self.transaction() as tx:
            fault_point("state_full")  # test hook: SQLite's "database or disk is full"
            if last is not None:
                await _insert_records(tx, job, last[0], last[1])
            await tx.execute(
                "UPDATE records SET cached = NOT EXISTS ("
                " SELECT 1 FROM pieces p WHERE p.job = records.job AND p.idx = records.idx"
                " AND NOT EXISTS (SELECT 1 FROM vectors v WHERE v.key = p.key)"
                " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.key = p.key"
                "  AND r.state != 'failed')"
                # (the unary + keeps SQLite on the key index, not a scan of the job's pieces)
                " AND NOT EXISTS (SELECT 1 FROM pieces q WHERE q.key = p.key AND +q.job = p.job"
                "  AND +q.idx < p.idx)"
                ") WHERE job = ?",
                (job,),
            )
            # As in queue_file: an embedded text needs no request, a queued one is
            # shared, one that failed before gets a fresh chance.
            # (a text is stored with its request, and only then: the two come and go together)
            await tx.execute(
                "INSERT OR IGNORE INTO request_texts (key, input) SELECT key, input FROM staged s "
                "WHERE s.job = ? AND NOT EXISTS (SELECT 1 FROM vectors v WHERE v.key = s.key)",
                (job,),
            )
            await tx.execute(
                "INSERT INTO requests (key, input, tokens, qtokens, nbytes, lane, state, queued_at) "
                "SELECT key, '', tokens, qtokens, nbytes, ?, 'pending', ? FROM staged s "
                "WHERE s.job = ? AND NOT EXISTS (SELECT 1 FROM vectors v WHERE v.key = s.key) "
                "ON CONFLICT(key) DO UPDATE SET state = 'pending', attempts = 0, error = NULL, "
                "shard = NULL, queued_at = excluded.queued_at, lane = excluded.lane "
                f"WHERE requests.state IN {_REVIVE}",
                (lane, now, job),
            )
            final = [] if last is None else last[2]
            await _insert_requests(tx, final, lane, now)
            if lane == "sync":
                await tx.execute(
                    "UPDATE requests SET lane = 'sync' WHERE state = 'pending' AND key IN "
                    "(SELECT key FROM staged WHERE job = ?)",
                    (job,),
                )
                await tx.with_rows(
                    ("key",),
                    [(q.key,) for q in final],
                    "UPDATE requests SET lane = 'sync' WHERE state = 'pending' "
                    "AND key IN (SELECT key FROM v)",
                )
            await tx.execute("DELETE FROM staged WHERE job = ?", (job,))
            await tx.execute(
                "UPDATE segments SET used_at = MAX(used_at, ?) WHERE id IN ("
                " SELECT v.segment FROM pieces p JOIN vectors v ON v.key = p.key WHERE p.job = ?)",
                (now, job),
            )
            cur = await tx.execute(
                "SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(cached), 0) "
                "FROM records WHERE job = ?",
                (job,),
            )
            row = await cur.fetchone()
            records, tokens, cached = (int(v) for v in row) if row else (0, 0, 0)
            await tx.execute(
                "UPDATE files SET state = 'queued', sha256 = ?, size = ?, records = ?, "
                "tokens = ?, queued_at = ? WHERE job = ? AND state = 'claiming'",
                (sha256, size, records, tokens, now, job),
            )
        return records, tokens, cached

    async def known_keys(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` are embedded already or queued (for the manifest's `cached`)."""
        wanted = list(dict.fromkeys(keys))
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = await self._all(
                f"SELECT key FROM vectors WHERE key IN ({marks}) "
                f"UNION SELECT key FROM requests WHERE key IN ({marks}) AND state != 'failed'",
                [*part, *part],
            )
            found.update(str(r[0]) for r in rows)
        return found

    async def move_file(self, job: str, new: str, **fields: object) -> bool:
        """Move a file to state `new` if the transition is legal from where it is."""
        olds = sources(FILE_TRANSITIONS, new)
        sets = "".join(f", {k} = ?" for k in fields)
        marks = ",".join("?" * len(olds))
        async with self.transaction() as tx:
            cur = await tx.execute(
                f"UPDATE files SET state = ?{sets} WHERE job = ? AND state IN ({marks})",
                (new, *fields.values(), job, *olds),
            )
            moved = cur.rowcount == 1
            if moved and new in FILE_FINISHED:
                await _forget_texts(tx, job)
        if moved and new in FILE_FINISHED:
            await self.checkpoint()
        return moved

    async def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it to nothing, so texts deleted
        with `secure_delete` leave no old copy in `-wal` either. Best effort: a reader
        in the middle of a read keeps the WAL until a later checkpoint."""
        async with self._lock:
            # Never wait for readers (a delivery streaming vectors): if one is reading,
            # this pass does what it can and a later one (each retention pass) finishes.
            await self._db.execute("PRAGMA busy_timeout=0")
            try:
                await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                await self._db.execute("PRAGMA busy_timeout=10000")

    async def forget_orphan_texts(self) -> int:
        """Delete the texts of requests no unfinished file needs any more (those that
        were still in a batch when their file finished); return how many."""
        async with self.transaction() as tx:
            cur = await tx.execute(
                "DELETE FROM requests WHERE state != 'planned' AND NOT EXISTS ("
                " SELECT 1 FROM pieces p JOIN files f ON f.job = p.job"
                f" WHERE p.key = requests.key AND f.state IN {_ACTIVE_SQL})"
            )
            count = cur.rowcount
        if count:
            await self.checkpoint()
        return count

    async def prune_finished(self, before: float) -> int:
        """Delete the rows of files that finished before `before` (records, pieces, the
        file) and of shards that ended before it; the ledger stays. Returns files pruned."""
        old = (
            f"SELECT job FROM files WHERE state IN {sql_in(FILE_FINISHED)} "
            "AND COALESCE(completed_at, queued_at, claimed_at) < ?"
        )
        async with self.transaction() as tx:
            await tx.execute(f"DELETE FROM pieces WHERE job IN ({old})", (before,))
            await tx.execute(f"DELETE FROM records WHERE job IN ({old})", (before,))
            cur = await tx.execute(f"DELETE FROM files WHERE job IN ({old})", (before,))
            count = cur.rowcount
            ended = (
                "SELECT id FROM shards WHERE state IN ('collected', 'abandoned') "
                "AND COALESCE(ended_at, submitted_at, created_at) < ?"
            )
            # a shard's membership goes with it
            await tx.execute(f"DELETE FROM shard_members WHERE shard IN ({ended})", (before,))
            await tx.execute(f"DELETE FROM shards WHERE id IN ({ended})", (before,))
        return count

    async def vector_bytes(self) -> int:
        """Bytes of the segment files the index knows (each counted at full size)."""
        row = await self._one("SELECT COALESCE(SUM(bytes), 0) FROM segments")
        return int(row[0]) if row else 0

    async def prune_vectors(
        self, *, max_bytes: int, keep: float, now: float, sweep: bool = True
    ) -> list[int]:
        """Drop whole segments, least recently used first: every segment unused for
        `keep` seconds, then more until the rest fit in `max_bytes`. The segment being
        filled and any holding a vector an unfinished file still needs stay. Their
        keys lose their vectors (a text that comes back is embedded again). Files on
        disk that no index row names (a crash before the index committed) go too
        (`sweep=False` skips that, and all the work when nothing is over its bound).
        Returns the segments dropped."""
        async with self._vector_lock:
            row = await self._one("SELECT COALESCE(SUM(bytes), 0), MIN(used_at) FROM segments")
            within = row is None or (
                int(row[0]) <= max_bytes and (row[1] is None or float(row[1]) >= now - keep)
            )
            if within and not sweep:
                return []  # the usual case, cheap: nothing is due
            segments = await self._all(
                "SELECT id, bytes, used_at FROM segments ORDER BY used_at, id"
            )
            pinned = {
                int(r[0])
                for r in await self._all(
                    "SELECT DISTINCT v.segment FROM files f JOIN pieces p ON p.job = f.job "
                    f"JOIN vectors v ON v.key = p.key WHERE f.state IN {_ACTIVE_SQL}"
                )
            }
            active = self.segments.active_id
            writing = {seg for seg, n in self._writing.items() if n > 0}
            total = sum(int(r["bytes"]) for r in segments)
            drop: list[int] = []
            for r in segments:
                seg = int(r["id"])
                if seg == active or seg in pinned or seg in writing:
                    continue
                if float(r["used_at"]) < now - keep or total > max_bytes:
                    drop.append(seg)
                    total -= int(r["bytes"])
            if drop:
                async with self.transaction() as tx:
                    for start in range(0, len(drop), 500):
                        part = drop[start : start + 500]
                        marks = ",".join("?" * len(part))
                        await tx.execute(f"DELETE FROM vectors WHERE segment IN ({marks})", part)
                        await tx.execute(f"DELETE FROM segments WHERE id IN ({marks})", part)
            known = {int(r["id"]) for r in segments} - set(drop)
            on_disk = await asyncio.to_thread(segment_files, self.vectors_dir)
            strays = [
                seg for seg in on_disk if seg not in known and seg != active and seg not in writing
            ]
            await asyncio.to_thread(remove_segments, self.vectors_dir, [*drop, *strays])
        return drop

    async def ready_files(self) -> list[aiosqlite.Row]:
        """Queued files whose every piece has a vector or a request that failed for good."""
        return await self._all(
            "SELECT f.* FROM files f WHERE f.state IN ('queued', 'writing') AND NOT EXISTS ("
            " SELECT 1 FROM pieces p LEFT JOIN vectors v ON v.key = p.key"
            " LEFT JOIN requests r ON r.key = p.key"
            " WHERE p.job = f.job AND v.key IS NULL AND (r.state IS NULL OR r.state != 'failed')"
            ") ORDER BY f.claimed_at"
        )

    async def file_records(self, job: str) -> list[aiosqlite.Row]:
        return await self._all("SELECT * FROM records WHERE job = ? ORDER BY idx", (job,))

    async def file_pieces(self, job: str) -> list[aiosqlite.Row]:
        """Each piece: whether it has a vector (`embedded`), where from, its request's error.

        The vectors themselves are in the segments: `piece_blocks` streams them.
        """
        return await self._all(
            "SELECT p.idx, p.chunk, p.key, p.tokens, v.key IS NOT NULL AS embedded, v.origin, "
            "r.state AS rstate, r.error "
            "FROM pieces p LEFT JOIN vectors v ON v.key = p.key "
            "LEFT JOIN requests r ON r.key = p.key "
            "WHERE p.job = ? ORDER BY p.idx, p.chunk",
            (job,),
        )

    # ---- requests and shards -----------------------------------------------------

    async def pending(self, lane: str, limit: int, *, inputs: bool = True) -> list[Pending]:
        """The oldest pending requests; with `inputs=False` their `input` is left empty
        (planning needs only sizes: a shard's texts are read by `request_inputs`)."""
        if inputs:
            sql = (
                "SELECT r.key, t.input, r.tokens, r.qtokens, r.nbytes, r.queued_at, r.attempts "
                "FROM requests r JOIN request_texts t ON t.key = r.key "
                "WHERE r.state = 'pending' AND r.lane = ? ORDER BY r.queued_at, r.key LIMIT ?"
            )
        else:
            sql = (
                "SELECT key, '' AS input, tokens, qtokens, nbytes, queued_at, attempts "
                "FROM requests WHERE state = 'pending' AND lane = ? "
                "ORDER BY queued_at, key LIMIT ?"
            )
        rows = await self._all(sql, (lane, limit))
        # (by position: a planner reads up to 50,000 of these at a time)
        return [Pending(r[0], _decode_input(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def oldest_pending(self, lane: str) -> float | None:
        row = await self._one(
            "SELECT MIN(queued_at) FROM requests WHERE state = 'pending' AND lane = ?", (lane,)
        )
        return None if row is None or row[0] is None else float(row[0])

    async def pending_totals(self, lane: str) -> tuple[int, int, int, float | None]:
        """(requests, bytes, queue tokens, oldest queued_at) of the pending requests: the
        planner's cheap look before it reads them one by one."""
        row = await self._one(
            "SELECT COUNT(*), COALESCE(SUM(nbytes), 0), COALESCE(SUM(qtokens), 0), "
            "MIN(queued_at) FROM requests WHERE state = 'pending' AND lane = ?",
            (lane,),
        )
        if row is None:
            return 0, 0, 0, None
        return int(row[0]), int(row[1]), int(row[2]), None if row[3] is None else float(row[3])

    async def create_shard(
        self,
        shard: str,
        *,
        path: Path,
        keys: Sequence[str],
        nbytes: int,
        tokens: int,
        qtokens: int,
        now: float,
        before_commit: Awaitable[None] | None = None,
    ) -> None:
        """Record a planned shard and move its requests from pending to planned. When
        `before_commit` is given, the transaction waits for it before committing (and
        rolls back if it fails): the shard's file is written and made durable
        meanwhile. (The store is held that long: a planner's shard is at most
        `[batch] max_bytes`.)"""
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO shards (id, state, path, lines, bytes, tokens, qtokens, created_at) "
                "VALUES (?, 'planned', ?, ?, ?, ?, ?, ?)",
                (shard, str(path), len(keys), nbytes, tokens, qtokens, now),
            )
            # One statement (the keys as one JSON array), not one a key: it runs without
            # the GIL, side by side with the planner writing the shard's file.
            await tx.execute(
                "UPDATE requests SET state = 'planned', shard = ? "
                f"WHERE key IN (SELECT value FROM json_each(?)) AND state IN {_TO_PLANNED}",
                (shard, orjson.dumps(list(keys)).decode()),
            )
            # The shard's own membership: what its batch file holds, whatever becomes
            # of the requests later (a resumed collection still counts every line).
            await tx.execute(
                "INSERT OR IGNORE INTO shard_members (shard, key, tokens) "
                "SELECT shard, key, tokens FROM requests WHERE shard = ? AND state = 'planned'",
                (shard,),
            )
            if before_commit is not None:
                await before_commit

    async def shards_in(self, *states: str) -> list[aiosqlite.Row]:
        marks = ",".join("?" * len(states))
        return await self._all(
            f"SELECT * FROM shards WHERE state IN ({marks}) ORDER BY created_at", states
        )

    async def move_shard(self, shard: str, new: str, **fields: object) -> bool:
        olds = sources(SHARD_TRANSITIONS, new)
        sets = "".join(f", {k} = ?" for k in fields)
        marks = ",".join("?" * len(olds))
        async with self.transaction() as tx:
            cur = await tx.execute(
                f"UPDATE shards SET state = ?{sets} WHERE id = ? AND state IN ({marks})",
                (new, *fields.values(), shard, *olds),
            )
            return cur.rowcount == 1

    async def update_shard(self, shard: str, **fields: object) -> None:
        """Set columns of a shard other than its state (`move_shard` moves it)."""
        if "state" in fields:
            raise ValueError("update_shard does not move a shard: use move_shard")
        sets = ", ".join(f"{k} = ?" for k in fields)
        async with self.transaction() as tx:
            await tx.execute(f"UPDATE shards SET {sets} WHERE id = ?", (*fields.values(), shard))

    async def shard_keys(self, shard: str) -> list[str]:
        return list(await self.shard_tokens(shard))

    async def shard_tokens(self, shard: str) -> dict[str, int]:
        """The requests still planned in `shard`, with their token estimates."""
        rows = await self._all(
            "SELECT key, tokens FROM requests WHERE shard = ? AND state = 'planned'", (shard,)
        )
        return {str(r[0]): int(r[1]) for r in rows}

    async def shard_members(self, shard: str) -> dict[str, int]:
        """Every request `shard`'s batch file holds, with its token estimate."""
        rows = await self._all("SELECT key, tokens FROM shard_members WHERE shard = ?", (shard,))
        return {str(r[0]): int(r[1]) for r in rows}

    async def shard(self, shard: str) -> aiosqlite.Row | None:
        return await self._one("SELECT * FROM shards WHERE id = ?", (shard,))

    async def refuse_shard(self, shard: str, error: str, max_retries: int, now: float) -> None:
        """The API refused a shard's batch for good: count a try against each of its
        requests and abandon the shard, in one transaction."""
        async with self.transaction() as tx:
            await tx.execute(
                "UPDATE requests SET attempts = attempts + 1, error = ?, shard = NULL, "
                "state = CASE WHEN attempts + 1 > ? THEN 'failed' ELSE 'pending' END "
                f"WHERE shard = ? AND state IN {_PLANNED_BACK}",
                (f"batch submission refused: {error}", max_retries, shard),
            )
            await tx.execute(
                "UPDATE shards SET state = 'abandoned', error = ?, ended_at = ? WHERE id = ? "
                f"AND state IN {_ABANDONABLE}",
                (error, now, shard),
            )

    async def plan_remote_deletes(
        self, files: Sequence[tuple[str, str | None, str]], now: float
    ) -> None:
        """Record files to delete at OpenAI: (file id, shard, kind)."""
        async with self.transaction() as tx:
            await tx.executemany(
                "INSERT OR IGNORE INTO remote_deletes (file_id, shard, kind, next_at, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(f, shard, kind, now, now) for f, shard, kind in files],
            )

    async def due_remote_deletes(self, now: float) -> list[aiosqlite.Row]:
        """Deletes due now whose shard is final (or that belong to no shard)."""
        return await self._all(
            "SELECT d.* FROM remote_deletes d LEFT JOIN shards s ON s.id = d.shard "
            "WHERE d.next_at <= ? AND (s.id IS NULL OR s.state IN ('collected', 'abandoned')) "
            "ORDER BY d.next_at",
            (now,),
        )

    async def remote_delete_done(self, file_id: str) -> None:
        async with self.transaction() as tx:
            await tx.execute("DELETE FROM remote_deletes WHERE file_id = ?", (file_id,))

    async def remote_delete_failed(self, file_id: str, error: str, next_at: float) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "UPDATE remote_deletes SET attempts = attempts + 1, error = ?, next_at = ? "
                "WHERE file_id = ?",
                (error, next_at, file_id),
            )

    async def add_stray(self, batch_id: str, shard: str, status: str | None, now: float) -> bool:
        """Record a second batch found for `shard`; False if it was known already."""
        async with self.transaction() as tx:
            cur = await tx.execute(
                "INSERT OR IGNORE INTO stray_batches (batch_id, shard, status, found_at) "
                "VALUES (?, ?, ?, ?)",
                (batch_id, shard, status, now),
            )
            return cur.rowcount == 1

    async def open_strays(self) -> list[aiosqlite.Row]:
        return await self._all(
            "SELECT * FROM stray_batches WHERE settled_at IS NULL ORDER BY found_at"
        )

    async def settle_stray(
        self, batch_id: str, ledger: tuple[str, str, str, str] | None, now: float
    ) -> None:
        """A stray batch ended: its ledger line (if it billed anything) and the mark."""
        async with self.transaction() as tx:
            await tx.execute(
                "UPDATE stray_batches SET settled_at = ? WHERE batch_id = ?", (now, batch_id)
            )
            if ledger is not None:
                await tx.execute(
                    "INSERT OR IGNORE INTO ledger (id, ts, kind, line) VALUES (?, ?, ?, ?)",
                    ledger,
                )

    async def shard_path(self, shard: str) -> str | None:
        row = await self._one("SELECT path FROM shards WHERE id = ?", (shard,))
        return None if row is None else str(row[0])

    async def add_vectors(
        self, vectors: Sequence[tuple[str, VectorLike, int | None]], *, origin: str, now: float
    ) -> None:
        """Store vectors and mark their requests done (idempotent: repeats change nothing).

        `vectors`: (key, float32 row as bytes or array, tokens). The rows go to the
        segment files first (durable), then their index rows commit.
        """
        if not vectors:
            return
        async with self._vector_lock:
            located = await self._write_segments(vectors)
            async with self.transaction() as tx:
                await _insert_vectors(tx, located, origin, now)

    def vector_writer(self, *, origin: str, clock: Callable[[], float]) -> VectorWriter:
        """A writer for the many vectors of one collection (see `VectorWriter`)."""
        return VectorWriter(self, origin, clock)

    async def _write_segments(
        self, vectors: Sequence[tuple[str, VectorLike, int | None]]
    ) -> _Located:
        if not vectors:
            return [], []
        slots, infos = await asyncio.to_thread(self.segments.write, [v for _, v, _ in vectors])
        rows = [(k, seg, row, t) for (k, _, t), (seg, row) in zip(vectors, slots, strict=True)]
        return rows, infos

    async def queue_tokens_in_flight(self) -> int:
        row = await self._one(
            f"SELECT COALESCE(SUM(qtokens), 0) FROM shards WHERE state IN {sql_in(SHARD_UPLOADED)}"
        )
        return int(row[0]) if row else 0

    async def fail_shard_requests(
        self, shard: str, reason: str, *, collected: bool, max_retries: int, now: float
    ) -> None:
        """Fail for good every request still planned in `shard`, with `reason`.

        `collected`: the shard had a batch (it is closed as collected, its stored
        vectors stay); otherwise it was never submitted and the caller abandons it."""
        keys = await self.shard_keys(shard)
        await self.apply_results(
            RequestVerdict(fail=tuple((k, reason) for k in keys)),
            shard=shard if collected else None,
            max_retries=max_retries,
            now=now,
        )

    async def apply_results(
        self,
        verdict: RequestVerdict,
        *,
        max_retries: int,
        now: float,
        shard: str | None = None,
        origin: str = "",
        vectors: Sequence[tuple[str, VectorLike, int | None]] = (),
        ledger: tuple[str, str, str, str] | None = None,
    ) -> None:
        """Apply one collected batch (or one sync call) in a single transaction.

        `verdict`: its requests to retry (counted against `max_retries`), fail for good
        or requeue (embedd.pipeline.outcome); `shard`: closed as collected; `vectors`: (key,
        float32 bytes, tokens) stored with `origin`; `ledger`: (id, ts, kind, json line).
        """
        async with self._vector_lock:
            located = await self._write_segments(vectors)
            await self._apply_results(
                located,
                shard,
                origin,
                verdict.retry,
                verdict.fail,
                verdict.requeue,
                max_retries,
                ledger,
                now,
            )

    async def _apply_results(
        self,
        located: _Located,
        shard: str | None,
        origin: str,
        retry: Sequence[tuple[str, str]],
        fail: Sequence[tuple[str, str]],
        requeue: Sequence[str],
        max_retries: int,
        ledger: tuple[str, str, str, str] | None,
        now: float,
    ) -> None:
        async with self.transaction() as tx:
            await _insert_vectors(tx, located, origin, now)
            await tx.executemany(
                "UPDATE requests SET attempts = attempts + 1, error = ?, shard = NULL, "
                "state = CASE WHEN attempts + 1 > ? THEN 'failed' ELSE 'pending' END "
                "WHERE key = ? AND state IN ('pending', 'planned')",
                [(err, max_retries, k) for k, err in retry],
            )
            await tx.executemany(
                "UPDATE requests SET state = 'failed', error = ?, shard = NULL WHERE key = ? "
                "AND state IN ('pending', 'planned')",
                [(err, k) for k, err in fail],
            )
            await tx.executemany(
                "UPDATE requests SET state = 'pending', shard = NULL WHERE key = ? "
                "AND state = 'planned'",
                [(k,) for k in requeue],
            )
            if shard is not None:
                await tx.execute(
                    "UPDATE shards SET state = 'collected', ended_at = ? WHERE id = ? "
                    "AND state = 'collecting'",
                    (now, shard),
                )
            if ledger is not None:
                await tx.execute(
                    "INSERT OR IGNORE INTO ledger (id, ts, kind, line) VALUES (?, ?, ?, ?)",
                    ledger,
                )

    async def release_shard(self, shard: str) -> None:
        """Send a shard that was never submitted back to pending."""
        async with self.transaction() as tx:
            await tx.execute(
                "UPDATE requests SET state = 'pending', shard = NULL WHERE shard = ? "
                f"AND state IN {_PLANNED_BACK}",
                (shard,),
            )
            await tx.execute(
                f"UPDATE shards SET state = 'abandoned' WHERE id = ? AND state IN {_ABANDONABLE}",
                (shard,),
            )

    # ---- supervised units (embedd.pipeline.supervise) -------------------------------------

    async def unit_started(self, stage: str, unit: str, now: float) -> tuple[int, str | None]:
        """Count one more try of a unit, before it runs; return (tries, last error)."""
        async with self.transaction() as tx:
            cur = await tx.execute(
                "INSERT INTO unit_attempts (stage, unit, attempts, started_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(stage, unit) DO UPDATE SET attempts = attempts + 1, "
                "started_at = excluded.started_at RETURNING attempts, error",
                (stage, db_text(unit), now),
            )
            row = await cur.fetchone()
        assert row is not None
        return int(row[0]), row[1]

    async def unit_error(self, stage: str, unit: str, error: str) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "UPDATE unit_attempts SET error = ? WHERE stage = ? AND unit = ?",
                (db_text(error), stage, db_text(unit)),
            )

    async def unit_not_tried(self, stage: str, unit: str) -> None:
        """Take back the last try: it failed for a reason that is not the unit's."""
        async with self.transaction() as tx:
            await tx.execute(
                "UPDATE unit_attempts SET attempts = MAX(attempts - 1, 0) "
                "WHERE stage = ? AND unit = ?",
                (stage, db_text(unit)),
            )

    async def unit_finished(self, stage: str, unit: str) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "DELETE FROM unit_attempts WHERE stage = ? AND unit = ?", (stage, db_text(unit))
            )

    # ---- ledger, daemon facts, status ----------------------------------------------

    async def add_ledger(self, ident: str, ts: str, kind: str, line: str) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT OR IGNORE INTO ledger (id, ts, kind, line) VALUES (?, ?, ?, ?)",
                (ident, ts, kind, line),
            )

    async def unwritten_ledger(self) -> list[aiosqlite.Row]:
        return await self._all("SELECT * FROM ledger WHERE written = 0 ORDER BY ts, id")

    async def mark_ledger_written(self, ident: str) -> None:
        async with self.transaction() as tx:
            await tx.execute("UPDATE ledger SET written = 1 WHERE id = ?", (ident,))

    async def ledger_lines_since(self, ts: str) -> list[str]:
        """The usage lines (no alerts) stamped `ts` or later (`ts`: `format_ts` text)."""
        return [str(r[0]) for r in await self._all(_LEDGER_SINCE, (ts,))]

    async def set_fact(self, key: str, value: object) -> None:
        async with self.transaction() as tx:
            await tx.execute(
                "INSERT INTO daemon (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value)),
            )

    async def facts(self) -> dict[str, Any]:
        return {str(r[0]): json.loads(r[1]) for r in await self._all(_FACTS)}

    async def counts(self) -> dict[str, dict[str, int]]:
        """Files, requests and shards by state."""
        out: dict[str, dict[str, int]] = {}
        for table in _COUNTED:
            rows = await self._all(_COUNT_SQL[table])
            out[table] = {str(r[0]): int(r[1]) for r in rows}
        return out


# ---- reading without the daemon (`embedd status`) -------------------------------------
#
# Plain sqlite3 on a connection from `connect_readonly`: these only read, so they work
# on a `mode=ro` or `immutable=1` connection while the daemon runs or not.

_LEDGER_SINCE = "SELECT line FROM ledger WHERE ts >= ? AND kind != 'alert'"
_FACTS = "SELECT key, value FROM daemon"
_COUNTED = ("files", "requests", "shards")
_COUNT_SQL = {t: f"SELECT state, COUNT(*) FROM {t} GROUP BY state" for t in _COUNTED}
_IN_FLIGHT_SQL = (
    "SELECT * FROM shards WHERE state IN ("
    + ", ".join(f"'{s}'" for s in sorted(SHARD_IN_FLIGHT))
    + ") ORDER BY created_at"
)
_ACTIVE_FILES_SQL = (
    "SELECT f.job, f.name, f.lane, f.state, COUNT(p.key) AS pieces, "
    "COUNT(v.key) AS embedded FROM files f "
    "LEFT JOIN pieces p ON p.job = f.job LEFT JOIN vectors v ON v.key = p.key "
    f"WHERE f.state IN {_ACTIVE_SQL} GROUP BY f.job "
    "ORDER BY f.claimed_at LIMIT ?"
)


def connect_readonly(db: Path) -> sqlite3.Connection:
    """Open the state database so that this process creates and changes nothing.

    `mode=ro` alone is not enough: reading a WAL database makes SQLite create its
    `-wal` and `-shm` files when they are missing, owned by whoever runs `embedd
    status`, which the daemon (another user) then cannot write. While the daemon runs
    both files exist and a read-only reader shares them; when they are missing the
    daemon is stopped (or was stopped cleanly), nothing is in flight, and the file is
    read as `immutable`, which takes no locks and creates no file.
    """
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    query = "mode=ro" if wal.exists() and shm.exists() else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"file:{quote(str(db))}?{query}", uri=True, timeout=5.0)
    conn.row_factory = sqlite3.Row
    return conn


def read_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Files, requests and shards by state (as `Store.counts`)."""
    return {
        table: {str(r[0]): int(r[1]) for r in conn.execute(_COUNT_SQL[table])} for table in _COUNTED
    }


def read_facts(conn: sqlite3.Connection) -> dict[str, Any]:
    """The daemon facts (as `Store.facts`)."""
    return {str(r[0]): json.loads(r[1]) for r in conn.execute(_FACTS)}


def read_shards_in_flight(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """The shards in `SHARD_IN_FLIGHT`, oldest first."""
    return list(conn.execute(_IN_FLIGHT_SQL))


def read_active_files(conn: sqlite3.Connection, limit: int = 50) -> list[sqlite3.Row]:
    """The first `limit` files in `FILE_ACTIVE` by claim time, each with `pieces` (its
    inputs) and `embedded` (how many have a vector)."""
    return list(conn.execute(_ACTIVE_FILES_SQL, (limit,)))


def read_ledger_lines_since(conn: sqlite3.Connection, ts: str) -> list[str]:
    """The usage lines stamped `ts` or later (as `Store.ledger_lines_since`)."""
    return [str(r[0]) for r in conn.execute(_LEDGER_SINCE, (ts,))]


async def _insert_records(tx: _Tx, job: str, first: int, records: Sequence[NewRecord]) -> None:
    """A batch of a file's records (numbered from `first`) and their pieces."""
    await tx.with_rows(
        ("job", "idx", "rid", "meta", "tokens", "chunks"),
        [
            (
                job,
                first + i,
                r.rid,
                None if r.meta is None else json.dumps(r.meta, ensure_ascii=False),
                r.tokens,
                len(r.pieces),
            )
            for i, r in enumerate(records)
        ],
        "INSERT INTO records (job, idx, rid, meta, tokens, chunks, cached) "
        "SELECT job, idx, rid, meta, tokens, chunks, 0 FROM v",
    )
    await tx.with_rows(
        ("job", "idx", "chunk", "key", "tokens"),
        [
            (job, first + i, c, key, tokens)
            for i, r in enumerate(records)
            for c, (key, tokens) in enumerate(r.pieces)
        ],
        "INSERT INTO pieces (job, idx, chunk, key, tokens) "
        "SELECT job, idx, chunk, key, tokens FROM v",
    )


async def _insert_requests(tx: _Tx, requests: Sequence[NewRequest], lane: str, now: float) -> None:
    """New pending requests and their texts. An embedded text needs no request, a
    queued one is shared, one that failed before gets a fresh chance."""
    if not requests:
        return
    await tx.with_rows(
        ("key", "input"),
        [(q.key, encode_input(q.input)) for q in requests],
        "INSERT OR IGNORE INTO request_texts (key, input) SELECT v.key, v.input FROM v "
        "WHERE NOT EXISTS (SELECT 1 FROM vectors w WHERE w.key = v.key)",
    )
    await tx.with_rows(
        ("key", "tokens", "qtokens", "nbytes"),
        [(q.key, q.tokens, q.qtokens, q.nbytes) for q in requests],
        "INSERT INTO requests (key, input, tokens, qtokens, nbytes, lane, state, queued_at) "
        "SELECT v.key, '', v.tokens, v.qtokens, v.nbytes, ?, 'pending', ? FROM v "
        "WHERE NOT EXISTS (SELECT 1 FROM vectors w WHERE w.key = v.key) "
        "ON CONFLICT(key) DO UPDATE SET state = 'pending', attempts = 0, error = NULL, "
        "shard = NULL, queued_at = excluded.queued_at, lane = excluded.lane "
        f"WHERE requests.state IN {_REVIVE}",
        (lane, now),
    )


# (key, segment, row, tokens) of rows already in their segments, and those segments.
_Located = tuple[list[tuple[str, int, int, int | None]], list[SegmentInfo]]


def _variable_limit() -> int:
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        return int(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


# `_Tx.with_rows`: rows bound in one statement, within the linked SQLite's limit on
# a statement's variables (32,766 by default since 3.32; a build may set it lower).
ROWS_PER_STATEMENT = 500
MAX_VARIABLES = _variable_limit()

GROUP_BYTES = 64 * 2**20  # a VectorWriter makes its rows durable and indexes them this often


class VectorWriter:
    """The vectors of one collection, stored as they come, indexed in groups.

    `add` writes rows to the segments without waiting for the disk. Every
    `GROUP_BYTES` of rows (and on leaving the `async with` block normally) the group
    is flushed: the segments are synced, then one transaction indexes the group and
    marks its requests done. A flush runs in the background while the next group is
    parsed and written (one at a time, in order). A few syncs for a whole batch
    output instead of two a slice, with the same crash order as `Store.add_vectors`
    (segment bytes durable, then the index). Rows not yet indexed when the block is
    left by an error are dead space, and a repeated collection writes them again.
    Until its group is indexed, a segment it wrote is never dropped (`_writing`).
    Use as `async with store.vector_writer(...)`.
    """

    def __init__(self, store: Store, origin: str, clock: Callable[[], float]) -> None:
        self._store = store
        self._origin = origin
        self._clock = clock
        self._rows: list[tuple[str, int, int, int | None]] = []
        self._infos: dict[int, SegmentInfo] = {}
        self._bytes = 0
        self._flushing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> VectorWriter:
        return self

    async def __aexit__(self, kind: object, error: object, tb: object) -> None:
        try:
            if kind is None:
                await self.flush()
            elif self._flushing is not None:
                # Let the group in flight finish (or fail) on its own; the error
                # already leaving the block is the one reported.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._flushing)
        finally:
            self._release(self._infos)
            self._infos = {}

    async def add(self, vectors: Sequence[tuple[str, VectorLike, int | None]]) -> None:
        """Write `vectors` (key, float32 row, tokens); index them with the group."""
        if not vectors:
            return
        store = self._store
        async with store._vector_lock:
            slots, infos = await asyncio.to_thread(store.segments.put, [v for _, v, _ in vectors])
            for info in infos:
                if info.id not in self._infos:
                    store._writing[info.id] += 1
                self._infos[info.id] = info
        self._rows.extend(
            (k, seg, row, t) for (k, _, t), (seg, row) in zip(vectors, slots, strict=True)
        )
        first = vectors[0][1]
        self._bytes += (len(first) if isinstance(first, bytes) else first.nbytes) * len(vectors)
        if self._bytes >= GROUP_BYTES:
            await self._start_flush()

    async def flush(self) -> None:
        """Make every row added so far durable and indexed; return when it is."""
        await self._start_flush()
        if self._flushing is not None:
            task, self._flushing = self._flushing, None
            await task

    async def _start_flush(self) -> None:
        if self._flushing is not None:
            task, self._flushing = self._flushing, None
            await task  # groups are indexed in order; an error stops the collection
        if not self._rows:
            return
        rows, infos = self._rows, self._infos
        self._rows, self._infos, self._bytes = [], {}, 0
        self._flushing = asyncio.ensure_future(self._index(rows, infos))

    async def _index(
        self, rows: list[tuple[str, int, int, int | None]], infos: dict[int, SegmentInfo]
    ) -> None:
        store = self._store
        try:
            await asyncio.to_thread(store.segments.sync)
            async with store.transaction() as tx:
                await _insert_vectors(tx, (rows, list(infos.values())), self._origin, self._clock())
        finally:
            self._release(infos)

    def _release(self, infos: dict[int, SegmentInfo]) -> None:
        writing = self._store._writing
        for seg in infos:
            writing[seg] -= 1
            if writing[seg] <= 0:
                del writing[seg]


async def _insert_vectors(tx: _Tx, located: _Located, origin: str, now: float) -> None:
    rows, segments = located
    if not rows:
        return
    await tx.executemany(
        "INSERT INTO segments (id, dims, capacity, rows, bytes, created_at, used_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
        "rows = MAX(rows, excluded.rows), used_at = MAX(used_at, excluded.used_at)",
        [(g.id, g.dims, g.capacity, g.rows, g.bytes, now, now) for g in segments],
    )
    # One statement each, the rows passed as one JSON array: `executemany` would run
    # a step per row, each giving up the GIL and waiting to get it back from the
    # threads parsing the next slice (measured: 0.45 s instead of 0.05 s a group).
    # A key that already has a vector keeps it; the new row is dead space.
    packed = orjson.dumps(rows).decode()
    await tx.execute(
        "INSERT OR IGNORE INTO vectors (key, segment, row, tokens, origin, created_at) "
        "SELECT j.value ->> 0, j.value ->> 1, j.value ->> 2, j.value ->> 3, ?, ? "
        "FROM json_each(?) AS j ORDER BY j.key",
        (origin, now, packed),
    )
    await tx.execute(
        "UPDATE requests SET state = 'done', error = NULL "
        "WHERE key IN (SELECT value ->> 0 FROM json_each(?)) "
        "AND state IN ('pending', 'planned')",
        (packed,),
    )


def piece_blocks(
    db_path: Path, job: str, fetch: int = 512
) -> Iterator[tuple[list[int], list[int], npt.NDArray[np.float32]]]:
    """The pieces of `job` in record order, about `fetch` at a time and never a
    record split between two blocks: (record indexes, tokens, float32 block of their
    rows).

    A plain blocking generator on its own read-only connection (WAL lets it read while
    the daemon writes), for a worker thread that writes the `.npy`: it holds at most
    `fetch` rows, never the whole file's, and gathers them from the segments with
    `SegmentReader.gather` (a batch answers in any order, so they are scattered). The
    segments of a file not yet done are never dropped (see `prune_vectors`).
    """
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30.0)
    reader = SegmentReader(db_path.parent / "vectors")
    try:
        cur = conn.execute(
            "SELECT p.idx, p.tokens, v.segment, v.row, s.dims FROM pieces p "
            "JOIN vectors v ON v.key = p.key JOIN segments s ON s.id = v.segment "
            "WHERE p.job = ? ORDER BY p.idx, p.chunk",
            (job,),
        )
        held: list[Any] = []  # the last record's pieces: it may go on in the next fetch
        while rows := cur.fetchmany(fetch):
            rows = held + rows
            cut = len(rows)
            while cut and rows[cut - 1][0] == rows[-1][0]:
                cut -= 1
            rows, held = rows[:cut], rows[cut:]
            yield from _gathered(reader, rows)
        yield from _gathered(reader, held)
    finally:
        reader.close()
        conn.close()


def _gathered(
    reader: SegmentReader, rows: list[Any]
) -> Iterator[tuple[list[int], list[int], npt.NDArray[np.float32]]]:
    for _, same in itertools.groupby(rows, key=operator.itemgetter(4)):
        part = list(same)  # (one width a block: a record's pieces all have the same)
        block = reader.gather([(r[2], r[3]) for r in part], part[0][4])
        yield [r[0] for r in part], [r[1] for r in part], block


async def _forget_texts(tx: _Tx, job: str) -> None:
    """A finished file's texts leave the database (SPEC §9): its requests that no
    unfinished file shares are deleted (a request still in a batch keeps its row
    until `forget_orphan_texts` finds it answered), and its records' `meta` too.
    Dedup needs only the key and the vector index, never the text."""
    await tx.execute(
        "DELETE FROM requests WHERE key IN (SELECT key FROM pieces WHERE job = ?) "
        "AND state != 'planned' AND NOT EXISTS ("
        " SELECT 1 FROM pieces p JOIN files f ON f.job = p.job"
        f" WHERE p.key = requests.key AND f.state IN {_ACTIVE_SQL})",
        (job,),
    )
    await tx.execute("UPDATE records SET meta = NULL WHERE job = ? AND meta IS NOT NULL", (job,))
    await tx.execute("DELETE FROM staged WHERE job = ?", (job,))  # a claim that failed


def request_inputs(
    db_path: Path, keys: Sequence[str], fetch: int = 256
) -> Iterator[tuple[str, str | list[int]]]:
    """(key, input) of each of `keys` that has a request, in the order given, read
    `fetch` at a time on a read-only connection (a blocking generator for a worker
    thread: a shard of 190 MB is written without holding its texts all at once)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30.0)
    try:
        for start in range(0, len(keys), fetch):
            part = keys[start : start + fetch]
            marks = ",".join("?" * len(part))
            rows = dict(
                conn.execute(f"SELECT key, input FROM request_texts WHERE key IN ({marks})", part)
            )
            for key in part:
                if key in rows:
                    yield key, _decode_input(rows.pop(key))
    finally:
        conn.close()


class _Tx:
    """The connection as seen inside a transaction."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> aiosqlite.Cursor:
        return await self._db.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

    async def with_rows(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        sql: str,
        params: Sequence[Any] = (),
    ) -> None:
        """Run `sql` over `rows`, bound as the table `v(columns)`, a few hundred rows a
        statement (`WITH v(...) AS (VALUES (?, ...), ...) <sql>`; `params` bind `sql`'s
        own `?`s). `executemany` runs one SQLite step a row, and each step gives up the
        GIL and waits to get it back from the threads parsing and tokenizing: storing
        20 files of 1,000 records beside one busy Python thread took 85-97 s that way
        and 14 s this way (3.3 s either way with nothing beside it).
        """
        width = len(columns)
        step = max(1, min(ROWS_PER_STATEMENT, MAX_VARIABLES // width))
        row = "(" + ", ".join("?" * width) + ")"
        head = f"WITH v({', '.join(columns)}) AS (VALUES "
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            values = ", ".join([row] * len(chunk))
            bound = [value for r in chunk for value in r]
            bound.extend(params)
            await self._db.execute(f"{head}{values}) {sql}", bound)

    async def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead
        # (a trigger's body holds semicolons: a statement ends where SQLite says it does).
        statement = ""
        for part in script.split(";"):
            statement += part + ";"
            if sqlite3.complete_statement(statement):
                if statement.strip(" \n;"):
                    await self._db.execute(statement)
                statement = ""


def _decode_input(raw: str) -> str | list[int]:
    # Token windows are stored as a JSON array; plain texts as themselves. A text that
    # happens to look like "[1, 2]" is stored with a marker so the two never mix.
    if raw.startswith("\x00tokens:"):
        value = json.loads(raw[len("\x00tokens:") :])
        return [int(t) for t in value]
    return raw


def encode_input(value: str | list[int] | npt.NDArray[np.uint32]) -> str:
    """How a request's input is stored: the text, or a marked JSON array of token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        return "\x00tokens:" + json.dumps(value.tolist())
    return "\x00tokens:" + json.dumps(value)
