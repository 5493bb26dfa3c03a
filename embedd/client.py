"""The producer's side in Python (SPEC §10): submit files or records, wait for vectors.

    from embedd.client import Spool, SubmissionFailed

    spool = Spool("/var/spool/embedd")
    sub = spool.submit_records([{"id": "a", "text": "hello"}], "greetings.jsonl")
    try:
        result = sub.wait(timeout=3600)
    except SubmissionFailed as exc:
        print(exc.reason, exc.records)
    else:
        print(result.ids, result.vectors.shape)

Only the spool protocol of SPEC §1 is used; nothing here reads the daemon's state.

Submitting: the bytes are written under `tmp/`, fsynced, then hard-linked into
`inbox/` (or `inbox/sync/`) under their name, and the temporary name removed (the
spool's file system must support hard links; Linux's local ones do). A link
never replaces an existing name: if the name is already waiting in the inbox,
`FileExistsError` is raised and nothing is submitted (no other name is chosen, since
the results would then carry a name the producer did not pick).

Finding one's own result: the daemon writes `outbox/NAME.npy` or, when that name is
taken by an earlier result, `outbox/NAME~JOBID.npy` (the same in `failed/`); the job
id is chosen by the daemon and is only in the manifest. So a `Submission` remembers
which results of NAME existed before it was linked into the inbox and the SHA-256
of its bytes; its result is a *new* result whose manifest (or `.error.json`) names
`NAME` as its source and carries that SHA-256. (A failure recorded before the bytes
could be hashed has no SHA-256; a new one for NAME is taken as ours.) Two
submissions of identical bytes under one name may each take the other's result;
the two are the same vectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

POLL_INTERVAL = 0.1
# Writes the submission's bytes into the open temporary file; returns their SHA-256.
_Fill = Callable[[IO[bytes]], str]
_COPY_CHUNK = 1 << 20


class SubmissionFailed(Exception):
    """The daemon could not embed the input: it is in `failed/` with this reason."""

    def __init__(self, reason: str, records: list[dict[str, Any]], error_path: Path) -> None:
        super().__init__(reason)
        self.reason = reason
        self.records = records  # per-record errors: [{"id": ..., "error": ...}]
        self.error_path = error_path


class SubmissionTimeout(TimeoutError):
    """No outcome before the deadline; the input is still being worked on."""


@dataclass(frozen=True)
class Result:
    """One input's vectors: row i of `vectors` belongs to `ids[i]`."""

    ids: list[str]
    vectors: npt.NDArray[np.float32]  # memory-mapped, read-only
    manifest: dict[str, Any]
    path: Path  # the .npy file


