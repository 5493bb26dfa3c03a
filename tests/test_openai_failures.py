"""The OpenAI side of failure isolation (SPEC §8), end to end with the daemon as a
subprocess and the emulator injecting what the real API does: creates whose answer
is lost while the batch list lags or fails, duplicate batches, output files that
answer 404, validation failures naming lines, a batch without `usage`, deletes that
fail, and files a kill left in `state/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from contract.emulator_client import Api, embedding_line, jsonl

from tests.conftest import TEST_KEY, DaemonProcess, EmulatorProcess, drop, wait_for
from tests.test_crash import (
    check_invariants,
    drop_all,
    emulator_list,
    finish_after_crash,
    new_daemon,
    wait_killed,
    wait_ready,
    wait_settled,
    workload,
)

FAST: dict[str, dict[str, Any]] = {
    "batch": {"max_lines": 20, "flush_after": "0.2s", "poll_interval": "0.1s", "list_lag": "1s"},
    "retry": {"base": "20ms", "cap": "200ms"},
}


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def ledger(spool: Path) -> list[dict[str, Any]]:
    text = (spool / "ledger.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def db_rows(spool: Path, sql: str) -> list[tuple[Any, ...]]:
    path = spool / "state" / "embedd.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return list(conn.execute(sql).fetchall())


def run(
    emulator: EmulatorProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tag: str,
    *,
    files: int = 2,
    per_file: int = 12,
    faults: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> tuple[DaemonProcess, dict[str, list[str]]]:
    """Start a daemon, set the faults once it is up, drop a workload, wait for it."""
    daemon = new_daemon(tmp_path, request, emulator.url, **{**FAST, **sections})
    wait_ready(daemon)
    if faults is not None:
        emulator.set_faults(faults)
    work = workload(tag, files=files, per_file=per_file)
    drop_all(daemon.spool, work)
    wait_settled(daemon, work)
    return daemon, work


@pytest.mark.parametrize(
    ("case", "script"),
    [
        (
            # The create's answer is lost and the list lags: the lookup finds nothing,
            # which proves nothing. Before: a second POST, two batches for one shard.
            "lostlag",
            {
                "list_lag_s": 0.6,
                "requests": [{"endpoint": "POST /v1/batches", "kind": "lost_response", "count": 2}],
            },
        ),
        (
            # The create's answer is lost and GET /v1/batches fails for a while.
            # Before: CreateOutcomeUnknown, advance() a second later, a second POST.
            "lostlistfails",
            {
                "requests": [
                    {"endpoint": "POST /v1/batches", "kind": "lost_response", "count": 1},
                    {"endpoint": "GET /v1/batches", "kind": "server_error", "count": 6},
                ]
            },
        ),
    ],
)
def test_lost_create_is_settled_by_lookup_never_by_a_second_post(
    case: str,
    script: dict[str, Any],
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A create whose outcome is unknown leaves the shard `unknown`; a later lookup
    (every page, with backoff) finds its batch: one batch a shard, paid once."""
    emulator = start_emulator(phase_time=0.05)
    daemon, work = run(emulator, tmp_path, request, case, faults=script)
    assert daemon.stop() == 0
    check_invariants(daemon.spool, emulator, work)  # one batch a shard, paid once
    unknown = events(daemon, "shard.create_unknown")
    assert unknown, "no create was left unknown"
    found = {e["shard"] for e in events(daemon, "shard.reconciled") if e.get("found") == "batch"}
    assert {e["shard"] for e in unknown} <= found
    assert events(daemon, "shard.create_absent") == []


