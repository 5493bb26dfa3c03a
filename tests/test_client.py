"""`embedd.client` (SPEC §10) against a running daemon: results with memory-mapped
vectors, failures with their reason and per-record errors, and the async wait."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embedd.client import Result, Spool, SubmissionFailed, SubmissionTimeout
from embedd.emulator import embed_text
from tests.conftest import DaemonProcess, EmulatorProcess, wait_for

DIMS = 3072


def ready(daemon: DaemonProcess) -> Spool:
    """The daemon's spool, once the daemon has created it and said READY."""
    wait_for(
        lambda: any(e.get("event") == "daemon.ready" for e in daemon.events()),
        30,
        what="daemon.ready",
    )
    return Spool(daemon.spool)


def check_vectors(result: Result, texts: list[str]) -> None:
    assert isinstance(result.vectors, np.memmap)  # mapped, not read into memory
    assert result.vectors.shape == (len(texts), DIMS)
    assert result.vectors.dtype == np.float32
    for row, text in zip(result.vectors, texts, strict=True):
        np.testing.assert_allclose(row, embed_text(text, DIMS), atol=1e-5)


@pytest.mark.parametrize("sync", [False, True], ids=["batch", "sync"])
def test_submit_records_and_wait_give_ids_vectors_and_manifest(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    sync: bool,
) -> None:
    """Records submitted as a JSONL input come back as a Result whose ids are the
    records' ids, in order, row for row with the vectors, and whose manifest is the
    outbox manifest; the records' other keys are kept as `meta`."""
    daemon = start_daemon(start_emulator().url)
    spool = ready(daemon)
    records = [{"id": "q1", "text": "alpha", "lang": "en"}, {"id": "q2", "text": "beta"}]
    sub = spool.submit_records(records, "questions", sync=sync)
    assert sub.name == "questions.jsonl"
    result = sub.wait(timeout=60)
    assert result.ids == ["q1", "q2"]
    check_vectors(result, ["alpha", "beta"])
    assert result.path == daemon.spool / "outbox" / "questions.jsonl.npy"
    on_disk = json.loads((daemon.spool / "outbox" / "questions.jsonl.json").read_text())
    assert result.manifest == on_disk
    assert result.manifest["mode"] == ("sync" if sync else "batch")
    assert result.manifest["records"][0]["meta"] == {"lang": "en"}


