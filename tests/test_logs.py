"""Logging output: JSON or key=value lines, UTC timestamps, and secrets never shown."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from embedd.errors import ConfigError
from embedd.logs import REDACTED, Redactor, configure_logging, get_logger

SECRET = "not-key-shaped-but-secret-0xC0FFEE"  # only the known-secret rule can catch it
SK = "sk-test-abcdefghijklmnopqrstuvwxyz012345"
PROJ = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz_0123-456"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the root logger and structlog back as they were after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    structlog.reset_defaults()


def capture(json_output: bool, level: str = "info") -> io.StringIO:
    """Configure logging into a string buffer with SECRET registered."""
    out = io.StringIO()
    configure_logging(level, json_output=json_output, secrets=[SECRET], stream=out)
    return out


def emit_everything(log_name: str = "embedd.test") -> None:
    """Log secrets in every place they could hide: message, fields, nesting, exceptions."""
    log = get_logger(log_name)
    log.info(
        "using key %s",
        SECRET,
        key=SECRET,
        nested={"deep": [{"value": f"x{SECRET}y"}], "tuple": (SK,)},
        headers={"Authorization": f"Bearer {SK}", "api-key": "azure0123456789abcdef"},
        raw=SECRET.encode(),
        obj=ValueError(f"wrapped {PROJ}"),
    )
    try:
        raise RuntimeError(f"request failed with key {SECRET} and {PROJ}")
    except RuntimeError:
        log.exception("upload failed")
    try:
        try:
            raise KeyError(SK)
        except KeyError as inner:
            raise OSError("outer") from inner
    except OSError:
        log.error("chained", exc_info=True)
    # A library logging through stdlib, as aiohttp does.
    lib = logging.getLogger("aiohttp.client")
    lib.warning("headers: %r", {"Authorization": f"Bearer {SECRET}"})
    try:
        raise ConnectionError(f"proxy said {SECRET}")
    except ConnectionError:
        lib.exception("connection lost")


def assert_clean(text: str) -> None:
    """No secret, key or bearer credential in *text*, and redaction markers present."""
    for secret in (SECRET, SK, PROJ, "azure0123456789abcdef", "0xC0FFEE", "abcdefghijklmnop"):
        assert secret not in text
    assert REDACTED in text


@pytest.mark.parametrize("json_output", [True, False])
def test_secrets_never_reach_output(json_output: bool) -> None:
    """Known secrets, sk- keys and Bearer values are replaced everywhere, exceptions too."""
    out = capture(json_output)
    emit_everything()
    text = out.getvalue()
    assert_clean(text)
    # The surrounding information is still there.
    assert "upload failed" in text
    assert "RuntimeError: request failed with key" in text
    assert "connection lost" in text
    assert "ConnectionError: proxy said" in text
    assert "KeyError" in text


def test_json_lines_carry_level_logger_and_utc_timestamp() -> None:
    """Each JSON line parses, with level, logger name and an ISO-8601 UTC timestamp."""
    out = capture(json_output=True)
    get_logger("embedd.files.spool").info("claimed", file="a.txt", size=3)
    logging.getLogger("aiohttp.access").warning("stdlib %s", "line")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert list(lines[0])[:4] == ["timestamp", "level", "logger", "event"]
    assert [(e["event"], e["level"], e["logger"]) for e in lines] == [
        ("claimed", "info", "embedd.files.spool"),
        ("stdlib line", "warning", "aiohttp.access"),
    ]
    assert lines[0]["file"] == "a.txt"
    assert lines[0]["size"] == 3
    for e in lines:
        stamp = datetime.fromisoformat(e["timestamp"])
        assert e["timestamp"].endswith("Z")
        assert stamp.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)


def test_console_output_is_key_value_without_colors() -> None:
    """The readable format is one key=value line, with no ANSI escapes off a terminal."""
    out = capture(json_output=False)
    get_logger("embedd.files.spool").info("claimed", file="a.txt")
    line = out.getvalue().strip()
    assert "claimed" in line
    assert "file=a.txt" in line
    assert "[embedd.files.spool]" in line
    assert "\x1b[" not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_level_filters_both_structlog_and_stdlib() -> None:
    """Below the configured level nothing is written, from either kind of logger."""
    out = capture(json_output=True, level="warning")
    get_logger("embedd.x").info("hidden")
    logging.getLogger("aiohttp.client").info("hidden too")
    get_logger("embedd.x").warning("shown")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["shown"]


def test_unknown_level_is_a_config_error() -> None:
    """A misspelt level is reported with the valid choices."""
    with pytest.raises(ConfigError, match="debug, info, warning, error, critical"):
        configure_logging("verbose", stream=io.StringIO())


def test_reconfigure_replaces_handler_and_adds_secret() -> None:
    """Configuring again (once the key is loaded) neither duplicates lines nor misses it."""
    log = get_logger("embedd.early")  # created before the key is known, like module loggers
    first = io.StringIO()
    configure_logging("info", json_output=True, stream=first)
    second = io.StringIO()
    configure_logging("info", json_output=True, secrets=[SECRET], stream=second)
    log.info("key loaded", value=SECRET)
    assert first.getvalue() == ""
    lines = second.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["value"] == REDACTED


def test_redactor_rules() -> None:
    """Empty secrets are ignored, longer secrets win, and key-like words are left alone."""
    r = Redactor(["", "  ", "abc", "abcdef"])
    assert r.text("xabcdefx abc") == f"x{REDACTED}x {REDACTED}"
    words = "task-ghijklmnopqrstuvwxyz disk-0123456789ghijklmn"
    assert Redactor().text(words) == words
    assert r.text("sk-short") == "sk-short"
    assert r.text(f"key={SK}.") == f"key={REDACTED}."
    assert r.text("authorization: BEARER tok123") == f"authorization: BEARER {REDACTED}"
    assert r.field("Authorization", "Basic dXNlcjpwYXNz") == REDACTED
    assert r.field("token", None) is None
    assert r.field("tokens", 12) == 12
    assert r.value({"a": [1, 2.5, None, True]}) == {"a": [1, 2.5, None, True]}


def test_redactor_handles_deep_and_odd_values() -> None:
    """Very deep nesting and arbitrary objects are redacted through their text."""

    class Holder:
        def __repr__(self) -> str:
            return f"Holder({SECRET})"

    r = Redactor([SECRET])
    deep: object = SECRET
    for _ in range(20):
        deep = [deep]
    assert SECRET not in repr(r.value(deep))
    assert r.value(Holder()) == f"Holder({REDACTED})"
    plain = object()
    assert r.value(plain) is plain


def run_child(
    code: str, *, stderr: int | None = None, no_color: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run *code* in a fresh interpreter with embedd importable."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["PYTHONPATH"] = str(ROOT)
    if no_color:
        env["NO_COLOR"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        timeout=60,
        check=True,
    )


CHILD = f"""
import logging
from embedd.logs import configure_logging, get_logger
configure_logging("info", secrets=[{SECRET!r}])
log = get_logger("embedd.child")
log.info("starting", key={SECRET!r}, other={SK!r})
try:
    raise RuntimeError({PROJ!r})
