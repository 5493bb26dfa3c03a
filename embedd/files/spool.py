"""The spool folders on disk: layout, listing the inbox, safe reads, safe moves, atomic writes.

SPEC section 1. Everything here is synchronous file-system code with no daemon
state; the daemon calls it through `asyncio.to_thread`.

Safety rules kept by every function:

- Never follow a symbolic link: listing uses `lstat`, reading opens with
  `O_NOFOLLOW`, moving hard-links the link itself.
- Never open a FIFO or device in a way that blocks: `O_NONBLOCK`, then `fstat`
  must say "regular file" before a single byte is read.
- Never overwrite: moves and result files pick `NAME`, else `NAME~JOB`
  (`candidate_names`), and the final step refuses to replace an existing name.
- Durability: a file is fsynced before it is renamed into place and the folder is
  fsynced after, so a power loss leaves either the old or the new state.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Literal

from embedd.crashpoints import fault_point
from embedd.errors import ConfigError, FatalError, InputRejected

FILE_MODE = 0o640  # files the daemon writes: group may read, others nothing
PRODUCER_DIR_MODE = 0o2770  # tmp/, inbox/, inbox/sync/: the group writes; setgid keeps the group
DAEMON_DIR_MODE = 0o2750  # everything else: the group reads
MAX_SUFFIXES = 9  # NAME, NAME~JOB, NAME~JOB-2 ... NAME~JOB-9

Lane = Literal["batch", "sync"]
Kind = Literal["file", "symlink", "dir", "fifo", "device", "socket", "other"]
Writer = Callable[[BinaryIO], None]


class UnsafeName(FatalError, ValueError):
    """A file name would escape its folder; this is a bug, not a user input."""


@dataclass(frozen=True)
class SpoolPaths:
    """Every path of one spool, derived from its root (and an optional state folder)."""

    root: Path
    tmp: Path
    inbox: Path
    inbox_sync: Path
    outbox: Path
    failed: Path
    done: Path
    work: Path
    state_dir: Path
    ledger: Path

    @classmethod
    def from_root(cls, root: Path, state_dir: Path | None = None) -> SpoolPaths:
        """The standard layout under `root`; `state_dir` defaults to `root/state`."""
        return cls(
            root=root,
            tmp=root / "tmp",
            inbox=root / "inbox",
            inbox_sync=root / "inbox" / "sync",
            outbox=root / "outbox",
            failed=root / "failed",
            done=root / "done",
            work=root / "work",
            state_dir=state_dir if state_dir is not None else root / "state",
            ledger=root / "ledger.jsonl",
        )

    def folders(self) -> dict[str, Path]:
        """Every folder of the spool by field name (not the ledger file)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ledger"}

    def ensure(self) -> None:
        """Create missing folders with their modes; refuse a path that is not a folder.

        Modes are set only on folders this call creates, so an administrator's
        choice on an existing folder is kept.
        """
        producer = {"tmp", "inbox", "inbox_sync"}
        for key, path in self.folders().items():
            mode = PRODUCER_DIR_MODE if key in producer else DAEMON_DIR_MODE
            try:
                path.mkdir(parents=True)
            except FileExistsError:
                if not path.is_dir():
                    raise ConfigError(f"spool path {path} exists but is not a folder") from None
                continue
            path.chmod(mode)  # mkdir's mode is masked by the umask; chmod is exact


def is_ignored(name: str) -> bool:
    """True for names producers are still writing: `.x`, `x.tmp`, `x.part`."""
    return name.startswith(".") or name.endswith((".tmp", ".part"))


@dataclass(frozen=True)
class Entry:
    """One thing found in an inbox, classified without following links."""

    path: Path
    name: str
    lane: Lane
    kind: Kind


