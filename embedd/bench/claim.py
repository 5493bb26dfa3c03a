"""claim: the largest inputs the daemon accepts, claimed in bounded memory (SPEC §9).

A JSON Lines file of many ~600-character records and a one-record text file, each
just under ``[inputs] max_file_bytes`` (256 MiB) at full size, are dropped into
the inbox together (two claims side by side, the worst case) of the real daemon
at 3072 dimensions. Batches stay in flight (the emulator never finishes them), so
the figure is the claim's: the daemon's peak RSS (``VmHWM``) once both files are
queued, against the 512 MB bound, and the time from the drop to both queued.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from embedd.bench.common import (
    MB,
    DaemonProc,
    EmulatorProc,
    _vocabulary,
    peak_rss,
    release_into_inbox,
    wait_until,
    write_config,
)

MiB = 1 << 20
SIZES = {"small": 4 * MiB, "full": 256 * MiB - 4096}  # each file; the limit is 256 MiB
BLOCK_CHARS = 8 * MiB  # distinct prose the files are cut from
RECORD_CHARS = 600
BOUND_MB = 512.0


def _prose(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words = _vocabulary()
    out: list[str] = []
    total = 0
    while total < chars:
        line = " ".join(rng.choices(words, k=16)) + ".\n"
        out.append(line)
        total += len(line)
    return "".join(out)[:chars]


def write_inputs(folder: Path, size: int) -> tuple[Path, Path, int]:
    """`many.jsonl` and `huge.txt` of `size` bytes or just under; (paths, records)."""
    folder.mkdir(parents=True, exist_ok=True)
    block = _prose(min(BLOCK_CHARS, size), 11)
    doubled = block + block  # record texts wrap around the block
    lines = folder / "many.jsonl"
    records = 0
    written = 0
    step = 7  # consecutive records start 7 characters apart: distinct texts
    with lines.open("w", encoding="utf-8") as fh:
        while True:
            start = (records * step) % len(block)
            line = json.dumps({"id": f"r{records}", "text": doubled[start : start + RECORD_CHARS]})
            if written + len(line) + 1 > size:
                break
            fh.write(line + "\n")
            written += len(line) + 1
            records += 1
    text = folder / "huge.txt"
    with text.open("w", encoding="utf-8") as fh:
        left = size
        shift = 0
        while left > 0:
            piece = doubled[shift : shift + min(left, len(block))]
            fh.write(piece)
            left -= len(piece)
            shift = (shift + 1009) % len(block)  # repeats are not aligned to windows
    return lines, text, records


def run(size: str, work: Path) -> dict[str, Any]:
    """Both files at once through the real daemon; its peak RSS once they are queued."""
    each = SIZES[size]
    lines, text, records = write_inputs(work / "tmp", each)
    spool = work / "spool"
    emulator = EmulatorProc.start(work / "emulator", phase_time=3600.0)
    daemon = DaemonProc(
        write_config(
            work / "config.toml", spool, emulator.url,
            openai={"base_url": emulator.url, "dimensions": 3072},
            batch={"flush_after": "1h"},
        ),
        work / "daemon.log",
    )  # fmt: skip
    try:
        daemon.start()
        daemon.wait_event("daemon.ready")
        idle = peak_rss(daemon.pid)
        (spool / "tmp").mkdir(parents=True, exist_ok=True)
        staged = [spool / "tmp" / p.name for p in (lines, text)]
        for src, dst in zip((lines, text), staged, strict=True):
            src.rename(dst)
        start = release_into_inbox(staged, spool / "inbox")

        def queued() -> bool:
            events = daemon.events()
            failed = [e for e in events if e.get("event") == "file.failed"]
            if failed:
                raise AssertionError(f"an input was refused: {failed}")
            names = {e.get("file") for e in events if e.get("event") == "file.queued"}
            return {"many.jsonl", "huge.txt"} <= names

        wait_until(queued, 120 + 4 * each / MiB, "both inputs queued")
        seconds = time.time() - start
        peak = peak_rss(daemon.pid)
    finally:
        daemon.stop()
        emulator.stop()
    return {
        "file_mb": each / MB,
        "records": records,
        "dimensions": 3072,
        "seconds": seconds,
        "idle_rss_mb": idle / MB,
        "daemon_peak_rss_mb": peak / MB,
        "bound_mb": BOUND_MB,
    }
