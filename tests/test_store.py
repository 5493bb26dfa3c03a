"""Tests for embedd.state.store against real SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import embedd.state.store as store_module
from embedd.errors import FatalError
from embedd.pipeline.outcome import RequestVerdict
from embedd.state.states import (
    FILE_TRANSITIONS,
    REQUEST_TRANSITIONS,
    SHARD_TRANSITIONS,
    can_move,
)
from embedd.state.store import (
    MIGRATIONS,
    SCHEMA,
    SCHEMA_VERSION,
    NewRecord,
    NewRequest,
    Store,
    piece_blocks,
    request_inputs,
)

NOW = 1_700_000_000.0


STATE_TABLES = {
    "files": FILE_TRANSITIONS,
    "requests": REQUEST_TRANSITIONS,
    "shards": SHARD_TRANSITIONS,
}


def watch_moves(path: Path) -> None:
    """Record every state change made to the database at `path` (SQLite triggers
    writing to a `test_moves` table), whichever statement makes it."""
    db = sqlite3.connect(path)
    try:
        db.execute("CREATE TABLE test_moves (tbl TEXT, old TEXT, new TEXT)")
        for table in STATE_TABLES:
            record = f"INSERT INTO test_moves VALUES ('{table}', OLD.state, NEW.state)"  # noqa: S608
            db.execute(
                f"CREATE TRIGGER test_move_{table} AFTER UPDATE OF state ON {table} "
                f"WHEN OLD.state IS NOT NEW.state BEGIN {record}; END"
            )
        db.commit()
    finally:
        db.close()


def unlisted_moves(path: Path) -> set[tuple[str, str, str]]:
    """The recorded state changes that embedd.state.states does not list."""
    moves = peek(path, "SELECT DISTINCT tbl, old, new FROM test_moves")
    return {(t, o, n) for t, o, n in moves if not can_move(STATE_TABLES[t], o, n)}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store on a real file; always closed. Every state change a test makes
    through it must be a transition embedd.state.states lists."""
    s = await Store.open(tmp_path / "s.sqlite3")
    watch_moves(s.path)
    try:
        yield s
    finally:
        await s.close()
    assert unlisted_moves(s.path) == set()


