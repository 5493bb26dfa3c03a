"""Tests for embedd.config: defaults, the shipped config file, precedence and bad values."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from embedd.config import (
    KEYS,
    Settings,
    find_config_path,
    load_settings,
    parse_duration,
    parse_size,
)
from embedd.errors import ConfigError
from embedd.money.prices import DEFAULT_PRICES, Price

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Load with an explicit (empty by default) environment, never the test runner's."""
    return load_settings(path, environ=dict(env or {}), overrides=overrides)


def test_defaults_load_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no config file every setting has its documented default."""
    monkeypatch.chdir(tmp_path)
    s = load(None)
    assert s.config_path is None
    assert s.spool_root == tmp_path / "spool"
    assert s.spool_state_dir == tmp_path / "spool" / "state"
    assert s.spool_keep_inputs is True
    assert s.inputs_max_file_bytes == 256 * 2**20
    assert s.inputs_max_tokens == 8191
    assert s.inputs_long == "average"
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.openai_model == "text-embedding-3-large"
    assert s.openai_dimensions == 3072
    assert s.send_dimensions is None
    assert s.openai_api_key_env == "OPENAI_API_KEY"
    assert s.openai_organization is None
    assert s.openai_ca_file is None
    assert s.batch_max_lines == 20_000
    assert s.batch_max_bytes == 190_000_000
    assert s.batch_queue_tokens == 3_000_000
    assert s.batch_flush_after == 60.0
    assert s.batch_poll_interval == 30.0
    assert (s.retry_base, s.retry_cap, s.retry_max_retries) == (1.0, 60.0, 5)
    assert (s.limits_rpm, s.limits_tpm) == (3000, 1_000_000)
    assert s.daemon_stop_timeout == 30.0
    assert s.budget_daily_usd is None
    assert s.budget_action == "warn"
    assert s.price == Price(Decimal("0.13"), Decimal("0.065"))
    assert dict(s.prices) == DEFAULT_PRICES


def test_repo_config_lists_every_key_with_its_default() -> None:
    """The shipped config.toml shows each key at its default; unset keys are commented out."""
    text = REPO_CONFIG.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    for key in KEYS:
        section = raw.get(key.section, {})
        if key.default is None:
            assert key.name not in section, key.dotted
            assert f"# {key.name} = " in text, f"{key.dotted} is not shown commented out"
        else:
            assert key.name in section, f"{key.dotted} is missing"
            assert section[key.name] == key.default, key.dotted
            assert type(section[key.name]) is type(key.default), key.dotted
    present = {(sec, name) for sec, body in raw.items() if sec != "cost" for name in body}
    assert present == {(k.section, k.name) for k in KEYS if k.default is not None}
    prices = {
        model: Price(Decimal(str(p["standard"])), Decimal(str(p["batch"])))
        for model, p in raw["cost"]["prices"].items()
    }
    assert prices == DEFAULT_PRICES


def test_repo_config_loads_to_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading config.toml gives the same settings as no file, apart from where it lives."""
    monkeypatch.chdir(tmp_path)
    from_file = load(REPO_CONFIG)
    assert from_file.config_path == REPO_CONFIG
    assert from_file.spool_root == REPO_CONFIG.parent / "spool"
    assert from_file.spool_state_dir == REPO_CONFIG.parent / "spool" / "state"
    defaults = load(None)
    same_place = dataclasses.replace(
        from_file,
        config_path=None,
        spool_root=defaults.spool_root,
        spool_state_dir=defaults.spool_state_dir,
    )
    assert same_place == defaults