except RuntimeError:
    logging.getLogger("aiohttp.client").exception("failed with %s", {SECRET!r})
"""


def test_stderr_of_a_process_is_json_and_clean_when_not_a_tty() -> None:
    """Under systemd (stderr is a pipe) the process writes redacted JSON lines to stderr."""
    result = run_child(CHILD)
    assert result.stdout == b""
    text = result.stderr.decode()
    assert_clean(text)
    events = [json.loads(line) for line in text.splitlines()]
    assert [e["event"] for e in events] == ["starting", f"failed with {REDACTED}"]
    assert "RuntimeError" in events[1]["exception"]


def run_on_terminal(no_color: bool) -> str:
    """Run CHILD with stderr on a pseudo-terminal and return what it wrote there."""
    master, slave = pty.openpty()
    try:
        run_child(CHILD, stderr=slave, no_color=no_color)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return b"".join(chunks).decode()


def test_stderr_on_a_terminal_is_readable_and_clean() -> None:
    """On a terminal the output is key=value text (coloured), still redacted."""
    raw = run_on_terminal(no_color=False)
    assert "\x1b[" in raw
    text = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    assert_clean(text)
    assert "starting" in text
    assert "key=[REDACTED]" in text
    assert not text.lstrip().startswith("{")


def test_no_color_on_a_terminal_means_plain_text() -> None:
    """NO_COLOR turns off ANSI colours even on a terminal."""
    text = run_on_terminal(no_color=True)
    assert "\x1b[" not in text
    assert "key=[REDACTED]" in text
