"""The allocator hands memory freed by worker threads back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from embedd import memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or memory._libc() is None, reason="glibc only"
)

# A worker thread fills 160 MiB in 64 KiB pieces and frees all but every 16th: the
# free space sits between live pieces, where glibc keeps it (an arena only shrinks
# from its top). The child prints its anonymous RSS before and after `after`.
CHILD = textwrap.dedent(
    """
    import threading
    from embedd import memory

    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    kept = []
    def work():
        pieces = [bytearray(65536) for _ in range(2560)]
        kept.extend(pieces[15::16])
        pieces.clear()
    memory.limit_arenas()
    t = threading.Thread(target=work)
    t.start()
    t.join()
    before = rss_anon()
    {after}
    print(before, rss_anon())
    """
)


def _rss_change(after: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(after=after)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return int(out[0]), int(out[1])


def test_trim_returns_memory_freed_between_live_pieces() -> None:
    before, after = _rss_change("assert memory.trim()")
    assert before - after > 100 * 2**20, (before, after)


def test_without_trim_the_freed_memory_stays_resident() -> None:
    """The case `trim` is for: nothing else gives this memory back."""
    before, after = _rss_change("pass")
    assert before - after < 20 * 2**20, (before, after)
