"""Settings: read once from TOML, checked, frozen, passed down.

Every key is declared once in `KEYS` (section, name, kind, default, help). A value
resolves as: command-line flag (applied by the CLI through `overrides`), then the
environment variable `EMBEDD_<SECTION>_<NAME>`, then the config file, then the
default. `OPENAI_BASE_URL` is honoured below the config file, as the official SDK
honours it below an explicit argument. A bad key or value raises `ConfigError`
naming the key, the value and what is allowed (the CLI exits 78).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from embedd.errors import ConfigError
from embedd.money.prices import DEFAULT_PRICES, NATIVE_DIMENSIONS, Price

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$")
_UNIT_BYTES = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}


def parse_duration(value: object) -> float:
    """Seconds from `"500ms"`, `"60s"`, `"5m"`, `"2h"`, `"1d"` or a plain number."""
    if isinstance(value, bool):
        raise ValueError('a duration such as "30s", "5m" or a number of seconds')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration that is not negative")
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ValueError('a duration such as "500ms", "30s", "5m", "2h" or a number of seconds')


def parse_size(value: object) -> int:
    """Bytes from `"190MB"`, `"256MiB"` or a plain integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)) and int(m.group(1)) > 0:
        return int(m.group(1)) * _UNIT_BYTES[m.group(2)]
    raise ValueError('a size above 0 such as 1048576, "190MB" or "256MiB"')


