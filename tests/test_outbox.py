"""Delivering outcomes (SPEC sections 1 and 3): results, failures and finished inputs."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedd.files import outbox
from embedd.files.outbox import RowStream, finish_input, write_failure, write_result
from embedd.files.spool import SpoolPaths, atomic_write


@pytest.fixture
def spool(tmp_path: Path) -> SpoolPaths:
    paths = SpoolPaths.from_root(tmp_path / "spool")
    paths.ensure()
    return paths


def vectors(rows: int = 3, dims: int = 4) -> np.ndarray:
    v = np.arange(1, rows * dims + 1, dtype=np.float64).reshape(rows, dims)
    unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


def manifest(name: str = "a.txt") -> dict[str, Any]:
    return {"source": name, "sha256": "0" * 64, "model": "text-embedding-3-large", "records": []}


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_result_content_and_format(spool: SpoolPaths) -> None:
    """The .npy is float32, C order, the given rows; the manifest carries the job; mode 0o640."""
    npy = write_result(spool, "a.txt", "J1", vectors(), manifest())
    assert npy == spool.outbox / "a.txt.npy"
    loaded = np.load(npy, allow_pickle=False)
    assert loaded.dtype == np.float32
    assert loaded.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(loaded, vectors(), rtol=1e-6)
    doc = json.loads((spool.outbox / "a.txt.json").read_text())
    assert doc == {**manifest(), "job": "J1"}
    assert stat.S_IMODE(npy.stat().st_mode) == 0o640
    assert names(spool.outbox) == {"a.txt.npy", "a.txt.json"}


def test_streamed_rows_give_the_same_npy_as_an_array(spool: SpoolPaths) -> None:
    """A RowStream is written row by row into exactly the .npy the whole array gives."""
    v = vectors(5, 8)
    streamed = write_result(spool, "s.txt", "J1", RowStream((5, 8), lambda: iter(v)), manifest())
    whole = write_result(spool, "w.txt", "J2", v, manifest("w.txt"))
    assert streamed.read_bytes() == whole.read_bytes()


def test_rows_and_blocks_mixed_give_the_same_npy(
    spool: SpoolPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single rows, small blocks (gathered) and big blocks (written as they come) in
    one stream make exactly the .npy the whole array gives; a non-finite value in a
    big block is reported at its own row number, and no .npy is left."""
    monkeypatch.setattr(outbox, "STREAM_BLOCK_BYTES", 3 * 8 * 4)
    monkeypatch.setattr(outbox, "DIRECT_BYTES", 4 * 8 * 4)
    v = vectors(16, 8).astype(np.float32)
    parts = [v[0], v[1:3], v[3:8], v[8], v[9:10], v[10:15], v[15]]  # 1, 2, 5, 1, 1, 5, 1
    streamed = write_result(
        spool, "s.txt", "J1", RowStream((16, 8), lambda: iter(parts)), manifest()
    )
    whole = write_result(spool, "w.txt", "J2", v, manifest("w.txt"))
    assert streamed.read_bytes() == whole.read_bytes()

    bad = v.copy()
    bad[12, 3] = np.inf
    parts = [bad[:2], bad[2], bad[3:16]]
    with pytest.raises(ValueError, match="row 12 is not finite"):
        write_result(spool, "b.txt", "J3", RowStream((16, 8), lambda: iter(parts)), manifest())
    assert not (spool.outbox / "b.txt.npy").exists()


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(lambda: iter(vectors(4, 8)), id="too-few"),
        pytest.param(lambda: iter(vectors(6, 8)), id="too-many"),
        pytest.param(lambda: iter(np.full((5, 8), np.nan)), id="not-finite"),
        pytest.param(lambda: iter(vectors(5, 7)), id="wrong-width"),
    ],
)
def test_a_bad_row_stream_leaves_no_npy(spool: SpoolPaths, rows: Any) -> None:
    """A stream with the wrong count, width or a non-finite row fails and leaves no .npy
    (nor its temp file) behind: the manifest alone never reads as a complete result."""
    with pytest.raises(ValueError, match="row"):
        write_result(spool, "b.txt", "J1", RowStream((5, 8), rows), manifest("b.txt"))
    assert not (spool.outbox / "b.txt.npy").exists()
    assert not [n for n in names(spool.outbox) if n.startswith(".")]


