"""`embedd submit --wait` (SPEC §5): one line per input, exit 0 done / 1 failed / 75
timeout, on both lanes; a name is never replaced, and a second input of one name finds
its own result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embedd.emulator import embed_text
from tests.conftest import REPO, DaemonProcess, EmulatorProcess, write_config

LANES = pytest.mark.parametrize("sync", [False, True], ids=["batch", "sync"])


def submit(
    config: Path, *args: str | Path, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
    return subprocess.run(
        [sys.executable, "-m", "embedd", "submit", "--config", str(config), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
    )


def lane_args(sync: bool) -> list[str]:
    return ["--sync"] if sync else []


@LANES
def test_wait_prints_done_with_the_shape_and_exits_0(
    tmp_path: Path,
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    sync: bool,
) -> None:
    """Every input done: one `done outbox/NAME.npy (ROWS, DIMS)` line each, in the order
    given, and exit 0; the result is the input's."""
    daemon = start_daemon(start_emulator().url)
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": "x", "text": "one"}\n{"id": "y", "text": "two"}\n')
    b = tmp_path / "b.txt"
    b.write_text("three")
    result = submit(daemon.config, *lane_args(sync), "--wait", "--timeout", "60s", a, b)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "done outbox/a.jsonl.npy (2, 3072)",
        "done outbox/b.txt.npy (1, 3072)",
    ]
    rows = np.load(daemon.spool / "outbox" / "a.jsonl.npy")
    np.testing.assert_allclose(rows[1], embed_text("two", 3072), atol=1e-5)


@LANES
def test_wait_prints_the_failure_reason_and_exits_1(
    tmp_path: Path,
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    sync: bool,
) -> None:
    """One input failed: its line names the error file and the reason, the good one is
    still reported done, and the exit code is 1. --json gives the same as JSON lines."""
    daemon = start_daemon(start_emulator().url)
    good = tmp_path / "good.txt"
    good.write_text("fine text")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"broken \xff\xfe bytes")
    args = [*lane_args(sync), "--wait", "--json", good, bad]
    result = submit(daemon.config, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    done, failed = (json.loads(line) for line in result.stdout.splitlines())
    assert done["outcome"] == "done"
    assert (done["path"], done["rows"], done["dimensions"]) == ("outbox/good.txt.npy", 1, 3072)
    assert failed["outcome"] == "failed"
    assert failed["path"] == "failed/bad.txt.error.json"
    assert "UTF-8" in failed["reason"]
    error = json.loads((daemon.spool / failed["path"]).read_text())
    assert failed["reason"] == error["reason"]
    plain = submit(daemon.config, *lane_args(sync), "--wait", bad)  # the name is free again
    assert plain.returncode == 1
    [line] = plain.stdout.splitlines()
    assert line.startswith("failed failed/bad.txt~")
    assert ".error.json: " in line
    assert "UTF-8" in line


@LANES
def test_wait_without_an_outcome_exits_75_at_the_timeout(tmp_path: Path, sync: bool) -> None:
    """No daemon runs: --wait gives up after --timeout with a `timeout` line and exit 75;
    the input stays in the inbox for a daemon to come."""
    spool = tmp_path / "spool"
    config = write_config(tmp_path / "config.toml", spool, "http://127.0.0.1:9/v1")
    src = tmp_path / "a.txt"
    src.write_text("nobody is listening")
    result = submit(config, *lane_args(sync), "--wait", "--timeout", "300ms", src)
    assert result.returncode == 75, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["timeout a.txt: no outcome within 0.3s"]
    inbox = spool / "inbox" / ("sync" if sync else "")
    assert (inbox / "a.txt").read_text() == "nobody is listening"


def test_timeout_needs_wait_and_a_duration(tmp_path: Path) -> None:
    """--timeout without --wait, or with a bad duration, is a usage error (exit 2)."""
    config = write_config(tmp_path / "config.toml", tmp_path / "spool", "http://127.0.0.1:9/v1")
    src = tmp_path / "a.txt"
    src.write_text("x")
    assert submit(config, "--timeout", "5s", src).returncode == 2
    assert submit(config, "--wait", "--timeout", "soon", src).returncode == 2
    assert not (tmp_path / "spool" / "inbox" / "a.txt").exists()


def test_concurrent_submits_of_one_name_never_overwrite(tmp_path: Path) -> None:
    """Two producers submit different files under one name at once: exactly one is in
    the inbox, whole; the other is told the name is taken and exits 1; nothing is left
    in tmp/."""
    config = write_config(tmp_path / "config.toml", tmp_path / "spool", "http://127.0.0.1:9/v1")
    sources = []
    for n in range(2):
        folder = tmp_path / f"producer{n}"
        folder.mkdir()
        src = folder / "same.txt"
        src.write_bytes(bytes([65 + n]) * (4 << 20))  # 4 MiB each: the copies overlap
        sources.append(src)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "embedd", "submit", "--config", str(config), str(src)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for src in sources
    ]
    outcomes = [(p.wait(60), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 1], outcomes
    loser = next(err for code, _, err in outcomes if code == 1)
    assert "already waiting; not replaced" in loser
    winner = next(i for i, (code, _, _) in enumerate(outcomes) if code == 0)
    inbox_copy = tmp_path / "spool" / "inbox" / "same.txt"
    assert inbox_copy.read_bytes() == sources[winner].read_bytes()
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_a_second_input_of_one_name_waits_for_its_own_result(
    tmp_path: Path,
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """When outbox/NAME.npy exists from an earlier input, --wait reports the new input's
    own NAME~JOBID.npy, not the earlier result."""
    daemon = start_daemon(start_emulator().url)
    src = tmp_path / "note.txt"
    src.write_text("first version")
    assert submit(daemon.config, "--wait", src).stdout == "done outbox/note.txt.npy (1, 3072)\n"
    src.write_text("second version")
    result = submit(daemon.config, "--wait", "--json", src)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["path"].startswith("outbox/note.txt~")
    rows = np.load(daemon.spool / line["path"])
    np.testing.assert_allclose(rows[0], embed_text("second version", 3072), atol=1e-5)
