"""Where the API key comes from, and errors that say what to fix without leaking it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from embedd.errors import ConfigError
from embedd.secrets import CREDENTIAL_NAME, load_api_key

KEY = "sk-test-0123456789abcdefABCDEF"
OTHER = "sk-test-environment-key-999999"


def credential(tmp_path: Path, content: bytes) -> Path:
    """A credentials directory like systemd's, holding *content* as the key file."""
    d = tmp_path / "credentials"
    d.mkdir()
    (d / CREDENTIAL_NAME).write_bytes(content)
    (d / CREDENTIAL_NAME).chmod(0o600)
    return d


def test_credential_file_wins_over_environment(tmp_path: Path) -> None:
    """The systemd credential is used before the environment variable."""
    d = credential(tmp_path, KEY.encode() + b"\n")
    env = {"CREDENTIALS_DIRECTORY": str(d), "OPENAI_API_KEY": OTHER}
    assert load_api_key(environ=env) == KEY


def test_credential_whitespace_is_stripped(tmp_path: Path) -> None:
    """Trailing newlines and spaces (echo, editors) are not part of the key."""
    d = credential(tmp_path, b"  " + KEY.encode() + b" \r\n\n")
    assert load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)}) == KEY


def test_environment_variable_when_no_credential(tmp_path: Path) -> None:
    """Without a credential file the named environment variable is used."""
    assert load_api_key(environ={"OPENAI_API_KEY": KEY}) == KEY
    assert load_api_key("EMBEDD_KEY", environ={"EMBEDD_KEY": KEY, "OPENAI_API_KEY": OTHER}) == KEY
    empty_dir = tmp_path / "creds"
    empty_dir.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(empty_dir), "OPENAI_API_KEY": KEY}
    assert load_api_key(environ=env) == KEY


def test_default_environ_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Called with no arguments it reads os.environ."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert os.environ["OPENAI_API_KEY"] == KEY
    assert load_api_key() == KEY


def test_missing_key_names_variable_and_file() -> None:
    """No key anywhere: the error names the variable and the credential file to create."""
    with pytest.raises(ConfigError) as err:
        load_api_key("MY_KEY_VAR", environ={})
    assert "MY_KEY_VAR" in err.value.message
    assert "/etc/embedd/openai_api_key" in err.value.message
    assert err.value.exit_code == 78


def test_missing_under_systemd_names_credentials_directory(tmp_path: Path) -> None:
    """With CREDENTIALS_DIRECTORY set but no file, the error says which folder lacks it."""
    with pytest.raises(ConfigError, match="has no openai_api_key file") as err:
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert str(tmp_path) in err.value.message


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n"])
def test_empty_credential_file_is_refused(tmp_path: Path, content: bytes) -> None:
    """An empty credential file is an error naming the file, not a fallback."""
    d = credential(tmp_path, content)
    env = {"CREDENTIALS_DIRECTORY": str(d), "OPENAI_API_KEY": OTHER}
    with pytest.raises(ConfigError, match="is empty") as err:
        load_api_key(environ=env)
    assert str(d / CREDENTIAL_NAME) in err.value.message


def test_empty_environment_variable_is_refused() -> None:
    """OPENAI_API_KEY set to nothing is an error naming the variable."""
    with pytest.raises(ConfigError, match="environment variable OPENAI_API_KEY is empty"):
        load_api_key(environ={"OPENAI_API_KEY": " "})


@pytest.mark.parametrize(
    "content",
    [KEY + "\n" + OTHER, KEY + " " + OTHER, KEY + "\x00", "Bearer " + KEY],
)
def test_malformed_key_refused_without_echoing_it(tmp_path: Path, content: str) -> None:
    """Two keys, inner spaces or control bytes are refused and no part of them is shown."""
    d = credential(tmp_path, content.encode())
    with pytest.raises(ConfigError, match="one line") as err:
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})
    text = str(err.value) + repr(err.value)
    assert KEY not in text
    assert "sk-" not in text
    assert err.value.__cause__ is None


def test_binary_credential_file_is_refused(tmp_path: Path) -> None:
    """A credential file that is not UTF-8 is an error naming the file."""
    d = credential(tmp_path, b"\xff\xfe" + KEY.encode())
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})


def test_oversized_credential_file_is_refused(tmp_path: Path) -> None:
    """A huge file in the credential's place is the wrong file, not a key."""
    d = credential(tmp_path, b"sk-" + b"a" * 70_000)
    with pytest.raises(ConfigError, match="too large"):
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})


def test_credential_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    """A folder where the key file should be is reported, not crashed on."""
    d = tmp_path / "creds"
    (d / CREDENTIAL_NAME).mkdir(parents=True)
    with pytest.raises(ConfigError, match="Cannot read the credential file"):
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})


def test_unreadable_credential_file_names_load_credential(tmp_path: Path) -> None:
    """A root-only key file read directly says to use LoadCredential= instead."""
    if os.geteuid() == 0:
        pytest.skip("root can read any file; permission errors cannot be produced")
    d = credential(tmp_path, KEY.encode())
    (d / CREDENTIAL_NAME).chmod(0)
    with pytest.raises(ConfigError, match="LoadCredential=openai_api_key"):
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})


def test_credential_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    """A link in the key's place is refused: the daemon reads no file it points at."""
    target = tmp_path / "elsewhere"
    target.write_text(KEY)
    target.chmod(0o600)
    d = tmp_path / "creds"
    d.mkdir()
    (d / CREDENTIAL_NAME).symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link") as err:
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})
    assert KEY not in str(err.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_credential_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A key file that group or others can read is refused, naming its mode and the fix."""
    d = credential(tmp_path, KEY.encode())
    (d / CREDENTIAL_NAME).chmod(mode)
    with pytest.raises(ConfigError, match=rf"mode {mode:04o}.*0600") as err:
        load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)})
    assert KEY not in str(err.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_credential_private_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    """systemd's own credential files are 0400; a hand-made 0600 file works as well."""
    d = credential(tmp_path, KEY.encode())
    (d / CREDENTIAL_NAME).chmod(mode)
    assert load_api_key(environ={"CREDENTIALS_DIRECTORY": str(d)}) == KEY
