"""Bounded state (SPEC §9): texts leave state/ when their file finishes, the vector
cache stays under `[dedup] max_bytes`, and an evicted text is embedded (and billed)
again when it comes back."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embedd.state.store import NewRecord, NewRequest, Store
from tests.conftest import DaemonProcess, EmulatorProcess, drop, wait_for

NOW = 1_700_000_000.0


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def files_holding(root: Path, needles: list[bytes]) -> dict[str, list[bytes]]:
    """Every file under `root` that contains any of `needles`, with those found.

    One pass of a single pattern over each file, not one search per needle (thousands
    of needles over megabytes of database made each check take seconds). The needles
    here are distinct and fixed-width within a family, so none hides another."""
    pattern = re.compile(
        b"|".join(re.escape(n) for n in sorted(set(needles), key=len, reverse=True))
    )
    found: dict[str, list[bytes]] = {}
    for path in root.rglob("*"):
        if path.is_file():
            hits = sorted({m.group() for m in pattern.finditer(path.read_bytes())})
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_finished_files_texts_are_in_no_byte_of_state(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Once files are done (or failed), none of their marker texts (nor the extra keys
    copied to the manifest) is left in any byte under state/: not in the database,
    not in its -wal, not in the vector segments, shards or downloads. That includes
    a file refused after some of its batches were already stored."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url, openai={"dimensions": 256})
    markers: list[bytes] = []
    names = []
    for f in range(4):
        records = []
        for i in range(30):
            marker = f"qzmarker{f:02d}x{i:04d}"
            markers.append(marker.encode())
            records.append({"id": str(i), "text": f"{marker} some words " * 3, "tag": marker})
        name = f"part{f}.jsonl"
        drop(daemon.spool, name, jsonl(records))
        names.append(name)
    # a file refused after a batch of it was stored (5 MB of text, a bad last line)
    big = [
        {"id": str(i), "text": f"qzbadfile{i:05d} " + "filler words " * 700} for i in range(2000)
    ]
    markers += [f"qzbadfile{i:05d}".encode() for i in range(2000)]
    drop(daemon.spool, "refused.jsonl", jsonl(big) + b"{not json\n")
    names.append("refused.jsonl")
    daemon.wait_done(names, timeout=60)
    state = daemon.spool / "state"

    def clean() -> bool:
        return not files_holding(state, markers)

    wait_for(clean, 30, what=f"no marker text under state/ ({files_holding(state, markers)})")
    assert (state / "vectors").is_dir()
    assert list((state / "vectors").iterdir())


@pytest.mark.slow
def test_the_cache_stays_under_its_cap_and_an_evicted_text_is_billed_again(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """With `[dedup] max_bytes = "64KiB"` the segment files never add up to more once a
    pass has run; texts whose vectors were dropped (the least recently used) are
    embedded again when they come back, and billed again."""
    emulator = start_emulator()
    cap = 64 * 1024
    daemon = start_daemon(emulator.url, openai={"dimensions": 256}, dedup={"max_bytes": "64KiB"})
    vectors = daemon.spool / "state" / "vectors"
    first = [{"id": str(i), "text": f"the first file, record {i}"} for i in range(40)]
    drop(daemon.spool, "first.jsonl", jsonl(first))
    daemon.wait_done(["first.jsonl"], timeout=60)
    billed_first = emulator.state()["tokens_billed"]
    for f in range(2):
        more = [{"id": str(i), "text": f"newer file {f}, record {i}"} for i in range(80)]
        drop(daemon.spool, f"more{f}.jsonl", jsonl(more))
        daemon.wait_done([f"more{f}.jsonl"], timeout=60)
    wait_for(lambda: tree_bytes(vectors) <= cap, 30, what="the vector cache back under its cap")
    before = emulator.state()["tokens_billed"]

    drop(daemon.spool, "again.jsonl", jsonl(first))
    daemon.wait_done(["again.jsonl"], timeout=60)
    again = json.loads((daemon.spool / "outbox" / "again.jsonl.json").read_text())
    assert not any(r.get("cached") for r in again["records"])
    assert emulator.state()["tokens_billed"] - before == billed_first
    assert again["cost_usd"] > 0
    wait_for(lambda: tree_bytes(vectors) <= cap, 30, what="the vector cache under its cap")


async def test_unfinished_files_keep_their_segments_and_old_rows_are_pruned(
    tmp_path: Path,
) -> None:
    """Pruning drops least recently used segments first but never one an unfinished
    file needs; `prune_finished` removes finished files' rows older than the cut and
    leaves the ledger alone."""
    store = await Store.open(tmp_path / "state" / "s.sqlite3")
    store.segments.segment_bytes = 4 * 8  # two 4-dim rows a segment
    try:
        for job, keys in (("job_old", ["a", "b"]), ("job_live", ["c", "d"])):
            await store.begin_claim(job, f"{job}.jsonl", "batch", NOW)
            await store.queue_file(
                job, sha256="0" * 64, size=1, lane="batch", now=NOW,
                records=[NewRecord(k, None, 1, [(k, 1)], cached=False) for k in keys],
                requests=[NewRequest(k, f"text {k}", 1, 1, 1) for k in keys],
            )  # fmt: skip
        await store.add_vectors(
            [(k, b"\x00\x00\x80\x3f" * 4, 1) for k in "abcd"], origin="b", now=NOW
        )
        await store.add_vectors([("e", b"\x00\x00\x80\x3f" * 4, 1)], origin="b", now=NOW + 5)
        for state in ("writing", "done"):
            assert await store.move_file("job_old", state, completed_at=NOW)
        dropped = await store.prune_vectors(max_bytes=1, keep=3600.0, now=NOW + 10)
        # a+b (job_old, done) go; c+d serve job_live; e is in the segment being filled
        assert len(dropped) == 1
        assert await store.known_keys("abcde") == {"c", "d", "e"}
        assert sorted(p.name for p in (tmp_path / "state" / "vectors").iterdir()) == [
            "0000000002.f32",
            "0000000003.f32",
        ]
        await store.add_ledger("l1", "2026-01-01T00:00:00Z", "batch", "{}")
        assert await store.prune_finished(NOW + 1) == 1
        assert await store.file("job_old") is None
        assert await store.file("job_live") is not None
        assert await store.file_records("job_old") == []
        assert len(await store.unwritten_ledger()) == 1
    finally:
        await store.close()
