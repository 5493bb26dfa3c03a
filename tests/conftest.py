"""Factory fixtures for process-level tests: an emulator and daemons as real subprocesses.

Each factory cleans up what it started, whatever the test did. Waiting is always
"poll a condition until a deadline", never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TEST_KEY = "sk-test-" + "k3y" * 8  # fake; the emulator accepts any sk- key


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def drop(spool: Path, name: str, data: bytes, *, sync: bool = False) -> Path:
    """Deliver a file the way producers must: write in tmp/, then rename into the inbox."""
    (spool / "tmp").mkdir(parents=True, exist_ok=True)
    inbox = spool / "inbox" / "sync" if sync else spool / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    staged = spool / "tmp" / f".{name}.staging"
    staged.write_bytes(data)
    target = inbox / name
    os.rename(staged, target)
    return target


@dataclass
class EmulatorProcess:
    """`embedd emulator` running as a subprocess on a loopback port."""

    proc: subprocess.Popen[str]
    url: str
    key: str = TEST_KEY  # the control endpoints need the key like every other

    def _admin(self, path: str, body: dict[str, Any] | None = None) -> Any:
        base = self.url.removesuffix("/v1")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - loopback URL we started
            base + path,
            data=data,
            # Both ways of sending the key: the emulator reads the one it was told to.
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.key}",
                "api-key": self.key,
            },
            method="GET" if body is None else "POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return json.loads(resp.read())

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("/_emulator/state")
        return result

    def billed(self) -> dict[str, int]:
        """custom_id → how many times a batch billed that line."""
        result: dict[str, int] = self._admin("/_emulator/billed")
        return result

    def set_faults(self, script: dict[str, Any]) -> None:
        self._admin("/_emulator/faults", script)


@pytest.fixture
def start_emulator(tmp_path: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    """Factory: start `embedd emulator` with extra CLI arguments; stopped at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, phase_time: float = 0.05) -> EmulatorProcess:
        data_dir = tmp_path / f"emulator-{len(started)}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedd",
                "emulator",
                "--port",
                "0",
                "--phase-time",
                str(phase_time),
                "--data-dir",
                str(data_dir),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, f"emulator did not start: {line!r}"
        key = args[args.index("--api-key") + 1] if "--api-key" in args else TEST_KEY
        return EmulatorProcess(proc, line.strip().split()[-1], key)

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass
class DaemonProcess:
    """`embedd run` as a subprocess, its log in a file."""

    spool: Path
    config: Path
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    extra: list[str] = field(default_factory=list)

    def start(self) -> DaemonProcess:
        self.runs += 1
        with self.log.open("ab") as log:
            log.write(f"--- run {self.runs}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "embedd", "run", "--config", str(self.config), *self.extra],
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=REPO,
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def outputs(self) -> list[str]:
        return sorted(p.name for p in (self.spool / "outbox").glob("*.npy"))

    def wait_done(self, names: list[str], timeout: float = 60.0) -> None:
        """Wait until every input name has a result or a failure, recorded as such."""

        def finished() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(
                    f"daemon exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            out = {p.name for p in (self.spool / "outbox").glob("*.npy")}
            failed = {p.name for p in (self.spool / "failed").glob("*.error.json")}
            if not all(f"{n}.npy" in out or f"{n}.error.json" in failed for n in names):
                return False
            # The files are visible just before the daemon records them (and logs that):
            # wait for the record too, so what follows the delivery has happened.
            settled = {
                e.get("file")
                for e in self.events()
                if e.get("event") in ("file.done", "file.failed")
            }
            return all(n in settled for n in names)

        wait_for(finished, timeout, what=f"results for {names}")


def write_config(path: Path, spool: Path, base_url: str, **sections: dict[str, Any]) -> Path:
    """A config file for tests: fast polling and flushing, plus `sections` overrides."""
    merged: dict[str, dict[str, Any]] = {
        "spool": {"root": str(spool), "scan_interval": "1s"},
        "openai": {"base_url": base_url},
        "batch": {"flush_after": "0.2s", "poll_interval": "0.1s", "list_lag": "0.5s"},
        "retry": {"base": "50ms", "cap": "1s"},
        "breaker": {"cooldown": "1s"},
        "daemon": {"log_level": "info"},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    lines = []
    for name, values in merged.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: a daemon on a fresh spool under tmp_path; killed at teardown if alive."""
    daemons: list[DaemonProcess] = []

    def start(
        base_url: str,
        *,
        key: str = TEST_KEY,
        env: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ) -> DaemonProcess:
        spool = tmp_path / f"spool{len(daemons) or ''}"
        config = write_config(tmp_path / f"config{len(daemons)}.toml", spool, base_url, **sections)
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
        environ["OPENAI_API_KEY"] = key
        environ["PYTHONUNBUFFERED"] = "1"
        environ.update(env or {})
        daemon = DaemonProcess(spool, config, tmp_path / f"daemon{len(daemons)}.log", environ)
        daemons.append(daemon)
        return daemon.start()

    yield start
    for d in daemons:
        if d.alive():
            d.kill()
