"""The `embedd` command as a user and systemd meet it: exit codes, messages, help, submit,
status, the demo, and the spool checks made before the daemon starts.

Every test runs the real command as a subprocess (`python -m embedd`), with an
environment that has no `EMBEDD_*` or `OPENAI_*` variables unless the test sets them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_KEY, DaemonProcess, EmulatorProcess, drop, write_config

EX_USAGE, EX_CONFIG = 2, 78
SUBCOMMANDS = ["run", "demo", "submit", "status", "report", "emulator"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EMBEDD_", "OPENAI_")) and k != "CREDENTIALS_DIRECTORY"
    }
    env.update(extra)
    return env


def embedd(
    *args: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedd", *args],
        capture_output=True,
        text=True,
        env=clean_env() if env is None else env,
        cwd=cwd,
        timeout=timeout,
    )


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[spool]\nroot = "{tmp_path / "spool"}"\n' + text)
    return path


# ---- exit 78: what to fix ------------------------------------------------------------


def test_missing_key_exits_78_naming_the_variable_and_the_credential(tmp_path: Path) -> None:
    """`embedd run` without a key exits 78 (systemd does not restart) and says which
    variable to set or which credential file to provide; nothing is started."""
    config = config_file(tmp_path, "")
    result = embedd("run", "--config", str(config))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "OPENAI_API_KEY" in result.stderr
    assert "LoadCredential=openai_api_key:/etc/embedd/openai_api_key" in result.stderr
    assert "set the environment variable" in result.stderr


def test_missing_credential_file_exits_78_naming_the_file(tmp_path: Path) -> None:
    """Under systemd (CREDENTIALS_DIRECTORY set, no file in it) the message names the
    missing openai_api_key file and the variable [openai] api_key_env chose."""
    creds = tmp_path / "creds"
    creds.mkdir()
    config = config_file(tmp_path, '[openai]\napi_key_env = "ACME_OPENAI_KEY"\n')
    result = embedd("run", "--config", str(config), env=clean_env(CREDENTIALS_DIRECTORY=str(creds)))
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{creds} has no openai_api_key file" in result.stderr
    assert "ACME_OPENAI_KEY" in result.stderr


def test_credential_file_wins_and_an_empty_one_exits_78(tmp_path: Path) -> None:
    """An empty credential file is refused with exit 78 naming the file, even when the
    environment has a key (the credential is what the unit meant to use)."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "openai_api_key").write_text("\n")
    (creds / "openai_api_key").chmod(0o600)
    config = config_file(tmp_path, "")
    env = clean_env(CREDENTIALS_DIRECTORY=str(creds), OPENAI_API_KEY=TEST_KEY)
    result = embedd("run", "--config", str(config), env=env)
    assert result.returncode == EX_CONFIG, result.stderr
    assert str(creds / "openai_api_key") in result.stderr
    assert "empty" in result.stderr


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[batch]\nmax_linez = 5\n", ["max_linez", "max_lines"]),
        ('[batch]\nmax_lines = "lots"\n', ["max_lines", "lots"]),
        ('[inputs]\nlong = "squash"\n', ["long", "squash", "average", "truncate", "fail"]),
        ("[nonsense]\nx = 1\n", ["nonsense", "[batch]"]),
        ("[batch\n", ["not valid TOML"]),
    ],
    ids=["unknown-key", "bad-number", "bad-choice", "unknown-section", "bad-toml"],
)
def test_bad_config_exits_78_naming_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    """A bad config stops `embedd run` (and every command that reads it) with exit 78
    and one line that names the key, the value and what would be accepted."""
    config = config_file(tmp_path, text)
    for command in (["run"], ["status", "--json"]):
        result = embedd(*command, "--config", str(config), env=clean_env(OPENAI_API_KEY=TEST_KEY))
        assert result.returncode == EX_CONFIG, (command, result.stderr)
        assert result.stderr.startswith("embedd: configuration error: ")
        for needle in needles:
            assert needle in result.stderr, (command, needle, result.stderr)
        assert "Traceback" not in result.stderr


def test_bad_environment_override_exits_78_naming_the_variable(tmp_path: Path) -> None:
    """An EMBEDD_* variable with a bad value is named in the exit-78 message, since that
    is where the operator must look (not the config file)."""
    config = config_file(tmp_path, "")
    env = clean_env(OPENAI_API_KEY=TEST_KEY, EMBEDD_BATCH_MAX_LINES="many")
    result = embedd("run", "--config", str(config), env=env)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "EMBEDD_BATCH_MAX_LINES" in result.stderr
    assert "many" in result.stderr