def test_create_proven_absent_is_posted_again(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A create dropped before it reached the API: unknown, then proven absent by a
    listing `[batch] list_lag` after it, then created again: exactly one batch."""
    emulator = start_emulator(phase_time=0.05)
    emulator.set_faults({"requests": [{"endpoint": "POST /v1/batches", "kind": "drop"}]})
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    work = workload("absent", files=1, per_file=5)
    drop_all(daemon.spool, work)
    wait_for(lambda: events(daemon, "shard.create_unknown"), 30, what="an unknown create")
    # While the create cannot succeed, the shard waits: no POST storm, no new batch.
    calls = emulator.state()["create_batch_calls"]
    emulator.set_faults({})
    wait_settled(daemon, work)
    assert daemon.stop() == 0
    assert events(daemon, "shard.create_absent")
    state = emulator.state()
    assert state["create_batch_calls"] <= calls + len(state["batches_by_metadata"])
    check_invariants(daemon.spool, emulator, work)


async def _make_duplicate(url: str, shard: str, texts: list[str]) -> str:
    async with aiohttp.ClientSession() as session:
        api = Api(session, url, TEST_KEY)
        lines = [embedding_line(f"dup-{i}", t) for i, t in enumerate(texts)]
        up = await api.upload(jsonl(lines), filename=f"embedd-{shard}.jsonl")
        reply = await api.create_batch(up.body["id"], {"embedd_shard": shard})
        assert reply.status == 200, reply.body
        return str(reply.body["id"])


def test_duplicate_batch_is_found_billed_and_cleaned_up(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A second batch naming a shard that already has one (what an older daemon could
    leave) is found by the next reconciliation, cancelled if it still runs, and what
    OpenAI billed for it gets exactly one `batch` ledger line: the ledger is the bill."""
    emulator = start_emulator(phase_time=0.05)
    daemon, _ = run(emulator, tmp_path, request, "dup", files=1, per_file=6)
    assert daemon.stop() == 0
    shard = db_rows(daemon.spool, "SELECT id FROM shards WHERE state = 'collected'")[0][0]
    stray = asyncio.run(_make_duplicate(emulator.url, shard, ["one more text", "and another"]))
    daemon.start()
    wait_ready(daemon)

    def settled() -> bool:
        return any(e.get("batch_id") == stray for e in ledger(daemon.spool))

    wait_for(settled, 30, what="the duplicate's ledger line")
    assert [e["batch"] for e in events(daemon, "batch.duplicate")] == [stray]
    state = emulator.state()
    lines = [x for x in ledger(daemon.spool) if x["kind"] in ("batch", "sync")]
    assert [x["batch_id"] for x in lines].count(stray) == 1
    assert sum(x["tokens"] for x in lines) == state["tokens_billed"]
    # Its files go too (input shared with nobody, output and error files).
    wait_for(
        lambda: emulator_list(emulator, "/files?purpose=batch_output") == [],
        30,
        what="the duplicate's output file deleted",
    )
    assert daemon.stop() == 0


def test_output_file_404_requeues_that_batch_only(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A completed batch whose output and error files answer 404 does not stop the
    daemon (before: APIPermanentError escaped poll_loop): its lines are retried in a
    new batch, every other batch goes on, and the lost batch is still in the ledger."""
    emulator = start_emulator(phase_time=0.05)
    gone = {"batches": [{"outcome": "complete", "files_gone": True, "count": 1}]}
    daemon, work = run(emulator, tmp_path, request, "gone", files=3, per_file=10, faults=gone)
    assert daemon.stop() == 0
    assert events(daemon, "batch.file_unavailable")
    lost = [x for x in ledger(daemon.spool) if x["kind"] == "batch" and x["requests"] == 0]
    assert len(lost) == 1
    assert lost[0]["tokens"] > 0
    check_invariants(daemon.spool, emulator, work, extra_billed=lost[0]["tokens"])


def test_validation_failure_fails_the_named_lines_and_requeues_the_rest(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A batch failed in `validating` with errors.data[].line: the records on those
    lines fail (their file goes to failed/ with the reason), the others are
    re-queued and embedded in a new batch; nothing is billed twice."""
    emulator = start_emulator(phase_time=0.05)
    emulator.set_faults({"batches": [{"outcome": "invalid", "invalid_line_rate": 0.2, "count": 1}]})
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    work = workload("invalid", files=1, per_file=10)
    name = next(n for n in work if n.endswith(".jsonl"))
    work = {name: work[name]}
    drop_all(daemon.spool, work)
    wait_settled(daemon, work)
    assert daemon.stop() == 0
    batches = emulator_list(emulator, "/batches")
    invalid = [b for b in batches if b["status"] == "failed"]
    assert len(invalid) == 1
    bad_lines = {e["line"] for e in invalid[0]["errors"]["data"]}
    # The file's texts left the state database when it failed (SPEC §9), so its
    # outcome is read from what it left: the error file and the ledger.
    error = json.loads((daemon.spool / "failed" / f"{name}.error.json").read_text())
    assert len(error["records"]) == len(bad_lines)
    assert all("invalid_value" in r["error"] for r in error["records"]), error
    lines = [x for x in ledger(daemon.spool) if x["kind"] == "batch"]
    # the refused batch billed nothing; the re-queued lines were billed once
    assert sum(x["requests"] for x in lines) == len(work[name]) - len(bad_lines)
    assert sum(x["tokens"] for x in lines) == emulator.state()["tokens_billed"]


def test_missing_usage_after_a_resumed_collection_gets_an_estimated_line(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A batch without `usage`, its collection killed after storing the vectors and
    resumed: one ledger line from the local count, marked `"estimated": true`, with
    every line counted (before: no line at all)."""
    emulator = start_emulator(phase_time=0.05)
    emulator.set_faults({"batches": [{"outcome": "complete", "usage_missing": True}]})
    daemon = new_daemon(tmp_path, request, emulator.url, crash_at="after_collect_vectors", **FAST)
    wait_ready(daemon)
    work = workload("nousage", files=1, per_file=8)
    drop_all(daemon.spool, work)
    wait_killed(daemon, "after_collect_vectors")
    finish_after_crash(daemon, work)
    lines = [x for x in ledger(daemon.spool) if x["kind"] == "batch"]
    assert lines
    assert all(x["estimated"] is True for x in lines)
    check_invariants(daemon.spool, emulator, work)


def test_failed_remote_deletes_are_recorded_and_retried(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Deleting the input, output and error files at OpenAI fails for a while: the
    deletes stay recorded and are retried until done (before: only logged)."""
    emulator = start_emulator(phase_time=0.05)
    script = {
        "batches": [{"outcome": "complete", "failed_line_rate": 0.2}],
        "requests": [{"endpoint": "DELETE /v1/files/{id}", "kind": "server_error", "count": 12}],
    }
    quick = {"base": "10ms", "cap": "20ms"}
    # The deletes fail by their 500s, not by the breaker they would open (its cooldowns
    # stall every other call and are tested elsewhere).
    daemon, _ = run(
        emulator, tmp_path, request, "deletes", files=1, per_file=8, faults=script,
        retry=quick, breaker={"failures": 1000},
    )  # fmt: skip
    assert events(daemon, "file.delete_failed")

    def all_gone() -> bool:
        return emulator_list(emulator, "/files") == []

    wait_for(all_gone, 60, what="every file deleted at the emulator")
    assert db_rows(daemon.spool, "SELECT COUNT(*) FROM remote_deletes") == [(0,)]
    assert daemon.stop() == 0


def test_start_up_sweeps_shard_files_and_downloads_no_shard_needs(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """What a kill left in `state/shards/` and `state/downloads/` (and `.part`
    downloads) for shards that are final or unknown is removed at the next start."""
    emulator = start_emulator(phase_time=0.05)
    daemon, _ = run(emulator, tmp_path, request, "sweep", files=1, per_file=4)
    assert daemon.stop() == 0
    shard = db_rows(daemon.spool, "SELECT id FROM shards WHERE state = 'collected'")[0][0]
    state = daemon.spool / "state"
    (state / "downloads").mkdir(exist_ok=True)
    stale = [
        state / "shards" / f"{shard}.jsonl",
        state / "shards" / "shard_0000_dead.jsonl.part",
        state / "downloads" / f"{shard}.output.jsonl",
        state / "downloads" / f"{shard}.error.jsonl.part",
    ]
    for path in stale:
        path.write_bytes(b'{"custom_id": "x"}\n')
    daemon.start()
    wait_ready(daemon)
    assert [p.name for p in stale if p.exists()] == []
    assert len(events(daemon, "state.leftover_removed")) == len(stale)
    assert daemon.stop() == 0


def test_sigterm_lets_a_sync_call_in_flight_finish_and_records_it(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """SIGTERM while a sync call is in flight (the API has done and billed it, the
    answer is on its way): the call finishes within stop_timeout, its vectors and its
    ledger line are stored, and the daemon exits 0 (before: cancelled, billed, no line)."""
    emulator = start_emulator(phase_time=0.05)
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    slow = {"endpoint": "POST /v1/embeddings", "kind": "slow", "seconds": 1.5, "count": 1}
    emulator.set_faults({"requests": [slow]})
    drop(daemon.spool, "now.jsonl", b'{"text": "needed at once"}\n', sync=True)
    wait_for(
        lambda: emulator.state()["faults_fired"] == 1, 20, what="the sync call to reach the API"
    )
    assert daemon.stop() == 0
    billed = emulator.state()["tokens_billed"]
    assert billed > 0
    lines = [x for x in ledger(daemon.spool) if x["kind"] == "sync"]
    assert [x["tokens"] for x in lines] == [billed]
    assert events(daemon, "sync.embedded")


def test_unknown_shard_survives_a_kill_and_is_settled_after_restart(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A shard left `unknown` (create answer lost, listing failing) by a daemon that is
    then killed stays unknown in the database; the next start's reconciliation
    settles it from the list: no second batch, nothing paid twice."""
    emulator = start_emulator(phase_time=0.05)
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    emulator.set_faults(
        {
            "requests": [
                {"endpoint": "POST /v1/batches", "kind": "lost_response", "count": 1},
                {"endpoint": "GET /v1/batches", "kind": "server_error"},  # always
            ]
        }
    )
    work = workload("restart", files=1, per_file=5)
    drop_all(daemon.spool, work)
    wait_for(lambda: events(daemon, "shard.create_unknown"), 30, what="an unknown create")
    daemon.kill()
    assert db_rows(daemon.spool, "SELECT state FROM shards") == [("unknown",)]
    emulator.set_faults({})
    finish_after_crash(daemon, work)
    check_invariants(daemon.spool, emulator, work)
    assert emulator.state()["create_batch_calls"] == 1


def test_reconciliation_deletes_leftover_files_of_our_batches(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Input, output and error files of our finished batches that are still at OpenAI
    with no delete recorded (what an older version or a lost row leaves) are found by
    the start-up reconciliation among files of purpose `batch` and `batch_output`, and
    deleted."""
    emulator = start_emulator(phase_time=0.05)
    script = {
        "batches": [{"outcome": "complete", "failed_line_rate": 0.3}],
        "requests": [{"endpoint": "DELETE /v1/files/{id}", "kind": "server_error"}],  # always
    }
    quick = {"base": "10ms", "cap": "20ms"}
    # The failing deletes must not open the breaker: that would stall every other call
    # for its cooldown again and again (most of this test's time) and is not the point.
    daemon, _ = run(
        emulator, tmp_path, request, "leftover", files=1, per_file=6, faults=script,
        retry=quick, breaker={"failures": 1000},
    )  # fmt: skip
    assert daemon.stop() == 0
    kinds = {f["purpose"] for f in emulator_list(emulator, "/files")}
    assert kinds == {"batch", "batch_output"}
    db = daemon.spool / "state" / "embedd.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DELETE FROM remote_deletes")
        conn.commit()
    emulator.set_faults({})
    daemon.start()
    wait_ready(daemon)
    wait_for(lambda: emulator_list(emulator, "/files") == [], 30, what="the leftovers deleted")
    assert events(daemon, "files.leftovers_found")
    assert daemon.stop() == 0


def test_collection_resumed_after_a_failed_error_file_download_counts_every_line(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The output file is stored, then the error file's download fails past its
    retries; the collection is resumed at the next poll and its ledger line still
    counts every billed line (before: `requests` only from requests still planned)."""
    emulator = start_emulator(phase_time=0.05)
    script = {
        "batches": [{"outcome": "complete", "failed_line_rate": 0.3, "count": 1}],
        "requests": [
            {
                "endpoint": "GET /v1/files/{id}/content",
                "kind": "server_error",
                "status": 502,
                "skip": 1,
                "count": 6,
            }
        ],
    }
    quick = {"base": "10ms", "cap": "20ms", "max_retries": 4}
    daemon, work = run(
        emulator, tmp_path, request, "errfile", files=1, per_file=10, faults=script, retry=quick
    )
    assert daemon.stop() == 0
    assert any("download_file" in e.get("error", "") for e in events(daemon, "poll.retry_later"))
    check_invariants(daemon.spool, emulator, work)


def test_refused_create_requeues_in_one_step_and_deletes_its_upload(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A create refused for good (400): the shard is abandoned and its requests are
    re-queued with a try counted, together; its upload is deleted (recorded, so it is
    not left at OpenAI); the work completes in a new batch."""
    emulator = start_emulator(phase_time=0.05)
    refuse = {"endpoint": "POST /v1/batches", "kind": "server_error", "status": 400, "count": 1}
    daemon, work = run(
        emulator, tmp_path, request, "refused", files=1, per_file=5, faults={"requests": [refuse]}
    )
    assert daemon.stop() == 0
    assert events(daemon, "shard.refused")
    shards = db_rows(daemon.spool, "SELECT state, file_id FROM shards ORDER BY created_at")
    assert [s for s, _ in shards] == ["abandoned", "collected"]
    deleted = {e["file_id"] for e in events(daemon, "file.deleted")}
    assert shards[0][1] in deleted
    check_invariants(daemon.spool, emulator, work)


def test_reconciliation_refused_for_good_at_start_still_reaches_ready(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """GET /v1/batches answering 400 at every start (an odd proxy, an API change): the
    start-up reconciliation is retried `max_retries` times, then deferred — shards
    that may have a batch are held `unknown` — and the daemon reaches READY and works.
    Before: the APIPermanentError left start-up, exit 1, and again after each restart."""
    emulator = start_emulator()
    emulator.set_faults(
        {"requests": [{"endpoint": "GET /v1/batches", "kind": "server_error", "status": 400}]}
    )
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    deferred = events(daemon, "reconcile.deferred")
    assert len(deferred) == 1, daemon.log_text()[-2000:]
    work = workload("refused", files=1, per_file=5)
    drop_all(daemon.spool, work)
    wait_settled(daemon, work)
    assert daemon.stop() == 0