class Spool:
    """A spool folder, seen from a producer."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.inbox = self.root / "inbox"
        self.outbox = self.root / "outbox"
        self.failed = self.root / "failed"

    def submit_file(
        self, path: str | os.PathLike[str], sync: bool = False, name: str | None = None
    ) -> Submission:
        """Copy the file at `path` into the inbox (as `name`, default its own name)."""
        src = Path(path)
        with src.open("rb") as fh:
            return self._submit(name or src.name, sync, lambda out: _copy(fh, out))

    def submit_records(
        self, records: Iterable[Mapping[str, Any]], name: str, sync: bool = False
    ) -> Submission:
        """Submit records (`{"id", "text", ...}` dicts) as one JSON Lines input.

        `name` gets a `.jsonl` suffix if it has none, so the daemon reads it as records.
        """
        if not name.endswith(".jsonl"):
            name += ".jsonl"
        lines = b"".join(
            json.dumps(dict(r), ensure_ascii=False).encode("utf-8") + b"\n" for r in records
        )
        return self._submit(name, sync, lambda out: _write_bytes(out, lines))

    def _submit(self, name: str, sync: bool, fill: _Fill) -> Submission:
        if name in ("", ".", "..") or "/" in name or "\x00" in name:
            raise ValueError(f"not a plain file name: {name!r}")
        if name.startswith(".") or name.endswith((".tmp", ".part")):
            raise ValueError(f"{name!r} would be ignored by the daemon (., .tmp, .part)")
        target_dir = self.inbox / "sync" if sync else self.inbox
        if not target_dir.is_dir() or not self.tmp.is_dir():
            raise FileNotFoundError(
                f"{self.root} is not a spool (no tmp/ or {target_dir.name}/); "
                "start the daemon once to create it"
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = fill(out)
                out.flush()
                os.fsync(out.fileno())
            tmp.chmod(0o640)
            before = self._results_of(name)
            dest = target_dir / name
            os.link(tmp, dest)  # EEXIST rather than replace a waiting file
        except FileExistsError:
            raise FileExistsError(f"{target_dir / name} is already waiting; not replaced") from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(target_dir)
        return Submission(self, name, dest, digest, before)

    def _results_of(self, name: str) -> frozenset[str]:
        """The outbox `.npy` and failed `.error.json` files that may be results of NAME."""
        found: set[str] = set()
        for folder, suffix in ((self.outbox, ".npy"), (self.failed, ".error.json")):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(folder):
                    base = entry.name.removesuffix(suffix)
                    if base != entry.name and (base == name or base.startswith(name + "~")):
                        found.add(f"{folder.name}/{entry.name}")
        return frozenset(found)


def _copy(src: IO[bytes], out: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_COPY_CHUNK):
        digest.update(chunk)
        out.write(chunk)
    return digest.hexdigest()


def _write_bytes(out: IO[bytes], data: bytes) -> str:
    out.write(data)
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Submission:
    """One input in the spool; `wait` for its `Result`."""

    spool: Spool
    name: str
    path: Path  # where it was put in the inbox
    sha256: str
    before: frozenset[str] = field(repr=False)

    def poll(self) -> Result | None:
        """The result if it is there, None if not yet; raises `SubmissionFailed`."""
        for rel in sorted(self.spool._results_of(self.name) - self.before):
            path = self.spool.root / rel
            if rel.startswith("outbox/"):
                manifest = _read_json(path.with_suffix(".json"))
                if manifest is None or not self._ours(manifest, strict=True):
                    continue
                vectors: npt.NDArray[np.float32] = np.load(path, mmap_mode="r")
                ids = [str(r.get("id")) for r in manifest.get("records", [])]
                return Result(ids, vectors, manifest, path)
            error = _read_json(path)
            if error is not None and self._ours(error, strict=False):
                records = error.get("records") or []
                raise SubmissionFailed(str(error.get("reason", "failed")), list(records), path)
        return None

    def _ours(self, doc: Mapping[str, Any], *, strict: bool) -> bool:
        if doc.get("source") != self.name:
            return False
        digest = doc.get("sha256")
        return digest == self.sha256 or (not strict and digest is None)

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the outcome; `SubmissionTimeout` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise SubmissionTimeout(f"{self.name}: no outcome within {timeout}s")
            time.sleep(POLL_INTERVAL)

    async def wait_async(self, timeout: float | None = None) -> Result:  # noqa: ASYNC109 - SPEC §10 API
        """Like `wait`, without blocking the event loop: woken by file events
        (watchfiles), re-checking every half second in case an event was missed, and
        polling alone where file events are unavailable."""
        try:
            async with asyncio.timeout(timeout):
                return await self._watch()
        except TimeoutError:
            raise SubmissionTimeout(f"{self.name}: no outcome within {timeout}s") from None

    async def _watch(self) -> Result:
        result = self.poll()
        if result is not None:
            return result
        try:
            import watchfiles

            folders = [p for p in (self.spool.outbox, self.spool.failed) if p.is_dir()]
            if not folders:
                raise FileNotFoundError("no outbox/ or failed/ to watch yet")
            async for _changes in watchfiles.awatch(
                *folders, rust_timeout=500, yield_on_timeout=True, recursive=False
            ):
                result = self.poll()
                if result is not None:
                    return result
        except (ImportError, OSError, RuntimeError):
            pass  # no inotify (limits, unsupported file system): poll instead
        while True:
            result = self.poll()
            if result is not None:
                return result
            await asyncio.sleep(POLL_INTERVAL)