def kind_of(mode: int) -> Kind:
    """Classify an `st_mode` from `lstat`."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"


def _list(folder: Path, lane: Lane, skip: str | None) -> Iterator[Entry]:
    try:
        with os.scandir(folder) as it:
            for de in it:
                if de.name == skip or is_ignored(de.name):
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # taken away between listing and lstat
                yield Entry(Path(de.path), de.name, lane, kind_of(st.st_mode))
    except FileNotFoundError:
        return


def scan(paths: SpoolPaths) -> list[Entry]:
    """Everything in `inbox/` and `inbox/sync/`, except ignored names, sorted by lane and name.

    `inbox/sync` is the sync lane only when it is a real folder; a symlink or a
    file with that name is listed as a batch-lane entry (and refused by kind).
    """
    try:
        sync_is_dir = stat.S_ISDIR(os.lstat(paths.inbox_sync).st_mode)
    except FileNotFoundError:
        sync_is_dir = False
    entries = list(_list(paths.inbox, "batch", paths.inbox_sync.name if sync_is_dir else None))
    if sync_is_dir:
        entries.extend(_list(paths.inbox_sync, "sync", None))
    return sorted(entries, key=lambda e: (e.lane, e.name))


def read_input(path: Path, max_bytes: int) -> bytes:
    """All bytes of a regular file, refusing links, FIFOs, devices, folders and oversize files.

    Raises `InputRejected` with the reason; never blocks on a FIFO. Call it only
    for entries `scan` classified as files: opening a device node can itself have
    effects, and the checks here are the second line of defence (the file may
    have been swapped since the scan).
    """
    with open_input(path, max_bytes) as f:
        parts: list[bytes] = []
        total = 0
        while True:
            # read one byte past the limit to notice a file that grew after fstat
            part = f.read(min(1 << 24, max_bytes + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
            if total > max_bytes:
                raise InputRejected(
                    f"{path.name} grew past the limit of {max_bytes} bytes while being read."
                )
        return b"".join(parts)


def open_input(path: Path, max_bytes: int) -> BinaryIO:
    """The open regular file at `path` (buffered, positioned at its start), with the
    checks of `read_input`; for callers that read it in pieces instead of whole."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        unreadable = not os.lstat(path).st_mode & 0o444
    except OSError:
        unreadable = False
    if unreadable:
        fault_point("open_input")  # test hook: refuse as a user other than root would
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputRejected(
                f"{path.name} is a symbolic link; links are not followed."
            ) from None
        raise
    try:
        st = os.fstat(fd)
        kind = kind_of(st.st_mode)
        if kind != "file":
            raise InputRejected(f"{path.name} is a {kind}, not a regular file.")
        if st.st_size > max_bytes:
            raise InputRejected(
                f"{path.name} is {st.st_size} bytes, over the limit of {max_bytes} bytes."
            )
        return os.fdopen(fd, "rb", buffering=1 << 20)
    except BaseException:
        os.close(fd)
        raise


def safe_name(name: str) -> str:
    """Return `name` if it is one plain file name; raise `UnsafeName` otherwise.

    Refused: empty, `.`, `..`, anything with `/` or NUL. A name merely containing
    two dots (`a..b`) is a plain name and allowed: without `/` it cannot escape.
    """
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise UnsafeName(f"unsafe file name {name!r}")
    return name


def candidate_names(name: str, job: str) -> Iterator[str]:
    """Names to try, in order, so nothing is overwritten: NAME, NAME~JOB, NAME~JOB-2, ..."""
    safe_name(name)
    safe_name(job)
    yield name
    yield f"{name}~{job}"
    for n in range(2, MAX_SUFFIXES + 1):
        yield f"{name}~{job}-{n}"