BAD_CONFIGS = [
    pytest.param("[colour]\nhue = 1\n", ["[colour]", "[spool]", "[cost.prices]"], id="section"),
    pytest.param("[batch]\nmax_line = 5\n", ["max_line", "max_lines"], id="key"),
    pytest.param("[cost]\nbudget = 5\n", ["[cost] budget", "[cost.prices]"], id="cost-key"),
    pytest.param(
        '[batch]\nmax_lines = "many"\n', ["[batch] max_lines", "'many'", "whole number"], id="type"
    ),
    pytest.param(
        "[spool]\nkeep_inputs = 3\n", ["[spool] keep_inputs", "3", "true or false"], id="bool"
    ),
    pytest.param(
        '[batch]\nflush_after = "5 parsecs"\n',
        ["[batch] flush_after", "'5 parsecs'", '"5m"'],
        id="duration",
    ),
    pytest.param("[batch]\nmax_lines = -3\n", ["[batch] max_lines", "-3", "above 0"], id="neg"),
    pytest.param("[retry]\nbase = -1\n", ["[retry] base", "-1", "not negative"], id="neg-time"),
    pytest.param(
        '[batch]\nmax_bytes = "0MB"\n', ["[batch] max_bytes", "'0MB'", '"190MB"'], id="zero-size"
    ),
    pytest.param(
        "[openai]\ndimensions = 4096\n",
        ["[openai] dimensions", "4096", "at most 3072"],
        id="dims-over-native",
    ),
    pytest.param(
        '[openai]\nmodel = "text-embedding-ada-002"\ndimensions = 512\n',
        ["[openai] dimensions", "512", "1536 for text-embedding-ada-002"],
        id="ada-dims",
    ),
    pytest.param(
        '[openai]\nmodel = "text-embedding-4"\n',
        ["[openai] model", "'text-embedding-4'", '"text-embedding-3-large"'],
        id="model",
    ),
    pytest.param(
        "[batch]\nmax_lines = 50001\n",
        ["[batch] max_lines", "50001", "at most 50000"],
        id="max-lines",
    ),
    pytest.param(
        "[inputs]\nmax_tokens = 8192\n",
        ["[inputs] max_tokens", "8192", "at most 8191"],
        id="max-tokens",
    ),
    pytest.param(
        '[openai]\nmodel = "text-embedding-3-small"\ndimensions = 1536\n'
        '[cost.prices]\n"text-embedding-3-large" = { standard = 0.13, batch = 0.065 }\n',
        ["[cost.prices]", "'text-embedding-3-small'", "standard = ", "batch = "],
        id="missing-price",
    ),
    pytest.param(
        '[cost.prices]\n"text-embedding-3-large" = 0.13\n',
        ['[cost.prices] "text-embedding-3-large"', "0.13", "{standard = "],
        id="price-shape",
    ),
    pytest.param(
        '[cost.prices]\n"text-embedding-3-large" = { standard = 0.13 }\n',
        ['[cost.prices] "text-embedding-3-large"', "'standard': 0.13", "batch = "],
        id="price-missing-batch",
    ),
    pytest.param(
        '[cost.prices]\n"text-embedding-3-large" = { standard = "cheap", batch = 0.065 }\n',
        ['[cost.prices] "text-embedding-3-large"', "'cheap'", "US dollars"],
        id="price-value",
    ),
    pytest.param("[cost]\nprices = 5\n", ["[cost.prices]", "5", "a table of models"], id="prices"),
    pytest.param(
        '[openai]\nbase_url = "ftp://example.com"\n',
        ["[openai] base_url", "'ftp://example.com'", "https://"],
        id="url",
    ),
    pytest.param(
        '[openai]\nbase_url = "http://api.example.com/v1"\n',
        ["[openai] base_url", "'http://api.example.com/v1'", "https://", "loopback"],
        id="plain-http-remote",
    ),
    pytest.param(
        '[openai]\nbase_url = "http://10.0.0.7:8080/v1"\n',
        ["[openai] base_url", "'http://10.0.0.7:8080/v1'", "loopback"],
        id="plain-http-private-address",
    ),
    pytest.param(
        '[retry]\nbase = "10s"\ncap = "5s"\n', ["[retry] cap", "5.0", "[retry] base"], id="cap"
    ),
]


@pytest.mark.parametrize(("text", "named"), BAD_CONFIGS)
def test_bad_value_names_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, named: list[str]
) -> None:
    """Each kind of bad config raises ConfigError naming the key, the value and what is allowed."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    for part in named:
        assert part in caught.value.message
    assert caught.value.exit_code == 78


def test_prices_table_replaces_the_defaults(tmp_path: Path) -> None:
    """A [cost.prices] table is the whole price list, so a changed price is used as written."""
    path = write(
        tmp_path, '[cost.prices]\n"text-embedding-3-large" = { standard = 0.2, batch = 0.1 }\n'
    )
    s = load(path)
    assert dict(s.prices) == {"text-embedding-3-large": Price(Decimal("0.2"), Decimal("0.1"))}
    assert s.price == Price(Decimal("0.2"), Decimal("0.1"))


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    """A bad EMBEDD_* value is reported under the variable's name, not the file key."""
    with pytest.raises(ConfigError, match=r"EMBEDD_BATCH_MAX_LINES = 'lots'.*whole number"):
        load(None, env={"EMBEDD_BATCH_MAX_LINES": "lots"})


def test_bad_override_names_the_flag() -> None:
    """A bad command-line value is reported under its flag."""
    with pytest.raises(ConfigError, match=r"--max-lines = 0 .*above 0"):
        load(None, overrides={"batch_max_lines": 0})
    with pytest.raises(ConfigError, match="unknown override"):
        load(None, overrides={"batch_colour": 1})


