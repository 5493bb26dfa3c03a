"""The C allocator's share of the daemon's memory (glibc; a no-op elsewhere).

The daemon runs many threads (tokenizing, the database, writing shards, collecting)
and each malloc()s from one of glibc's arenas: up to 8 a core, each keeping the
memory it freed. A long-running daemon's RSS then grows by steps as more arenas come
into use and each holds its high-water mark, while what it actually holds is flat.
`limit_arenas` caps the arenas at start (as `MALLOC_ARENA_MAX` would), and `trim`
hands free memory back to the system after big releases (a file delivered, a
retention pass), as `malloc_trim(3)` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

ARENAS = 2  # enough for a database thread and a tokenizing one not to share a lock
_M_ARENA_MAX = -8  # from <malloc.h>


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc has both; musl and others may not)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas (call before the daemon's threads start); True if done."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return free heap memory to the system; True if some was."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))
