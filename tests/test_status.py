"""`embedd status`: counts, batches in flight, files in progress, read from a real database."""

from __future__ import annotations

import io
import json
from pathlib import Path

from embedd.state.store import NewRecord, NewRequest, Store
from embedd.status import gather, render, status_main


async def _populated(tmp_path: Path) -> Path:
    db = tmp_path / "state" / "embedd.sqlite3"
    store = await Store.open(db)
    await store.begin_claim("job_1", "a.jsonl", "batch", 1000.0)
    records = [
        NewRecord(rid=str(i), meta=None, tokens=3, pieces=[(f"k{i}", 3)], cached=False)
        for i in range(4)
    ]
    requests = [
        NewRequest(key=f"k{i}", input=f"t{i}", tokens=3, qtokens=3, nbytes=90) for i in range(4)
    ]
    await store.queue_file(
        "job_1",
        sha256="0" * 64,
        size=10,
        records=records,
        requests=requests,
        lane="batch",
        now=1000.0,
    )
    await store.create_shard(
        "shard_1", path=tmp_path / "s.jsonl", keys=["k0", "k1", "k2", "k3"], nbytes=360,
        tokens=12, qtokens=12, now=1000.0,
    )  # fmt: skip
    await store.move_shard("shard_1", "uploaded", file_id="file-1")
    await store.move_shard(
        "shard_1", "submitted", batch_id="batch_1", status="in_progress", submitted_at=1010.0
    )
    await store.update_shard(
        "shard_1", request_counts=json.dumps({"total": 4, "completed": 1, "failed": 0})
    )
    await store.add_vectors([("k0", b"\0" * 12, 3)], origin="batch_1", now=1020.0)
    await store.set_fact("paused", {"reason": "401 invalid_api_key", "until": 2000.0})
    await store.close()
    return db


async def test_gather_reports_counts_batches_and_files(tmp_path: Path) -> None:
    """Status shows counts by state, the batch in flight with its request counts and
    age, the file with how many of its pieces are embedded, and why submission paused."""
    db = await _populated(tmp_path)
    data = gather(db, now=1070.0)
    assert data["counts"]["files"] == {"queued": 1}
    assert data["counts"]["requests"] == {"planned": 3, "done": 1}
    assert data["counts"]["shards"] == {"submitted": 1}
    [batch] = data["batches"]
    assert batch["batch_id"] == "batch_1"
    assert batch["request_counts"] == {"total": 4, "completed": 1, "failed": 0}
    assert batch["age_s"] == 60.0
    [entry] = data["files"]
    assert (entry["name"], entry["pieces"], entry["embedded"]) == ("a.jsonl", 4, 1)
    assert data["paused"] == "401 invalid_api_key"
    text = render(data, bars=True)
    assert "batch_1" in text
    assert "[######.................." in text  # 1 of 4 is a quarter of the bar
    assert "PAUSED:   401 invalid_api_key" in text


async def test_status_main_prints_json_for_programs(tmp_path: Path) -> None:
    """`embedd status --json` prints one JSON document with the same data."""
    db = await _populated(tmp_path)
    out = io.StringIO()
    assert status_main(db, as_json=True, watch=False, out=out) == 0
    data = json.loads(out.getvalue())
    assert data["counts"]["shards"] == {"submitted": 1}


def test_status_without_a_database_says_so(tmp_path: Path) -> None:
    """Before the daemon ever ran, status explains there is no database yet (exit 0)."""
    out = io.StringIO()
    assert status_main(tmp_path / "none.sqlite3", as_json=False, watch=False, out=out) == 0
    assert "no state database yet" in out.getvalue()
