"""Each fault the API can throw, end to end: the emulator injects it, the daemon
recovers, every file completes (or fails where it must), nothing is paid twice.

The missing-custom_id case needs a fault the emulator does not make (an output
file that silently leaves a line out), so a small pass-through proxy at the
network edge removes one line from the first output file it carries.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from embedd.emulator.vectors import count_tokens
from embedd.pipeline.intake import request_key
from tests.conftest import DaemonProcess, EmulatorProcess, drop
from tests.test_crash import (
    check_invariants,
    drop_all,
    jsonl,
    new_daemon,
    wait_ready,
    wait_settled,
    workload,
)

MODEL = "text-embedding-3-large"
FAST: dict[str, dict[str, Any]] = {
    "batch": {"max_lines": 20, "flush_after": "0.2s", "poll_interval": "0.1s"},
    "retry": {"base": "50ms", "cap": "2s"},
}


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def run_workload(
    emulator: EmulatorProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    tag: str,
    base_url: str | None = None,
    **sections: dict[str, Any],
) -> tuple[DaemonProcess, dict[str, list[str]]]:
    """Start a daemon, drop a small workload, wait for every file, stop cleanly."""
    daemon = new_daemon(tmp_path, request, base_url or emulator.url, **{**FAST, **sections})
    wait_ready(daemon)
    work = workload(tag, files=3, per_file=12)
    drop_all(daemon.spool, work)
    wait_settled(daemon, work)
    assert daemon.stop() == 0
    return daemon, work


REQUEST_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("rate_limit", {"endpoint": "*", "kind": "rate_limit", "count": 3, "retry_after": 1.0}),
    ("server_error_html", {"endpoint": "*", "kind": "server_error", "status": 502, "count": 4}),
    ("dropped_connection", {"endpoint": "*", "kind": "drop", "count": 4}),
    (
        "truncated_download",
        {"endpoint": "GET /v1/files/{id}/content", "kind": "truncate", "count": 2},
    ),
    ("create_response_lost", {"endpoint": "POST /v1/batches", "kind": "lost_response", "count": 2}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "rule"), REQUEST_FAULTS, ids=[k for k, _ in REQUEST_FAULTS])
def test_request_fault_is_retried_and_every_file_completes_once(
    kind: str,
    rule: dict[str, Any],
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """429 with Retry-After, 5xx with an HTML body, a dropped connection, a truncated
    download and a batch created whose answer was lost are each retried (the last by
    finding the batch, not creating another); every file completes, nothing twice."""
    emulator = start_emulator(phase_time=0.05)
    emulator.set_faults({"requests": [rule]})
    daemon, work = run_workload(emulator, tmp_path, request, kind.replace("_", ""))
    state = emulator.state()
    assert state["faults_fired"] == rule["count"], state
    retries = events(daemon, "api.retry")
    if kind == "create_response_lost":
        # Not retried blindly: each lost answer was found by listing the batches.
        assert len(events(daemon, "api.create_batch.recovered")) == rule["count"]
    else:
        assert retries, "the fault never reached the client's retry path"
    if kind == "rate_limit":
        # Retry-After: 1 is honoured: no retry after a 429 came sooner than asked.
        throttled = [e for e in retries if "429" in e["error"]]
        assert throttled
        assert all(e["delay_s"] >= 1.0 for e in throttled), throttled
    if kind == "server_error_html":
        assert any("HTTP 502" in e["error"] for e in retries), retries
    check_invariants(daemon.spool, emulator, work)


BATCH_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("expired_partial", {"outcome": "expire", "completed_fraction": 0.5, "count": 1}),
    ("cancelled", {"outcome": "cancel", "completed_fraction": 0.3, "count": 1}),
    (
        "failed_lines_500",
        {"outcome": "complete", "failed_line_rate": 1.0, "failed_line_status": 500, "count": 1},
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "rule"), BATCH_FAULTS, ids=[k for k, _ in BATCH_FAULTS])
def test_batch_outcome_requeues_the_rest_and_every_file_completes_once(
    kind: str,
    rule: dict[str, Any],
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """An expired batch with partial output, a cancelled one, and one whose every line
    failed with a 500: what completed is kept, the rest goes out again in another
    batch, and every file completes with each text billed once."""
    emulator = start_emulator(phase_time=0.05)
    emulator.set_faults({"batches": [rule]})
    daemon, work = run_workload(emulator, tmp_path, request, kind.replace("_", ""))
    collected = events(daemon, "batch.collected")
    first = collected[0]
    if kind == "failed_lines_500":
        assert (first["completed"], first["failed"]) == (0, 0), first
        assert first["retried"] > 0, first
    else:
        assert first["status"] == {"expired_partial": "expired", "cancelled": "cancelled"}[kind]
        assert first["failed"] == 0, first
        assert first["requeued"] > 0, first
    check_invariants(daemon.spool, emulator, work)


@pytest.mark.slow
def test_line_refused_with_400_fails_its_file_with_the_records_error(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A line the API refuses with 400 fails its record for good: that file goes to
    failed/ with each record's error; a file in a later, healthy batch completes."""
    emulator = start_emulator(phase_time=0.05)
    emulator.set_faults(
        {
            "batches": [
                {
                    "outcome": "complete",
                    "failed_line_rate": 1.0,
                    "failed_line_status": 400,
                    "count": 1,
                }
            ]
        }
    )
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    bad = ["refused alpha", "refused beta"]
    drop(daemon.spool, "bad.jsonl", jsonl(bad))
    wait_settled(daemon, ["bad.jsonl"])
    good = ["accepted gamma", "accepted delta"]
    drop(daemon.spool, "good.jsonl", jsonl(good))
    wait_settled(daemon, ["good.jsonl"])
    assert daemon.stop() == 0
    error = json.loads((daemon.spool / "failed" / "bad.jsonl.error.json").read_text())
    assert [r["id"] for r in error["records"]] == ["1", "2"]
    assert all(
        "400" in r["error"] and "could not be processed" in r["error"] for r in error["records"]
    ), error
    check_invariants(
        daemon.spool, emulator, {"bad.jsonl": bad, "good.jsonl": good}, failed={"bad.jsonl"}
    )


