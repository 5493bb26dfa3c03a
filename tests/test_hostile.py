"""SPEC §8 at process level: hostile inputs, injected faults in each stage's unit
guard, a unit that kills the daemon, and full disks — the daemon stays up, and every
input ends in exactly one place (outbox/ or failed/).

The faults are injected with `EMBEDD_FAULT_AT` (embedd.crashpoints): an unexpected
exception inside a stage's unit guard, `ENOSPC` at the outbox or the ledger, `EACCES`
opening an input without read permission (so a daemon running as root is refused as
any other user would be), the file watcher failing inside an ExceptionGroup.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TEST_KEY, DaemonProcess, EmulatorProcess, drop, wait_for, write_config
from tests.test_crash import jsonl, wait_killed, wait_ready

FAST: dict[str, dict[str, Any]] = {
    "batch": {"max_lines": 50, "flush_after": "0.2s", "poll_interval": "0.1s"},
    "retry": {"base": "50ms", "cap": "300ms", "max_retries": 1},
}


def daemon_with(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    base_url: str,
    env: dict[str, str] | None = None,
    *,
    spool_dir: Path | None = None,
    state_dir: Path | None = None,
    **sections: dict[str, Any],
) -> DaemonProcess:
    """A daemon subprocess with test hooks in its environment from its first start."""
    spool = spool_dir or tmp_path / "spool"
    config = write_config(tmp_path / "config.toml", spool, base_url, **{**FAST, **sections})
    if state_dir is not None:
        text = config.read_text().replace(
            "[spool]\n", f"[spool]\nstate_dir = {json.dumps(str(state_dir))}\n"
        )
        config.write_text(text)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
    environ.update({"OPENAI_API_KEY": TEST_KEY, "PYTHONUNBUFFERED": "1", **(env or {})})
    daemon = DaemonProcess(spool, config, tmp_path / "daemon.log", environ)

    def cleanup() -> None:
        if daemon.alive():
            daemon.kill()

    request.addfinalizer(cleanup)
    return daemon.start()


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in daemon.events() if e.get("event") == name]


def failure_of(spool: Path, source: str) -> dict[str, Any] | None:
    """The error file in failed/ whose `source` is this input name (any stored name)."""
    for path in (spool / "failed").glob("*.error.json"):
        doc = json.loads(path.read_bytes())
        if doc.get("source") == source:
            return dict(doc)
    return None


def place_of(spool: Path, name: str) -> list[str]:
    """Where an input ended: its result in outbox/, its failure in failed/ (both listed)."""
    places = []
    if (spool / "outbox" / f"{name}.npy").exists():
        places.append("outbox")
    if failure_of(spool, name) is not None:
        places.append("failed")
    return places


def wait_placed(daemon: DaemonProcess, names: list[str], timeout: float = 60.0) -> None:
    def placed() -> bool:
        if not daemon.alive():
            pytest.fail(f"daemon exited:\n{daemon.log_text()[-3000:]}")
        return all(place_of(daemon.spool, n) for n in names)

    wait_for(placed, timeout, what=f"{names} in outbox/ or failed/")


def assert_delivered(spool: Path, name: str, rows: int) -> None:
    vectors = np.load(spool / "outbox" / f"{name}.npy")
    assert vectors.shape == (rows, 3072)
    assert not (spool / "failed" / f"{name}.error.json").exists()


def drop_bytes_name(spool: Path, name: bytes | str, data: bytes) -> None:
    """Drop a file via tmp/ and rename, staged under a short name: its own may be too
    long for a staging suffix, or raw bytes that are not valid UTF-8."""
    staged = spool / "tmp" / ".staging"
    staged.write_bytes(data)
    staged.rename(
        spool / "inbox" / (os.fsdecode(name) if isinstance(name, bytes) else name)
    )  # surrogate escapes: the raw bytes


# Hostile inputs, by name: (file name or bytes, content)
BAD_UTF8_NAME = b"bad\xffname.txt"
LONG_NAME = "L" * 246 + ".txt"  # 250 bytes: NAME.error.json cannot exist
SURROGATE = "surrogate.jsonl"
DEEP = "deep.jsonl"
UNREADABLE = "unreadable.txt"


def surrogate_lines() -> bytes:
    return b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "bad \\ud800 here"}\n'


def deep_lines(depth: int = 5000) -> bytes:
    return b'{"text": "deep", "extra": ' + b"[" * depth + b"]" * depth + b"}\n"


def drop_unreadable(spool: Path) -> None:
    path = drop(spool, UNREADABLE, b"you cannot read me")
    path.chmod(0)


# The hook makes a daemon that runs as root refuse unreadable files as any other user would.
AS_OTHER_USER = {"EMBEDD_FAULT_AT": "open_input:99"} if os.geteuid() == 0 else {}


# ---- one hostile input at a time ----------------------------------------------------


def test_a_name_that_is_not_utf8_goes_to_failed_and_the_daemon_stays_up(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A file named b"bad\\xffname.txt" is refused into failed/ under its own name, with
    a reason; the daemon stays up and goes on with other files."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url)
    wait_ready(daemon)
    drop_bytes_name(daemon.spool, BAD_UTF8_NAME, b"some text")
    drop(daemon.spool, "good.txt", b"a good file")
    source = os.fsdecode(BAD_UTF8_NAME)
    wait_placed(daemon, [source, "good.txt"])
    assert BAD_UTF8_NAME in {os.fsencode(p.name) for p in (daemon.spool / "failed").iterdir()}
    doc = failure_of(daemon.spool, source)
    assert doc is not None
    assert "not valid UTF-8" in doc["reason"]
    assert_delivered(daemon.spool, "good.txt", 1)
    assert daemon.alive()
    assert daemon.stop() == 0


def test_a_name_too_long_for_its_error_file_is_failed_under_a_shorter_name(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A 250-byte name leaves no room for `.error.json`: the input goes to failed/
    under a shortened name, and its error file keeps the original name."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url)
    wait_ready(daemon)
    drop_bytes_name(daemon.spool, LONG_NAME, b"text with a long name")
    wait_placed(daemon, [LONG_NAME])
    doc = failure_of(daemon.spool, LONG_NAME)
    assert doc is not None
    assert "longer than" in doc["reason"]

    def stored_inputs() -> list[str]:
        # The error file is written first, then the input is moved beside it.
        return [
            p.name
            for p in (daemon.spool / "failed").iterdir()
            if (p.suffix == ".txt" or "…" in p.name) and not p.name.endswith(".error.json")
        ]

    wait_for(lambda: bool(stored_inputs()), 30, what="the input moved to failed/")
    stored = stored_inputs()
    assert len(stored) == 1
    assert len(stored[0].encode()) < 200
    assert (daemon.spool / "failed" / stored[0]).read_bytes() == b"text with a long name"
    assert not (daemon.spool / "inbox" / LONG_NAME).exists()
    assert daemon.alive()
    assert daemon.stop() == 0


@pytest.mark.parametrize("how", ["hook", "real"])
def test_an_input_the_daemon_cannot_read_goes_to_failed(
    how: str, start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A producer's umask 077 leaves a file the daemon cannot open: failed/ with a
    reason, not a crash loop. As root (who reads anything) the open is refused by the
    test hook exactly where a real EACCES would arise."""
    if how == "real" and os.geteuid() == 0:
        pytest.skip("root reads any file; the hook variant covers this")
    emulator: EmulatorProcess = start_emulator()
    env = AS_OTHER_USER if how == "hook" else {}
    daemon = daemon_with(tmp_path, request, emulator.url, env)
    wait_ready(daemon)
    drop_unreadable(daemon.spool)
    drop(daemon.spool, "good.txt", b"a good file")
    wait_placed(daemon, [UNREADABLE, "good.txt"])
    doc = failure_of(daemon.spool, UNREADABLE)
    assert doc is not None
    assert "permission denied" in doc["reason"]
    assert (daemon.spool / "failed" / UNREADABLE).exists()
    assert_delivered(daemon.spool, "good.txt", 1)
    assert daemon.stop() == 0


