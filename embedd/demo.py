"""`embedd demo`: the whole product in one offline command.

A temporary spool, the built-in emulator, a few sample documents of every input
kind (one longer than the model's 8191-token window), the daemon until they are
done; then where the results are and the cost report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from embedd.config import load_settings
from embedd.logs import configure_logging

SAMPLES: dict[str, str] = {
    "welcome.txt": "embedd turns document files into embedding vectors through the OpenAI "
    "Batch API, at half the price of the synchronous API.\n",
    "notes.md": "# Release notes\n\nBatches are packed, submitted, polled and collected; "
    "results land in the outbox as .npy files with a JSON manifest.\n",
}


def _sample_files() -> dict[str, bytes]:
    files = {name: text.encode() for name, text in SAMPLES.items()}
    faq = [
        {"id": "q1", "text": "How much does the Batch API save?", "topic": "cost"},
        {"id": "q2", "text": "Where do the vectors go?", "topic": "results"},
        {"id": "q3", "text": "How much does the Batch API save?", "topic": "duplicate"},
        {"id": "q4", "text": "What happens when the daemon is killed?", "topic": "safety"},
    ]
    files["faq.jsonl"] = "".join(json.dumps(r) + "\n" for r in faq).encode()
    files["glossary.json"] = json.dumps(
        [
            {"id": "shard", "text": "A shard is one batch input file of at most 20,000 lines."},
            {"id": "ledger", "text": "The ledger records what every batch cost and saved."},
        ]
    ).encode()
    words = " ".join(f"paragraph{i} discusses embeddings, spools and batches." for i in range(2500))
    files["long-report.txt"] = (words + "\n").encode()
    return files


def run_demo(workdir: Path) -> int:
    """Run the demo in `workdir`; print where the results are and the cost report."""
    spool = workdir / "spool"
    config = workdir / "config.toml"
    config.write_text(
        "# written by `embedd demo`\n"
        "[spool]\n"
        f'root = "{spool}"\n'
        'scan_interval = "1s"\n'
        "[batch]\n"
        'flush_after = "1s"\n'
        "[emulator]\n"
        'phase_time = "0.3s"\n'
        'poll_interval = "0.3s"\n'
    )
    settings = dataclasses.replace(load_settings(config), emulate=True)
    configure_logging("info")
    print(f"embedd demo: spool {spool}", file=sys.stderr)

    from embedd.daemon import run_daemon
    from embedd.files.spool import SpoolPaths
    from embedd.pipeline.wakeups import Wakeups

    paths = SpoolPaths.from_root(spool, None)
    paths.ensure()

    async def drop_samples(wake: Wakeups) -> None:
        for name, data in _sample_files().items():
            tmp = paths.tmp / f".{name}.tmp"
            tmp.write_bytes(data)
            os.rename(tmp, paths.inbox / name)
        wake.kick("scan")

    code = asyncio.run(
        run_daemon(settings, "sk-emulated-demo", until_idle=True, on_ready=drop_samples)
    )
    if code != 0:
        return code
    print()
    print(f"Results in {paths.outbox}:")
    for npy in sorted(paths.outbox.glob("*.npy")):
        manifest = json.loads(npy.with_suffix(".json").read_text())
        array = np.load(npy)
        chunks = max(r["chunks"] for r in manifest["records"])
        cached = sum(1 for r in manifest["records"] if r.get("cached"))
        print(
            f"  {npy.name:<24} shape {array.shape!s:<12} tokens {manifest['tokens']:>6}"
            f"  chunks≤{chunks}  cached {cached}  emulated={manifest['emulated']}"
        )
    failed = sorted(paths.failed.glob("*.error.json"))
    if failed:
        print(f"Failed inputs in {paths.failed}: {[f.name for f in failed]}")
    print()
    print("Cost report (embedd report --config " + str(config) + "):")
    from embedd.money.report import report_main

    report_main([], paths.ledger)
    print()
    print(f"Try:  embedd status --config {config}")
    return 0 if not failed else 1
