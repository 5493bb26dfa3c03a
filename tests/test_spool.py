"""The spool on disk (SPEC section 1): layout, listing, safe reads, safe moves, atomic writes."""

from __future__ import annotations

import dataclasses
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

import pytest

from embedd.errors import ConfigError, InputRejected
from embedd.files.spool import (
    Entry,
    SpoolPaths,
    UnsafeName,
    atomic_write,
    check_same_filesystem,
    is_ignored,
    read_input,
    rename_noreplace,
    safe_name,
    scan,
)


@pytest.fixture
def spool(tmp_path: Path) -> SpoolPaths:
    paths = SpoolPaths.from_root(tmp_path / "spool")
    paths.ensure()
    return paths


def test_layout_from_root(tmp_path: Path) -> None:
    """Paths follow the SPEC layout; state_dir can move out of the root."""
    p = SpoolPaths.from_root(tmp_path)
    assert p.inbox_sync == tmp_path / "inbox" / "sync"
    assert p.state_dir == tmp_path / "state"
    assert p.ledger == tmp_path / "ledger.jsonl"
    assert SpoolPaths.from_root(tmp_path, tmp_path / "lib").state_dir == tmp_path / "lib"


def test_ensure_creates_folders_with_modes(spool: SpoolPaths) -> None:
    """ensure() creates every folder; producer folders are group-writable, none world-readable."""
    for path in spool.folders().values():
        assert path.is_dir()
        assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE(spool.inbox.stat().st_mode) == 0o2770
    assert stat.S_IMODE(spool.outbox.stat().st_mode) == 0o2750
    spool.ensure()  # a second call is harmless


def test_ensure_keeps_existing_modes_and_refuses_files(tmp_path: Path) -> None:
    """An existing folder keeps its mode; a file where a folder belongs is a config error."""
    p = SpoolPaths.from_root(tmp_path)
    p.outbox.mkdir(mode=0o755)
    p.outbox.chmod(0o755)
    p.done.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a folder"):
        p.ensure()
    assert stat.S_IMODE(p.outbox.stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("name", "ignored"),
    [(".hidden", True), ("a.tmp", True), ("a.part", True), ("a.txt", False), ("tmp", False)],
)
def test_is_ignored(name: str, ignored: bool) -> None:
    """Dot names and .tmp/.part suffixes are ignored, everything else is a submission."""
    assert is_ignored(name) is ignored


def test_scan_classifies_without_following(spool: SpoolPaths) -> None:
    """scan lists files, links, FIFOs and folders by lstat, in both lanes, skipping ignored."""
    (spool.inbox / "a.txt").write_text("a")
    (spool.inbox / "link").symlink_to("/etc/passwd")
    (spool.inbox / "dangling").symlink_to(spool.root / "nowhere")
    os.mkfifo(spool.inbox / "pipe")
    (spool.inbox / "sub").mkdir()
    (spool.inbox / ".x").write_text("x")
    (spool.inbox / "w.part").write_text("x")
    (spool.inbox_sync / "s.md").write_text("s")
    (spool.inbox_sync / "s.tmp").write_text("s")
    got = {(e.lane, e.name, e.kind) for e in scan(spool)}
    assert got == {
        ("batch", "a.txt", "file"),
        ("batch", "link", "symlink"),
        ("batch", "dangling", "symlink"),
        ("batch", "pipe", "fifo"),
        ("batch", "sub", "dir"),
        ("sync", "s.md", "file"),
    }
    assert Entry(spool.inbox_sync / "s.md", "s.md", "sync", "file") in scan(spool)


def test_scan_sync_symlink_is_not_a_lane(spool: SpoolPaths, tmp_path: Path) -> None:
    """An inbox/sync that is a link is listed as a refused symlink, never entered."""
    spool.inbox_sync.rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    spool.inbox_sync.symlink_to(outside)
    assert [(e.name, e.lane, e.kind) for e in scan(spool)] == [("sync", "batch", "symlink")]


def test_scan_missing_inbox_is_empty(tmp_path: Path) -> None:
    """A spool whose inbox does not exist yet scans as empty."""
    assert scan(SpoolPaths.from_root(tmp_path / "none")) == []


def test_read_input_reads_regular_file(spool: SpoolPaths) -> None:
    """A regular file up to the limit is read whole."""
    f = spool.inbox / "a.txt"
    f.write_bytes(b"x" * 100)
    assert read_input(f, 100) == b"x" * 100


def test_read_input_refuses_oversize(spool: SpoolPaths) -> None:
    """A file over max_bytes is refused, naming size and limit."""
    f = spool.inbox / "big.txt"
    f.write_bytes(b"x" * 101)
    with pytest.raises(InputRejected, match="101 bytes, over the limit of 100 bytes"):
        read_input(f, 100)


def test_read_input_refuses_symlink(spool: SpoolPaths) -> None:
    """A symlink is refused, not followed, even to a readable file."""
    target = spool.root / "target.txt"
    target.write_text("secret")
    (spool.inbox / "l").symlink_to(target)
    with pytest.raises(InputRejected, match="symbolic link"):
        read_input(spool.inbox / "l", 100)


def test_read_input_refuses_fifo_without_blocking(spool: SpoolPaths) -> None:
    """A FIFO with no writer is refused at once (the test timeout catches a hang)."""
    os.mkfifo(spool.inbox / "p")
    with pytest.raises(InputRejected, match="is a fifo, not a regular file"):
        read_input(spool.inbox / "p", 100)