def fsync_dir(path: Path) -> None:
    """fsync a folder, so the names created or removed in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except FileNotFoundError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def move_exact(src: Path, dst: Path) -> bool:
    """Move `src` (any kind, never followed) to exactly `dst` unless `dst` exists.

    Returns False, moving nothing, when `dst` is taken by another file. Files,
    links and FIFOs are hard-linked then unlinked: `link()` fails with EEXIST
    rather than replace, so there is no race. A crash between the two steps
    leaves both names on one inode; calling again sees that and just unlinks
    `src`. Where `link()` is refused (folders; `protected_hardlinks`; some file
    systems) we check, then `rename()`.
    The race accepted there (another process creating `dst` between the two) is
    harmless because only the daemon writes `done/` and `failed/`.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        if not _same_file(src, dst):
            return False
    except PermissionError:
        # EPERM: Linux never hard-links folders, fs.protected_hardlinks=1 refuses
        # links to producer-owned files the daemon cannot write, and some file
        # systems refuse links altogether; fall back to check-then-rename
        if os.path.lexists(dst):
            return False
        src.rename(dst)
        return True
    src.unlink()
    return True


def rename_noreplace(src: Path, dst_dir: Path, name: str, job: str) -> Path:
    """Move `src` into `dst_dir` as `name`, or `name~job` if taken; never overwrite.

    Both folders are fsynced afterwards. Raises `FileExistsError` if every
    candidate name is taken.
    """
    for candidate in candidate_names(name, job):
        dst = dst_dir / candidate
        if move_exact(src, dst):
            fsync_dir(dst_dir)
            fsync_dir(src.parent)
            return dst
    raise FileExistsError(errno.EEXIST, f"no free name for {name} in {dst_dir}")


def atomic_write(
    folder: Path,
    name: str,
    data: bytes | Writer,
    *,
    replace: bool = True,
    mode: int = FILE_MODE,
) -> Path:
    """Write `folder/name` so that it is never seen half-written; return its path.

    Writes a hidden temp file `.NAME.tmp-XXXXXXXX` in the same folder (`data` is
    bytes, or a callable that writes into the open binary file), fsyncs it,
    renames it into place and fsyncs the folder. With `replace=False` an existing
    `name` is never replaced: `FileExistsError` is raised and the temp removed.
    """
    safe_name(name)
    final = folder / name
    # keep the hidden temp name within NAME_MAX (255 bytes) even for long names
    tmp = folder / f".{name[:200]}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have narrowed it
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            tmp.replace(final)
        else:
            os.link(tmp, final)  # EEXIST instead of replacing
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return final


def check_same_filesystem(paths: SpoolPaths) -> None:
    """Raise `ConfigError` unless the folders that files move between share one file system.

    `rename()` and `link()` cannot cross mounts (EXDEV), and a copy would not be
    atomic, so tmp/, inbox/, inbox/sync/, work/, outbox/, done/ and failed/ must
    all be on the same device.
    """
    keys = ("tmp", "inbox", "inbox_sync", "work", "outbox", "done", "failed")
    devices = {key: Path(getattr(paths, key)).stat().st_dev for key in keys}
    base = devices["inbox"]
    others = [key for key, dev in devices.items() if dev != base]
    if others:
        names = ", ".join(str(getattr(paths, key)) for key in others)
        raise ConfigError(
            f"{names} must be on the same file system as {paths.inbox}: files are moved "
            "between these folders with rename(), which fails across mounts (EXDEV)."
        )


# `atomic_write` stages every file as `.NAME.tmp-XXXXXXXX`.
_STALE_TEMP = re.compile(r"\..+\.tmp-[0-9a-f]{8}")


def sweep_stale_temps(folders: Sequence[Path]) -> list[str]:
    """Remove the temp files of writes a kill interrupted; return their names.

    Call only at start-up, when no write is in progress, so every such file is stale.
    The folders must be the daemon's own (outbox/, failed/): a producer's dot file
    never gets there, since inbox dot files are never claimed.
    """
    removed: list[str] = []
    for folder in folders:
        found = False
        for entry in os.scandir(folder):
            if _STALE_TEMP.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink()
                removed.append(f"{folder.name}/{entry.name}")
                found = True
        if found:
            fsync_dir(folder)
    return removed
