"""The circuit breaker and the pause, end to end against the emulator.

A 5xx storm opens the breaker: the log and `embedd status --json` say so, no call
leaves the daemon while it is open, one probe goes out after the cooldown and a
healthy answer closes it. A key the API refuses pauses submission with every file
kept; a restart with a good key finishes the work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, DaemonProcess, EmulatorProcess, wait_for
from tests.test_crash import (
    check_invariants,
    drop_all,
    new_daemon,
    wait_ready,
    wait_settled,
    workload,
)

COOLDOWN = 6.0  # longer than the daemon's 5 s status refresh, so status can see "open"
GOOD_KEY = "sk-good-" + "g00d" * 6  # fake keys for the emulator's --api-key check
BAD_KEY = "sk-bad-" + "ba4d" * 6


def status_json(daemon: DaemonProcess) -> dict[str, Any]:
    """`embedd status --json` run as a user would, against the daemon's config."""
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "status", "--json", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=daemon.env,
        timeout=30,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def breaker_state(daemon: DaemonProcess) -> str | None:
    breaker = status_json(daemon).get("breaker")
    return breaker.get("state") if isinstance(breaker, dict) else None


@pytest.mark.slow
def test_5xx_storm_opens_the_breaker_which_blocks_then_probes_and_closes(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Three 503s in a row open the breaker (log and status say so); while it is open
    the emulator sees no request at all; after the cooldown one probe goes out, it
    succeeds, the breaker closes and every file completes once."""
    emulator = start_emulator(phase_time=0.05)
    daemon = new_daemon(
        tmp_path,
        request,
        emulator.url,
        breaker={"failures": 3, "cooldown": f"{COOLDOWN}s"},
        retry={"base": "50ms", "cap": "200ms"},
        batch={"max_lines": 20, "flush_after": "0.2s", "poll_interval": "0.1s"},
    )
    wait_ready(daemon)
    emulator.set_faults(
        {"requests": [{"endpoint": "*", "kind": "server_error", "status": 503, "count": 3}]}
    )
    work = workload("breaker", files=2, per_file=5)
    drop_all(daemon.spool, work)

    def blocked() -> bool:
        return any("circuit breaker open" in str(e.get("error", "")) for e in daemon.events())

    wait_for(blocked, 20, what="a call refused by the open breaker")
    opened = time.monotonic()
    served = emulator.state()["requests_served"]
    assert emulator.state()["faults_fired"] == 3
    wait_for(
        lambda: breaker_state(daemon) == "open",
        10,
        interval=0.3,
        what="status --json to show the breaker open",
    )
    # Watch the emulator's counter for most of the rest of the cooldown: it must not move.
    while time.monotonic() < opened + COOLDOWN - 1.5:
        assert emulator.state()["requests_served"] == served, "a call left while open"
        time.sleep(0.1)  # sampling interval of an observation window, not a race wait
    wait_settled(daemon, work, timeout=30)
    assert time.monotonic() - opened >= COOLDOWN - 1.5
    assert emulator.state()["requests_served"] > served  # the probe, then the rest
    wait_for(
        lambda: breaker_state(daemon) == "closed",
        10,
        interval=0.3,
        what="status --json to show the breaker closed",
    )
    assert daemon.stop() == 0
    check_invariants(daemon.spool, emulator, work)


@pytest.mark.slow
def test_refused_key_pauses_with_work_kept_and_a_good_key_finishes_it(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """With a key the API refuses (401) the daemon pauses submission, says why in the
    log and in status, fails no file and never logs the key; restarted with the good
    key it finishes every file once."""
    emulator = start_emulator("--api-key", GOOD_KEY, phase_time=0.05)
    daemon = new_daemon(
        tmp_path,
        request,
        emulator.url,
        key=BAD_KEY,
        batch={"max_lines": 20, "flush_after": "0.2s", "poll_interval": "0.1s"},
    )
    wait_ready(daemon)
    work = workload("paused", files=2, per_file=5)
    drop_all(daemon.spool, work)
    wait_for(
        lambda: any(e.get("event") == "submission.paused" for e in daemon.events()),
        20,
        what="submission.paused in the log",
    )
    paused = next(e for e in daemon.events() if e.get("event") == "submission.paused")
    assert "401" in paused["reason"], paused

    def queued_and_paused() -> bool:
        status = status_json(daemon)
        return bool(status.get("paused")) and status["counts"]["files"].get("queued") == len(work)

    wait_for(queued_and_paused, 20, interval=0.3, what="status: paused, every file queued")
    assert "401" in str(status_json(daemon)["paused"])
    assert not list((daemon.spool / "failed").iterdir())
    assert not list((daemon.spool / "outbox").iterdir())
    assert daemon.stop() == 0
    assert BAD_KEY not in daemon.log_text()

    daemon.env["OPENAI_API_KEY"] = GOOD_KEY
    daemon.start()
    wait_ready(daemon)
    wait_settled(daemon, work, timeout=30)
    assert daemon.stop() == 0
    assert GOOD_KEY not in daemon.log_text()
    check_invariants(daemon.spool, emulator, work, key=GOOD_KEY)
