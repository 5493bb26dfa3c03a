"""Start-up safety checks on the spool and state folders, and the file modes we write.

Any local user who can write into a spool folder can submit documents on the
organisation's bill, swap a result for a forged one, or replace the state database.
So the daemon refuses to start (`ConfigError`, exit 78) when a spool or state folder,
or a folder above one that is not protected by the sticky bit, is world-writable.

Who may read the results is decided by group membership: under systemd the unit's
``UMask=0007`` strips every permission for "other" from whatever the daemon creates,
and the daemon gives what it writes explicit modes (`embedd.files.spool.FILE_MODE`, 0640: the
daemon writes, the ``embedd`` group reads), inside setgid folders owned by group
``embedd`` (`embedd.files.spool.PRODUCER_DIR_MODE` 2770 for tmp/ and inbox/,
`DAEMON_DIR_MODE` 2750 for the rest; ``systemd/embedd.tmpfiles`` creates the same).
Producers join the group; nobody else sees a thing.

The same-file-system (EXDEV) check lives with the spool code, not here.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Mapping
from pathlib import Path

from embedd.errors import ConfigError


def world_writable(mode: int) -> bool:
    """True when *mode* lets any local user write (the ``o+w`` bit)."""
    return bool(mode & stat.S_IWOTH)


def folder_problem(name: str, path: Path, mode: int) -> str | None:
    """Why the folder *name* at *path* with *mode* is unsafe, or None when it is fine."""
    if not stat.S_ISDIR(mode):
        return f"The {name} folder {path} is not a folder: point the config at a directory."
    if world_writable(mode):
        return (
            f"The {name} folder {path} is world-writable (mode {stat.S_IMODE(mode):04o}), "
            f"so any local user could add or replace files in it: run `chmod o-w {path}` "
            "and give producers access through the embedd group instead."
        )
    return None


def ancestor_problem(name: str, path: Path, ancestor: Path, mode: int) -> str | None:
    """Why a folder *above* the *name* folder is unsafe, or None.

    A world-writable parent without the sticky bit lets anyone rename our folder away
    and put their own in its place; with the sticky bit (``/tmp``) they cannot.
    """
    if world_writable(mode) and not mode & stat.S_ISVTX:
        return (
            f"The {name} folder {path} is inside {ancestor}, which is world-writable "
            f"without the sticky bit (mode {stat.S_IMODE(mode):04o}), so any local user "
            f"could replace the folder: move the {name} folder or run `chmod o-w {ancestor}`."
        )
    return None


def _ancestors(path: Path) -> list[Path]:
    """The folders above *path*, nearest first: as written and with links resolved."""
    seen: dict[Path, None] = {}
    for p in (*path.absolute().parents, *path.resolve().parents):
        seen.setdefault(p, None)
    return list(seen)


def check_spool_safety(dirs: Mapping[str, Path]) -> None:
    """Raise `ConfigError` naming the first unsafe folder among *dirs*.

    *dirs* maps a name for the message ("spool root", "inbox", "state", …) to a
    folder. Folders that do not exist yet are skipped (the daemon creates them with
    safe modes); call this again after creating them. Symbolic links are followed:
    what matters is the folder files actually land in.
    """
    for name, path in dirs.items():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"Cannot inspect the {name} folder {path}: "
                f"{exc.strerror or type(exc).__name__}; check its permissions."
            ) from None
        problem = folder_problem(name, path, st.st_mode)
        if problem is None:
            for ancestor in _ancestors(path):
                try:
                    mode = ancestor.stat().st_mode
                except OSError:
                    continue  # a parent we cannot stat cannot be judged; skip it
                problem = ancestor_problem(name, path, ancestor, mode)
                if problem is not None:
                    break
        if problem is not None:
            raise ConfigError(problem)


STATE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")
"""The state database and the files SQLite keeps beside it."""


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ownership_problem(path: Path, owner: int, me: int) -> str | None:
    """Why a daemon file at *path* owned by *owner* is unusable to uid *me*, or None."""
    if owner == me:
        return None
    return (
        f"{path} is owned by {_user(owner)}, not by {_user(me)} who runs embedd, so the "
        "daemon cannot rely on writing it (another user's `sqlite3` or an old `embedd "
        f"status` may have made it): with the daemon stopped, run `chown {me} {path}`, or "
        "remove it if it is a -wal/-shm/-journal file of a cleanly stopped database."
    )


def check_ownership(state_db: Path, ledger: Path, uid: int | None = None) -> None:
    """Raise `ConfigError` when a file the daemon must write belongs to someone else.

    SQLite opens a database it cannot write read-only without complaint and fails
    later ("attempt to write a readonly database"), in a restart loop; one sentence
    at start-up naming the file and the fix is better. Files that do not exist yet
    are fine: the daemon creates them.
    """
    me = os.geteuid() if uid is None else uid
    candidates = [state_db.parent, *(Path(f"{state_db}{s}") for s in STATE_FILE_SUFFIXES)]
    for path in [*candidates, ledger]:
        try:
            owner = path.lstat().st_uid
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"Cannot inspect {path}: {exc.strerror or type(exc).__name__}; check its "
                "permissions."
            ) from None
        problem = ownership_problem(path, owner, me)
        if problem is not None:
            raise ConfigError(problem)


def current_umask() -> int:
    """The process umask (read by setting and restoring it; call at start-up only)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def umask_problem(mask: int) -> str | None:
    """A warning sentence when *mask* lets files be created writable by "other", or None.

    The daemon sets explicit modes on what it writes, so this is advice for the log,
    not a reason to refuse to start.
    """
    if not mask & stat.S_IWOTH:
        return (
            f"The process umask is {mask:04o}, so new files could be world-writable: "
            "run embedd with UMask=0007 (as the systemd unit does) or `umask 007`."
        )
    return None


__all__ = [
    "ancestor_problem",
    "check_ownership",
    "check_spool_safety",
    "current_umask",
    "folder_problem",
    "ownership_problem",
    "umask_problem",
    "world_writable",
]
