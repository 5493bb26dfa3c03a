"""Random-kill soak: SIGKILL the daemon at random moments while the emulator injects
faults, then let it finish, and check the same invariants as the crash-point tests.

The seed is printed and can be set with `EMBEDD_SOAK_SEED=N` to replay a failure:
it drives the kill times, the drop times and the emulator's random faults.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from embedd.emulator.vectors import count_tokens
from embedd.pipeline.intake import request_key
from tests.conftest import EmulatorProcess
from tests.test_crash import (
    check_invariants,
    drop_all,
    new_daemon,
    wait_ready,
    wait_settled,
    workload,
)

KILLS = 22
FAULTS = {
    # A new batch shows in GET /v1/batches only after a while: a lookup right after a
    # lost create proves nothing.
    "list_lag_s": 0.5,
    "requests": [
        # A batch is created but its answer never arrives: the client must find it.
        {"endpoint": "POST /v1/batches", "kind": "lost_response", "rate": 0.15},
        {"endpoint": "GET /v1/files/{id}/content", "kind": "truncate", "rate": 0.1},
        {"endpoint": "*", "kind": "server_error", "status": 502, "rate": 0.05},
        {"endpoint": "*", "kind": "server_error", "status": 503, "rate": 0.03},
        {"endpoint": "*", "kind": "drop", "rate": 0.03},
    ],
    "batches": [
        # Completed, but its output and error files answer 404.
        {"outcome": "complete", "files_gone": True, "count": 1},
        # Failed while validating, errors.data[].line naming the refused lines.
        {"outcome": "invalid", "invalid_line_rate": 0.1, "count": 1},
        {"outcome": "expire", "completed_fraction": 0.5, "count": 3},
        {"outcome": "complete", "failed_line_rate": 0.15, "failed_line_status": 500, "count": 6},
        {"outcome": "cancel", "completed_fraction": 0.4, "count": 1},
    ],
}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_random_kills_under_faults_lose_nothing_and_pay_once(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """More than 20 kill -9 at random moments, with 5xx, dropped connections, lost
    create responses while the batch list lags, truncated downloads, an output file
    that answers 404, a batch failing validation, expired and cancelled batches and
    failed lines on: every file still ends once in the outbox (or in failed/ for the
    invalid lines), no two batches share metadata, no batch content is submitted
    again after a batch that produced something, the ledger equals what the emulator
    billed, no upload or output file is left, and the database agrees."""
    seed = int(os.environ.get("EMBEDD_SOAK_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"soak seed: {seed}  (replay with EMBEDD_SOAK_SEED={seed})")
    rng = random.Random(seed)
    emulator = start_emulator("--seed", str(seed), phase_time=0.1)
    emulator.set_faults(FAULTS)
    daemon = new_daemon(
        tmp_path,
        request,
        emulator.url,
        batch={"max_lines": 15, "flush_after": "0.2s", "poll_interval": "0.1s", "list_lag": "0.7s"},
        retry={"base": "20ms", "cap": "200ms", "max_retries": 8},
        breaker={"failures": 50, "cooldown": "200ms"},
    )
    work = workload("soak", files=12, per_file=20)
    batches = [dict(list(work.items())[i::4]) for i in range(4)]
    started = time.monotonic()
    for kill in range(KILLS):
        if kill % 5 == 0 and batches:
            drop_all(daemon.spool, batches.pop())
        # From "still importing" to "well into the pipeline": every phase gets hit.
        time.sleep(rng.uniform(0.3, 2.2))  # the random kill moment, not a race wait
        assert daemon.alive(), f"seed {seed}: daemon died on its own:\n{daemon.log_text()[-3000:]}"
        daemon.kill()
        daemon.start()
    for rest in batches:
        drop_all(daemon.spool, rest)
    print(f"soak: {KILLS} kills in {time.monotonic() - started:.1f}s")
    try:
        wait_ready(daemon)
        wait_settled(daemon, work, timeout=90)
        assert daemon.stop() == 0
        emulator.set_faults({})  # the checker's own calls must not meet the faults
        state = emulator.state()
        # The batch that failed validation failed the records on its named lines for
        # good: their files are in failed/, the reason says why.
        failed = {p.name for p in (daemon.spool / "failed").glob("*.error.json")}
        failed = {n.removesuffix(".error.json") for n in failed}
        assert failed, "the batch that failed validation failed no file"
        assert any(b["files_gone"] for b in state["batch_log"]), "no output answered 404"
        for name in failed:
            reason = (daemon.spool / "failed" / f"{name}.error.json").read_text()
            assert "invalid_value" in reason, (name, reason)
        check_invariants(
            daemon.spool,
            emulator,
            work,
            failed=failed,
            extra_billed=_lost_or_unused(daemon.spool, emulator, work, failed),
        )
        check_batches(state["batch_log"])
    except BaseException:
        print(f"soak seed was {seed}")
        raise


def check_batches(log: list[dict[str, Any]]) -> None:
    """No two batches share metadata, and no batch input content was submitted again
    unless every earlier batch with it produced nothing we could fetch."""
    metadata = [json.dumps(b["metadata"], sort_keys=True) for b in log]
    assert len(metadata) == len(set(metadata)), "two batches share metadata"
    seen: dict[str, list[dict[str, Any]]] = {}
    for batch in log:  # oldest first
        earlier = seen.setdefault(batch["input_sha256"], [])
        productive = [b["id"] for b in earlier if b["completed"] and not b["files_gone"]]
        assert productive == [], (batch["id"], "resubmits the content of", productive)
        earlier.append(batch)


def _lost_or_unused(
    spool: Path, emulator: EmulatorProcess, work: Mapping[str, list[str]], failed: set[str]
) -> int:
    """Tokens the emulator billed beyond "each text of a delivered file once": batches
    whose output answered 404 (billed, then embedded again), and texts embedded for a
    file that failed anyway (a neighbour of an invalid line). Which texts were billed
    is the emulator's word (its per-line books, by custom_id): the daemon's database
    no longer holds the texts of finished files (SPEC §9)."""
    lines = [json.loads(x) for x in (spool / "ledger.jsonl").read_text().splitlines() if x]
    usage = [x for x in lines if x["kind"] == "batch"]
    lost = sum(x["tokens"] for x in usage if not x["requests"])
    model, dimensions = usage[0]["model"], usage[0]["dimensions"]
    delivered = {t for name, texts in work.items() if name not in failed for t in texts}
    unused = {t for name in failed for t in work[name] if t not in delivered}
    billed = emulator.billed()
    return lost + sum(
        count_tokens(t) for t in unused if billed.get(request_key(model, dimensions, t))
    )