def test_missing_config_file_named_on_the_command_line_exits_78(tmp_path: Path) -> None:
    """--config naming a file that does not exist is a config error, not a silent default."""
    result = embedd("status", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == EX_CONFIG
    assert "nope.toml" in result.stderr


# ---- exit 2 and --help ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["run", "--bogus"], ["submit"], ["emulator", "--port", "x"]],
    ids=["nothing", "unknown-command", "unknown-flag", "missing-file", "bad-port"],
)
def test_bad_usage_exits_2_with_usage(argv: list[str]) -> None:
    """A command line that cannot be parsed exits 2 and prints the usage."""
    result = embedd(*argv)
    assert result.returncode == EX_USAGE, result.stderr
    assert "usage: embedd" in result.stderr


def test_help_for_the_command_and_every_subcommand() -> None:
    """`embedd --help` lists every subcommand; each subcommand's --help exits 0."""
    top = embedd("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
    for name in SUBCOMMANDS:
        result = embedd(name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert f"usage: embedd {name}" in result.stdout, name


# ---- submit --------------------------------------------------------------------------

IN_MODIFY, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x8, 0x80, 0x100
EVENT_NAMES = {IN_MODIFY: "modify", IN_CLOSE_WRITE: "close_write", IN_MOVED_TO: "moved_to"}
EVENT_NAMES[IN_CREATE] = "create"


class Inotify:
    """Linux inotify on one folder, through libc: what happened to which names."""

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        assert libc.inotify_add_watch(self.fd, str(folder).encode(), mask) >= 0

    def events(self) -> list[tuple[str, str]]:
        """(event, name) pairs queued so far."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, offset = [], 0
        while offset < len(data):
            _wd, mask, _cookie, size = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16 : offset + 16 + size].rstrip(b"\0").decode()
            offset += 16 + size
            out += [(label, name) for bit, label in EVENT_NAMES.items() if mask & bit]
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("sync", [False, True], ids=["batch", "sync"])
def test_submit_renames_a_whole_file_into_the_inbox(tmp_path: Path, sync: bool) -> None:
    """`embedd submit` writes in tmp/ and hard-links the finished file into the inbox:
    the inbox only ever sees the name appear complete (a single link, never a write),
    no temp file is left, and the file has the group-readable mode."""
    config = config_file(tmp_path, "")
    inbox = tmp_path / "spool" / "inbox" / ("sync" if sync else "")
    inbox.mkdir(parents=True)
    src = tmp_path / "report.md"
    src.write_bytes(os.urandom(3 << 20))  # 3 MiB: a plain copy would be seen writing
    watch = Inotify(inbox)
    try:
        result = embedd("submit", "--config", str(config), *(["--sync"] if sync else []), str(src))
        events = [e for e in watch.events() if e[1] == "report.md"]
    finally:
        watch.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(inbox / "report.md")
    assert events == [("create", "report.md")]  # link(): created whole, never written
    assert (inbox / "report.md").read_bytes() == src.read_bytes()
    assert (inbox / "report.md").stat().st_mode & 0o777 == 0o640
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_submit_never_replaces_a_waiting_file(tmp_path: Path) -> None:
    """A name already waiting in the inbox is kept; submit says so, exits 1 and leaves
    no temp file."""
    config = config_file(tmp_path, "")
    src = tmp_path / "a.txt"
    src.write_text("new")
    assert embedd("submit", "--config", str(config), str(src)).returncode == 0
    src.write_text("newer")
    result = embedd("submit", "--config", str(config), str(src), str(tmp_path / "missing.txt"))
    assert result.returncode == 1
    assert "already waiting" in result.stderr
    assert "missing.txt is not a readable file" in result.stderr
    assert (tmp_path / "spool" / "inbox" / "a.txt").read_text() == "new"
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


# ---- status --------------------------------------------------------------------------


def test_status_json_before_any_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    """Before the daemon ever ran, `status --json` prints JSON saying there is no state
    database yet, and creates neither the spool nor a database."""
    config = config_file(tmp_path, "")
    result = embedd("status", "--json", "--config", str(config))
    data = json.loads(result.stdout)
    assert data["running"] is False
    assert "no state database" in data["error"]
    assert data["database"] == str(tmp_path / "spool" / "state" / "embedd.sqlite3")
    assert not (tmp_path / "spool").exists()


@pytest.mark.slow
def test_status_json_reads_the_database_while_the_daemon_runs(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """While the daemon runs (and holds its database open), `status --json` exits 0 with
    the daemon's pid and the file counts."""
    emulator = start_emulator()
    daemon = start_daemon(emulator.url)
    drop(daemon.spool, "one.txt", b"count me")
    daemon.wait_done(["one.txt"])
    result = embedd("status", "--json", "--config", str(daemon.config))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert daemon.proc is not None
    assert data["daemon_pid"] == daemon.proc.pid
    assert data["counts"]["files"].get("done") == 1
    assert daemon.alive()
    assert daemon.stop() == 0


# ---- demo ----------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_offline_and_prints_results_and_a_cost_report(tmp_path: Path) -> None:
    """`embedd demo` needs no key and no network (proxies pointing nowhere, no
    OPENAI_* variables), exits 0 within 60 s, and names the outbox and a cost report
    that shows the Batch API's 50.0% saving."""
    dead = "http://127.0.0.1:9"  # the discard port: nothing answers there
    env = clean_env(HTTPS_PROXY=dead, https_proxy=dead, TMPDIR=str(tmp_path))
    started = time.monotonic()
    result = embedd("demo", env=env, cwd=tmp_path, timeout=60)
    seconds = time.monotonic() - started
    print(f"embedd demo took {seconds:.1f}s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert seconds < 60
    assert "Results in " in result.stdout
    outbox = Path(result.stdout.split("Results in ", 1)[1].split(":", 1)[0])
    assert outbox.name == "outbox"
    assert str(outbox).startswith(str(tmp_path))
    assert len(list(outbox.glob("*.npy"))) == 5
    assert "Cost report" in result.stdout
    assert "50.0%" in result.stdout


# ---- spool safety at start -----------------------------------------------------------


@pytest.mark.parametrize("folder", ["spool root", "inbox", "state"])
def test_a_world_writable_spool_or_state_folder_stops_the_start(
    tmp_path: Path, folder: str
) -> None:
    """`embedd run` refuses (exit 78) a world-writable spool root, spool folder or state
    folder, naming it and the chmod that fixes it, before creating anything in it."""
    spool, state = tmp_path / "spool", tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[spool]\nroot = "{spool}"\nstate_dir = "{state}"\n')
    target = {"spool root": spool, "inbox": spool / "inbox", "state": state}[folder]
    target.mkdir(parents=True)
    target.chmod(0o777)
    result = embedd("run", "--config", str(config), env=clean_env(OPENAI_API_KEY=TEST_KEY))
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{target} is world-writable" in result.stderr
    assert f"chmod o-w {target}" in result.stderr
    if folder == "spool root":
        assert not (spool / "outbox").exists(), "created folders inside an unsafe spool"


def test_spool_folders_on_two_file_systems_stop_the_start_explaining_exdev(
    tmp_path: Path,
) -> None:
    """An outbox on another file system (here tmpfs, through a symbolic link) is refused
    with exit 78 and a message that names it and explains EXDEV."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's")
    elsewhere = shm / f"embedd-test-{os.getpid()}-{time.monotonic_ns()}"
    elsewhere.mkdir(mode=0o750)
    try:
        spool = tmp_path / "spool"
        spool.mkdir()
        (spool / "outbox").symlink_to(elsewhere)
        config = write_config(tmp_path / "config.toml", spool, "http://127.0.0.1:9/v1")
        result = embedd("run", "--config", str(config), env=clean_env(OPENAI_API_KEY=TEST_KEY))
    finally:
        elsewhere.rmdir()
    assert result.returncode == EX_CONFIG, result.stderr
    assert str(spool / "outbox") in result.stderr
    assert "same file system" in result.stderr
    assert "EXDEV" in result.stderr


# ---- a crash ends the process --------------------------------------------------------


def test_a_crash_at_start_exits_1_promptly_with_one_logged_line(tmp_path: Path) -> None:
    """A state database that is not SQLite crashes the start: the process ends with
    exit 1 (so systemd restarts it) instead of hanging on the half-open connection's
    thread, and the traceback is one JSON log line (redacted like all others)."""
    spool = tmp_path / "spool"
    (spool / "state").mkdir(parents=True)
    (spool / "state" / "embedd.sqlite3").write_bytes(b"not a database " * 1000)
    config = config_file(tmp_path, "")
    result = embedd(
        "run", "--config", str(config), env=clean_env(OPENAI_API_KEY=TEST_KEY), timeout=20
    )
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    crash = [e for e in lines if e["event"] == "daemon.crashed"]
    assert len(crash) == 1
    assert "file is not a database" in crash[0]["exception"]
