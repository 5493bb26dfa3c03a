"""Prometheus metrics (SPEC §10): `/metrics` of a real daemon after real work, the
scrape-time state gauges as a pure function, and the alert rules in the docs."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from embedd import metrics
from embedd.config import ConfigError, load_settings
from embedd.metrics_http import StateSnapshot, parse_listen, render
from tests.conftest import REPO, DaemonProcess, EmulatorProcess, drop, wait_for

# SPEC §10: family (as the parser names it: counters without `_total`) → type, labels.
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "embedd_files": ("counter", {"lane", "outcome"}),
    "embedd_records": ("counter", {"lane", "outcome"}),
    "embedd_tokens": ("counter", {"lane"}),
    "embedd_cost_usd": ("counter", {"lane"}),
    "embedd_saved_usd": ("counter", set()),
    "embedd_queue_requests": ("gauge", {"state"}),
    "embedd_batches": ("gauge", {"status"}),
    "embedd_queue_tokens_in_flight": ("gauge", set()),
    "embedd_queue_tokens_limit": ("gauge", set()),
    "embedd_api_requests": ("counter", {"op", "code"}),
    "embedd_api_request_duration_seconds": ("histogram", {"op"}),
    "embedd_breaker_open": ("gauge", set()),
    "embedd_submission_paused": ("gauge", {"reason"}),
    "embedd_oldest_pending_age_seconds": ("gauge", set()),
    "embedd_batch_turnaround_seconds": ("histogram", set()),
    "embedd_unit_failures": ("counter", {"stage"}),
    "embedd_stage_blocked": ("gauge", {"stage", "reason"}),
    "embedd_state_bytes": ("gauge", set()),
    "embedd_dedup_cache_bytes": ("gauge", set()),
}


def scrape(url: str) -> tuple[str, dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def value(family: Any, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    samples: list[Sample] = family.samples
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def metrics_url(daemon: DaemonProcess) -> str:
    def find() -> str | None:
        for event in daemon.events():
            if event.get("event") == "metrics.listening":
                return str(event["url"])
        return None

    url: str = wait_for(find, 30, what="metrics.listening in the daemon log")
    return url


@pytest.mark.slow
def test_metrics_after_real_work_have_every_family_and_moved(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """After files went through both lanes, one failed, one text deduplicated and a batch
    was collected, `/metrics` has every SPEC §10 family with its type, labels and HELP,
    and the counters moved: both file outcomes, tokens, cost, API calls, turnaround."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url, metrics={"listen": "127.0.0.1:0"})
    url = metrics_url(daemon)
    text, before = scrape(url)
    assert value(before["embedd_files"], "embedd_files_total") == 0
    drop(daemon.spool, "a.jsonl", b'{"id": "1", "text": "alpha"}\n{"id": "2", "text": "alpha"}\n')
    drop(daemon.spool, "b.txt", b"beta for the sync lane", sync=True)
    drop(daemon.spool, "bad.txt", b"not utf-8 \xff\xfe")
    daemon.wait_done(["a.jsonl", "b.txt", "bad.txt"])
    text, fams = scrape(url)

    for name, (kind, labels) in FAMILIES.items():
        assert name in fams, f"{name} missing from /metrics"
        fam = fams[name]
        assert fam.type == kind, name
        assert fam.documentation, f"{name} has no HELP"
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert re.search(r"^# HELP embedd_files_total ", text, re.MULTILINE)

    files = fams["embedd_files"]
    assert value(files, "embedd_files_total", lane="batch", outcome="done") == 1
    assert value(files, "embedd_files_total", lane="sync", outcome="done") == 1
    assert value(files, "embedd_files_total", lane="batch", outcome="failed") == 1
    records = fams["embedd_records"]
    assert value(records, "embedd_records_total", lane="batch", outcome="embedded") == 1
    assert value(records, "embedd_records_total", lane="batch", outcome="cached") == 1
    assert value(records, "embedd_records_total", lane="sync", outcome="embedded") == 1
    for lane in ("batch", "sync"):
        assert value(fams["embedd_tokens"], "embedd_tokens_total", lane=lane) > 0
        assert value(fams["embedd_cost_usd"], "embedd_cost_usd_total", lane=lane) > 0
    assert value(fams["embedd_saved_usd"], "embedd_saved_usd_total") > 0
    api = fams["embedd_api_requests"]
    for op in ("upload_file", "create_batch", "retrieve_batch", "download_file", "embeddings"):
        assert value(api, "embedd_api_requests_total", op=op, code="200") >= 1, op
    duration = fams["embedd_api_request_duration_seconds"]
    assert value(duration, "embedd_api_request_duration_seconds_count", op="create_batch") >= 1
    turnaround = fams["embedd_batch_turnaround_seconds"]
    assert value(turnaround, "embedd_batch_turnaround_seconds_count") >= 1
    assert value(fams["embedd_breaker_open"], "embedd_breaker_open") == 0
    paused = fams["embedd_submission_paused"]
    assert {s.labels["reason"] for s in paused.samples} == {"auth", "quota", "budget"}
    assert value(paused, "embedd_submission_paused") == 0
    queue = fams["embedd_queue_requests"]
    assert {s.labels["state"] for s in queue.samples} == {"pending", "planned"}
    assert value(queue, "embedd_queue_requests") == 0  # everything was delivered
    assert value(fams["embedd_queue_tokens_limit"], "embedd_queue_tokens_limit") == 3_000_000
    assert (
        value(fams["embedd_oldest_pending_age_seconds"], "embedd_oldest_pending_age_seconds") == 0
    )
    state_bytes = value(fams["embedd_state_bytes"], "embedd_state_bytes")
    db = daemon.spool / "state" / "embedd.sqlite3"
    assert state_bytes >= db.stat().st_size > 0
    # Two distinct texts are stored: 2 x 3072 float32.
    assert value(fams["embedd_dedup_cache_bytes"], "embedd_dedup_cache_bytes") >= 2 * 3072 * 4
    assert daemon.stop() == 0


