"""Where the OpenAI API key comes from, and the errors that say how to provide it.

The key is looked up, in order:

1. ``$CREDENTIALS_DIRECTORY/openai_api_key`` — systemd's ``LoadCredential=`` puts the
   root-only file ``/etc/embedd/openai_api_key`` there, readable by this service alone;
2. the environment variable named by ``[openai] api_key_env`` (``OPENAI_API_KEY``).

It is never read from the config file (config files get copied, committed and pasted
into tickets). Every error is a `ConfigError` (exit 78, systemd does not restart) whose
message names the file or variable to fix and never contains any part of a value.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from embedd.errors import ConfigError

CREDENTIAL_NAME: Final = "openai_api_key"
"""The credential name in the unit's ``LoadCredential=openai_api_key:/etc/...``."""

DEFAULT_ENV_NAME: Final = "OPENAI_API_KEY"

# A key is 50 to 200 characters; anything much larger is the wrong file.
_MAX_CREDENTIAL_BYTES: Final = 64 * 1024


def check_key_text(text: str, source: str) -> str:
    """Return the key in *text* without surrounding whitespace, or raise `ConfigError`.

    *source* names where the text came from, for the message. A key that is empty, or
    that has whitespace or control characters inside it (two lines pasted into the
    file, say), cannot go into an HTTP header and is refused here rather than at the
    first request.
    """
    key = text.strip()
    if not key:
        raise ConfigError(f"The OpenAI API key in {source} is empty: put the key there.")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(
            f"The OpenAI API key in {source} contains spaces, line breaks or control "
            "characters: it must hold the key alone, on one line."
        )
    return key


def _read_credential(path: Path) -> str:
    """Read the credential file, turning every failure into a `ConfigError` about it.

    The file is opened without following a symbolic link (a link planted in the
    credentials folder could point at any file the service may read), and refused when
    its group or others may read or write it: a key that others can read is already
    leaked, and the operator must know.
    """
    source = f"the credential file {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except PermissionError:
        raise ConfigError(
            f"Cannot read {source}: permission denied. Under systemd, load it with "
            f"LoadCredential={CREDENTIAL_NAME}:/etc/embedd/{CREDENTIAL_NAME} instead of "
            "reading it directly."
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"{source.capitalize()} is a symbolic link: put the key in a regular file."
            ) from None
        raise ConfigError(f"Cannot read {source}: {exc.strerror or type(exc).__name__}.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConfigError(f"Cannot read {source}: it is not a regular file.")
    with os.fdopen(fd, "rb") as f:
        if info.st_mode & 0o066:
            raise ConfigError(
                f"{source.capitalize()} can be read or written by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): make it 0600 (or 0400) and owned by the "
                "service's user."
            )
        try:
            data = f.read(_MAX_CREDENTIAL_BYTES + 1)
        except OSError as exc:
            raise ConfigError(
                f"Cannot read {source}: {exc.strerror or type(exc).__name__}."
            ) from None
    if len(data) > _MAX_CREDENTIAL_BYTES:
        raise ConfigError(f"{source.capitalize()} is too large to be an API key: check the file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source.capitalize()} is not UTF-8 text: check the file.") from None
    return check_key_text(text, source)


def load_api_key(env_name: str = DEFAULT_ENV_NAME, environ: Mapping[str, str] = os.environ) -> str:
    """Return the OpenAI API key from the systemd credential or the environment.

    Raises `ConfigError` naming what to fix when neither provides a usable key.
    """
    cred_dir = environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / CREDENTIAL_NAME
        if path.exists() or path.is_symlink():
            return _read_credential(path)
    value = environ.get(env_name)
    if value is not None:
        return check_key_text(value, f"the environment variable {env_name}")
    raise ConfigError(missing_key_message(env_name, cred_dir))


def missing_key_message(env_name: str, credentials_directory: str | None) -> str:
    """The sentence that tells the operator how to supply a key when none was found."""
    if credentials_directory:
        return (
            f"No OpenAI API key: {credentials_directory} has no {CREDENTIAL_NAME} file and "
            f"{env_name} is not set. Put the key in /etc/embedd/{CREDENTIAL_NAME} (mode 0600, "
            f"owner root) and keep LoadCredential={CREDENTIAL_NAME}:/etc/embedd/"
            f"{CREDENTIAL_NAME} in the unit."
        )
    return (
        f"No OpenAI API key: set the environment variable {env_name}, or under systemd "
        f"put the key in /etc/embedd/{CREDENTIAL_NAME} and load it with "
        f"LoadCredential={CREDENTIAL_NAME}:/etc/embedd/{CREDENTIAL_NAME}."
    )


__all__ = [
    "CREDENTIAL_NAME",
    "DEFAULT_ENV_NAME",
    "check_key_text",
    "load_api_key",
    "missing_key_message",
]