def test_read_input_refuses_folder(spool: SpoolPaths) -> None:
    """A folder is refused."""
    (spool.inbox / "d").mkdir()
    with pytest.raises(InputRejected, match="is a dir"):
        read_input(spool.inbox / "d", 100)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x", "a\x00b"])
def test_safe_name_refuses_escapes(bad: str) -> None:
    """Names that are empty, dot, dot-dot or contain / or NUL are refused."""
    with pytest.raises(UnsafeName):
        safe_name(bad)


def test_safe_name_allows_plain_names() -> None:
    """Plain names, including ones with two dots inside, pass."""
    assert safe_name("a..b.txt") == "a..b.txt"
    assert safe_name("~x y") == "~x y"


def test_rename_noreplace_never_overwrites(spool: SpoolPaths) -> None:
    """A taken name gets NAME~JOB, then NAME~JOB-2; existing files keep their bytes."""
    for n in range(3):
        (spool.work / f"f{n}").write_bytes(str(n).encode())
    assert rename_noreplace(spool.work / "f0", spool.done, "a.txt", "J") == spool.done / "a.txt"
    assert rename_noreplace(spool.work / "f1", spool.done, "a.txt", "J") == spool.done / "a.txt~J"
    third = rename_noreplace(spool.work / "f2", spool.done, "a.txt", "J")
    assert third == spool.done / "a.txt~J-2"
    contents = {p.name: p.read_bytes() for p in spool.done.iterdir()}
    assert contents == {"a.txt": b"0", "a.txt~J": b"1", "a.txt~J-2": b"2"}
    assert list(spool.work.iterdir()) == []


def test_rename_noreplace_finishes_a_half_done_move(spool: SpoolPaths) -> None:
    """After a crash between link and unlink, a retry removes the source, no second copy."""
    src = spool.work / "a.txt"
    src.write_bytes(b"x")
    os.link(src, spool.done / "a.txt")  # the state a crash after link() leaves
    assert rename_noreplace(src, spool.done, "a.txt", "J") == spool.done / "a.txt"
    assert not src.exists()
    assert [p.name for p in spool.done.iterdir()] == ["a.txt"]


def test_rename_noreplace_moves_links_and_folders_as_they_are(spool: SpoolPaths) -> None:
    """A symlink is moved as a link (target untouched); a folder moves whole."""
    target = spool.root / "t.txt"
    target.write_text("keep")
    (spool.work / "l").symlink_to(target)
    moved = rename_noreplace(spool.work / "l", spool.failed, "l", "J")
    assert moved.is_symlink()
    assert moved.readlink() == target
    assert target.read_text() == "keep"
    (spool.work / "d").mkdir()
    (spool.work / "d" / "inner").write_text("i")
    (spool.failed / "d").mkdir()
    moved = rename_noreplace(spool.work / "d", spool.failed, "d", "J")
    assert moved == spool.failed / "d~J"
    assert (moved / "inner").read_text() == "i"
    assert list((spool.failed / "d").iterdir()) == []


def test_rename_noreplace_refuses_unsafe_names(spool: SpoolPaths) -> None:
    """A name with a slash can never move a file out of the target folder."""
    (spool.work / "a").write_text("a")
    with pytest.raises(UnsafeName):
        rename_noreplace(spool.work / "a", spool.done, "../a", "J")
    assert (spool.work / "a").exists()


def test_atomic_write_leaves_only_the_file(spool: SpoolPaths) -> None:
    """atomic_write leaves the named file with mode 0o640 and no temp file."""
    path = atomic_write(spool.outbox, "r.json", b"{}")
    assert path.read_bytes() == b"{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in spool.outbox.iterdir()] == ["r.json"]


def test_atomic_write_streams_through_a_writer(spool: SpoolPaths) -> None:
    """A callable writer fills the file; replace=True overwrites, replace=False refuses."""

    def writer(f: BinaryIO) -> None:
        f.write(b"a")
        f.write(b"b")

    atomic_write(spool.outbox, "x", b"old")
    atomic_write(spool.outbox, "x", writer)
    assert (spool.outbox / "x").read_bytes() == b"ab"
    with pytest.raises(FileExistsError):
        atomic_write(spool.outbox, "x", b"new", replace=False)
    assert (spool.outbox / "x").read_bytes() == b"ab"
    assert [p.name for p in spool.outbox.iterdir()] == ["x"]


def test_atomic_write_cleans_up_when_the_writer_fails(spool: SpoolPaths) -> None:
    """A writer that raises leaves neither the file nor a temp behind."""

    def broken(f: BinaryIO) -> None:
        f.write(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(spool.outbox, "x", broken)
    assert list(spool.outbox.iterdir()) == []


def test_atomic_write_long_name_temp_fits(spool: SpoolPaths) -> None:
    """A 250-byte name still gets a temp name within NAME_MAX."""
    name = "n" * 250
    assert atomic_write(spool.outbox, name, b"x").name == name


def test_same_filesystem_passes_for_one_root(spool: SpoolPaths) -> None:
    """All folders under one root share a device."""
    check_same_filesystem(spool)


def test_different_filesystem_is_a_config_error(spool: SpoolPaths) -> None:
    """A failed/ folder on another mount is refused, explaining EXDEV."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == spool.inbox.stat().st_dev:
        pytest.skip("no second file system available")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        moved = dataclasses.replace(spool, failed=Path(other))
        with pytest.raises(ConfigError, match="EXDEV") as info:
            check_same_filesystem(moved)
        assert other in info.value.message
