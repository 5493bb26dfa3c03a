"""Named crash points: kill -9 at each step that matters, restart, and prove that
nothing was lost, nothing was shown half-written and nothing was paid for twice.

`check_invariants` is the one definition of "the spool survived"; the random-kill
soak (`test_soak.py`) and the fault tests reuse it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedd.crashpoints import POINTS as CRASH_POINTS
from embedd.emulator import embed_text
from embedd.emulator.vectors import count_tokens
from tests.conftest import TEST_KEY, DaemonProcess, EmulatorProcess, drop, wait_for, write_config

DIMS = 3072
SHARD_UPLOAD_PREFIX = "embedd-shard_"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


# ---- helpers shared with the soak and fault tests -------------------------------------


def new_daemon(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    base_url: str,
    *,
    crash_at: str | None = None,
    key: str = TEST_KEY,
    tag: str = "",
    **sections: dict[str, Any],
) -> DaemonProcess:
    """A daemon subprocess like conftest's, but able to start with `EMBEDD_CRASH_AT`
    set from its very first run; killed at teardown if still alive."""
    spool = tmp_path / f"spool{tag}"
    config = write_config(tmp_path / f"config{tag}.toml", spool, base_url, **sections)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
    env["OPENAI_API_KEY"] = key
    env["PYTHONUNBUFFERED"] = "1"
    if crash_at:
        env["EMBEDD_CRASH_AT"] = crash_at
    daemon = DaemonProcess(spool, config, tmp_path / f"daemon{tag}.log", env)

    def cleanup() -> None:
        if daemon.alive():
            daemon.kill()

    request.addfinalizer(cleanup)
    return daemon.start()


def current_run_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The log events of the daemon's latest start only."""
    text = daemon.log_text().rpartition(f"--- run {daemon.runs}\n")[2]
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def wait_ready(daemon: DaemonProcess, timeout: float = 30.0) -> None:
    """Wait until the daemon's latest start logged `daemon.ready`."""

    def ready() -> bool:
        if not daemon.alive():
            pytest.fail(f"daemon exited early:\n{daemon.log_text()[-3000:]}")
        return any(e.get("event") == "daemon.ready" for e in current_run_events(daemon))

    wait_for(ready, timeout, what="daemon.ready")


def wait_killed(daemon: DaemonProcess, point: str, timeout: float = 60.0) -> None:
    """Wait for the daemon to SIGKILL itself at `point`."""
    assert daemon.proc is not None
    wait_for(
        lambda: daemon.proc is not None and daemon.proc.poll() is not None,
        timeout,
        what=f"the daemon to die at {point}",
    )
    assert daemon.proc.returncode == -signal.SIGKILL, daemon.log_text()[-3000:]
    assert f"crash point {point} reached" in daemon.log_text()


def settled_in_database(spool: Path) -> set[str]:
    """Names of inputs the state database records as done or failed."""
    db = spool / "state" / "embedd.sqlite3"
    if not db.exists():
        return set()
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute("SELECT name FROM files WHERE state IN ('done', 'failed')")
        return {str(r[0]) for r in rows}


def wait_settled(daemon: DaemonProcess, names: Iterable[str], timeout: float = 60.0) -> None:
    """Wait until every input is recorded done or failed — not merely visible in the
    outbox, so a stop right after cannot catch a delivery between its `.npy` and its
    database row. The log says so, or, for a delivery whose log line a kill -9 cut
    off after its commit, the state database does."""
    wanted = set(names)

    def settled() -> bool:
        if not daemon.alive():
            pytest.fail(
                f"daemon exited with {daemon.proc and daemon.proc.returncode}:\n"
                f"{daemon.log_text()[-3000:]}"
            )
        finished = {
            e.get("file") for e in daemon.events() if e.get("event") in ("file.done", "file.failed")
        }
        return wanted <= finished or wanted <= settled_in_database(daemon.spool)

    wait_for(settled, timeout, what=f"{sorted(wanted)} done or failed")


