"""retention: months of traffic in minutes, with state/ and the daemon's memory sampled.

The real daemon (a subprocess) and the emulator (instant batches) take a stream of
unique documents in rounds; after each round is delivered the benchmark samples the
size of `state/` (its files' allocated blocks: database, -wal, vector segments), of
`state/vectors/` alone, and the daemon's resident memory (VmRSS now and VmHWM). With
`[dedup] max_bytes` far below what the documents would need, the cache must reach
its cap and then stay there: the figures that matter are how much the samples after
that point still grow.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from embedd.bench.common import (
    MB,
    BenchError,
    DaemonProc,
    EmulatorProc,
    peak_rss,
    release_into_inbox,
    wait_until,
    write_config,
    write_corpus,
)

# size: (documents, sample every, dimensions, [dedup] max_bytes in bytes)
SIZES = {"small": (3_000, 500, 256, 256 * 1024), "full": (200_000, 20_000, 1024, 64 * 2**20)}
DOC_CHARS = 300
PER_FILE = 500
# How long a partial batch waits for more lines: a round is one batch either way, so the
# small size does not spend most of its time waiting for the flush.
FLUSH_AFTER = {"small": "0.1s", "full": "1s"}
# Rows of finished files are kept this long (default 30 days): months pass in minutes here.
STATE_KEEP = "10s"


def current_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def disk_bytes(root: Path) -> int:
    """Bytes allocated to the files under `root` (sparse segment tails not counted)."""
    total = 0
    for path in root.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_blocks * 512
        except FileNotFoundError:
            continue
    return total


def run(size: str, work: Path) -> dict[str, Any]:
    n, every, dims, cap = SIZES[size]
    corpus = write_corpus(work / "corpus", n, DOC_CHARS, PER_FILE)
    spool = work / "spool"
    state = spool / "state"
    emulator = EmulatorProc.start(work / "emulator", phase_time=0.0)
    daemon = DaemonProc(
        write_config(
            work / "config.toml", spool, emulator.url,
            openai={"dimensions": dims}, batch={"flush_after": FLUSH_AFTER[size]},
            dedup={"max_bytes": cap}, state={"keep": STATE_KEEP},
        ),
        work / "daemon.log",
    )  # fmt: skip
    samples: list[dict[str, Any]] = []
    per_round = every // PER_FILE
    try:
        daemon.start()
        daemon.wait_event("daemon.ready")
        for start in range(0, len(corpus), per_round):
            batch = corpus[start : start + per_round]
            staged = []
            for path in batch:
                target = spool / "tmp" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(path, target)
                staged.append(target)
            release_into_inbox(staged, spool / "inbox")
            want = start + len(batch)

            def delivered(want: int = want) -> bool:
                return sum(1 for e in daemon.events() if e.get("event") == "file.done") >= want

            wait_until(delivered, 120 + every / 100, f"{want} files done", step=0.1)
            # the delivery kicks a retention pass; give it time to bring the cache back
            # under its cap, then sample whatever it is (a cache still over the cap shows
            # in `vectors_over_cap`, it is not hidden by a looser wait)
            with contextlib.suppress(BenchError):
                wait_until(lambda: disk_bytes(state / "vectors") <= cap, 30, "the cache cap")
            samples.append(
                {
                    "records": want * PER_FILE,
                    "state_mb": disk_bytes(state) / MB,
                    "vectors_mb": disk_bytes(state / "vectors") / MB,
                    "db_mb": sum(p.stat().st_blocks * 512 for p in state.glob("embedd.sqlite3*"))
                    / MB,
                    "rss_mb": current_rss(daemon.pid) / MB,
                    "peak_rss_mb": peak_rss(daemon.pid) / MB,
                }
            )
        layout = {
            str(p.relative_to(state)): p.stat().st_blocks * 512
            for p in state.rglob("*")
            if p.is_file()
        }
    finally:
        daemon.stop()
        emulator.stop()
    # the cap is reached once the documents so far would need twice the cache
    row_bytes = dims * 4
    settled = [s for s in samples if s["records"] * row_bytes >= 2 * cap] or samples[-1:]
    shutil.rmtree(work)
    return {
        "documents": n,
        "dimensions": dims,
        "cap_mb": cap / MB,
        "samples": samples,
        "state_files_last": layout,
        "state_mb_last": samples[-1]["state_mb"],
        "state_growth": max(s["state_mb"] for s in settled) / settled[0]["state_mb"],
        "rss_growth": max(s["rss_mb"] for s in settled) / settled[0]["rss_mb"],
        "vectors_over_cap": max(s["vectors_mb"] for s in settled) / (cap / MB),
    }
