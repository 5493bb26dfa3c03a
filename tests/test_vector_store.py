"""The vector segments as the collector uses them: rows written in blocks, indexed in
groups, read back in runs, and never swept while a group is still being written."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from embedd.pipeline.delivery import record_rows
from embedd.state import store as store_module
from embedd.state.store import NewRecord, NewRequest, Store, piece_blocks
from embedd.state.vectors import SegmentReader, SegmentWriter, segment_files
from embedd.tokens import combine_chunks
from tests.test_store import add_file, piece_vectors

NOW = 1_700_000_000.0
DIMS = 4


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "state" / "s.sqlite3")
    s.segments.segment_bytes = 3 * DIMS * 4  # three rows a segment
    try:
        yield s
    finally:
        await s.close()


def indexed(store: Store) -> set[str]:
    """Keys with a vector index row (read on a connection of its own)."""
    with sqlite3.connect(store.path) as conn:
        return {str(r[0]) for r in conn.execute("SELECT key FROM vectors")}


def rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start * DIMS, (start + n) * DIMS, dtype=np.float32).reshape(n, DIMS)


def test_block_writes_read_back_in_runs_across_segments(tmp_path: Path) -> None:
    """Eight rows put as blocks land in three-row segments in order; reading a run
    back, a single row, or any row gives the bytes written."""
    writer = SegmentWriter(tmp_path, segment_bytes=3 * DIMS * 4)
    writer.resume(None, 0)
    slots, infos = writer.write(rows(5))
    more, _ = writer.write(list(rows(3, start=5)))  # a sequence of rows works too
    writer.close()
    assert slots + more == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]
    assert [(i.id, i.rows) for i in infos] == [(1, 3), (2, 2)]
    reader = SegmentReader(tmp_path)
    try:
        assert np.array_equal(reader.rows(2, 0, 3, DIMS), rows(3, start=3))
        for n, (segment, row) in enumerate(slots + more):
            assert np.array_equal(reader.row(segment, row, DIMS), rows(1, start=n)[0])
        with pytest.raises(OSError, match="shorter than its index"):
            reader.rows(3, 2, 2, DIMS)  # the segment file holds three rows, not four
    finally:
        reader.close()


async def test_a_group_is_indexed_only_when_flushed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows a writer has put are not indexed (their requests not done) before their
    group reaches its bytes; a full group is indexed in the background, in order
    (the next full group waits for it); the rest when the block ends."""
    monkeypatch.setattr(store_module, "GROUP_BYTES", 4 * DIMS * 4)
    texts = [f"t{i}" for i in range(10)]
    keys = [f"k:{t}" for t in texts]
    await add_file(store, "job1", texts)
    data = rows(10)
    batch = [(k, data[i], 1) for i, k in enumerate(keys)]
    async with store.vector_writer(origin="b1", clock=lambda: NOW) as writer:
        await writer.add(batch[:3])
        assert indexed(store) == set()
        await writer.add(batch[3:5])  # 5 rows: a full group, indexed in the background
        await writer.add(batch[5:9])  # another full group: waits for the first
        assert set(keys[:5]) <= indexed(store) <= set(keys[:9])
        await writer.add(batch[9:])
    assert indexed(store) == set(keys)
    got = np.stack([v for _, _, v in piece_vectors(store.path, "job1")])
    assert np.array_equal(got, data)  # read back across four segments, in order


async def test_an_error_leaves_the_group_unindexed_and_sweepable(store: Store) -> None:
    """A collection that fails mid-group indexes nothing of that group; its rows are
    dead space, and the next prune sweeps the segment files no index row names."""
    await add_file(store, "job1", ["a", "b", "c", "d"])
    keys = [f"k:{t}" for t in "abcd"]

    async def collect_and_break() -> None:
        async with store.vector_writer(origin="b1", clock=lambda: NOW) as writer:
            await writer.add([(k, rows(1, i)[0], 1) for i, k in enumerate(keys)])
            raise RuntimeError("download broke")

    with pytest.raises(RuntimeError):
        await collect_and_break()
    assert indexed(store) == set()
    await store.prune_vectors(max_bytes=10**9, keep=3600.0, now=NOW)
    assert sorted(segment_files(store.vectors_dir)) == [store.segments.active_id]