def _positive_int(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError("a whole number above 0")


def _non_negative_int(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("a whole number, 0 or more")


def _string(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError("a string")


def _optional_string(value: object) -> str | None:
    if value is None or value == "":
        return None
    return _string(value)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
        return value.lower() in {"true", "1", "yes"}
    raise ValueError("true or false")


def _money(value: object) -> Decimal:
    if isinstance(value, bool):
        raise ValueError("an amount in US dollars, such as 5 or 12.50")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("an amount in US dollars, such as 5 or 12.50") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("an amount in US dollars, 0 or more")
    return amount


def _optional_money(value: object) -> Decimal | None:
    if value is None or value == "":
        return None
    return _money(value)


def _one_of(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError("one of " + ", ".join(f'"{c}"' for c in choices))

    return check


def _listen(value: object) -> str | None:
    """`"HOST:PORT"` (`"[::1]:9464"` for IPv6; port 0 picks a free one), or unset."""
    text = _optional_string(value)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if sep and host and port.isdigit() and int(port) < 65536:
        return text
    raise ValueError('an address such as "127.0.0.1:9464", or "" for off')


def _base_url(value: object) -> str:
    url = _string(value).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError("an http:// or https:// URL such as https://api.openai.com/v1")
    if url.startswith("http://") and not _is_loopback(urlsplit(url).hostname or ""):
        # The API key travels in a header: in plain text it is anyone's on the path.
        raise ValueError(
            "an https:// URL (plain http:// only for a loopback host such as 127.0.0.1 or "
            "localhost, where the key never leaves the machine)"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Key:
    """One setting: where it lives, how it is checked, its default and what it does."""

    section: str
    name: str
    parse: Callable[[object], Any]
    default: object
    help: str

    @property
    def env(self) -> str:
        return f"EMBEDD_{self.section.upper()}_{self.name.upper()}"

    @property
    def dotted(self) -> str:
        return f"[{self.section}] {self.name}"


KEYS: tuple[Key, ...] = (
    Key(
        "spool",
        "root",
        _string,
        "spool",
        "the spool folder; relative paths are relative to the config file",
    ),
    Key(
        "spool",
        "state_dir",
        _optional_string,
        None,
        "where the queue database lives; default <root>/state",
    ),
    Key(
        "spool",
        "keep_inputs",
        _boolean,
        True,
        "move finished inputs to done/ (true) or delete them (false)",
    ),
    Key(
        "spool",
        "scan_interval",
        parse_duration,
        "10s",
        "how often the inbox is rescanned besides file events",
    ),
    Key(
        "inputs",
        "max_file_bytes",
        parse_size,
        "256MiB",
        "larger input files are refused into failed/",
    ),
    Key(
        "inputs",
        "max_tokens",
        _positive_int,
        8191,
        "longest input sent in one piece (the API takes 8192)",
    ),
    Key(
        "inputs",
        "long",
        _one_of("average", "truncate", "fail"),
        "average",
        "what to do with longer inputs",
    ),
    Key(
        "openai",
        "base_url",
        _base_url,
        "https://api.openai.com/v1",
        "the API's base URL (OpenAI, Azure OpenAI's v1 API, or the emulator); https:// except for a loopback host",
    ),
    Key(
        "openai",
        "model",
        _one_of(*NATIVE_DIMENSIONS),
        "text-embedding-3-large",
        "the embedding model",
    ),
    Key(
        "openai",
        "dimensions",
        _positive_int,
        3072,
        "vector size; 1024 is the documented optimized setting for -large",
    ),
    Key(
        "openai",
        "api_key_env",
        _string,
        "OPENAI_API_KEY",
        "environment variable holding the key (systemd: LoadCredential=openai_api_key)",
    ),
    Key(
        "openai",
        "organization",
        _optional_string,
        None,
        "sent as the OpenAI-Organization header when set",
    ),
    Key("openai", "project", _optional_string, None, "sent as the OpenAI-Project header when set"),
    Key(
        "openai",
        "ca_file",
        _optional_string,
        None,
        "extra CA bundle for TLS behind a corporate proxy (TLS is always verified)",
    ),
    Key("openai", "timeout", parse_duration, "300s", "longest wait for one HTTP response"),
    Key(
        "openai",
        "auth_header",
        _one_of("authorization", "api-key"),
        "authorization",
        "how the key is sent: Authorization: Bearer KEY (OpenAI), or api-key: KEY (Azure OpenAI)",
    ),
    Key("batch", "max_lines", _positive_int, 20000, "most requests in one batch file"),
    Key("batch", "max_bytes", parse_size, "190MB", "largest batch file (the API takes 200 MB)"),
    Key(
        "batch",
        "queue_tokens",
        _positive_int,
        3000000,
        "enqueued-token limit of the organisation: tier 1 3M, tier 2 20M, tier 3 100M, tier 4 500M, tier 5 4B",
    ),
    Key(
        "batch",
        "flush_after",
        parse_duration,
        "60s",
        "submit a partial batch once its oldest request waited this long",
    ),
    Key("batch", "poll_interval", parse_duration, "30s", "how often batches in flight are polled"),
    Key(
        "batch",
        "expiry_grace",
        parse_duration,
        "1h",
        "a batch still running this long after its expires_at is cancelled and its work re-queued",
    ),
    Key(
        "batch",
        "list_lag",
        parse_duration,
        "60s",
        "how long a new batch may take to appear in GET /v1/batches; a lost create is taken as not made only by a listing this long after it",
    ),
    Key("sync", "max_inputs", _positive_int, 2048, "most inputs in one /v1/embeddings request"),
    Key(
        "sync",
        "max_request_tokens",
        _positive_int,
        300000,
        "most tokens in one /v1/embeddings request",
    ),
    Key("limits", "rpm", _positive_int, 3000, "requests a minute, all endpoints"),
    Key("limits", "tpm", _positive_int, 1000000, "tokens a minute on /v1/embeddings"),
    Key("retry", "base", parse_duration, "1s", "first backoff delay"),
    Key("retry", "cap", parse_duration, "60s", "longest backoff delay"),
    Key(
        "retry",
        "max_retries",
        _non_negative_int,
        5,
        "retries of one call, and re-queues of one request after retryable failures",
    ),
    Key(
        "breaker",
        "failures",
        _positive_int,
        5,
        "consecutive failures that open the circuit breaker",
    ),
    Key(
        "breaker",
        "cooldown",
        parse_duration,
        "30s",
        "how long the breaker stays open before one probe",
    ),
    Key("daemon", "stop_timeout", parse_duration, "30s", "longest graceful stop after SIGTERM"),
    Key(
        "daemon", "log_level", _one_of("debug", "info", "warning", "error"), "info", "log verbosity"
    ),
    Key("budget", "daily_usd", _optional_money, None, "daily spending budget in USD (unset: none)"),
    Key(
        "budget",
        "monthly_usd",
        _optional_money,
        None,
        "monthly spending budget in USD (unset: none)",
    ),
    Key(
        "budget",
        "action",
        _one_of("warn", "pause"),
        "warn",
        "on crossing a budget: warn, or pause new submissions",
    ),
    Key(
        "dedup",
        "keep",
        parse_duration,
        "30d",
        "cached vectors unused this long are dropped (their texts are embedded again)",
    ),
    Key(
        "dedup",
        "max_bytes",
        parse_size,
        "10GiB",
        "largest size of the vector cache in state/vectors/; least recently used go first",
    ),
    Key(
        "state",
        "keep",
        parse_duration,
        "30d",
        "how long the rows of finished files stay for status and reports (the ledger stays)",
    ),
    Key(
        "emulator",
        "phase_time",
        parse_duration,
        "0.5s",
        "with --emulate: time a batch spends in each emulated state",
    ),
    Key(
        "emulator",
        "poll_interval",
        parse_duration,
        "0.5s",
        "with --emulate: poll interval used instead of [batch] poll_interval",
    ),
    Key(
        "metrics",
        "listen",
        _listen,
        None,
        "serve Prometheus metrics on GET /metrics at this HOST:PORT (unset: off)",
    ),
)


@dataclass(frozen=True)
class Settings:
    """Every setting, resolved and checked. Attribute names are `<section>_<name>`."""

    config_path: Path | None
    spool_root: Path
    spool_state_dir: Path
    spool_keep_inputs: bool
    spool_scan_interval: float
    inputs_max_file_bytes: int
    inputs_max_tokens: int
    inputs_long: str
    openai_base_url: str
    openai_model: str
    openai_dimensions: int
    openai_api_key_env: str
    openai_organization: str | None
    openai_project: str | None
    openai_ca_file: Path | None
    openai_timeout: float
    openai_auth_header: str
    batch_max_lines: int
    batch_max_bytes: int
    batch_queue_tokens: int
    batch_flush_after: float
    batch_poll_interval: float
    batch_expiry_grace: float
    batch_list_lag: float
    sync_max_inputs: int
    sync_max_request_tokens: int
    limits_rpm: int
    limits_tpm: int
    retry_base: float
    retry_cap: float
    retry_max_retries: int
    breaker_failures: int
    breaker_cooldown: float
    daemon_stop_timeout: float
    daemon_log_level: str
    budget_daily_usd: Decimal | None
    budget_monthly_usd: Decimal | None
    budget_action: str
    dedup_keep: float
    dedup_max_bytes: int
    state_keep: float
    emulator_phase_time: float
    emulator_poll_interval: float
    metrics_listen: str | None
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    emulate: bool = False

    @property
    def price(self) -> Price:
        """USD per 1M tokens (standard, batch) of the configured model."""
        return self.prices[self.openai_model]

    @property
    def send_dimensions(self) -> int | None:
        """`dimensions` to send: only when not the model's native size."""
        native = NATIVE_DIMENSIONS[self.openai_model]
        return None if self.openai_dimensions == native else self.openai_dimensions


def _bad(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r} is not valid: expected {allowed}")


def _parse_prices(table: object) -> dict[str, Price]:
    # A [cost.prices] table is the whole price list (it is not merged with the
    # defaults), so a model left out of it has no price: a config error.
    if table is None:
        return dict(DEFAULT_PRICES)
    if not isinstance(table, dict):
        raise _bad("[cost.prices]", table, "a table of models")
    prices: dict[str, Price] = {}
    for model, entry in table.items():
        where = f'[cost.prices] "{model}"'
        if not isinstance(entry, dict) or set(entry) != {"standard", "batch"}:
            raise _bad(
                where, entry, "{standard = <USD per 1M tokens>, batch = <USD per 1M tokens>}"
            )
        try:
            prices[model] = Price(_money(entry["standard"]), _money(entry["batch"]))
        except ValueError as exc:
            raise _bad(where, entry, str(exc)) from None
    return prices


def load_settings(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Read, resolve and check the settings. `path` None means defaults only.

    `overrides` maps attribute names (`batch_max_lines`) to command-line values.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base_dir = path.resolve().parent if path is not None else Path.cwd()

    known: dict[str, set[str]] = {}
    for key in KEYS:
        known.setdefault(key.section, set()).add(key.name)
    prices_table: object = None
    for section, body in raw.items():
        if section == "cost":
            if not isinstance(body, dict):
                raise _bad("[cost]", body, "the table [cost.prices]")
            extra = sorted(set(body) - {"prices"})
            if extra:
                raise ConfigError(
                    f"unknown key [cost] {extra[0]} in {path}; allowed: [cost.prices]"
                )
            prices_table = body.get("prices")
            continue
        if section not in known:
            allowed = ", ".join(f"[{s}]" for s in [*known, "cost.prices"])
            raise ConfigError(f"unknown section [{section}] in {path}; allowed: {allowed}")
        if not isinstance(body, dict):
            raise ConfigError(f"[{section}] must be a table")
        for name in body:
            if name not in known[section]:
                allowed = ", ".join(sorted(known[section]))
                raise ConfigError(f"unknown key [{section}] {name} in {path}; allowed: {allowed}")

    values: dict[str, Any] = {}
    given = dict(overrides or {})
    for key in KEYS:
        attr = f"{key.section}_{key.name}"
        source = key.dotted
        if attr in given:
            value, source = given.pop(attr), f"--{key.name.replace('_', '-')}"
        elif key.env in env:
            value, source = env[key.env], key.env
        elif key.name in raw.get(key.section, {}):
            value = raw[key.section][key.name]
        elif attr == "openai_base_url" and env.get("OPENAI_BASE_URL"):
            value, source = env["OPENAI_BASE_URL"], "OPENAI_BASE_URL"
        else:
            value = key.default
        try:
            values[attr] = key.parse(value)
        except ValueError as exc:
            raise _bad(source, value, str(exc)) from None
    if given:
        raise ConfigError(f"unknown override(s): {', '.join(sorted(given))}")

    root = Path(values["spool_root"]).expanduser()
    root = root if root.is_absolute() else base_dir / root
    values["spool_root"] = root
    state = values["spool_state_dir"]
    if state is None:
        values["spool_state_dir"] = root / "state"
    else:
        state_path = Path(state).expanduser()
        values["spool_state_dir"] = (
            state_path if state_path.is_absolute() else base_dir / state_path
        )
    ca = values["openai_ca_file"]
    if ca is not None:
        ca_path = Path(ca).expanduser()
        ca_path = ca_path if ca_path.is_absolute() else base_dir / ca_path
        if not ca_path.is_file():
            raise _bad("[openai] ca_file", ca, "a readable CA bundle file")
        values["openai_ca_file"] = ca_path

    prices = _parse_prices(prices_table)
    settings = Settings(config_path=path, prices=prices, **values)
    _check_combinations(settings)
    return settings


def _check_combinations(s: Settings) -> None:
    native = NATIVE_DIMENSIONS[s.openai_model]
    if s.openai_model == "text-embedding-ada-002" and s.openai_dimensions != native:
        raise _bad("[openai] dimensions", s.openai_dimensions, "1536 for text-embedding-ada-002")
    if s.openai_dimensions > native:
        raise _bad(
            "[openai] dimensions", s.openai_dimensions, f"at most {native} for {s.openai_model}"
        )
    if s.openai_model not in s.prices:
        raise ConfigError(
            f"[cost.prices] has no price for [openai] model = {s.openai_model!r}: expected "
            f'"{s.openai_model}" = {{standard = <USD per 1M tokens>, batch = <USD per 1M tokens>}}'
        )
    if s.inputs_max_tokens > 8191:
        raise _bad("[inputs] max_tokens", s.inputs_max_tokens, "at most 8191 (the API's limit)")
    if s.batch_max_lines > 50000:
        raise _bad("[batch] max_lines", s.batch_max_lines, "at most 50000 (the API's limit)")
    if s.batch_max_bytes > 200 * 10**6:
        raise _bad("[batch] max_bytes", s.batch_max_bytes, "at most 200MB (the API's limit)")
    if s.sync_max_inputs > 2048:
        raise _bad("[sync] max_inputs", s.sync_max_inputs, "at most 2048 (the API's limit)")
    if s.sync_max_request_tokens > 300000:
        raise _bad("[sync] max_request_tokens", s.sync_max_request_tokens, "at most 300000")
    if s.retry_cap < s.retry_base:
        raise _bad("[retry] cap", s.retry_cap, f"at least [retry] base ({s.retry_base}s)")


def find_config_path(flag: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """`--config`, else `$EMBEDD_CONFIG`, else `./config.toml` if it exists, else None."""
    env = os.environ if environ is None else environ
    if flag:
        return Path(flag)
    if env.get("EMBEDD_CONFIG"):
        return Path(env["EMBEDD_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None
