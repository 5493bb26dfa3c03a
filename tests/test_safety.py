"""Start-up refusal of world-writable spool and state folders; the modes we document."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from embedd.errors import ConfigError
from embedd.files.spool import DAEMON_DIR_MODE, FILE_MODE, PRODUCER_DIR_MODE
from embedd.safety import (
    ancestor_problem,
    check_spool_safety,
    current_umask,
    folder_problem,
    umask_problem,
    world_writable,
)


def spool(tmp_path: Path) -> dict[str, Path]:
    """A spool with the modes systemd/embedd.tmpfiles gives it, plus a state folder."""
    root = tmp_path / "spool"
    dirs = {
        "spool root": root,
        "tmp": root / "tmp",
        "inbox": root / "inbox",
        "inbox/sync": root / "inbox" / "sync",
        "outbox": root / "outbox",
        "failed": root / "failed",
        "done": root / "done",
        "state": tmp_path / "state",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        mode = PRODUCER_DIR_MODE if name in {"tmp", "inbox", "inbox/sync"} else DAEMON_DIR_MODE
        path.chmod(mode)
    return dirs


def test_pure_mode_decisions() -> None:
    """o+w is unsafe on a folder; a world-writable parent is fine only with the sticky bit."""
    assert world_writable(0o777)
    assert world_writable(0o002)
    assert not world_writable(0o2770)
    d = stat.S_IFDIR
    assert folder_problem("inbox", Path("/s/inbox"), d | 0o2770) is None
    assert "world-writable (mode 0777)" in (folder_problem("inbox", Path("/s/i"), d | 0o777) or "")
    assert "not a folder" in (folder_problem("inbox", Path("/s/i"), stat.S_IFREG | 0o640) or "")
    assert ancestor_problem("inbox", Path("/t/i"), Path("/t"), d | 0o1777) is None
    assert ancestor_problem("inbox", Path("/t/i"), Path("/t"), d | 0o755) is None
    assert "sticky" in (ancestor_problem("inbox", Path("/t/i"), Path("/t"), d | 0o777) or "")


def test_documented_modes_keep_other_out() -> None:
    """Result files and folders give nothing to "other" and nothing writable beyond the group."""
    assert FILE_MODE & 0o007 == 0
    assert DAEMON_DIR_MODE & 0o007 == 0
    assert PRODUCER_DIR_MODE & 0o007 == 0
    assert PRODUCER_DIR_MODE & stat.S_ISGID
    assert DAEMON_DIR_MODE & stat.S_ISGID
    assert FILE_MODE & 0o020 == 0


def test_safe_spool_passes(tmp_path: Path) -> None:
    """The tmpfiles layout (setgid, group-only) is accepted."""
    check_spool_safety(spool(tmp_path))


def test_missing_folders_are_skipped(tmp_path: Path) -> None:
    """Folders the daemon has not created yet are not an error."""
    check_spool_safety({"inbox": tmp_path / "not-yet" / "inbox"})


@pytest.mark.parametrize("name", ["spool root", "inbox", "outbox", "state"])
def test_world_writable_folder_is_refused_by_name(tmp_path: Path, name: str) -> None:
    """A world-writable spool or state folder stops start-up, naming folder and fix."""
    dirs = spool(tmp_path)
    dirs[name].chmod(0o777)
    with pytest.raises(ConfigError) as err:
        check_spool_safety(dirs)
    assert f"The {name} folder {dirs[name]}" in err.value.message
    assert f"chmod o-w {dirs[name]}" in err.value.message
    assert err.value.exit_code == 78


def test_sticky_world_writable_folder_is_still_refused(tmp_path: Path) -> None:
    """The sticky bit does not make a spool folder safe: anyone could still add files."""
    dirs = spool(tmp_path)
    dirs["tmp"].chmod(0o1777)
    with pytest.raises(ConfigError, match="The tmp folder"):
        check_spool_safety(dirs)


def test_world_writable_parent_without_sticky_is_refused(tmp_path: Path) -> None:
    """A parent anyone can rename things in makes the folder below it replaceable."""
    parent = tmp_path / "shared"
    parent.mkdir()
    dirs = spool(parent)
    parent.chmod(0o777)
    with pytest.raises(ConfigError, match=r"inside .*shared.*without the sticky bit"):
        check_spool_safety(dirs)
    parent.chmod(0o1777)
    check_spool_safety(dirs)


def test_symlinked_folder_is_judged_by_its_target(tmp_path: Path) -> None:
    """A link to a world-writable folder is refused: files land in the target."""
    target = tmp_path / "target"
    target.mkdir()
    target.chmod(0o777)
    link = tmp_path / "inbox"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="The inbox folder"):
        check_spool_safety({"inbox": link})


def test_file_in_place_of_folder_is_refused(tmp_path: Path) -> None:
    """A plain file where a spool folder should be is reported by name."""
    f = tmp_path / "outbox"
    f.write_text("oops")
    with pytest.raises(ConfigError, match=r"The outbox folder .* is not a folder"):
        check_spool_safety({"outbox": f})


def test_umask_advice() -> None:
    """A umask that lets "other" write is flagged; 0007, 0022 and 0002 are fine."""
    assert umask_problem(0o007) is None
    assert umask_problem(0o022) is None
    assert umask_problem(0o002) is None
    assert "0000" in (umask_problem(0o000) or "")
    assert "0020" in (umask_problem(0o020) or "")


def test_current_umask_reads_and_restores() -> None:
    """current_umask() reports the umask and leaves it unchanged."""
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)


def test_umask_0007_with_explicit_mode_gives_group_readable_results(tmp_path: Path) -> None:
    """UMask=0007 plus spool.FILE_MODE yields 0640 files: group reads, other gets nothing."""
    old = os.umask(0o007)
    try:
        fd = os.open(tmp_path / "a.txt.npy", os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt.npy").stat().st_mode) == 0o640
