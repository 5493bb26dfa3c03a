"""Who may touch the state database: `embedd status` creates nothing, and the daemon
refuses (exit 78, one sentence) files it does not own instead of a restart loop.

SPEC §8: `embedd status` run by another user never changes what the daemon needs.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from embedd.errors import ConfigError
from embedd.safety import check_ownership
from embedd.state.store import Store
from embedd.status import gather
from tests.conftest import TEST_KEY
from tests.test_cli import EX_CONFIG, clean_env, config_file, embedd


async def _stopped_database(tmp_path: Path) -> Path:
    """A state database as a cleanly stopped daemon leaves it: no -wal, no -shm."""
    db = tmp_path / "spool" / "state" / "embedd.sqlite3"
    store = await Store.open(db)
    await store.begin_claim("job_1", "a.txt", "batch", 1000.0)
    await store.close()
    assert not Path(f"{db}-wal").exists()
    assert not Path(f"{db}-shm").exists()
    return db


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


async def test_status_of_a_stopped_daemon_creates_and_changes_nothing(tmp_path: Path) -> None:
    """Reading a stopped daemon's database leaves the state folder byte for byte as it was."""
    db = await _stopped_database(tmp_path)
    before = _listing(db.parent)
    data = gather(db)
    assert data["counts"]["files"] == {"claiming": 1}
    assert _listing(db.parent) == before


async def test_status_command_of_a_stopped_daemon_creates_nothing(tmp_path: Path) -> None:
    """The real `embedd status` subprocess, as an operator runs it, makes no -wal or -shm."""
    db = await _stopped_database(tmp_path)
    config = config_file(tmp_path, "")
    before = _listing(db.parent)
    result = embedd("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert _listing(db.parent) == before


async def test_status_reads_a_running_daemons_uncheckpointed_writes(tmp_path: Path) -> None:
    """While the daemon has the database open (its -wal and -shm exist), status sees
    rows that are still only in the write-ahead log."""
    db = await _stopped_database(tmp_path)
    store = await Store.open(db)
    try:
        await store.begin_claim("job_2", "b.txt", "batch", 1001.0)
        assert Path(f"{db}-wal").exists()
        assert gather(db)["counts"]["files"] == {"claiming": 2}
    finally:
        await store.close()


def test_ownership_check_names_the_file_its_owner_and_the_fix(tmp_path: Path) -> None:
    """A state file of another user is refused with the path, both users and a chown."""
    state = tmp_path / "state"
    state.mkdir()
    db = state / "embedd.sqlite3"
    sqlite3.connect(db).close()
    (state / "embedd.sqlite3-wal").write_bytes(b"")
    me = os.geteuid()
    check_ownership(db, tmp_path / "ledger.jsonl", uid=me)  # all ours: fine
    with pytest.raises(ConfigError) as err:
        check_ownership(db, tmp_path / "ledger.jsonl", uid=me + 4242)
    message = str(err.value)
    assert f"{state} is owned by" in message
    assert f"uid {me + 4242}" in message
    assert "chown" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
async def test_daemon_exits_78_when_another_user_owns_its_state_files(tmp_path: Path) -> None:
    """What `embedd status` (or sqlite3) as another user used to leave behind: a -wal
    and -shm the daemon cannot write. The daemon says so and exits 78 instead of
    failing in a loop with "attempt to write a readonly database"."""
    db = await _stopped_database(tmp_path)
    for suffix in ("-wal", "-shm"):
        extra = Path(f"{db}{suffix}")
        extra.write_bytes(b"")
        os.chown(extra, 65534, 65534)
    config = config_file(tmp_path, "")
    result = embedd("run", "--config", str(config), env=clean_env(OPENAI_API_KEY=TEST_KEY))
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{db}-wal is owned by" in result.stderr
    assert "chown" in result.stderr
