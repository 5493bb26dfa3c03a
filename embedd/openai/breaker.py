"""Circuit breaker: stop calling an API that keeps failing, probe it after a cooldown.

A pure state machine with no I/O; every method that depends on time takes ``now``.

    closed ──N consecutive failures──▶ open ──cooldown elapsed──▶ half_open
      ▲                                  ▲                            │
      └────────── probe succeeded ───────┼────────────────────────────┤
                                         └────── probe failed ────────┘

In half-open exactly one call (the probe) is let through. A probe that never reports
back (cancelled, crashed) would wedge the breaker, so a probe older than the cooldown
is considered lost and another one is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# (state, event) → next state. Events: "failure" (below threshold), "trip" (the
# failure that reaches the threshold), "success", "cooldown" (open long enough).
TRANSITIONS: Mapping[tuple[str, str], str] = {
    (CLOSED, "success"): CLOSED,
    (CLOSED, "failure"): CLOSED,
    (CLOSED, "trip"): OPEN,
    (OPEN, "cooldown"): HALF_OPEN,
    (OPEN, "success"): CLOSED,  # a call sent before the trip came back fine
    (OPEN, "failure"): OPEN,
    (OPEN, "trip"): OPEN,
    (HALF_OPEN, "success"): CLOSED,
    (HALF_OPEN, "failure"): OPEN,
    (HALF_OPEN, "trip"): OPEN,
}


class Breaker:
    """Opens after ``failures`` consecutive failures, for ``cooldown`` seconds."""

    def __init__(self, failures: int, cooldown: float) -> None:
        if failures < 1 or cooldown < 0:
            raise ValueError("failures must be >= 1 and cooldown >= 0")
        self.threshold = failures
        self.cooldown = float(cooldown)
        self._state = CLOSED
        self.consecutive_failures = 0
        self.opened_at: float | None = None
        self._probe_started: float | None = None

    def _fire(self, event: str) -> None:
        self._state = TRANSITIONS[(self._state, event)]

    def _tick(self, now: float) -> None:
        if (
            self._state == OPEN
            and self.opened_at is not None
            and now - self.opened_at >= self.cooldown
        ):
            self._fire("cooldown")
            self._probe_started = None

    def state(self, now: float) -> str:
        """ "closed", "open" or "half_open" at ``now``."""
        self._tick(now)
        return self._state

    def allow(self, now: float) -> bool:
        """May a call go out now? In half-open, True exactly once per probe."""
        self._tick(now)
        if self._state == CLOSED:
            return True
        if self._state == OPEN:
            return False
        # Half-open: one probe at a time; a probe lost for a whole cooldown is replaced.
        if self._probe_started is None or now - self._probe_started >= self.cooldown:
            self._probe_started = now
            return True
        return False

    def record_success(self) -> None:
        """A call came back healthy: close the breaker and forget past failures."""
        self._fire("success")
        self.consecutive_failures = 0
        self.opened_at = None
        self._probe_started = None

    def record_failure(self, now: float) -> None:
        """A call failed (5xx, timeout, dropped connection)."""
        self._tick(now)
        self.consecutive_failures += 1
        was = self._state
        tripped = was == HALF_OPEN or self.consecutive_failures >= self.threshold
        self._fire("trip" if tripped else "failure")
        if was != OPEN and self._state == OPEN:
            # Entering open (from closed or a failed probe) starts a new cooldown;
            # late failures of calls sent before the trip do not extend it.
            self.opened_at = now
            self._probe_started = None

    def retry_in(self, now: float) -> float:
        """Seconds until the next probe may go out (0 when a call is allowed)."""
        self._tick(now)
        if self._state == OPEN and self.opened_at is not None:
            return max(0.0, self.opened_at + self.cooldown - now)
        if self._state == HALF_OPEN and self._probe_started is not None:
            return max(0.0, self._probe_started + self.cooldown - now)
        return 0.0

    def snapshot(self, now: float) -> dict[str, object]:
        """State for ``embedd status``."""
        return {
            "state": self.state(now),
            "consecutive_failures": self.consecutive_failures,
            "opened_at": self.opened_at,
            "retry_in_s": round(self.retry_in(now), 3),
        }