def test_lone_surrogates_and_deep_nesting_fail_their_file_only(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """JSON with a lone surrogate escape, and a record nested 5,000 levels deep: however
    the parser takes them, each file ends in failed/ and the daemon stays up."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url)
    wait_ready(daemon)
    drop(daemon.spool, SURROGATE, surrogate_lines())
    drop(daemon.spool, DEEP, deep_lines())
    drop(daemon.spool, "good.jsonl", jsonl(["one", "two"]))
    wait_placed(daemon, [SURROGATE, DEEP, "good.jsonl"])
    assert place_of(daemon.spool, SURROGATE) == ["failed"]
    assert place_of(daemon.spool, DEEP) == ["failed"]
    assert_delivered(daemon.spool, "good.jsonl", 2)
    assert daemon.alive()
    assert daemon.stop() == 0


def test_the_watcher_failing_inside_an_exception_group_falls_back_to_scanning(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """watchfiles' error (the inotify limit) arriving wrapped in an ExceptionGroup does
    not stop the daemon: the periodic scan still finds new files."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": "watch"})
    wait_ready(daemon)
    wait_for(lambda: events(daemon, "watch.unavailable"), 20, what="watch.unavailable")
    drop(daemon.spool, "after.txt", b"found by the scan")
    wait_placed(daemon, ["after.txt"])
    assert_delivered(daemon.spool, "after.txt", 1)
    assert daemon.stop() == 0


