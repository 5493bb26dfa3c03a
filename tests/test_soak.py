"""Random-kill soak: SIGKILL the daemon at random moments while the emulator injects
faults, then let it finish, and check the same invariants as the crash-point tests.

The seed is printed and can be set with `EMBEDD_SOAK_SEED=N` to replay a failure:
it drives the kill times, the drop times and the emulator's random faults.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

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
    "requests": [
        # A batch is created but its answer never arrives: the client must find it.
        {"endpoint": "POST /v1/batches", "kind": "lost_response", "rate": 0.15},
        {"endpoint": "GET /v1/files/{id}/content", "kind": "truncate", "rate": 0.1},
        {"endpoint": "*", "kind": "server_error", "status": 502, "rate": 0.05},
        {"endpoint": "*", "kind": "server_error", "status": 503, "rate": 0.03},
        {"endpoint": "*", "kind": "drop", "rate": 0.03},
    ],
    "batches": [
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
    create responses, truncated downloads, expired and cancelled batches and failed
    lines on: every file still ends once in the outbox, no shard becomes two
    batches, no text is billed twice, no upload is orphaned, the database agrees."""
    seed = int(os.environ.get("EMBEDD_SOAK_SEED") or random.SystemRandom().randrange(1 << 30))
    print(f"soak seed: {seed}  (replay with EMBEDD_SOAK_SEED={seed})")
    rng = random.Random(seed)
    emulator = start_emulator("--seed", str(seed), phase_time=0.1)
    emulator.set_faults(FAULTS)
    daemon = new_daemon(
        tmp_path,
        request,
        emulator.url,
        batch={"max_lines": 15, "flush_after": "0.2s", "poll_interval": "0.1s"},
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
        check_invariants(daemon.spool, emulator, work)
    except BaseException:
        print(f"soak seed was {seed}")
        raise
