"""Named wake-ups: one stage sets an event another stage waits on with a timeout."""

from __future__ import annotations

import asyncio
import contextlib


class Wakeups:
    """Named events a stage waits on with a timeout and another stage sets."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def _event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())

    def kick(self, *names: str) -> None:
        for name in names:
            self._event(name).set()

    async def wait(self, name: str, seconds: float) -> None:
        """Return when kicked or after `seconds`, whichever is first."""
        event = self._event(name)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # (not wait_for: never swallows a cancel)
                await event.wait()
        event.clear()