CRASH_SCRIPT = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from embedd.files.outbox import write_result
from embedd.files.spool import SpoolPaths
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
paths = SpoolPaths.from_root(Path(sys.argv[1]))
try:
    write_result(paths, "a.txt", "J1", np.ones((64, 64)) / 8.0, {"source": "a.txt"})
except OSError as exc:
    sys.exit(f"stopped: {exc!r}")
"""


def test_manifest_is_written_before_npy(spool: SpoolPaths) -> None:
    """If writing stops after the manifest (file too large), no .npy and no temp is visible."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(spool.root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert "stopped: OSError" in run.stderr  # the .npy could not be written
    assert names(spool.outbox) == {"a.txt.json"}
    # the next attempt of the same job completes the pair under the same name
    npy = write_result(spool, "a.txt", "J1", np.ones((64, 64)) / 8.0, {"source": "a.txt"})
    assert npy == spool.outbox / "a.txt.npy"
    assert names(spool.outbox) == {"a.txt.json", "a.txt.npy"}


def test_crash_after_manifest_is_finished_not_duplicated(spool: SpoolPaths) -> None:
    """A manifest of this job without its .npy (crash) is completed under the same name."""
    atomic_write(spool.outbox, "a.txt.json", json.dumps({**manifest(), "job": "J1"}).encode())
    npy = write_result(spool, "a.txt", "J1", vectors(), manifest())
    assert npy == spool.outbox / "a.txt.npy"
    assert names(spool.outbox) == {"a.txt.npy", "a.txt.json"}


def test_same_job_twice_is_idempotent(spool: SpoolPaths) -> None:
    """Writing the same job's result again writes nothing and returns the first path."""
    first = write_result(spool, "a.txt", "J1", vectors(), manifest())
    before = first.stat().st_mtime_ns, first.stat().st_ino
    again = write_result(spool, "a.txt", "J1", vectors(), manifest())
    assert again == first
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == before
    assert names(spool.outbox) == {"a.txt.npy", "a.txt.json"}


def test_other_job_gets_suffixed_names(spool: SpoolPaths) -> None:
    """A second job for the same name writes NAME~JOB; the first result is untouched."""
    write_result(spool, "a.txt", "J1", vectors(), manifest())
    second = write_result(spool, "a.txt", "J2", vectors(2, 4), manifest())
    assert second == spool.outbox / "a.txt~J2.npy"
    assert np.load(second).shape == (2, 4)
    assert np.load(spool.outbox / "a.txt.npy").shape == (3, 4)
    assert json.loads((spool.outbox / "a.txt~J2.json").read_text())["job"] == "J2"
    # and the second job is idempotent under its suffixed name
    assert write_result(spool, "a.txt", "J2", vectors(2, 4), manifest()) == second
    assert len(names(spool.outbox)) == 4


def test_stray_npy_alone_forces_suffix(spool: SpoolPaths) -> None:
    """An existing NAME.npy without a manifest is never overwritten."""
    (spool.outbox / "a.txt.npy").write_bytes(b"theirs")
    npy = write_result(spool, "a.txt", "J1", vectors(), manifest())
    assert npy.name == "a.txt~J1.npy"
    assert (spool.outbox / "a.txt.npy").read_bytes() == b"theirs"
    assert "a.txt.json" not in names(spool.outbox)


def test_result_refuses_bad_vectors_and_job_mismatch(spool: SpoolPaths) -> None:
    """Non-2-D or non-finite vectors, or a manifest of another job, write nothing."""
    with pytest.raises(ValueError, match="2-D"):
        write_result(spool, "a.txt", "J1", np.ones(3), manifest())
    with pytest.raises(ValueError, match="finite"):
        write_result(spool, "a.txt", "J1", np.full((1, 2), np.inf), manifest())
    with pytest.raises(ValueError, match="job"):
        write_result(spool, "a.txt", "J1", vectors(), {**manifest(), "job": "J9"})
    assert names(spool.outbox) == set()


def error_doc(data: bytes) -> dict[str, Any]:
    return {
        "source": "a.txt",
        "sha256": hashlib.sha256(data).hexdigest(),
        "reason": "a.txt is empty.",
        "records": [],
    }


