"""The submission gate: whether new work may be sent to the API now.

One object owns every fact of it, and is the only writer of them:

* the pause — the API refused the key, the organisation or the quota: no new
  submission (batch or sync) until `until`, the reason shown in status;
* the queue limit — the organisation's enqueued-token limit, the configured one or a
  lower one learned from a `token_limit_exceeded` batch (persisted, kept on restart);
* the queue backoff — after such a batch, no new batch until the backoff ends; each
  one in a row backs off longer.

The pause and the learned limit are persisted as daemon facts for `embedd status`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from embedd.state.store import Store


class Backoff(Protocol):
    def delay(self, attempt: int, retry_after: float | None) -> float: ...


class SubmissionGate:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        log: Any,
        *,
        queue_limit: int,
        pause_for: float,
        backoff: Backoff,
    ) -> None:
        self._store = store
        self._clock = clock
        self._log = log
        self._pause_for = pause_for
        self._backoff = backoff
        self._queue_limit = queue_limit
        self._reason: str | None = None
        self._paused_until = 0.0
        self._backoff_until = 0.0
        self._backoff_streak = 0

    # ------------------------------------------------------------------ reading

    @property
    def paused_reason(self) -> str | None:
        """Why submission is paused (the API's message), or None."""
        return self._reason

    @property
    def queue_limit(self) -> int:
        """The enqueued tokens the organisation allows (configured, or learned lower)."""
        return self._queue_limit

    def paused(self) -> bool:
        """True while a pause holds (a pause ends by itself after its time)."""
        return self._reason is not None and self._clock() < self._paused_until

    def may_submit(self) -> bool:
        """True when a new batch may be created: not paused, not backing off."""
        return not self.paused() and self._clock() >= self._backoff_until

    # ------------------------------------------------------------------ writing

    def restore(self, facts: dict[str, Any]) -> None:
        """At start: a queue limit learned by an earlier run still holds."""
        learned = facts.get("queue_limit")
        if isinstance(learned, int) and not isinstance(learned, bool):
            self._queue_limit = min(self._queue_limit, learned)

    async def pause(self, reason: str) -> None:
        """Stop submitting for a while; files are kept, the reason shows in status."""
        if self._reason != reason:
            self._log.error("submission.paused", reason=reason)
        self._reason = reason
        self._paused_until = self._clock() + self._pause_for
        await self._store.set_fact("paused", {"reason": reason, "until": self._paused_until})

    async def resume(self) -> None:
        """A submission went through: the pause (if any) is over."""
        if self._reason is not None:
            self._log.info("submission.resumed", previous_reason=self._reason)
            self._reason = None
            await self._store.set_fact("paused", None)

    async def queue_full(self, learned: int | None) -> float:
        """A batch failed for the organisation's queue limit: learn a lower `learned`
        limit, back off new batches; return the backoff in seconds."""
        if learned is not None and learned < self._queue_limit:
            self._log.warning(
                "queue_limit.learned", configured=self._queue_limit, organisation_limit=learned
            )
            self._queue_limit = learned
            await self._store.set_fact("queue_limit", learned)
        self._backoff_streak += 1
        delay = self._backoff.delay(self._backoff_streak, None)
        self._backoff_until = self._clock() + delay
        return delay
