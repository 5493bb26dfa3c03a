"""The limiter against a server that says no: the sync lane with far more demand
than the rate limit allows, against the emulator enforcing the same RPM/TPM, gets
no 429 once it has warmed up (throughput is the benchmark's business, not a test's).

OpenAI documents that a per-minute limit may be enforced in shorter slices; the
emulator's `rate_window_s` does that, which lets a run of a few seconds cover many
windows (`embedd emulator --rate-window 1`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from embedd.emulator.vectors import count_tokens
from tests.conftest import EmulatorProcess, drop, wait_for
from tests.test_crash import new_daemon, wait_ready

RPM = 600  # 10 requests a one-second slice
TPM = 30_000  # 500 tokens a one-second slice
WARM_UP = 3.0  # seconds of load before 429s count
OBSERVE = 6.0  # seconds of load in which no 429 may happen


@pytest.fixture
def limited_emulator(start_emulator: Callable[..., EmulatorProcess]) -> EmulatorProcess:
    """The emulator enforcing RPM/TPM in one-second slices, as a subprocess."""
    return start_emulator(
        "--rpm", str(RPM), "--tpm", str(TPM), "--rate-window", "1", phase_time=0.0
    )


@pytest.mark.slow
def test_sync_lane_at_five_times_the_limit_gets_no_429_after_warm_up(
    limited_emulator: EmulatorProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """With inbox/sync/ holding over 5x the tokens the limit allows in the observed
    span, the limiter (re-calibrated from the x-ratelimit headers) keeps every call
    under the emulator's RPM/TPM: its 429 counter does not move after warm-up."""
    emulator = limited_emulator
    daemon = new_daemon(
        tmp_path,
        request,
        emulator.url,
        limits={"rpm": RPM, "tpm": TPM},
        sync={"max_inputs": 8},
        retry={"base": "200ms", "cap": "2s"},
    )
    wait_ready(daemon)
    texts = [f"sync record {i} about topic {i % 13} and more" for i in range(2400)]
    demand = sum(count_tokens(t) for t in texts)
    allowed = TPM / 60 * (WARM_UP + OBSERVE)
    assert demand >= 5 * allowed, (demand, allowed)
    for part in range(3):
        body = "".join(json.dumps({"text": t}) + "\n" for t in texts[part::3])
        drop(daemon.spool, f"load{part}.jsonl", body.encode(), sync=True)

    def embedding() -> bool:
        return any(e.get("event") == "sync.embedded" for e in daemon.events())

    wait_for(embedding, 20, what="the first sync call")
    started = time.monotonic()
    wait_for(
        lambda: time.monotonic() - started >= WARM_UP,
        WARM_UP + 5,
        interval=0.1,
        what="the warm-up to pass",
    )
    warm = emulator.state()["rate_limited_429"]
    wait_for(
        lambda: time.monotonic() - started >= WARM_UP + OBSERVE,
        OBSERVE + 5,
        interval=0.1,
        what="the observation window to pass",
    )
    state = emulator.state()
    # Demand stayed above the limit the whole time: work is still waiting.
    assert not (daemon.spool / "outbox" / "load2.jsonl.npy").exists()
    served = state["requests_by_endpoint"].get("POST /v1/embeddings", 0)
    print(f"429s: {warm} in warm-up, {state['rate_limited_429'] - warm} after; calls {served}")
    assert state["rate_limited_429"] == warm, state
    assert daemon.stop() == 0
