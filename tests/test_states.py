"""Tests for embedd.state.states: the transition tables and what is generated from them."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

import pytest

from embedd.state.states import (
    BATCH_STATUSES,
    BATCH_TERMINAL,
    FILE_ACTIVE,
    FILE_FINISHED,
    FILE_TRANSITIONS,
    REQUEST_OPEN,
    REQUEST_TRANSITIONS,
    SHARD_FINISHED,
    SHARD_IN_FLIGHT,
    SHARD_TRANSITIONS,
    SHARD_UNSUBMITTED,
    SHARD_UPLOADED,
    can_move,
    check_sql,
    sources,
    sql_from,
    sql_in,
)

Table = Mapping[str, frozenset[str]]

TABLES: dict[str, tuple[Table, str, frozenset[str]]] = {
    # name: (table, initial state, terminal states)
    "file": (FILE_TRANSITIONS, "claiming", frozenset({"done", "failed"})),
    # A failed request is final for the files that had it; a new file with the same
    # text queues it again (failed -> pending), so only `done` has no way out.
    "request": (REQUEST_TRANSITIONS, "pending", frozenset({"done"})),
    "shard": (SHARD_TRANSITIONS, "planned", frozenset({"collected", "abandoned"})),
}
ALL_STATES = frozenset(s for table, _, _ in TABLES.values() for s in table)


def reachable(table: Table, start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("name", TABLES)
def test_every_state_is_reachable_from_the_initial_one(name: str) -> None:
    """No state in a table is dead: each can be reached from the initial state."""
    table, initial, _ = TABLES[name]
    assert reachable(table, initial) == set(table)


@pytest.mark.parametrize("name", TABLES)
def test_terminal_states_have_no_exits(name: str) -> None:
    """Exactly the terminal states have no way out."""
    table, _, terminal = TABLES[name]
    assert {s for s, targets in table.items() if not targets} == terminal


@pytest.mark.parametrize("name", ["file", "shard"])
def test_files_and_shards_never_go_back_to_their_first_state(name: str) -> None:
    """Only a request may be re-queued; a file or a shard never re-enters its first state."""
    table, initial, _ = TABLES[name]
    assert sources(table, initial) == ()


@pytest.mark.parametrize("name", TABLES)
def test_every_target_is_a_state_of_the_same_table(name: str) -> None:
    """A transition never leads to a state the table does not list."""
    table, _, _ = TABLES[name]
    for targets in table.values():
        assert targets <= set(table)


@pytest.mark.parametrize("name", TABLES)
def test_every_state_reaches_a_terminal_state(name: str) -> None:
    """From any state some path ends in a terminal state: nothing can loop forever by design."""
    table, _, terminal = TABLES[name]
    for state in table:
        assert reachable(table, state) & terminal


@pytest.mark.parametrize("name", TABLES)
def test_check_sql_admits_exactly_the_table_states(name: str) -> None:
    """The generated CHECK clause accepts every state of the table and nothing else."""
    table, _, _ = TABLES[name]
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE TABLE t (state TEXT NOT NULL {check_sql('state', table)})")
    for state in table:
        db.execute("INSERT INTO t VALUES (?)", (state,))
    outsiders = (ALL_STATES - set(table)) | {"", "DONE", "done ", "lost"}
    for state in outsiders:
        with pytest.raises(sqlite3.IntegrityError):
            db.execute("INSERT INTO t VALUES (?)", (state,))
    assert {r[0] for r in db.execute("SELECT state FROM t")} == set(table)
    db.close()


@pytest.mark.parametrize("name", TABLES)
def test_sources_is_the_inverse_of_the_table(name: str) -> None:
    """`sources(new)` lists exactly the states that have `new` among their targets."""
    table, _, _ = TABLES[name]
    for new in table:
        expected = {old for old in table if can_move(table, old, new)}
        assert set(sources(table, new)) == expected
        assert list(sources(table, new)) == sorted(expected)
    assert sources(table, "no-such-state") == ()


@pytest.mark.parametrize("name", TABLES)
def test_can_move_follows_the_table(name: str) -> None:
    """`can_move` is true exactly for listed pairs and false for unknown states."""
    table, _, _ = TABLES[name]
    for old in table:
        for new in table:
            assert can_move(table, old, new) == (new in table[old])
    assert not can_move(table, "no-such-state", next(iter(table)))


def test_named_state_sets_belong_to_their_tables() -> None:
    """The active/in-flight sets are non-terminal states of their own tables."""
    assert set(FILE_TRANSITIONS) >= FILE_ACTIVE
    assert all(FILE_TRANSITIONS[s] for s in FILE_ACTIVE)
    assert set(SHARD_TRANSITIONS) >= SHARD_IN_FLIGHT
    assert all(SHARD_TRANSITIONS[s] for s in SHARD_IN_FLIGHT)
    assert BATCH_TERMINAL < BATCH_STATUSES


def test_named_sets_are_what_their_names_say() -> None:
    """Each shared set is derived from the tables' structure, not picked by hand."""
    terminal = {s for s, targets in FILE_TRANSITIONS.items() if not targets}
    assert terminal == FILE_FINISHED
    assert set(FILE_TRANSITIONS) - terminal == FILE_ACTIVE
    assert {s for s in REQUEST_TRANSITIONS if "done" in REQUEST_TRANSITIONS[s]} == REQUEST_OPEN
    assert {s for s, targets in SHARD_TRANSITIONS.items() if not targets} == SHARD_FINISHED
    assert set(SHARD_TRANSITIONS) - SHARD_FINISHED == SHARD_IN_FLIGHT
    assert set(sources(SHARD_TRANSITIONS, "abandoned")) == SHARD_UNSUBMITTED
    assert SHARD_IN_FLIGHT - {"planned"} == SHARD_UPLOADED


def test_a_failed_request_can_only_be_queued_again() -> None:
    """The one way out of `failed`: pending again (a new file with the same text)."""
    assert REQUEST_TRANSITIONS["failed"] == {"pending"}


def test_sql_from_admits_listed_moves_and_refuses_others() -> None:
    """The store's hand-written guards are checked against the tables when it loads."""
    assert sql_from(REQUEST_TRANSITIONS, "pending", "planned", "failed") == "('failed', 'planned')"
    assert sql_in(["b", "a"]) == "('a', 'b')"
    with pytest.raises(ValueError, match="done -> pending"):
        sql_from(REQUEST_TRANSITIONS, "pending", "done")
    with pytest.raises(ValueError, match="collected -> planned"):
        sql_from(SHARD_TRANSITIONS, "planned", "collected")