def jsonl(texts: Iterable[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def workload(tag: str, files: int = 4, per_file: int = 25) -> dict[str, list[str]]:
    """Input name → record texts, in order. Texts are distinct except one shared
    line in every file (the dedup path: embedded once, cached elsewhere)."""
    out: dict[str, list[str]] = {}
    for f in range(files):
        texts = [f"{tag} file {f} record {i} about topic {i % 5}" for i in range(per_file)]
        texts.append(f"{tag} the line every file shares")
        out[f"{tag}-{f}.jsonl"] = texts
    out[f"{tag}-note.txt"] = [f"{tag} a plain text note, one record"]
    return out


def drop_all(spool: Path, work: Mapping[str, list[str]]) -> None:
    for name, texts in work.items():
        data = texts[0].encode() if name.endswith(".txt") else jsonl(texts)
        drop(spool, name, data)


def _get(url: str, key: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read())


def emulator_list(emulator: EmulatorProcess, path: str, key: str = TEST_KEY) -> list[Any]:
    """Every item of a paged OpenAI list endpoint of the emulator."""
    items: list[Any] = []
    after = ""
    while True:
        sep = "&" if "?" in path else "?"
        page = _get(f"{emulator.url}{path}{sep}limit=100{after}", key)
        items.extend(page["data"])
        if not page.get("has_more") or not page["data"]:
            return items
        after = f"&after={page['data'][-1]['id']}"


def _source_of(filename: str, *suffixes: str) -> str:
    """The input name a spool entry belongs to: `a.txt~job_1.npy` → `a.txt`."""
    for suffix in suffixes:
        if filename.endswith(suffix):
            filename = filename.removesuffix(suffix)
            break
    return filename.split("~")[0]


def check_invariants(
    spool: Path,
    emulator: EmulatorProcess,
    work: Mapping[str, list[str]],
    *,
    failed: Iterable[str] = (),
    key: str = TEST_KEY,
    extra_billed: int = 0,
) -> None:
    """Everything SPEC §1/§4/§6 promise across crashes, checked against the files,
    the state database, the ledger and the emulator's own books. `failed` names the
    inputs that must end in failed/; `extra_billed` is what the API itself charged
    for work it then lost (only a fault that misbehaves at the API's side)."""
    must_fail = set(failed)
    outbox, failed_dir, done = spool / "outbox", spool / "failed", spool / "done"
    # 1. Every input in exactly one place, once; its original in done/ once.
    for name, texts in work.items():
        results = [p.name for p in outbox.iterdir() if _source_of(p.name, ".npy", ".json") == name]
        failures = [
            p.name for p in failed_dir.iterdir() if _source_of(p.name, ".error.json") == name
        ]
        kept = [p.name for p in done.iterdir() if _source_of(p.name) == name]
        if name in must_fail:
            assert results == [], (name, results)
            assert sorted(failures) == [name, f"{name}.error.json"], (name, failures)
            assert kept == [], (name, kept)
            continue
        assert sorted(results) == [f"{name}.json", f"{name}.npy"], (name, results)
        assert failures == [], (name, failures)
        assert kept == [name], (name, kept)
        # 2. No partial result: it loads, matches its manifest, holds the right vectors.
        array = np.load(outbox / f"{name}.npy")
        manifest = json.loads((outbox / f"{name}.json").read_text())
        assert array.dtype == np.float32, name
        assert array.shape == (len(texts), DIMS), name
        assert [r["tokens"] for r in manifest["records"]] == [count_tokens(t) for t in texts]
        for row, text in enumerate(texts):
            np.testing.assert_allclose(
                array[row], embed_text(text, DIMS), atol=1e-5, err_msg=f"{name} row {row}"
            )
    for folder in (outbox, failed_dir, done, spool / "inbox"):
        leftovers = [
            p.name
            for p in folder.iterdir()
            if p.name.startswith(".") or ".tmp" in p.name or p.name.endswith(".part")
        ]
        assert leftovers == [], (folder.name, leftovers)
    assert list((spool / "work").iterdir()) == []
    assert [p.name for p in (spool / "inbox").iterdir() if p.name != "sync"] == []

    # 3. No shard became two batches.
    state = emulator.state()
    assert state["batches_by_metadata"], "no batch was created at all"
    doubled = {m: n for m, n in state["batches_by_metadata"].items() if n != 1}
    assert doubled == {}, doubled

    # 4. No text embedded twice: the emulator billed each unique text once, and the
    #    ledger says exactly what the emulator billed.
    unique = {t for name, texts in work.items() if name not in must_fail for t in texts}
    expected = sum(count_tokens(t) for t in unique)
    lines = [json.loads(x) for x in (spool / "ledger.jsonl").read_text().splitlines() if x.strip()]
    usage = [x for x in lines if x["kind"] in ("batch", "sync")]
    ids = [x["batch_id"] for x in usage]
    assert len(ids) == len(set(ids)), "a ledger line was written twice"
    assert state["tokens_billed"] == expected + extra_billed, (state["tokens_billed"], expected)
    assert sum(x["tokens"] for x in usage) == state["tokens_billed"]
    if not extra_billed:
        # Every line billed is counted once, also when a collection was resumed.
        assert sum(x["requests"] for x in usage) == len(unique), usage
        assert sum(x["estimated_tokens"] for x in usage) == expected, usage

    # 5. No orphan upload: every shard upload left belongs to a batch still running.
    batches = emulator_list(emulator, "/batches", key)
    live_inputs = {b["input_file_id"] for b in batches if b["status"] not in TERMINAL}
    uploads = [
        f
        for f in emulator_list(emulator, "/files?purpose=batch", key)
        if str(f["filename"]).startswith(SHARD_UPLOAD_PREFIX)
    ]
    orphans = [f["filename"] for f in uploads if f["id"] not in live_inputs]
    assert orphans == [], orphans
    outputs = emulator_list(emulator, "/files?purpose=batch_output", key)
    assert outputs == [], [f["filename"] for f in outputs]
    # Nothing left behind in state/: shard files and downloads go with their shard.
    left = [
        f"{d}/{p.name}"
        for d in ("shards", "downloads")
        if (spool / "state" / d).is_dir()
        for p in (spool / "state" / d).iterdir()
    ]
    assert left == [], left

    # 6. The state database agrees with the files.
    db = sqlite3.connect(f"file:{spool / 'state' / 'embedd.sqlite3'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT name, state, result FROM files").fetchall()
        requests = dict(
            db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall()
        )
        shards = dict(db.execute("SELECT state, COUNT(*) FROM shards GROUP BY state").fetchall())
    finally:
        db.close()
    by_name: dict[str, list[tuple[str, str]]] = {}
    for name, st, result in rows:
        by_name.setdefault(name, []).append((st, result))
    assert set(by_name) == set(work), set(by_name) ^ set(work)
    for name, entries in by_name.items():
        assert len(entries) == 1, (name, entries)  # one job per input, never two
        st, result = entries[0]
        if name in must_fail:
            assert (st, Path(result)) == ("failed", failed_dir / name), name
        else:
            assert (st, Path(result)) == ("done", outbox / f"{name}.npy"), name
    assert (requests.get("pending", 0), requests.get("planned", 0)) == (0, 0), requests
    assert set(shards) <= {"collected", "abandoned"}, shards


def finish_after_crash(daemon: DaemonProcess, work: Mapping[str, list[str]]) -> None:
    """Restart without the crash variable, let everything finish, stop cleanly."""
    daemon.env.pop("EMBEDD_CRASH_AT", None)
    daemon.start()
    wait_ready(daemon)
    wait_settled(daemon, work)
    # A file can be delivered at start from vectors stored before the kill, while its
    # batch's collection (and ledger line) is finished after READY: wait for that too.
    wait_for(lambda: shards_final(daemon.spool), 30, what="every shard collected")
    # Files at OpenAI are deleted after collection, recorded and retried until done.
    wait_for(lambda: remote_deletes_done(daemon.spool), 30, what="every remote delete done")
    assert daemon.stop() == 0


def remote_deletes_done(spool: Path) -> bool:
    """Whether the state database has no delete at OpenAI still to do."""
    db = spool / "state" / "embedd.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM remote_deletes").fetchone()
    return int(rows[0]) == 0


def shards_final(spool: Path) -> bool:
    """Whether the state database has no shard still in flight."""
    db = spool / "state" / "embedd.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT COUNT(*) FROM shards WHERE state NOT IN ('collected', 'abandoned')"
        ).fetchone()
    return int(rows[0]) == 0


