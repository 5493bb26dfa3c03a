"""Logging for embedd: structlog, one line per event, secrets redacted on the way out.

Every log line, whether it comes from embedd's structlog loggers or from a library's
stdlib `logging` logger (aiohttp, asyncio), passes through one processor chain:

    level and logger name -> ISO-8601 UTC timestamp -> exception text
    -> redaction -> renderer (JSON lines, or key=value for people at a terminal)

Redaction runs after exceptions are formatted to text, so a secret inside an exception
message or a traceback's repr is caught too. It replaces, in every field and nested
value, each known secret value (the loaded API key) and anything shaped like a key
(``sk-…``, ``sk-proj-…``, ``Bearer …``), and hides the values of fields named like
credentials (``authorization``, ``api_key``, …).

Call `configure_logging` once at start, and again with ``secrets=[key]`` as soon as the
API key is loaded; it replaces its own previous configuration each time.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from embedd.errors import ConfigError

REDACTED: Final = "[REDACTED]"

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Shapes of credentials that must never reach a log line, whoever's they are.
# OpenAI keys: sk-..., sk-proj-..., sk-svcacct-... (all within this character class).
# The look-behind keeps words like "task-…" or "disk-…" out of it.
_KEY_SHAPED: Final = re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{16,}")
# The credential after "Bearer" in an Authorization header, wherever it is quoted.
_BEARER: Final = re.compile(r"(?i)\bbearer\s+([^\s\"',;}\]]+)")
# Field names whose values are credentials no matter what they look like.
_SENSITIVE_NAMES: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api_key",
        "api-key",
        "apikey",
        "x-api-key",
        "openai_api_key",
        "password",
        "secret",
        "token",
        "access_token",
    }
)
_SCALARS: Final = (int, float, bool, type(None))
# Nested structures deeper than this are rendered as text and redacted as a whole.
_MAX_DEPTH: Final = 8

# The handler this module installed on the root logger, so reconfiguring replaces it.
_HANDLER_NAME: Final = "embedd"


class Redactor:
    """Replaces secrets in strings and, recursively, in containers.

    *secrets* are exact values (the API key); empty ones are ignored. The key-shaped
    patterns apply always.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: tuple[str, ...] = tuple(sorted({s for s in secrets if s and s.strip()}))

    def text(self, value: str) -> str:
        """Return *value* with every secret and key-shaped token replaced."""
        spans = self._spans(value)
        if not spans:
            return value
        # Matches are found on the original text and merged, so one rule's replacement
        # can never break another rule's match and leave part of a key behind.
        spans.sort()
        parts: list[str] = []
        pos = 0
        end = -1
        for start, stop in spans:
            if start > end:
                if end >= 0:
                    parts.append(REDACTED)
                parts.append(value[pos:start])
                end = stop
            else:
                end = max(end, stop)
            pos = end
        parts.append(REDACTED)
        parts.append(value[pos:])
        return "".join(parts)

    def _spans(self, value: str) -> list[tuple[int, int]]:
        """Where each secret or key-shaped token occurs in *value*, as (start, stop)."""
        spans = []
        for secret in self.secrets:
            start = value.find(secret)
            while start != -1:
                spans.append((start, start + len(secret)))
                start = value.find(secret, start + 1)
        spans.extend(m.span() for m in _KEY_SHAPED.finditer(value))
        spans.extend(m.span(1) for m in _BEARER.finditer(value))
        return spans

    def value(self, value: object, depth: int = 0) -> object:
        """Return a copy of *value* with secrets replaced at any depth."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, _SCALARS):
            return value
        if depth >= _MAX_DEPTH:
            return self.text(repr(value))
        if isinstance(value, bytes | bytearray):
            return self.text(bytes(value).decode("utf-8", errors="replace"))
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.field(str(k), v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(v, depth + 1) for v in value]
        # Any other object is rendered through str() or repr() later; if either shows
        # a secret, log the redacted repr instead of the object.
        for shown in (str(value), repr(value)):
            if self.text(shown) != shown:
                return self.text(repr(value))
        return value

    def field(self, name: str, value: object, depth: int = 0) -> object:
        """Redact one named field: credential-named fields are hidden entirely."""
        if name.lower() in _SENSITIVE_NAMES and value not in (None, ""):
            return REDACTED
        return self.value(value, depth)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        """The structlog processor: redact every field of the event."""
        return {k: self.field(k, v) for k, v in event_dict.items()}


def _shared_processors() -> list[Processor]:
    """Processors that both structlog events and stdlib records go through first."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


_FIRST_KEYS: Final = ("timestamp", "level", "logger", "event")


def _order_keys(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, logger and event first, so JSON lines scan well."""
    head = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    return {**head, **{k: v for k, v in event_dict.items() if k not in head}}


def _parse_level(level: str) -> int:
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        choices = ", ".join(LEVELS)
        raise ConfigError(f"Unknown log level {level!r}: set it to one of {choices}.") from None


def build_formatter(
    redactor: Redactor, *, json_output: bool, colors: bool = False
) -> structlog.stdlib.ProcessorFormatter:
    """The `logging.Formatter` that renders every record: exception text, redaction, output."""
    renderer: Processor
    if json_output:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=structlog.dev.plain_traceback
        )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            # Exceptions become text *before* redaction, so tracebacks are redacted too.
            structlog.processors.format_exc_info,
            redactor,
            _order_keys,
            renderer,
        ],
    )


def configure_logging(
    level: str = "info",
    json_output: bool | None = None,
    secrets: Sequence[str] = (),
    *,
    stream: TextIO | None = None,
) -> None:
    """Send all logging (structlog and stdlib) to *stream* (stderr) with secrets redacted.

    *json_output* None picks JSON lines when the stream is not a terminal (systemd's
    journal, files, pipes) and readable ``key=value`` lines when it is, in colour unless
    ``NO_COLOR`` is set. Calling it again
    replaces the previous configuration. Raises `ConfigError` for an unknown *level*.
    """
    numeric = _parse_level(level)
    out = sys.stderr if stream is None else stream
    is_tty = bool(getattr(out, "isatty", lambda: False)())
    use_json = (not is_tty) if json_output is None else json_output
    colors = is_tty and not os.environ.get("NO_COLOR")

    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(build_formatter(Redactor(secrets), json_output=use_json, colors=colors))

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # One line per HTTP request (the emulator's access log) or per inotify batch is
    # noise next to embedd's own events; their warnings still come through.
    for chatty in ("aiohttp.access", "watchfiles.main"):
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))
    # aiosqlite logs every statement with its parameters at debug level.
    logging.getLogger("aiosqlite").setLevel(max(numeric, logging.INFO))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a second configure_logging (with the API key) must take effect
        # for loggers that modules created at import time.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **initial: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger named *name* (use ``__name__``), bound to *initial* fields."""
    return structlog.stdlib.get_logger(name, **initial)


__all__ = [
    "LEVELS",
    "REDACTED",
    "Redactor",
    "build_formatter",
    "configure_logging",
    "get_logger",
]