def test_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist or is not TOML is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    broken = write(tmp_path, "[batch\nmax_lines = 5\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(broken)


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    """A value resolves as flag, then EMBEDD_SECTION_KEY, then the file, then the default."""
    path = write(tmp_path, "[batch]\nmax_lines = 100\n")
    env = {"EMBEDD_BATCH_MAX_LINES": "200"}
    assert load(path, env=env, overrides={"batch_max_lines": 300}).batch_max_lines == 300
    assert load(path, env=env).batch_max_lines == 200
    assert load(path).batch_max_lines == 100
    assert load(None).batch_max_lines == 20_000


def test_openai_base_url_ranks_below_the_file(tmp_path: Path) -> None:
    """OPENAI_BASE_URL beats the default but not the file, EMBEDD_* or a flag."""
    sdk = {"OPENAI_BASE_URL": "https://sdk.example/v1"}
    assert load(None, env=sdk).openai_base_url == "https://sdk.example/v1"
    path = write(tmp_path, '[openai]\nbase_url = "https://file.example/v1/"\n')
    assert load(path, env=sdk).openai_base_url == "https://file.example/v1"
    both = {**sdk, "EMBEDD_OPENAI_BASE_URL": "https://env.example/v1"}
    assert load(path, env=both).openai_base_url == "https://env.example/v1"
    flag = {"openai_base_url": "https://flag.example/v1"}
    assert load(path, env=both, overrides=flag).openai_base_url == "https://flag.example/v1"
    assert load(None).openai_base_url == "https://api.openai.com/v1"


def test_environment_strings_are_parsed_like_file_values() -> None:
    """EMBEDD_* strings become the same typed values the file would give."""
    env = {
        "EMBEDD_SPOOL_KEEP_INPUTS": "false",
        "EMBEDD_BATCH_FLUSH_AFTER": "5m",
        "EMBEDD_BATCH_MAX_BYTES": "100MB",
        "EMBEDD_BUDGET_DAILY_USD": "12.50",
        "EMBEDD_OPENAI_ORGANIZATION": "",
    }
    s = load(None, env=env)
    assert s.spool_keep_inputs is False
    assert s.batch_flush_after == 300.0
    assert s.batch_max_bytes == 100_000_000
    assert s.budget_daily_usd == Decimal("12.50")
    assert s.openai_organization is None


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative spool root or state dir is relative to the config file, not the cwd."""
    write(tmp_path / "etc", '[spool]\nroot = "data/spool"\nstate_dir = "db"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load(Path("..") / "etc" / "config.toml")
    assert s.spool_root == tmp_path / "etc" / "data" / "spool"
    assert s.spool_state_dir == tmp_path / "etc" / "db"


def test_absolute_spool_root_is_kept(tmp_path: Path) -> None:
    """An absolute spool root is used as written; the state dir defaults inside it."""
    root = tmp_path / "var" / "spool"
    path = write(tmp_path / "etc", f'[spool]\nroot = "{root}"\n')
    s = load(path)
    assert s.spool_root == root
    assert s.spool_state_dir == root / "state"


def test_ca_file_must_exist(tmp_path: Path) -> None:
    """A CA bundle that is not there is refused at load, not at the first TLS handshake."""
    path = write(tmp_path, '[openai]\nca_file = "corp.pem"\n')
    with pytest.raises(ConfigError, match=r"\[openai\] ca_file = 'corp.pem'"):
        load(path)
    (tmp_path / "corp.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert load(path).openai_ca_file == tmp_path / "corp.pem"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("60s", 60.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("0.5s", 0.5),
        ("45", 45.0),
        (90, 90.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_durations_take_a_unit_or_plain_seconds(value: object, seconds: float) -> None:
    """Durations are strings with ms/s/m/h/d or plain numbers of seconds."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5 parsecs", "-5s", "", "s", "1.5.2s", True, None, -1, [1]])
def test_bad_durations_are_refused(value: object) -> None:
    """Anything else is refused with a hint at the accepted forms."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "nbytes"),
    [
        ("190MB", 190_000_000),
        ("256MiB", 256 * 2**20),
        ("1KB", 1000),
        ("2GiB", 2 * 2**30),
        ("512", 512),
        (1024, 1024),
    ],
)
def test_sizes_take_decimal_or_binary_units(value: object, nbytes: int) -> None:
    """Sizes are bytes, or numbers with KB/MB/GB (10^3) or KiB/MiB/GiB (2^10)."""
    assert parse_size(value) == nbytes


@pytest.mark.parametrize("value", ["0", "0MB", 0, -5, "1.5MB", "12 parsecs", "MB", True, 1.0])
def test_bad_sizes_are_refused(value: object) -> None:
    """A size must be a whole number of bytes above zero."""
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


def test_config_path_comes_from_flag_then_env_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config wins over $EMBEDD_CONFIG, which wins over ./config.toml; else no file."""
    monkeypatch.chdir(tmp_path)
    env = {"EMBEDD_CONFIG": "/etc/embedd/config.toml"}
    assert find_config_path("mine.toml", env) == Path("mine.toml")
    assert find_config_path(None, env) == Path("/etc/embedd/config.toml")
    assert find_config_path(None, {}) is None
    write(tmp_path, "")
    assert find_config_path(None, {}) == Path("config.toml")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8089/v1",
        "http://127.5.6.7/v1",
        "http://localhost:8089/v1",
        "http://[::1]:8089/v1",
        "https://my-resource.openai.azure.com/openai/v1",
    ],
)
def test_base_url_plain_http_only_on_loopback(tmp_path: Path, url: str) -> None:
    """The key may travel in plain text only to this machine (the emulator, a local proxy)."""
    path = write(tmp_path, f'[openai]\nbase_url = "{url}"\n')
    assert load(path).openai_base_url == url


def test_plain_http_from_the_environment_is_refused_too() -> None:
    """OPENAI_BASE_URL goes through the same check as the file."""
    with pytest.raises(ConfigError, match=r"OPENAI_BASE_URL.*loopback"):
        load(None, env={"OPENAI_BASE_URL": "http://proxy.example/v1"})
