"""The errors embedd raises, sorted by what happens next. The one drawing of the tree:
classes defined elsewhere name their module in brackets.

    EmbeddError
    ├── ConfigError               bad config, missing key: exit 78, systemd does not restart
    ├── InputRejected             the input file goes to failed/ with this reason
    ├── MalformedLine [batchlines]  an output line we cannot read: its request is missing
    ├── TransientError            retry later, with backoff (the stage's own loop)
    │   ├── APITransientError *   429 rate limit, 5xx, dropped connection, truncated body
    │   ├── BreakerOpen           the circuit breaker holds every call for now
    │   └── OutcomeUnknown        the request left, the answer did not: reconcile first
    │       └── CreateOutcomeUnknown [api] *  a batch create: the shard becomes `unknown`
    ├── APIError                  the API answered with an error (status, code, retry_after)
    │   ├── APITransientError *   (also a TransientError, above)
    │   ├── APIPermanentError     the API refused this request for good (400, 404, 422)
    │   └── SubmissionPaused      401, 403, insufficient_quota: the submission gate
    │                             (embedd.pipeline.gate) pauses; every file is kept, the reason
    │                             shows in the log and `embedd status`
    ├── FatalError                local state is broken: crash, systemd restarts us
    │   ├── LedgerCorrupt [ledger]  ledger.jsonl holds a line that is no entry
    │   └── UnsafeName [spool]      a file name would escape its folder (a bug)
    └── ApiError [emulator.errors]  the emulator's own error answers (never in the daemon)

    * two parents: CreateOutcomeUnknown is an OutcomeUnknown and an APITransientError.

Outside the tree, by design: `LedgerWriteError` [ledger] is an OSError (a full disk
holds the ledger stage, SPEC §8), `BadVector` [batchlines] a ValueError (a bad vector
in a sync reply: that request is retried), `InjectedFault` [crashpoints] a test hook.
What each one means to a unit of work — retried, failed alone, or fatal — is decided
in one place, `embedd.pipeline.supervise.verdict` (SPEC §8).

Each class's docstring is its default message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class EmbeddError(Exception):
    """embedd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(EmbeddError):
    """The configuration is not valid."""

    exit_code = 78  # EX_CONFIG: systemd's RestartPreventExitStatus=78 stops the loop


class InputRejected(EmbeddError):
    """The input file cannot be embedded."""

    def __init__(
        self,
        message: str | None = None,
        *,
        records: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.records: list[dict[str, Any]] = [dict(r) for r in records]


class TransientError(EmbeddError):
    """A temporary failure; the same call can succeed later."""

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class APIError(EmbeddError):
    """The OpenAI API returned an error."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class APITransientError(APIError, TransientError):
    """The OpenAI API failed for now; retry with backoff."""


class BreakerOpen(TransientError):
    """The circuit breaker is open: no call leaves the process until it half-opens."""


class OutcomeUnknown(TransientError):
    """The request was sent but its answer was lost; reconcile before trying again."""


class APIPermanentError(APIError):
    """The OpenAI API rejected the request; repeating it cannot succeed."""


class SubmissionPaused(APIError):
    """Submission is paused: the API refused the key, the organisation or the quota."""


class FatalError(EmbeddError):
    """embedd hit a local failure it cannot recover from."""
