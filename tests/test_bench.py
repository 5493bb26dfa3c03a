"""The benchmark suite keeps working: its small size runs end to end and reports every figure.

No timing is asserted here (absolute times on a shared machine are noise); the
figures' presence and the benchmarks' own correctness checks are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

FIGURES: dict[str, list[str]] = {
    "collect": [
        "lines", "dimensions", "npy_mb", "base64_file_mb", "float_file_mb", "embedd_s",
        "baseline_s", "speedup", "embedd_mb_s", "baseline_mb_s", "embedd_rows_s",
        "baseline_rows_s", "embedd_peak_rss_mb", "baseline_peak_rss_mb", "idle_rss_mb",
        "embedd_rss_over_npy", "baseline_rss_over_npy",
    ],
    "intake": [
        "documents", "text_mb", "tokens", "floor_s", "queued_s", "planned_s", "uploaded_s",
        "overhead_planned", "overhead_uploaded", "daemon_peak_rss_mb",
    ],
    "e2e": ["size_ratio", "time_ratio", "rss_ratio"],
    "sync": ["tpm", "window_s", "request_tokens", "demand_over_limit"],
    "retention": ["documents", "dimensions", "cap_mb", "state_mb_last", "state_growth",
                  "rss_growth", "vectors_over_cap"],
    "claim": ["file_mb", "records", "dimensions", "seconds", "idle_rss_mb", "daemon_peak_rss_mb",
              "bound_mb"],
}  # fmt: skip
RETENTION_SAMPLE = ["records", "state_mb", "vectors_mb", "db_mb", "rss_mb", "peak_rss_mb"]
E2E_RUN = ["documents", "rows_delivered", "batches", "seconds", "docs_per_s",
           "daemon_peak_rss_mb", "emulator_peak_rss_mb"]  # fmt: skip
SYNC_SIDE = ["measured_s", "tokens_accepted", "tokens_per_min", "fraction_of_limit",
             "http_429_after_warmup", "http_429_total"]  # fmt: skip
TARGETS = {
    "collect": {"speedup_20x", "rss_under_1.5x_npy"},
    "intake": {"planned_within_1.5x_floor", "uploaded_within_1.5x_floor"},
    "e2e": {"first_under_60s"},
    "sync": {"at_least_95pct", "no_429_after_warmup"},
    "retention": {"vectors_within_cap", "state_flat_within_1.1x", "rss_flat_within_1.15x"},
    "claim": {"peak_rss_under_512mb"},
}


def _numbers(figures: dict[str, Any], keys: list[str], where: str) -> None:
    for key in keys:
        value = figures.get(key)
        assert isinstance(value, int | float), (where, key, value)
        assert not isinstance(value, bool), (where, key, value)
        assert math.isfinite(value), (where, key, value)
        assert value >= 0, (where, key, value)


@pytest.mark.slow
@pytest.mark.timeout(220)
def test_small_suite_reports_every_figure(tmp_path: Path) -> None:
    """`python -m embedd.bench --size small` runs all six benchmarks in a subprocess,
    exits 0, prints the table and writes JSON holding every figure and target verdict,
    with each benchmark's own correctness checks passing."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embedd.bench", "--size", "small", "--json", str(out),
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=210, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["size"] == "small"
    benches = report["benchmarks"]
    assert set(benches) == set(FIGURES)
    for name, keys in FIGURES.items():
        _numbers(benches[name], keys, name)
        assert set(benches[name]["targets"]) == TARGETS[name], name
        assert all(isinstance(v, bool) for v in benches[name]["targets"].values())
    assert benches["collect"]["same_vectors"] is True  # both sides decoded the same vectors
    assert benches["intake"]["tokens"] > 0
    for run in benches["e2e"]["runs"]:
        _numbers(run, E2E_RUN, "e2e run")
        assert run["rows_delivered"] == run["documents"]
    for side in ("embedd", "baseline"):
        _numbers(benches["sync"][side], SYNC_SIDE, f"sync {side}")
        assert benches["sync"][side]["tokens_accepted"] > 0
    retention = benches["retention"]
    assert len(retention["samples"]) == 6
    for sample in retention["samples"]:
        _numbers(sample, RETENTION_SAMPLE, "retention sample")
    assert retention["targets"]["vectors_within_cap"] is True  # the cap holds at any size
    assert benches["claim"]["records"] > 0  # both inputs were queued, none refused
    for name in FIGURES:
        assert name in proc.stdout  # the table names every benchmark
