"""What every stage of the running daemon shares: settings, edges, and wake-ups.

The daemon builds one `Runtime` and hands it to each stage. The edges — the store,
the API client, the tokenizer, the clock — are injected here, so tests can run a
stage against a real SQLite file and the emulator without patching anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from embedd.api import OpenAIClient
from embedd.config import Settings
from embedd.ledger import Ledger
from embedd.prices import Price
from embedd.spool import SpoolPaths
from embedd.store import Store
from embedd.supervise import Supervisor
from embedd.tokens import Tokenizer


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
            await asyncio.wait_for(event.wait(), seconds)
        event.clear()


@dataclass
class Runtime:
    settings: Settings
    paths: SpoolPaths
    store: Store
    client: OpenAIClient
    tokenizer: Tokenizer
    ledger: Ledger
    log: Any
    emulated: bool = False
    clock: Callable[[], float] = time.time
    wake: Wakeups = field(default_factory=Wakeups)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    queue_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Learned at run time; persisted as daemon facts for `embedd status`.
    queue_limit: int = 0
    paused_reason: str | None = None
    paused_until: float = 0.0
    queue_backoff_until: float = 0.0
    queue_backoff_streak: int = 0
    prices: dict[str, Price] = field(default_factory=dict)
    # The guard every stage runs its units in (SPEC §8).
    guard: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.guard = Supervisor(
            self.store,
            self.log,
            lambda: self.clock(),
            s.retry_max_retries,
            s.retry_base,
            s.retry_cap,
        )
        if self.queue_limit == 0:
            self.queue_limit = self.settings.batch_queue_tokens
        if not self.prices:
            self.prices = dict(self.settings.prices)

    @property
    def poll_interval(self) -> float:
        s = self.settings
        return s.emulator_poll_interval if self.emulated else s.batch_poll_interval