def test_failure_of_regular_file(spool: SpoolPaths) -> None:
    """The input bytes move untouched to failed/NAME beside NAME.error.json."""
    src = spool.work / "w1"
    src.write_bytes(b"\xff\x00raw")
    moved = write_failure(spool, src, "a.txt", "J1", error_doc(b"\xff\x00raw"))
    assert moved == spool.failed / "a.txt"
    assert moved.read_bytes() == b"\xff\x00raw"
    assert not src.exists()
    doc = json.loads((spool.failed / "a.txt.error.json").read_text())
    assert doc == {**error_doc(b"\xff\x00raw"), "job": "J1"}
    assert stat.S_IMODE((spool.failed / "a.txt.error.json").stat().st_mode) == 0o640


def test_failure_of_symlink_moves_the_link(spool: SpoolPaths) -> None:
    """A symlink is moved as a link; its target is neither read nor moved."""
    target = spool.root / "target"
    target.write_text("outside")
    src = spool.work / "l"
    src.symlink_to(target)
    moved = write_failure(spool, src, "l", "J1", error_doc(b""))
    assert moved.is_symlink()
    assert moved.readlink() == target
    assert target.read_text() == "outside"
    assert not os.path.lexists(src)


def test_failure_of_fifo_does_not_open_it(spool: SpoolPaths) -> None:
    """A FIFO is moved without being opened (a blocking open would hit the timeout)."""
    src = spool.work / "p"
    os.mkfifo(src)
    moved = write_failure(spool, src, "p", "J1", error_doc(b""))
    assert stat.S_ISFIFO(os.lstat(moved).st_mode)
    assert names(spool.failed) == {"p", "p.error.json"}


def test_failure_name_collision_and_idempotency(spool: SpoolPaths) -> None:
    """A taken name gives NAME~JOB for both files; repeating a job adds nothing."""
    (spool.work / "w1").write_bytes(b"1")
    (spool.work / "w2").write_bytes(b"2")
    write_failure(spool, spool.work / "w1", "a.txt", "J1", error_doc(b"1"))
    moved = write_failure(spool, spool.work / "w2", "a.txt", "J2", error_doc(b"2"))
    assert moved == spool.failed / "a.txt~J2"
    assert moved.read_bytes() == b"2"
    assert (spool.failed / "a.txt").read_bytes() == b"1"
    again = write_failure(spool, spool.work / "w2", "a.txt", "J2", error_doc(b"2"))
    assert again == moved
    assert names(spool.failed) == {"a.txt", "a.txt.error.json", "a.txt~J2", "a.txt~J2.error.json"}


def test_failure_crash_after_error_file_moves_input_later(spool: SpoolPaths) -> None:
    """An error file of this job without its input (crash) gets the input on retry."""
    atomic_write(spool.failed, "a.txt.error.json", json.dumps({"job": "J1"}).encode())
    (spool.work / "w").write_bytes(b"x")
    moved = write_failure(spool, spool.work / "w", "a.txt", "J1", error_doc(b"x"))
    assert moved == spool.failed / "a.txt"
    assert names(spool.failed) == {"a.txt", "a.txt.error.json"}


def test_failure_lookup_ignores_user_fifo_named_like_error_file(spool: SpoolPaths) -> None:
    """A failed input that is a FIFO named `x.error.json` is never opened while looking up."""
    os.mkfifo(spool.failed / "x.error.json")
    (spool.work / "w").write_bytes(b"x")
    moved = write_failure(spool, spool.work / "w", "x", "J1", error_doc(b"x"))
    assert moved == spool.failed / "x~J1"


def test_finish_keeps_or_deletes(spool: SpoolPaths) -> None:
    """keep=True moves to done/ without overwriting; keep=False deletes; gone is fine."""
    (spool.done / "a.txt").write_bytes(b"old")
    (spool.work / "w").write_bytes(b"new")
    kept = finish_input(spool, spool.work / "w", "a.txt", "J1", keep=True)
    assert kept == spool.done / "a.txt~J1"
    assert kept.read_bytes() == b"new"
    assert (spool.done / "a.txt").read_bytes() == b"old"
    assert finish_input(spool, spool.work / "w", "a.txt", "J1", keep=True) is None
    (spool.work / "v").write_bytes(b"v")
    assert finish_input(spool, spool.work / "v", "b.txt", "J2", keep=False) is None
    assert not (spool.work / "v").exists()
    assert finish_input(spool, spool.work / "v", "b.txt", "J2", keep=False) is None