def test_a_paused_submission_shows_its_reason_and_the_queue_its_age(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A key the API refuses pauses submission: `submission_paused{reason="auth"}` is 1,
    the file waits as a pending request whose age is shown, nothing is in flight."""
    emulator = start_emulator("--api-key", "sk-the-right-one")
    daemon = start_daemon(emulator.url, metrics={"listen": "127.0.0.1:0"})
    url = metrics_url(daemon)
    drop(daemon.spool, "a.txt", b"waiting for a key")

    def paused_with_work() -> dict[str, Any] | None:
        _, fams = scrape(url)
        pause = value(fams["embedd_submission_paused"], "embedd_submission_paused", reason="auth")
        pending = value(fams["embedd_queue_requests"], "embedd_queue_requests", state="pending")
        return fams if pause == 1 and pending == 1 else None

    fams = wait_for(paused_with_work, 30, what="paused (auth) with one request pending")
    assert value(fams["embedd_submission_paused"], "embedd_submission_paused", reason="quota") == 0
    age = value(fams["embedd_oldest_pending_age_seconds"], "embedd_oldest_pending_age_seconds")
    assert age > 0
    api = fams["embedd_api_requests"]
    assert value(api, "embedd_api_requests_total", code="401") >= 1
    assert daemon.stop() == 0


def test_state_gauges_render_from_a_snapshot() -> None:
    """The scrape-time gauges come from the snapshot alone, with the queue states always
    present (0 when empty) and one `batches` sample per status in flight."""
    snap = StateSnapshot(
        requests={"pending": 3, "done": 9},
        batches={"in_progress": 2, "planned": 1},
        tokens_in_flight=1200,
        tokens_limit=3_000_000,
        oldest_pending_age=42.5,
        state_bytes=4096,
        dedup_cache_bytes=2048,
    )
    fams = {f.name: f for f in text_string_to_metric_families(render(snap).decode())}
    queue = {s.labels["state"]: s.value for s in fams["embedd_queue_requests"].samples}
    assert queue == {"pending": 3, "planned": 0}
    batches = {s.labels["status"]: s.value for s in fams["embedd_batches"].samples}
    assert batches == {"in_progress": 2, "planned": 1}
    assert fams["embedd_queue_tokens_in_flight"].samples[0].value == 1200
    assert fams["embedd_oldest_pending_age_seconds"].samples[0].value == 42.5
    assert fams["embedd_state_bytes"].samples[0].value == 4096
    assert fams["embedd_dedup_cache_bytes"].samples[0].value == 2048
    assert "embedd_files" in fams  # the event-driven registry is part of every scrape


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("create_batch HTTP 401: Incorrect API key provided", "auth"),
        ("upload_file HTTP 403: project not allowed", "auth"),
        ("create_batch HTTP 429 code=insufficient_quota: You exceeded your quota", "quota"),
        ("create_batch HTTP 400 code=billing_hard_limit_reached: limit", "quota"),
    ],
)
def test_pause_reasons_are_labelled_by_what_fixes_them(message: str, kind: str) -> None:
    """A pause is `quota` when money fixes it, `auth` when the key or project does."""
    assert metrics.pause_kind(message) == kind


def test_listen_addresses(tmp_path: Path) -> None:
    """`[metrics] listen` takes HOST:PORT (IPv6 in brackets), "" for off, and refuses
    anything else naming the key."""
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    config = tmp_path / "c.toml"
    config.write_text('[metrics]\nlisten = ""\n')
    assert load_settings(config).metrics_listen is None
    config.write_text('[metrics]\nlisten = "9464"\n')
    with pytest.raises(ConfigError, match=r"\[metrics\] listen"):
        load_settings(config)


def alert_rules() -> dict[str, Any]:
    """The rules file shown in docs/operations.md (the fenced block after its marker)."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = re.search(r"<!-- alert-rules -->\s*```yaml\n(.*?)```", text, re.DOTALL)
    assert block, "docs/operations.md has no alert-rules yaml block"
    rules: dict[str, Any] = yaml.safe_load(block.group(1))
    return rules | {"_text": block.group(1)}


def test_the_documented_alert_rules_watch_breaker_pause_and_age() -> None:
    """The three alert rules in the operations guide use families /metrics serves."""
    rules = alert_rules()
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert set(alerts) == {"EmbeddBreakerOpen", "EmbeddSubmissionPaused", "EmbeddWorkWaiting"}
    assert "embedd_breaker_open" in alerts["EmbeddBreakerOpen"]["expr"]
    assert alerts["EmbeddBreakerOpen"]["for"] == "5m"
    assert "embedd_submission_paused" in alerts["EmbeddSubmissionPaused"]["expr"]
    assert "embedd_oldest_pending_age_seconds" in alerts["EmbeddWorkWaiting"]["expr"]
    for rule in alerts.values():
        used = set(re.findall(r"embedd_[a-z_]+", rule["expr"]))
        assert used <= set(FAMILIES) | {f"{n}_total" for n in FAMILIES}, used


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_documented_alert_rules(tmp_path: Path) -> None:
    """`promtool check rules` accepts the rules file of the operations guide."""
    path = tmp_path / "embedd.rules.yml"
    path.write_text(alert_rules()["_text"])
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def test_a_taken_metrics_address_is_logged_and_the_daemon_embeds_anyway(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Metrics are not worth an outage: when the address is taken, the daemon logs
    `metrics.unavailable` with the address and goes on embedding."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        daemon = start_daemon(start_emulator().url, metrics={"listen": listen})
        drop(daemon.spool, "a.txt", b"metrics or not")
        daemon.wait_done(["a.txt"])
    assert daemon.outputs() == ["a.txt.npy"]
    [event] = [e for e in daemon.events() if e.get("event") == "metrics.unavailable"]
    assert event["listen"] == listen
    assert daemon.stop() == 0
