"""The emulator's own persistence: files and batches in a data directory.

Layout under ``data_dir``::

    files/<file id>.jsonl    the bytes of an uploaded or generated file
    files/<file id>.json     its OpenAI ``File`` object plus private keys (``_...``)
    batches/<batch id>.json  a :class:`~embedd.emulator.lifecycle.BatchRecord`

JSON objects are written to a temporary name and renamed, so a crash leaves the old
or the new object, never half of one. Everything is read back at start, so a
restarted emulator on the same directory still knows every file and batch.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from embedd.emulator.lifecycle import BatchRecord

PUBLIC_FILE_KEYS = (
    "id",
    "object",
    "bytes",
    "created_at",
    "expires_at",
    "filename",
    "purpose",
    "status",
    "status_details",
)


def new_id(prefix: str) -> str:
    """A fresh object id such as ``file-…`` or ``batch_…``."""
    return prefix + secrets.token_hex(12)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def _read_all(folder: Path) -> Iterable[dict[str, Any]]:
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a torn write cannot happen (rename), but a stray file may
        if isinstance(data, dict):
            yield data


def public_file(meta: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``File`` object of a stored file (private keys dropped)."""
    return {key: meta.get(key) for key in PUBLIC_FILE_KEYS}


class Store:
    """Files and batches, cached in memory and written through to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files_dir = root / "files"
        self.batches_dir = root / "batches"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.batches_dir.mkdir(parents=True, exist_ok=True)
        for stray in self.files_dir.glob("*.part"):
            stray.unlink()  # output interrupted by a stop; it is written again
        self.files: dict[str, dict[str, Any]] = {m["id"]: m for m in _read_all(self.files_dir)}
        self.batches: dict[str, BatchRecord] = {}
        for data in _read_all(self.batches_dir):
            rec = BatchRecord.from_json(data)
            self.batches[rec.id] = rec

    # Files -----------------------------------------------------------------------------

    def content_path(self, file_id: str) -> Path:
        """Where the bytes of ``file_id`` live (ids are generated, never user paths)."""
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(
        self,
        file_id: str,
        *,
        filename: str,
        purpose: str,
        created: float,
        private: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Record a file whose bytes are already at :meth:`content_path`."""
        meta: dict[str, Any] = {
            "id": file_id,
            "object": "file",
            "bytes": self.content_path(file_id).stat().st_size,
            "created_at": int(created),
            "expires_at": None,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "_created": created,
            "_seq": len(self.files),
        }
        for key, value in (private or {}).items():
            meta[f"_{key}"] = value
        _write_json(self.files_dir / f"{file_id}.json", meta)
        self.files[file_id] = meta
        return meta

    def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Files, oldest first, optionally of one purpose."""
        files = [m for m in self.files.values() if purpose is None or m["purpose"] == purpose]
        return sorted(files, key=lambda m: (m["_created"], m["_seq"]))

    def delete_file(self, file_id: str) -> bool:
        """Forget a file and remove its bytes; False when it did not exist."""
        if self.files.pop(file_id, None) is None:
            return False
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
        self.content_path(file_id).unlink(missing_ok=True)
        return True

    # Batches ---------------------------------------------------------------------------

    def save_batch(self, rec: BatchRecord) -> None:
        """Persist a new or changed batch record."""
        _write_json(self.batches_dir / f"{rec.id}.json", rec.to_json())
        self.batches[rec.id] = rec

    def list_batches(self) -> list[BatchRecord]:
        """Batches, newest first (ties broken by id for a stable order)."""
        return sorted(self.batches.values(), key=lambda r: (r.created, r.id), reverse=True)


def page_after(
    items: list[dict[str, Any]], after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Cursor paging by id: the ``limit`` items after ``after`` and whether more follow."""
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start : start + limit]
    return page, start + limit < len(items)