async def test_segments_of_a_group_in_flight_are_never_swept(store: Store) -> None:
    """A prune that runs while a collection's group is written but not yet indexed
    (full segments no index row names yet) leaves those files alone, so the rows the
    group then indexes are still there to read."""
    await add_file(store, "job1", list("abcdefg"))
    keys = [f"k:{t}" for t in "abcdefg"]
    data = rows(7)
    async with store.vector_writer(origin="b1", clock=lambda: NOW) as writer:
        await writer.add([(k, data[i], 1) for i, k in enumerate(keys)])
        assert len(segment_files(store.vectors_dir)) == 3  # two full, one being filled
        await store.prune_vectors(max_bytes=0, keep=0.0, now=NOW + 10)
        assert len(segment_files(store.vectors_dir)) == 3
    got = np.stack([v for _, _, v in piece_vectors(store.path, "job1")])
    assert np.array_equal(got, data)


def test_gather_reads_rows_in_any_order_across_segments(tmp_path: Path) -> None:
    """`gather` returns the rows asked for, in the order asked, from several segments;
    a row past a segment's end is an error, not zeros."""
    writer = SegmentWriter(tmp_path, segment_bytes=3 * DIMS * 4)
    writer.resume(None, 0)
    slots, _ = writer.write(rows(7))
    writer.close()
    order = [5, 0, 6, 3, 3, 1]
    reader = SegmentReader(tmp_path)
    try:
        got = reader.gather([slots[i] for i in order], DIMS)
        assert np.array_equal(got, rows(7)[order])
        with pytest.raises(OSError, match="shorter than its index"):
            reader.gather([(3, 0), (3, 3)], DIMS)  # the segment file holds three rows
    finally:
        reader.close()


async def test_one_group_keeps_the_first_vector_of_a_key(store: Store) -> None:
    """A key twice in one group (one statement indexes the whole group) keeps its first
    vector, as two groups would; the group's requests are done, other requests not."""
    await add_file(store, "job1", ["a", "b", "c"])
    async with store.vector_writer(origin="b1", clock=lambda: NOW) as writer:
        await writer.add([("k:a", rows(1, 0)[0], 1), ("k:b", rows(1, 1)[0], 2)])
        await writer.add([("k:a", rows(1, 2)[0], 3)])
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT key, tokens, row FROM vectors ORDER BY key").fetchall() == [
            ("k:a", 1, 0),
            ("k:b", 2, 1),
        ]
        states = dict(conn.execute("SELECT key, state FROM requests").fetchall())
    assert states == {"k:a": "done", "k:b": "done", "k:c": "pending"}
    got = [v for _, _, v in piece_vectors(store.path, "job1")]
    assert np.array_equal(np.stack(got), rows(2))


async def test_records_of_several_chunks_come_out_whole_from_any_output_order(
    store: Store,
) -> None:
    """Vectors stored in the order a batch answered (shuffled, over several segments)
    come back in record order, blocks never splitting a record's chunks even when a
    fetch would, and `record_rows` gives each record its row: its one vector, or the
    token-weighted mean of its chunks."""
    chunks = [1, 3, 1, 2, 1, 1, 4, 1]
    keys = [[f"k{r}.{c}" for c in range(n)] for r, n in enumerate(chunks)]
    flat = [k for ks in keys for k in ks]
    await store.begin_claim("job1", "job1.jsonl", "batch", NOW)
    await store.queue_file(
        "job1", sha256="0" * 64, size=100, lane="batch", now=NOW,
        records=[
            NewRecord(str(r), None, 3 * len(ks), [(k, 2 + i) for i, k in enumerate(ks)], False)
            for r, ks in enumerate(keys)
        ],
        requests=[NewRequest(k, k, 1, 1, 1) for k in flat],
    )  # fmt: skip
    rng = np.random.default_rng(7)
    data = {k: rng.standard_normal(DIMS).astype(np.float32) for k in flat}
    answered = list(rng.permutation(flat))
    async with store.vector_writer(origin="b1", clock=lambda: NOW) as writer:
        await writer.add([(k, data[k], 1) for k in answered])
    assert len(segment_files(store.vectors_dir)) > 3

    for fetch in (1, 2, 3, 5, 512):
        blocks = list(piece_blocks(store.path, "job1", fetch))
        seen = [set(idxs) for idxs, _, _ in blocks]
        assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])
        out = np.concatenate([np.reshape(r, (-1, DIMS)) for r in record_rows(blocks)])
        expected = [
            data[ks[0]]
            if len(ks) == 1
            else combine_chunks(np.stack([data[k] for k in ks]), [2 + i for i in range(len(ks))])
            for ks in keys
        ]
        assert np.allclose(out, np.stack(expected), atol=1e-6), fetch
