"""Deduplication end to end: identical texts are embedded once, across files and within
one, and the saving shows in the manifests, the ledger and the report."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedd.cli import main
from embedd.money.ledger import LedgerEntry, read_entries
from embedd.money.prices import cost
from tests.conftest import DaemonProcess, EmulatorProcess, drop, wait_for

BATCH = Decimal("0.065")


def manifest(spool: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        (spool / "outbox" / f"{name}.json").read_text(), parse_float=Decimal
    )
    return doc


@pytest.mark.slow
def test_the_same_file_twice_costs_nothing_the_second_time(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The second copy of a file creates no batch and bills no token; its manifest
    marks every row cached with cost 0 and the same vectors; the ledger has a
    zero-cost dedup line per file with cached rows (also a text repeated inside the
    first file), and the report totals show the dedup tokens and their saving."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url)
    records = [
        {"id": "a", "text": "deduplication saves the second embedding"},
        {"id": "b", "text": "a text that is only here once"},
        {"id": "c", "text": "deduplication saves the second embedding"},  # = a
    ]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    drop(daemon.spool, "first.jsonl", body)
    daemon.wait_done(["first.jsonl"], timeout=30)
    before = emulator.state()
    first = manifest(daemon.spool, "first.jsonl")
    assert [r.get("cached", False) for r in first["records"]] == [False, False, True]
    tokens = [r["tokens"] for r in first["records"]]
    assert first["cost_usd"] == cost(tokens[0] + tokens[1], BATCH)

    drop(daemon.spool, "second.jsonl", body)
    daemon.wait_done(["second.jsonl"], timeout=30)
    after = emulator.state()
    assert after["batches_created"] == before["batches_created"] == 1
    assert after["tokens_billed"] == before["tokens_billed"] == tokens[0] + tokens[1]
    assert after["requests_by_endpoint"].get("POST /v1/embeddings", 0) == 0
    second = manifest(daemon.spool, "second.jsonl")
    assert all(r["cached"] is True for r in second["records"])
    assert [r["tokens"] for r in second["records"]] == tokens
    assert second["tokens"] == sum(tokens)
    assert second["cost_usd"] == 0
    out = daemon.spool / "outbox"
    np.testing.assert_array_equal(
        np.load(out / "second.jsonl.npy"), np.load(out / "first.jsonl.npy")
    )

    lines = [e for e in read_entries(daemon.spool / "ledger.jsonl") if isinstance(e, LedgerEntry)]
    dedup = {e.batch_id: e for e in lines if e.kind == "dedup"}
    by_job = {first["job"]: tokens[2], second["job"]: sum(tokens)}
    assert {k: e.dedup_tokens for k, e in dedup.items()} == by_job
    assert all(e.tokens == 0 and e.cost_usd == 0 and e.requests == 0 for e in dedup.values())
    # On disk a dedup line names its job, never a batch that does not exist (SPEC §6).
    raw = [json.loads(x) for x in (daemon.spool / "ledger.jsonl").read_text().splitlines()]
    assert sorted(r["job"] for r in raw if r["kind"] == "dedup") == sorted(by_job)
    assert all("batch_id" not in r for r in raw if r["kind"] == "dedup")
    assert all(not r["batch_id"].startswith("dedup:") for r in raw if r["kind"] == "batch")
    billed = [e for e in lines if e.kind == "batch"]
    assert sum(e.tokens for e in billed) == after["tokens_billed"]

    assert main(["report", "--config", str(daemon.config), "--format", "json"]) == 0
    total = json.loads(capsys.readouterr().out, parse_float=Decimal)["total"]
    assert total["dedup_tokens"] == tokens[2] + sum(tokens)
    assert total["dedup_saved_usd"] == cost(tokens[2] + sum(tokens), BATCH)
    assert total["tokens"] == after["tokens_billed"]
    assert total["cost_usd"] == first["cost_usd"]
    assert main(["report", "--config", str(daemon.config)]) == 0
    table_total = capsys.readouterr().out.splitlines()[-1].split()
    assert f"{total['dedup_tokens']:,}" in table_total
    assert daemon.stop() == 0


@pytest.mark.slow
def test_files_dropped_together_share_a_text_billed_once(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Files claimed side by side that share texts: each shared text is billed to exactly
    one file and marked cached in the others, so the manifests' costs add up to the
    ledger and to what the emulator billed."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url)
    wait_for(lambda: (daemon.spool / "inbox").is_dir(), what="the spool")
    shared = ["a text every file carries", "another shared sentence"]
    names = [f"together-{i}.jsonl" for i in range(6)]
    staged = []
    for i, name in enumerate(names):
        texts = [*shared, f"only in file {i}"]
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        tmp = daemon.spool / "tmp" / name
        tmp.write_bytes(body)
        staged.append(tmp)
    for tmp in staged:  # all at once, so the claims overlap
        tmp.rename(daemon.spool / "inbox" / tmp.name)
    daemon.wait_done(names, timeout=60)
    docs = [manifest(daemon.spool, n) for n in names]
    for row in range(len(shared)):
        flags = [bool(d["records"][row].get("cached")) for d in docs]
        assert flags.count(False) == 1, flags
    assert all(not d["records"][2].get("cached") for d in docs)
    usage = [e for e in read_entries(daemon.spool / "ledger.jsonl") if isinstance(e, LedgerEntry)]
    billed = sum(e.tokens for e in usage)
    assert billed == emulator.state()["tokens_billed"]
    assert sum(d["cost_usd"] for d in docs) == sum(e.cost_usd for e in usage)
    assert daemon.stop() == 0