def schema(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
    finally:
        db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def build_to(path: Path, version: int) -> None:
    """A database at schema `version`, made by plain sqlite3 one migration at a time."""
    db = sqlite3.connect(path)
    try:
        for number in range(version):
            db.executescript(MIGRATIONS[number])
            db.execute(f"PRAGMA user_version = {number + 1}")
    finally:
        db.close()


def peek(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read committed rows through a second, independent connection."""
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def piece_vectors(path: Path, job: str) -> list[tuple[int, int, Any]]:
    """(record index, tokens, row) of each piece of `job`, from `piece_blocks`."""
    return [
        piece
        for idxs, tokens, block in piece_blocks(path, job)
        for piece in zip(idxs, tokens, block, strict=True)
    ]


def request_row(s: Store, key: str) -> tuple[Any, ...] | None:
    rows = peek(s.path, "SELECT state, attempts, shard, error FROM requests WHERE key = ?", (key,))
    return rows[0] if rows else None


def worker_threads() -> int:
    return sum("_connection_worker_thread" in t.name for t in threading.enumerate())


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll `check` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def add_file(
    s: Store, job: str, texts: list[str], *, lane: str = "batch", now: float = NOW
) -> None:
    """Claim and queue a file with one single-piece record per text (key = 'k:' + text)."""
    await s.begin_claim(job, f"{job}.jsonl", lane, now)
    records = [
        NewRecord(str(i), None, len(t), [(f"k:{t}", len(t))], False) for i, t in enumerate(texts)
    ]
    unique = dict.fromkeys(texts)
    requests = [NewRequest(f"k:{t}", t, len(t), len(t), len(t) + 50) for t in unique]
    await s.queue_file(
        job, sha256="0" * 64, size=100, records=records, requests=requests, lane=lane, now=now
    )


async def plan(s: Store, shard: str, keys: list[str], qtokens: int = 10) -> None:
    await s.create_shard(
        shard, path=Path(f"{shard}.jsonl"), keys=keys, nbytes=1, tokens=1, qtokens=qtokens, now=NOW
    )


async def apply(
    s: Store,
    *,
    retry: Sequence[tuple[str, str]] = (),
    fail: Sequence[tuple[str, str]] = (),
    requeue: Sequence[str] = (),
    **changes: Any,
) -> None:
    """apply_results with nothing to do except what the test names."""
    args: dict[str, Any] = {"origin": "test", "max_retries": 2, "now": NOW}
    args.update(changes)
    verdict = RequestVerdict(retry=tuple(retry), fail=tuple(fail), requeue=tuple(requeue))
    await s.apply_results(verdict, **args)


# ---- schema and migrations ------------------------------------------------------------


def _checks(sql: str) -> list[str]:
    """The CHECK constraints in a CREATE TABLE statement, whitespace normalized."""
    found = []
    start = sql.find("CHECK")
    while start >= 0:
        depth, end = 0, sql.index("(", start)
        while True:
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            if depth == 0:
                break
            end += 1
        found.append(" ".join(sql[start : end + 1].split()))
        start = sql.find("CHECK", end)
    return sorted(found)


def structure(path: Path) -> dict[str, dict[str, Any]]:
    """Each table's columns (in order), CHECKs, indexes and foreign keys, and every
    trigger (its text, whitespace aside): what a database's schema means, whatever
    text made it (CREATE or ALTER, in any order)."""
    db = sqlite3.connect(path)
    try:
        out: dict[str, dict[str, Any]] = {
            f"trigger {name}": {"sql": " ".join(sql.split())}
            for name, sql in db.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
            )
        }
        for name, sql in db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        ):
            indexes = []
            for _, index, unique, origin, partial in db.execute(f"PRAGMA index_list({name})"):
                columns = tuple(c[2] for c in db.execute(f"PRAGMA index_info({index})"))
                where = db.execute(
                    "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (index,)
                ).fetchone()
                indexes.append((index, unique, origin, partial, columns, where))
            out[name] = {
                "columns": [tuple(r[1:]) for r in db.execute(f"PRAGMA table_info({name})")],
                "checks": _checks(sql),
                "indexes": sorted(indexes, key=repr),
                "foreign_keys": sorted(
                    tuple(r[2:]) for r in db.execute(f"PRAGMA foreign_key_list({name})")
                ),
            }
        return out
    finally:
        db.close()


def state_checks(path: Path) -> dict[str, set[str]]:
    """The states each table's `state` CHECK admits."""
    admitted = {}
    for table, parts in structure(path).items():
        for check in parts.get("checks", []):
            if check.startswith("CHECK (state IN ("):
                admitted[table] = set(re.findall(r"'([^']*)'", check))
    return admitted


def build_from_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
    finally:
        db.close()


async def test_every_migration_leads_to_the_schema_definition(tmp_path: Path) -> None:
    """A database built through every migration has exactly the tables, columns,
    CHECKs, indexes and foreign keys of one built from `SCHEMA`."""
    migrated, defined = tmp_path / "migrated.sqlite3", tmp_path / "defined.sqlite3"
    build_to(migrated, SCHEMA_VERSION)
    build_from_schema(defined)
    assert structure(migrated) == structure(defined)
    s = await Store.open(tmp_path / "opened.sqlite3")  # what the daemon builds
    await s.close()
    assert structure(tmp_path / "opened.sqlite3") == structure(defined)


async def test_state_checks_admit_exactly_the_states_of_embedd_states(tmp_path: Path) -> None:
    """The migrations are frozen SQL: when embedd.state.states gains (or loses) a state, this
    fails until a new migration changes the CHECK (rebuilding the table: a CHECK cannot
    be altered) and `SCHEMA` says so too."""
    migrated, defined = tmp_path / "migrated.sqlite3", tmp_path / "defined.sqlite3"
    build_to(migrated, SCHEMA_VERSION)
    build_from_schema(defined)
    wanted = {table: set(states) for table, states in STATE_TABLES.items()}
    assert state_checks(migrated) == wanted
    assert state_checks(defined) == wanted


def test_structure_sees_a_changed_check_column_and_index(tmp_path: Path) -> None:
    """The comparison is real: each kind of difference (a CHECK, a column, an index,
    a trigger) changes the structure."""
    base = tmp_path / "base.sqlite3"
    build_from_schema(base)
    changes = [
        SCHEMA.replace("'queued', 'writing'", "'queued', 'waiting', 'writing'"),
        SCHEMA.replace("    reason TEXT,\n", "    reason TEXT NOT NULL DEFAULT '',\n"),
        SCHEMA.replace("CREATE INDEX files_state ON files(state);", ""),
        SCHEMA.replace("requests(state, lane, queued_at)", "requests(state, queued_at, lane)"),
        SCHEMA.replace("AFTER DELETE ON requests", "BEFORE DELETE ON requests"),
    ]
    for number, changed in enumerate(changes):
        assert changed != SCHEMA
        other = tmp_path / f"changed{number}.sqlite3"
        db = sqlite3.connect(other)
        db.executescript(changed)
        db.close()
        assert structure(other) != structure(base), number
    assert state_checks(tmp_path / "changed0.sqlite3")["files"] == {*FILE_TRANSITIONS, "waiting"}


async def test_migration_keeps_shards_and_records_their_membership(tmp_path: Path) -> None:
    """From schema 1, shards keep their rows (now admitting `unknown`), and a shard's
    membership is taken from its requests still planned."""
    path = tmp_path / "v1.sqlite3"
    build_to(path, 1)
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO shards (id, state, path, lines, bytes, tokens, qtokens, batch_id, created_at)"
        " VALUES ('s1', 'submitted', 'p', 2, 1, 7, 7, 'batch_1', 1.0)"
    )
    db.executemany(
        "INSERT INTO requests (key, input, tokens, qtokens, nbytes, lane, state, shard, queued_at)"
        " VALUES (?, ?, ?, 1, 1, 'batch', ?, ?, 1.0)",
        [
            ("a", "x", 3, "planned", "s1"),
            ("b", "y", 4, "planned", "s1"),
            ("c", "z", 5, "pending", None),
        ],
    )
    db.commit()
    db.close()
    s = await Store.open(path)
    try:
        row = await s.shard("s1")
        assert row is not None
        assert (row["state"], row["batch_id"], row["lookups"]) == ("submitted", "batch_1", 0)
        assert await s.shard_members("s1") == {"a": 3, "b": 4}
    finally:
        await s.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE shards SET state = 'unknown' WHERE id = 's1'")  # admitted by the new CHECK
    db.commit()
    db.close()


@pytest.mark.parametrize("start", range(SCHEMA_VERSION + 1))
async def test_migrated_schema_equals_fresh_schema(tmp_path: Path, start: int) -> None:
    """A database migrated from any older version ends up exactly like one built fresh."""
    reference = tmp_path / "reference.sqlite3"
    build_to(reference, SCHEMA_VERSION)
    old = tmp_path / "old.sqlite3"
    build_to(old, start)
    migrated = await Store.open(old)
    await migrated.close()
    fresh = await Store.open(tmp_path / "fresh.sqlite3")
    await fresh.close()
    assert schema(old) == schema(reference)
    assert schema(tmp_path / "fresh.sqlite3") == schema(reference)
    assert user_version(old) == user_version(tmp_path / "fresh.sqlite3") == SCHEMA_VERSION


async def test_newer_database_is_refused_and_released(tmp_path: Path) -> None:
    """A database from a newer embedd raises FatalError and leaves no connection behind."""
    path = tmp_path / "s.sqlite3"
    build_to(path, SCHEMA_VERSION)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = worker_threads()
    with pytest.raises(FatalError, match="newer than this embedd"):
        await Store.open(path)
    await eventually(lambda: worker_threads() <= before)
    assert user_version(path) == SCHEMA_VERSION + 1


@pytest.mark.parametrize(
    "insert",
    [
        "INSERT INTO files (job, name, lane, state, claimed_at) VALUES ('j', 'n', 'batch', {}, 0)",
        "INSERT INTO requests (key, input, tokens, qtokens, nbytes, lane, state, queued_at) "
        "VALUES ('k', 't', 1, 1, 1, 'batch', {}, 0)",
        "INSERT INTO shards (id, state, path, lines, bytes, tokens, qtokens, created_at) "
        "VALUES ('s', {}, 'p', 1, 1, 1, 1, 0)",
    ],
    ids=["files", "requests", "shards"],
)
async def test_check_constraints_reject_unknown_states(tmp_path: Path, insert: str) -> None:
    """The schema refuses a state its table does not list, and accepts one it does."""
    path = tmp_path / "s.sqlite3"
    await (await Store.open(path)).close()
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute(insert.format("'lost'"))
        other_tables_state = "'collecting'" if "files" in insert else "'claiming'"
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute(insert.format(other_tables_state))
        db.execute(insert.format("'planned'" if "shards" in insert else "'failed'"))
    finally:
        db.close()


# ---- files ------------------------------------------------------------------------------


async def test_move_file_follows_the_table(store: Store) -> None:
    """A file moves only along listed transitions; an illegal move changes nothing."""
    await store.begin_claim("job1", "a.txt", "batch", NOW)
    assert not await store.move_file("job1", "done")
    assert not await store.move_file("job1", "writing")
    row = await store.file("job1")
    assert row is not None
    assert row["state"] == "claiming"
    assert await store.move_file("job1", "queued")
    assert await store.move_file("job1", "writing")
    assert await store.move_file("job1", "done", completed_at=NOW + 5, result="{}")
    assert not await store.move_file("job1", "failed", reason="late")
    assert not await store.move_file("job1", "claiming")
    row = await store.file("job1")
    assert row is not None
    assert (row["state"], row["completed_at"], row["reason"]) == ("done", NOW + 5, None)
    assert not await store.move_file("no-such-job", "queued")


async def test_shared_text_makes_one_request(store: Store) -> None:
    """Two files with the same text queue one request, which both files' pieces point to."""
    await add_file(store, "job1", ["hello", "world"])
    await add_file(store, "job2", ["world", "again"], now=NOW + 1)
    pending = await store.pending("batch", 100)
    assert [p.key for p in pending] == ["k:hello", "k:world", "k:again"]
    assert (await store.counts())["requests"] == {"pending": 3}
    assert [p["key"] for p in await store.file_pieces("job2")] == ["k:world", "k:again"]


@pytest.mark.parametrize("variables", [None, 7])
async def test_a_file_bigger_than_one_statement_is_stored_whole_and_in_order(
    store: Store, monkeypatch: pytest.MonkeyPatch, variables: int | None
) -> None:
    """A file's rows go to SQLite a few hundred a statement (`_Tx.with_rows`), within
    the linked SQLite's limit on a statement's variables: every record, piece, text and
    request of a file of many statements is stored, in the file's order, a repeated
    text queued once (also when the limit allows a single row a statement)."""
    if variables is not None:
        monkeypatch.setattr(store_module, "MAX_VARIABLES", variables)
    texts = [f"t{i % 900:03d}" for i in range(1234)]  # 334 repeats
    await add_file(store, "job1", texts, lane="sync")
    assert peek(store.path, "SELECT idx, rid, chunks FROM records ORDER BY idx") == [
        (i, str(i), 1) for i in range(1234)
    ]
    assert peek(store.path, "SELECT idx, chunk, key FROM pieces ORDER BY idx") == [
        (i, 0, f"k:{t}") for i, t in enumerate(texts)
    ]
    assert peek(store.path, "SELECT records, tokens FROM files") == [(1234, 4 * 1234)]
    assert peek(store.path, "SELECT SUM(cached) FROM records") == [(334,)]
    pending = await store.pending("sync", 2000)
    assert [(p.key, p.input) for p in pending] == [(f"k:t{i:03d}", f"t{i:03d}") for i in range(900)]
    assert (await store.counts())["requests"] == {"pending": 900}


async def test_embedded_text_makes_no_request(store: Store) -> None:
    """A text whose vector is stored already is not queued again and its file is ready."""
    await store.add_vectors([("k:hello", b"\x00" * 8, 1)], origin="test", now=NOW)
    await add_file(store, "job1", ["hello"])
    assert await store.pending("batch", 100) == []
    assert (await store.counts())["requests"] == {}
    assert [r["job"] for r in await store.ready_files()] == ["job1"]


async def test_failed_text_is_retried_for_a_new_file(store: Store) -> None:
    """A text that failed before gets a fresh request, with a clean count, for a new file."""
    await add_file(store, "job1", ["hello"])
    await apply(store, fail=[("k:hello", "invalid input")])
    await add_file(store, "job2", ["hello"], now=NOW + 1)
    assert request_row(store, "k:hello") == ("pending", 0, None, None)
    # A listed transition (failed -> pending), recorded like any other move.
    assert peek(store.path, "SELECT old, new FROM test_moves WHERE tbl = 'requests'") == [
        ("pending", "failed"),
        ("failed", "pending"),
    ]


async def test_watched_store_sees_a_move_outside_the_state_tables(store: Store) -> None:
    """The fixture's check is real: a change the tables do not list is reported."""
    await add_file(store, "job1", ["hello"])
    db = sqlite3.connect(store.path)
    db.execute("UPDATE requests SET state = 'done' WHERE key = 'k:hello'")
    db.execute("UPDATE requests SET state = 'pending' WHERE key = 'k:hello'")
    db.commit()
    db.close()
    assert unlisted_moves(store.path) == {("requests", "done", "pending")}
    db = sqlite3.connect(store.path)
    db.execute("DELETE FROM test_moves")  # leave the fixture's own check clean
    db.commit()
    db.close()


async def test_update_shard_refuses_to_move_a_shard(store: Store) -> None:
    """A shard's state changes only through move_shard, which follows the table."""
    await add_file(store, "job1", ["a"])
    await plan(store, "s1", ["k:a"])
    with pytest.raises(ValueError, match="move_shard"):
        await store.update_shard("s1", state="collected")
    assert not await store.move_shard("s1", "collected")
    assert (await store.shard("s1"))["state"] == "planned"  # type: ignore[index]


async def test_known_keys_are_embedded_or_queued(store: Store) -> None:
    """known_keys finds stored vectors and live requests, not failed or unknown keys."""
    await add_file(store, "job1", ["queued", "failing"])
    await apply(store, fail=[("k:failing", "bad")])
    many = [f"k:v{i}" for i in range(1200)]  # more than one SQL chunk of 500
    await store.add_vectors([(k, b"\x00" * 8, 1) for k in many], origin="test", now=NOW)
    asked = ["k:queued", "k:failing", "k:unknown", *many, "k:queued"]
    assert await store.known_keys(asked) == {"k:queued", *many}
    assert await store.known_keys([]) == set()


async def test_ready_files_waits_for_every_piece(store: Store) -> None:
    """A file is ready only when each piece has a vector or a request that failed for good."""
    await add_file(store, "job1", ["one", "two"])
    await store.begin_claim("job2", "b.txt", "batch", NOW)  # claiming: never ready
    assert await store.ready_files() == []
    await store.add_vectors([("k:one", b"\x01" * 8, 3)], origin="test", now=NOW)
    assert await store.ready_files() == []
    await plan(store, "shard1", ["k:two"])
    await apply(store, retry=[("k:two", "HTTP 500")], max_retries=1)
    assert await store.ready_files() == []  # re-queued, not yet failed
    await apply(store, fail=[("k:two", "invalid input")])
    assert [r["job"] for r in await store.ready_files()] == ["job1"]
    pieces = await store.file_pieces("job1")
    assert [(p["key"], bool(p["embedded"]), p["rstate"]) for p in pieces] == [
        ("k:one", True, "done"),
        ("k:two", False, "failed"),
    ]


# ---- requests, shards, results ------------------------------------------------------


async def test_move_shard_follows_the_table(store: Store) -> None:
    """A shard moves only along listed transitions; an illegal move changes nothing."""
    await add_file(store, "job1", ["a"])
    await plan(store, "shard1", ["k:a"])
    assert not await store.move_shard("shard1", "submitted")
    assert not await store.move_shard("shard1", "collected")
    assert [r["state"] for r in await store.shards_in("planned")] == ["planned"]
    assert await store.move_shard("shard1", "uploaded", file_id="file-1")
    assert await store.move_shard("shard1", "submitted", batch_id="batch_1")
    assert not await store.move_shard("shard1", "abandoned")
    assert await store.move_shard("shard1", "collecting")
    assert await store.move_shard("shard1", "collected")
    assert not await store.move_shard("shard1", "planned")
    rows = await store.shards_in("collected")
    assert [(r["id"], r["file_id"], r["batch_id"]) for r in rows] == [
        ("shard1", "file-1", "batch_1")
    ]


async def test_retries_are_counted_until_max_retries(store: Store) -> None:
    """A retryable failure re-queues a request max_retries times; the next one fails it."""
    await add_file(store, "job1", ["a"])
    for attempt in (1, 2):
        await plan(store, f"shard{attempt}", ["k:a"])
        await apply(store, retry=[("k:a", f"HTTP 500 #{attempt}")], max_retries=2)
        assert request_row(store, "k:a") == ("pending", attempt, None, f"HTTP 500 #{attempt}")
    await plan(store, "shard3", ["k:a"])
    await apply(store, retry=[("k:a", "HTTP 500 #3")], max_retries=2)
    assert request_row(store, "k:a") == ("failed", 3, None, "HTTP 500 #3")


async def test_requeue_does_not_count_as_a_retry(store: Store) -> None:
    """Work sent back because its batch expired or hit the queue limit keeps its retry count."""
    await add_file(store, "job1", ["a"])
    for n in range(5):
        await plan(store, f"shard{n}", ["k:a"])
        assert request_row(store, "k:a") == ("planned", 0, f"shard{n}", None)
        await apply(store, requeue=["k:a"], max_retries=0)
    assert request_row(store, "k:a") == ("pending", 0, None, None)


async def test_fail_is_final(store: Store) -> None:
    """A permanent failure fails the request with its reason; later results do not revive it."""
    await add_file(store, "job1", ["a"])
    await plan(store, "shard1", ["k:a"])
    await apply(store, fail=[("k:a", "invalid input")])
    await apply(store, retry=[("k:a", "HTTP 500")], requeue=["k:a"])
    await store.add_vectors([("k:a", b"\x00" * 8, 1)], origin="late", now=NOW)
    assert request_row(store, "k:a") == ("failed", 0, None, "invalid input")


async def test_results_collect_the_shard_and_write_one_ledger_row(store: Store) -> None:
    """Applying a batch marks the shard collected; the same ledger id twice is one row."""
    await add_file(store, "job1", ["a", "b"])
    await plan(store, "shard1", ["k:a", "k:b"])
    for state in ("uploaded", "submitted", "collecting"):
        assert await store.move_shard("shard1", state)
    ledger = ("batch_1", "2026-01-01T00:00:00Z", "batch", '{"kind": "batch"}')
    vectors = [("k:a", b"\x01" * 8, 1), ("k:b", b"\x02" * 8, 1)]
    for _ in range(2):
        await apply(store, shard="shard1", vectors=vectors, ledger=ledger)
    assert [tuple(r) for r in await store.unwritten_ledger()] == [(*ledger, 0)]
    assert [r["state"] for r in await store.shards_in("collected")] == ["collected"]
    assert (await store.counts())["requests"] == {"done": 2}
    await store.add_ledger(*ledger)
    await store.mark_ledger_written("batch_1")
    assert await store.unwritten_ledger() == []


async def test_a_shard_commits_only_once_its_file_is_durable(store: Store) -> None:
    """`create_shard(before_commit=...)`: while the file is still being made durable the
    shard is not visible to another connection; if that fails, nothing of the shard
    is recorded and its requests stay pending."""
    await add_file(store, "job1", ["a", "b"])
    waiting, settled = asyncio.Event(), asyncio.Event()

    async def file_made_durable() -> None:
        waiting.set()  # the shard's statements have run, uncommitted
        await settled.wait()

    creating = asyncio.ensure_future(
        store.create_shard(
            "s1", path=Path("s1.jsonl"), keys=["k:a", "k:b"], nbytes=1, tokens=1, qtokens=1,
            now=NOW, before_commit=file_made_durable(),
        )
    )  # fmt: skip
    await waiting.wait()
    assert peek(store.path, "SELECT id FROM shards") == []
    assert request_row(store, "k:a")[0] == "pending"  # (as another connection sees it)
    settled.set()
    await creating
    assert peek(store.path, "SELECT id, state FROM shards") == [("s1", "planned")]

    async def file_lost() -> None:
        raise OSError("disk went away")

    await add_file(store, "job2", ["c"])
    with pytest.raises(OSError, match="disk went away"):
        await store.create_shard(
            "s2", path=Path("s2.jsonl"), keys=["k:c"], nbytes=1, tokens=1, qtokens=1, now=NOW,
            before_commit=file_lost(),
        )  # fmt: skip
    assert peek(store.path, "SELECT id FROM shards ORDER BY id") == [("s1",)]
    assert request_row(store, "k:c")[0] == "pending"


async def test_add_vectors_is_idempotent(store: Store) -> None:
    """Storing a vector twice keeps the first and one row; its request is done."""
    await add_file(store, "job1", ["a"])
    await store.add_vectors([("k:a", b"\x01" * 8, 4)], origin="first", now=NOW)
    await store.add_vectors([("k:a", b"\x02" * 8, 5)], origin="second", now=NOW + 1)
    rows = peek(store.path, "SELECT key, tokens, origin FROM vectors")
    assert rows == [("k:a", 4, "first")]
    [(idx, tokens, vector)] = list(piece_vectors(store.path, "job1"))
    assert (idx, tokens, vector.tobytes()) == (0, 1, b"\x01" * 8)
    assert request_row(store, "k:a") == ("done", 0, None, None)


async def test_queue_tokens_in_flight_counts_sent_shards_only(store: Store) -> None:
    """Only uploaded, submitted and collecting shards count against the batch queue."""
    await add_file(store, "job1", ["a", "b", "c", "d", "e", "f"])
    path = {
        "planned": [],
        "uploaded": ["uploaded"],
        "submitted": ["uploaded", "submitted"],
        "collecting": ["uploaded", "submitted", "collecting"],
        "collected": ["uploaded", "submitted", "collecting", "collected"],
        "abandoned": ["abandoned"],
    }
    for n, (name, steps) in enumerate(path.items()):
        await plan(store, name, [f"k:{'abcdef'[n]}"], qtokens=10**n)
        for step in steps:
            assert await store.move_shard(name, step)
    assert await store.queue_tokens_in_flight() == 10 + 100 + 1000


async def test_release_shard_sends_unsent_work_back(store: Store) -> None:
    """A shard that was never submitted is abandoned and its requests are pending again."""
    await add_file(store, "job1", ["a", "b"])
    await plan(store, "shard1", ["k:a", "k:b"], qtokens=7)
    assert await store.move_shard("shard1", "uploaded")
    await store.release_shard("shard1")
    assert [r["id"] for r in await store.shards_in("abandoned")] == ["shard1"]
    assert [p.key for p in await store.pending("batch", 10)] == ["k:a", "k:b"]
    assert await store.queue_tokens_in_flight() == 0


async def test_sync_file_takes_shared_pending_work_to_the_sync_lane(store: Store) -> None:
    """A sync file does not wait for a batch: a shared pending text moves to the sync lane."""
    await add_file(store, "job1", ["shared", "batch-only"])
    await add_file(store, "job2", ["shared"], lane="sync", now=NOW + 1)
    assert [p.key for p in await store.pending("sync", 10)] == ["k:shared"]
    assert [p.key for p in await store.pending("batch", 10)] == ["k:batch-only"]
    assert await store.oldest_pending("sync") == NOW


# ---- transactions ---------------------------------------------------------------------


async def test_transaction_rolls_back_on_error(store: Store) -> None:
    """An exception inside a transaction undoes its writes, and the store stays usable."""

    async def fail_inside() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO daemon (key, value) VALUES ('a', '1')")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    assert await store.facts() == {}
    await store.set_fact("b", 2)
    assert await store.facts() == {"b": 2}


async def test_cancelled_transaction_commits_nothing(store: Store) -> None:
    """A task cancelled inside a transaction leaves nothing committed and no lock held."""
    inside = asyncio.Event()

    async def writer() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO daemon (key, value) VALUES ('a', '1')")
            inside.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(writer())
    await asyncio.wait_for(inside.wait(), timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.facts() == {}
    assert peek(store.path, "SELECT * FROM daemon") == []
    await store.set_fact("b", 2)
    assert await store.facts() == {"b": 2}


@pytest.mark.parametrize("steps", range(8))
async def test_cancel_at_any_step_leaves_no_open_transaction(store: Store, steps: int) -> None:
    """Cancelling a transaction at any point, even during BEGIN, leaves the store usable."""

    async def writer() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO daemon (key, value) VALUES ('a', '1')")
            await asyncio.Event().wait()

    task = asyncio.create_task(writer())
    for _ in range(steps):
        await asyncio.sleep(0)  # let the task run this many loop steps before the cancel
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(store.set_fact("b", 2), timeout=5)
    assert await store.facts() == {"b": 2}
    assert peek(store.path, "SELECT key FROM daemon") == [("b",)]


async def test_membership_outlives_the_requests_states(store: Store) -> None:
    """A shard's membership stays what its file holds once its requests are done:
    a resumed collection counts every line of it."""
    await add_file(store, "j1", ["aa", "bbb"])
    await plan(store, "s1", ["k:aa", "k:bbb"])
    await store.add_vectors([("k:aa", b"\0" * 4, 2)], origin="b", now=NOW)
    assert await store.shard_tokens("s1") == {"k:bbb": 3}
    assert await store.shard_members("s1") == {"k:aa": 2, "k:bbb": 3}


async def test_refusing_a_shard_is_one_transaction(store: Store) -> None:
    """A refused shard's requests are re-queued with a try counted and the shard is
    abandoned, together (before: two transactions, a kill between them left the
    shard uploaded with its requests pending)."""
    await add_file(store, "j1", ["aa", "bbb"])
    await plan(store, "s1", ["k:aa", "k:bbb"])
    await store.move_shard("s1", "uploaded", file_id="file-1")
    await store.refuse_shard("s1", "bad file", max_retries=0, now=NOW)
    assert request_row(store, "k:aa") == ("failed", 1, None, "batch submission refused: bad file")
    assert peek(store.path, "SELECT state, error FROM shards") == [("abandoned", "bad file")]


async def test_remote_deletes_wait_for_their_shard_to_be_final(store: Store) -> None:
    """A delete recorded during collection is due only once its shard is collected;
    a failed one comes back after its backoff; a done one is gone."""
    await add_file(store, "j1", ["aa"])
    await plan(store, "s1", ["k:aa"])
    await store.plan_remote_deletes([("file-in", "s1", "input"), ("file-x", None, "output")], NOW)
    assert [r["file_id"] for r in await store.due_remote_deletes(NOW)] == ["file-x"]
    await store.release_shard("s1")  # abandoned: final
    assert {r["file_id"] for r in await store.due_remote_deletes(NOW)} == {"file-in", "file-x"}
    await store.remote_delete_failed("file-x", "HTTP 502", NOW + 10)
    await store.remote_delete_done("file-in")
    assert await store.due_remote_deletes(NOW + 5) == []
    assert [r["attempts"] for r in await store.due_remote_deletes(NOW + 10)] == [1]


# ---- request texts and shard membership (issue 11) ------------------------------------


async def test_migration_moves_texts_out_of_request_rows(tmp_path: Path) -> None:
    """From schema 4, each request's text moves to `request_texts` (read back the same),
    the request rows keep none, and members of shards already pruned are dropped."""
    path = tmp_path / "v4.sqlite3"
    build_to(path, 4)
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO requests (key, input, tokens, qtokens, nbytes, lane, state, queued_at)"
        " VALUES (?, ?, 1, 1, 1, 'batch', 'pending', 1.0)",
        [("a", "text of a"), ("b", "\x00tokens:[1, 2]")],
    )
    db.execute("INSERT INTO shard_members (shard, key, tokens) VALUES ('gone', 'a', 1)")
    db.commit()
    db.close()
    s = await Store.open(path)
    try:
        assert [(p.key, p.input) for p in await s.pending("batch", 10)] == [
            ("a", "text of a"),
            ("b", [1, 2]),
        ]
        assert list(request_inputs(path, ["b", "a"])) == [("b", [1, 2]), ("a", "text of a")]
    finally:
        await s.close()
    assert peek(path, "SELECT DISTINCT input FROM requests") == [("",)]
    assert peek(path, "SELECT * FROM shard_members") == []


async def test_a_requests_text_goes_with_its_request(store: Store) -> None:
    """Every way a request row is deleted takes its text along (the trigger)."""
    await add_file(store, "j1", ["alpha", "beta"])
    assert sorted(peek(store.path, "SELECT key, input FROM request_texts")) == [
        ("k:alpha", "alpha"),
        ("k:beta", "beta"),
    ]
    assert await store.move_file("j1", "failed", reason="x")  # the file ends: texts go
    assert peek(store.path, "SELECT COUNT(*) FROM requests") == [(0,)]
    assert peek(store.path, "SELECT COUNT(*) FROM request_texts") == [(0,)]


async def test_pruning_a_shard_prunes_its_membership(store: Store) -> None:
    """A pruned shard's member rows go with it (they grew without bound before)."""
    await add_file(store, "j1", ["alpha", "beta"])
    await plan(store, "s1", ["k:alpha", "k:beta"])
    await plan(store, "s2", [])
    assert await store.move_shard("s1", "abandoned", error="x")
    await store.update_shard("s1", ended_at=NOW)
    await store.prune_finished(NOW + 1)
    assert await store.shard("s1") is None
    assert await store.shard_members("s1") == {}
    assert peek(store.path, "SELECT COUNT(*) FROM shard_members") == [(0,)]
    assert await store.shard("s2") is not None  # still planned: kept