# ---- chaos: an unexpected exception inside each stage's unit guard --------------------

STAGES = ["intake", "submit", "collect", "deliver", "sync"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_once_in_a_stage_is_retried_and_the_unit_succeeds(
    stage: str, start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """One unexpected exception in the unit: logged with its traceback, counted,
    retried after a backoff; the file is delivered and the daemon never stopped."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": stage})
    wait_ready(daemon)
    drop(daemon.spool, "chaos.jsonl", jsonl(["x", "y", "z"]), sync=stage == "sync")
    wait_placed(daemon, ["chaos.jsonl"])
    assert_delivered(daemon.spool, "chaos.jsonl", 3)
    retries = [e for e in events(daemon, "unit.retry") if e.get("stage") == stage]
    assert len(retries) == 1
    assert "InjectedFault" in retries[0]["error"]
    assert "Traceback" in retries[0]["traceback"]
    assert daemon.alive()
    assert daemon.stop() == 0


@pytest.mark.parametrize("stage", STAGES)
def test_a_fault_every_time_fails_the_unit_after_max_retries(
    stage: str, start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A unit that always raises is tried 1 + max_retries times, then its input goes to
    failed/ with "internal error: ..."; the daemon stays up for the next file."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": f"{stage}:2"})
    wait_ready(daemon)
    drop(daemon.spool, "poison.jsonl", jsonl(["p", "q"]), sync=stage == "sync")
    wait_placed(daemon, ["poison.jsonl"])
    doc = failure_of(daemon.spool, "poison.jsonl")
    assert doc is not None
    assert "internal error: InjectedFault" in json.dumps(doc)
    assert place_of(daemon.spool, "poison.jsonl") == ["failed"]
    assert len([e for e in events(daemon, "unit.failed") if e.get("stage") == stage]) == 1
    # The fault is used up: the stage serves the next unit.
    drop(daemon.spool, "next.jsonl", jsonl(["n"]), sync=stage == "sync")
    wait_placed(daemon, ["next.jsonl"])
    assert_delivered(daemon.spool, "next.jsonl", 1)
    assert daemon.stop() == 0


# ---- poison never twice ---------------------------------------------------------------


def test_a_file_that_kills_the_daemon_is_quarantined_after_max_retries_restarts(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A kill -9 inside the unit every time (a C-extension crash, the OOM killer): the
    try is recorded before the unit runs, so after 1 + max_retries deaths the next
    start sets the file aside into failed/ and reaches READY."""
    emulator: EmulatorProcess = start_emulator()
    crash = {"EMBEDD_CRASH_AT": "during_parse"}
    daemon = daemon_with(tmp_path, request, emulator.url, crash)
    wait_ready(daemon)
    drop(daemon.spool, "poison.txt", b"this text kills the parser")
    wait_killed(daemon, "during_parse")
    daemon.start()  # the claim is resumed before READY: killed again
    wait_killed(daemon, "during_parse")
    daemon.start()
    wait_ready(daemon)
    wait_placed(daemon, ["poison.txt"])
    doc = failure_of(daemon.spool, "poison.txt")
    assert doc is not None
    assert "crashed the daemon 2 times" in doc["reason"]
    assert (daemon.spool / "failed" / "poison.txt").read_bytes() == b"this text kills the parser"
    assert not list((daemon.spool / "work").iterdir())
    assert daemon.stop() == 0


# ---- full disk ------------------------------------------------------------------------


def blocked_fact(spool: Path) -> Any:
    db = spool / "state" / "embedd.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        row = conn.execute("SELECT value FROM daemon WHERE key = 'blocked'").fetchone()
    return json.loads(row[0]) if row else None


def test_enospc_on_the_outbox_holds_delivery_then_finishes_by_itself(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """ENOSPC writing the result: the deliver stage is held (logged once, shown as a
    daemon fact), retried with backoff, and delivers by itself once writes succeed."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": "outbox_enospc:3"})
    wait_ready(daemon)
    drop(daemon.spool, "big.jsonl", jsonl(["a", "b"]))
    wait_placed(daemon, ["big.jsonl"])
    assert_delivered(daemon.spool, "big.jsonl", 2)
    blocked = events(daemon, "stage.blocked")
    assert [(e["stage"], e["reason"]) for e in blocked] == [("deliver", "disk full")]
    # The hold ends once the delivery has succeeded: its log line follows the .npy.
    wait_for(lambda: events(daemon, "stage.unblocked"), 30, what="stage.unblocked")
    assert [e["stage"] for e in events(daemon, "stage.unblocked")] == ["deliver"]
    assert not events(daemon, "unit.failed")
    assert blocked_fact(daemon.spool) is None
    assert daemon.stop() == 0


def test_enospc_at_start_up_recovery_does_not_stop_the_daemon(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A delivery pending at start meets a full disk during recovery: the daemon still
    reaches READY, shows the hold, and delivers once writes succeed."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": "outbox_enospc:99"})
    wait_ready(daemon)
    drop(daemon.spool, "held.jsonl", jsonl(["h"]))
    wait_for(lambda: blocked_fact(daemon.spool), 30, what="the deliver stage held")
    assert blocked_fact(daemon.spool)["deliver"]["reason"] == "disk full"
    status = subprocess.run(
        [sys.executable, "-m", "embedd", "status", "--config", str(daemon.config)],
        capture_output=True,
        text=True,
        env=daemon.env,
        timeout=30,
    )
    assert "BLOCKED:  deliver stage held: disk full" in status.stdout
    assert daemon.stop() == 0
    daemon.env["EMBEDD_FAULT_AT"] = "outbox_enospc:1"  # the recovery's try fails too
    daemon.start()
    wait_ready(daemon)
    wait_placed(daemon, ["held.jsonl"])
    assert_delivered(daemon.spool, "held.jsonl", 1)
    assert daemon.stop() == 0


def test_enospc_on_the_ledger_holds_only_the_ledger_and_loses_no_line(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The ledger cannot be appended to: the line waits in the database, the ledger
    stage is held and retried, the batch's line is written once room is back."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": "ledger_enospc:2"})
    wait_ready(daemon)
    drop(daemon.spool, "billed.jsonl", jsonl(["one", "two"]))
    wait_placed(daemon, ["billed.jsonl"])
    ledger = daemon.spool / "ledger.jsonl"

    def billed() -> list[dict[str, Any]]:
        if not ledger.exists():
            return []
        return [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]

    lines = wait_for(billed, 30, what="the ledger line")
    assert len([x for x in lines if x.get("tokens")]) == 1
    assert [e["stage"] for e in events(daemon, "stage.blocked")] == ["ledger"]
    wait_for(lambda: events(daemon, "stage.unblocked"), 30, what="stage.unblocked")
    assert daemon.alive()
    assert daemon.stop() == 0


def test_a_full_state_database_holds_intake_then_finishes_by_itself(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SQLite's "database or disk is full" while queueing a file: the intake stage is
    held, the claim is not counted against the file, and it is queued and delivered
    once the database takes writes again."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, {"EMBEDD_FAULT_AT": "state_full:3"})
    wait_ready(daemon)
    drop(daemon.spool, "queued.jsonl", jsonl(["q1", "q2"]))
    wait_placed(daemon, ["queued.jsonl"])
    assert_delivered(daemon.spool, "queued.jsonl", 2)
    assert [(e["stage"], e["reason"]) for e in events(daemon, "stage.blocked")] == [
        ("intake", "disk full")
    ]
    wait_for(lambda: events(daemon, "stage.unblocked"), 30, what="stage.unblocked")
    assert [e["stage"] for e in events(daemon, "stage.unblocked")] == ["intake"]
    assert not events(daemon, "unit.failed")
    assert daemon.stop() == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs for the spool (root only; skipped where mount is refused)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_file_system_holds_delivery_until_room_comes_back(
    small_fs: Path, start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On a real full file system: the result cannot be written, the stage holds, no
    half result is left; after space is freed the result appears with no restart."""
    emulator: EmulatorProcess = start_emulator()
    spool = small_fs / "spool"
    daemon = daemon_with(
        tmp_path,
        request,
        emulator.url,
        spool_dir=spool,
        state_dir=tmp_path / "state",
    )
    wait_ready(daemon)
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 96 * 1024))  # room for inputs, not a result
    drop(spool, "forty.jsonl", jsonl([f"row {i}" for i in range(40)]))  # a 480 KiB result
    wait_for(lambda: events(daemon, "stage.blocked"), 60, what="stage.blocked")
    assert not (spool / "outbox" / "forty.jsonl.npy").exists()
    filler.unlink()
    wait_placed(daemon, ["forty.jsonl"])
    assert_delivered(spool, "forty.jsonl", 40)
    assert not [p for p in (spool / "outbox").iterdir() if ".tmp-" in p.name]
    wait_for(lambda: events(daemon, "stage.unblocked"), 30, what="stage.unblocked")
    assert daemon.stop() == 0


# ---- everything at once ---------------------------------------------------------------


def test_all_hostile_inputs_together_leave_every_input_in_exactly_one_place(
    start_emulator: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Every hostile case dropped in one run, among good files: the daemon stays up,
    each input ends in exactly one of outbox/ and failed/, and the good ones succeed."""
    emulator: EmulatorProcess = start_emulator()
    daemon = daemon_with(tmp_path, request, emulator.url, AS_OTHER_USER)
    wait_ready(daemon)
    spool = daemon.spool
    drop_bytes_name(spool, BAD_UTF8_NAME, b"bad name")
    drop_bytes_name(spool, LONG_NAME, b"long name")
    drop(spool, SURROGATE, surrogate_lines())
    drop(spool, DEEP, deep_lines())
    drop_unreadable(spool)
    drop(spool, "good-1.jsonl", jsonl(["g1", "g2"]))
    drop(spool, "good-2.txt", b"good two")
    drop(spool, "good-3.jsonl", jsonl(["g3"]), sync=True)
    hostile = [os.fsdecode(BAD_UTF8_NAME), LONG_NAME, SURROGATE, DEEP, UNREADABLE]
    good = ["good-1.jsonl", "good-2.txt", "good-3.jsonl"]
    wait_placed(daemon, hostile + good)
    for name in hostile:
        assert place_of(spool, name) == ["failed"], name
    for name in good:
        assert place_of(spool, name) == ["outbox"], name
    assert not list((spool / "work").iterdir())
    assert [p.name for p in (spool / "inbox").iterdir()] == ["sync"]
    assert daemon.alive()
    assert daemon.stop() == 0