# ---- the crash points --------------------------------------------------------------

FAST: dict[str, dict[str, Any]] = {
    "batch": {"max_lines": 20, "flush_after": "0.2s", "poll_interval": "0.1s"},
}

# Every crash point but the one at start-up, which has a test of its own below.
POINTS = sorted(CRASH_POINTS - {"during_recovery"})


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_kill_at_a_crash_point_then_restart_loses_nothing_and_pays_once(
    point: str,
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A SIGKILL at this step, then a restart: every input ends once in outbox/ (its
    original in done/), no temp or half result is left, no shard became two batches,
    no text was billed twice, no upload is orphaned, and the database agrees."""
    emulator = start_emulator(phase_time=0.05)
    daemon = new_daemon(tmp_path, request, emulator.url, crash_at=point, **FAST)
    wait_ready(daemon)
    work = workload(point.replace("_", ""))
    drop_all(daemon.spool, work)
    wait_killed(daemon, point)
    finish_after_crash(daemon, work)
    check_invariants(daemon.spool, emulator, work)


@pytest.mark.slow
def test_kill_during_recovery_after_a_kill_after_create_still_pays_once(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A kill after a batch create, then a second kill half way through the start-up
    reconcile that finds it, then a clean start: still no second batch for any shard,
    no double charge, and every file delivered once."""
    emulator = start_emulator(phase_time=0.3)
    daemon = new_daemon(tmp_path, request, emulator.url, crash_at="after_batch_create:2", **FAST)
    wait_ready(daemon)
    work = workload("recovery")
    drop_all(daemon.spool, work)
    wait_killed(daemon, "after_batch_create")
    daemon.env["EMBEDD_CRASH_AT"] = "during_recovery"
    daemon.start()
    wait_killed(daemon, "during_recovery")
    finish_after_crash(daemon, work)
    check_invariants(daemon.spool, emulator, work)


@pytest.mark.slow
def test_temp_files_a_kill_left_in_outbox_and_failed_are_swept_at_start(
    start_emulator: Callable[..., EmulatorProcess],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A kill inside an atomic write leaves `.NAME.tmp-XXXXXXXX` behind (the random
    soak hit this); the next start removes such files from outbox/ and failed/ and
    leaves every other file there alone."""
    emulator = start_emulator(phase_time=0.05)
    daemon = new_daemon(tmp_path, request, emulator.url, **FAST)
    wait_ready(daemon)
    assert daemon.stop() == 0
    stale = [
        daemon.spool / "outbox" / ".a.jsonl.npy.tmp-0ed45cbf",
        daemon.spool / "failed" / ".b.txt.error.json.tmp-12ab34cd",
    ]
    for path in stale:
        path.write_bytes(b"\x93NUMPY half written")
    kept = daemon.spool / "outbox" / "c.txt.json"  # not a temp name: never touched
    kept.write_text("{}")
    daemon.start()
    wait_ready(daemon)
    assert [p for p in stale if p.exists()] == []
    assert kept.read_text() == "{}"
    assert daemon.stop() == 0