@pytest.mark.slow
def test_token_limit_exceeded_requeues_and_the_daemon_learns_the_limit(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A batch over the organisation's enqueued-token limit fails with
    token_limit_exceeded: its work is re-queued (no file fails), the daemon logs the
    limit from the message, keeps later batches under it, and everything completes."""
    emulator = start_emulator("--enqueued-token-limit", "300", phase_time=0.05)
    daemon, work = run_workload(
        emulator,
        tmp_path,
        request,
        "tokenlimit",
        batch={"max_lines": 100, "flush_after": "0.5s", "poll_interval": "0.1s"},
    )
    learned = events(daemon, "queue_limit.learned")
    assert [e["organisation_limit"] for e in learned][:1] == [300], learned
    assert events(daemon, "batch.queue_limit")
    later = events(daemon, "shard.planned")[1:]
    assert later, "nothing was planned after the limit was learned"
    assert all(e["tokens"] <= 300 for e in later), later
    check_invariants(daemon.spool, emulator, work)


class _DropOneLineProxy(http.server.BaseHTTPRequestHandler):
    """Forwards everything to the emulator; leaves one line out of the first batch
    output file it carries (the API promising every custom_id and not keeping it)."""

    upstream = ""
    dropped: ClassVar[list[str]] = []
    lock = threading.Lock()

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")
        }
        req = urllib.request.Request(  # noqa: S310 - the loopback emulator
            self.upstream + self.path, data=body, headers=headers, method=self.command
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
                status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
        except urllib.error.HTTPError as exc:
            status, data, ctype = exc.code, exc.read(), exc.headers.get("Content-Type")
        if self.path.endswith("/content") and status == 200 and b'"status_code":200' in data:
            with self.lock:
                if not self.dropped:
                    lines = data.splitlines(keepends=True)
                    self.dropped.append(json.loads(lines[0])["custom_id"])
                    data = b"".join(lines[1:])
        self.send_response(status)
        self.send_header("Content-Type", ctype or "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def drop_line_proxy(
    start_emulator: Callable[..., EmulatorProcess],
) -> Iterator[tuple[EmulatorProcess, str, list[str]]]:
    emulator = start_emulator(phase_time=0.05)
    handler = type(
        "Proxy", (_DropOneLineProxy,), {"upstream": emulator.url.removesuffix("/v1"), "dropped": []}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield emulator, f"http://127.0.0.1:{server.server_address[1]}/v1", handler.dropped
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.slow
def test_custom_id_missing_from_both_files_is_requeued_and_completes(
    drop_line_proxy: tuple[EmulatorProcess, str, list[str]],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A custom_id absent from both the output and the error file is re-queued and
    embedded in a later batch: every file completes, that text is billed once."""
    emulator, proxy_url, dropped = drop_line_proxy
    daemon, work = run_workload(emulator, tmp_path, request, "missing", base_url=proxy_url)
    assert len(dropped) == 1
    first = events(daemon, "batch.collected")[0]
    assert first["retried"] == 1, first
    # The API billed the line it then left out; the daemon paid for it once more, and
    # only once, when it came back in a later batch.
    texts = {request_key(MODEL, 3072, t): t for ts in work.values() for t in ts}
    check_invariants(daemon.spool, emulator, work, extra_billed=count_tokens(texts[dropped[0]]))
