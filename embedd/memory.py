"""The C allocator's share of the daemon's memory (glibc; a no-op elsewhere).

The daemon runs many threads (tokenizing, the database, writing shards, collecting)
and each malloc()s from one of glibc's arenas: up to 8 a core, each keeping the
memory it freed. A long-running daemon's RSS then grows by steps as more arenas come
into use and each holds its high-water mark, while what it actually holds is flat.
`limit_arenas` caps the arenas at start (as `MALLOC_ARENA_MAX` would) and keeps big
blocks out of the heap, and `trim` hands free memory back to the system after big
releases (a file claimed or delivered, a retention pass), as `malloc_trim(3)` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

ARENAS = 2  # enough for a database thread and a tokenizing one not to share a lock
# Blocks this big or bigger are mapped on their own and unmapped when freed. glibc's
# own threshold starts at 128 KiB but rises to the largest block freed so far (up to
# 32 MiB), after which a collector's or a claim's big buffers stay in the heap.
MMAP_THRESHOLD = 1 << 20
_M_ARENA_MAX = -8  # from <malloc.h>
_M_MMAP_THRESHOLD = -3


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


def limit_arenas(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Cap malloc's arenas and fix its mmap threshold (call before the daemon's
    threads start); True if done."""
    libc = _libc()
    return (
        libc is not None
        and bool(libc.mallopt(_M_ARENA_MAX, arenas))
        and bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    )


def trim() -> bool:
    """Return free heap memory to the system; True if some was."""
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))
