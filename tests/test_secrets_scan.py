"""The API key never lands on disk: a full run with faults, then every byte is scanned.

The daemon runs at log level debug (the most it ever writes) against two emulators in
turn: one that refuses the key (401 on every call), then one that accepts it but
answers with 5xx, 429, dropped connections, truncated downloads and failed lines. Then
the daemon's whole log and every file under the spool — manifests, error files, the
ledger, the state database with its ``-wal`` and ``-shm`` files — are read as bytes and
searched for the key.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, EmulatorProcess, drop, wait_for, write_config

FAULTS = {
    "requests": [
        {"endpoint": "GET /v1/batches", "kind": "server_error", "status": 502, "count": 2},
        {"endpoint": "POST /v1/files", "kind": "server_error", "status": 500, "count": 2},
        {"endpoint": "POST /v1/batches", "kind": "rate_limit", "count": 2, "retry_after": 0.1},
        {"endpoint": "GET /v1/batches/{id}", "kind": "drop", "count": 1},
        {"endpoint": "GET /v1/files/{id}/content", "kind": "truncate", "count": 1},
        {"endpoint": "POST /v1/embeddings", "kind": "rate_limit", "count": 2, "retry_after": 0.1},
        {"endpoint": "POST /v1/embeddings", "kind": "server_error", "status": 503, "count": 1},
    ],
    "batches": [
        # The first batch has lines refused for good (their file fails, with per-record
        # errors from the API in its error file); the next one is retried lines, then fine.
        {"outcome": "complete", "failed_line_rate": 0.5, "failed_line_status": 400, "count": 1},
        {"outcome": "complete", "failed_line_rate": 0.3, "failed_line_status": 500, "count": 1},
    ],
}


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Every file under `root` whose bytes contain `needle`."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    )


@pytest.mark.slow
def test_the_key_appears_in_no_log_result_ledger_or_database_byte(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """After a 401 burst and a run full of retried faults, the API key is nowhere: not in
    the daemon's log, the outbox, failed/, the ledger, or the SQLite files."""
    key = "sk-test-SECRETSCAN-" + secrets.token_hex(12)
    refusing = start_emulator("--api-key", "sk-test-some-other-key-entirely")
    config = {"daemon": {"log_level": "debug"}, "batch": {"max_lines": 10}}
    daemon = start_daemon(refusing.url, key=key, **config)
    for name in ("first.jsonl", "second.jsonl"):
        lines = "".join(f'{{"id": "r{i}", "text": "{name} record {i}"}}\n' for i in range(10))
        drop(daemon.spool, name, lines.encode())
    drop(daemon.spool, "now.txt", b"the synchronous lane", sync=True)

    def refused() -> bool:
        return any(e.get("event") == "api.paused" for e in daemon.events())

    wait_for(refused, 30, what="the daemon to meet the 401")
    assert daemon.stop() == 0

    faulty = start_emulator()
    faulty.set_faults(FAULTS)
    write_config(
        daemon.config, daemon.spool, faulty.url, retry={"base": "10ms", "cap": "200ms"}, **config
    )
    daemon.start()
    daemon.wait_done(["first.jsonl", "second.jsonl", "now.txt"], timeout=60)
    assert daemon.stop() == 0

    state = faulty.state()
    assert state["requests_by_endpoint"]["POST /v1/files"] >= 3, "the faults did not fire"
    errors = list((daemon.spool / "failed").glob("*.jsonl.error.json"))
    assert len(errors) == 1, "one batch file fails on the lines refused for good"
    assert b'"error"' in errors[0].read_bytes()
    assert len(list((daemon.spool / "outbox").glob("*.jsonl.npy"))) == 1
    assert (daemon.spool / "outbox" / "now.txt.npy").exists()
    assert (daemon.spool / "ledger.jsonl").stat().st_size > 0
    assert (daemon.spool / "state" / "embedd.sqlite3").stat().st_size > 0

    log = daemon.log.read_bytes()
    assert b"401" in log or b"Incorrect API key" in log  # the refusal was logged …
    for needle in (key.encode(), key.removeprefix("sk-").encode()):
        assert needle not in log  # … without the key
        assert files_holding(daemon.spool, needle) == []
