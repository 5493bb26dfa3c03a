"""Refusing a claimed input: `failed/NAME` and its `.error.json`, and the file `failed`.

Beside the outbox: results go to `outbox/` (embedd.files.outbox.write_result), refusals to
`failed/` through here. Used by intake (an input that cannot be read or parsed) and
delivery (an input whose records failed, or whose delivery was given up).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

from embedd import metrics
from embedd.errors import InputRejected
from embedd.files.outbox import write_failure
from embedd.files.spool import SpoolPaths
from embedd.state.store import Store, db_text

MAX_NAME_BYTES = 200


async def refuse(
    store: Store,
    paths: SpoolPaths,
    log: Any,
    job: str,
    name: str,
    work: Path,
    exc: InputRejected,
    sha256: str | None,
) -> None:
    """Move the input `work` of `job` (originally `name`) to failed/ with the reason
    and the failed records of `exc`; the file becomes `failed`."""
    error: dict[str, Any] = {
        "source": name,
        "sha256": sha256,
        "job": job,
        "reason": exc.message,
        "records": exc.records,
    }
    stored = failed_name(name)
    target = await asyncio.to_thread(write_failure, paths, work, stored, job, error)
    await store.move_file(job, "failed", reason=db_text(exc.message), result=db_text(str(target)))
    log.warning("file.failed", file=name, job=job, reason=exc.message)
    metrics.file_finished(await _lane_of(store, job), "failed", {"failed": len(exc.records)})


async def _lane_of(store: Store, job: str) -> str:
    row = await store.file(job)
    return str(row["lane"]) if row is not None else "batch"


def failed_name(name: str) -> str:
    """The name an input gets in failed/: its own, or — when `NAME~JOB-9.error.json`
    would not fit in 255 bytes — a shortened one (the original is in the error file)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    return f"{raw[:120].decode('utf-8', 'surrogateescape')}…{digest}"