def test_a_file_submitted_twice_under_one_name_gets_each_its_own_result(
    tmp_path: Path,
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """The second input of a name ends as NAME~JOBID.npy; its Submission finds that one
    (by its bytes' SHA-256 in the manifest), not the first input's result."""
    daemon = start_daemon(start_emulator().url)
    spool = ready(daemon)
    src = tmp_path / "doc.md"
    src.write_text("version one")
    first = spool.submit_file(src).wait(60)
    src.write_text("version two")
    second = spool.submit_file(src).wait(60)
    assert first.path.name == "doc.md.npy"
    assert second.path.name.startswith("doc.md~")
    assert second.manifest["job"] in second.path.name
    check_vectors(first, ["version one"])
    check_vectors(second, ["version two"])


def test_a_failed_input_raises_with_the_reason_and_per_record_errors(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """An input the daemon refuses raises SubmissionFailed carrying the reason of
    `failed/NAME.error.json` and its per-record errors."""
    daemon = start_daemon(start_emulator().url, inputs={"long": "fail", "max_tokens": 8})
    spool = ready(daemon)
    records = [
        {"id": "short", "text": "fits"},
        {"id": "long", "text": "this sentence has rather more than eight tokens in it"},
    ]
    sub = spool.submit_records(records, "mixed.jsonl")
    with pytest.raises(SubmissionFailed) as caught:
        sub.wait(timeout=60)
    error = json.loads((daemon.spool / "failed" / "mixed.jsonl.error.json").read_text())
    assert caught.value.reason == error["reason"]
    assert "long" in caught.value.reason
    assert [r["id"] for r in caught.value.records] == ["long"]
    assert caught.value.error_path == daemon.spool / "failed" / "mixed.jsonl.error.json"


async def test_wait_async_returns_the_result_without_blocking_the_loop(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """`await wait_async()` returns the same Result as `wait`, and other tasks keep
    running while it waits (the loop is not blocked)."""
    import asyncio

    daemon = start_daemon(start_emulator().url)
    spool = ready(daemon)
    sub = spool.submit_records([{"id": "a", "text": "async hello"}], "hello")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        result = await sub.wait_async(timeout=60)
    finally:
        task.cancel()
    assert result.ids == ["a"]
    check_vectors(result, ["async hello"])
    assert ticks > 1


async def test_wait_async_times_out_then_reports_a_failure(
    start_emulator: Callable[..., EmulatorProcess],
    start_daemon: Callable[..., DaemonProcess],
    tmp_path: Path,
) -> None:
    """With no daemon, `wait_async(timeout)` raises SubmissionTimeout (a TimeoutError);
    once a daemon starts on the spool, the same Submission's failure arrives."""
    spool_root = tmp_path / "spool"
    for folder in ("tmp", "inbox/sync", "outbox", "failed"):
        (spool_root / folder).mkdir(parents=True)
    spool = Spool(spool_root)
    sub = spool.submit_records([{"id": "x", "text": "dup"}, {"id": "x", "text": "dup"}], "dups")
    with pytest.raises(SubmissionTimeout):
        await sub.wait_async(timeout=0.2)
    with pytest.raises(TimeoutError):
        sub.wait(timeout=0.1)
    daemon = start_daemon(start_emulator().url)  # its spool is tmp_path/spool
    assert daemon.spool == spool_root
    with pytest.raises(SubmissionFailed) as caught:
        await sub.wait_async(timeout=60)
    assert "duplicate" in caught.value.reason


def test_a_waiting_name_is_never_replaced(tmp_path: Path) -> None:
    """Submitting a name already waiting in the inbox raises FileExistsError and leaves
    the waiting file and tmp/ as they were; a name the daemon would ignore or that is
    not a plain name is refused before anything is written."""
    for folder in ("tmp", "inbox/sync", "outbox", "failed"):
        (tmp_path / folder).mkdir(parents=True)
    spool = Spool(tmp_path)
    spool.submit_records([{"text": "first"}], "same")
    with pytest.raises(FileExistsError, match="already waiting"):
        spool.submit_records([{"text": "second"}], "same")
    assert json.loads((tmp_path / "inbox" / "same.jsonl").read_text()) == {"text": "first"}
    assert list((tmp_path / "tmp").iterdir()) == []
    for ignored in (".hidden", "draft.tmp", "upload.part", "a/b"):
        with pytest.raises(ValueError, match=r"ignored by the daemon|not a plain file name"):
            spool.submit_file(tmp_path / "inbox" / "same.jsonl", name=ignored)
    with pytest.raises(FileNotFoundError, match="not a spool"):
        Spool(tmp_path / "nowhere").submit_records([{"text": "x"}], "x")


async def test_wait_async_polls_where_there_is_nothing_to_watch(tmp_path: Path) -> None:
    """With no outbox/ to watch when the wait starts (file events unavailable), the wait
    polls: a result published later under the protocol's rules is still found."""
    import asyncio
    import hashlib

    for folder in ("tmp", "inbox/sync"):
        (tmp_path / folder).mkdir(parents=True)
    spool = Spool(tmp_path)
    sub = spool.submit_records([{"id": "a", "text": "later"}], "late")
    waiting = asyncio.create_task(sub.wait_async(timeout=30))
    await asyncio.sleep(0)  # the wait has started and found nothing to watch
    assert not waiting.done()
    data = (tmp_path / "inbox" / "late.jsonl").read_bytes()
    (tmp_path / "outbox").mkdir()
    manifest = {"source": "late.jsonl", "sha256": hashlib.sha256(data).hexdigest()}
    manifest["records"] = [{"id": "a"}]
    (tmp_path / "outbox" / "late.jsonl.json").write_text(json.dumps(manifest))
    staged = tmp_path / "outbox" / ".late.jsonl.npy.tmp"  # written whole, then renamed
    with staged.open("wb") as fh:
        np.save(fh, np.ones((1, 4), dtype=np.float32))
    staged.rename(tmp_path / "outbox" / "late.jsonl.npy")
    result = await waiting
    assert result.ids == ["a"]
    assert result.vectors.shape == (1, 4)
