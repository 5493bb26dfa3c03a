"""The shipped systemd files: the unit verifies, is sandboxed, and agrees with the code."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from embedd.files.spool import DAEMON_DIR_MODE, PRODUCER_DIR_MODE
from embedd.safety import check_spool_safety
from embedd.secrets import CREDENTIAL_NAME

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "embedd.service"
MAX_EXPOSURE = 1.5

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` in the unit, by key, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def copy_with_stub(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart names a stub executable that exists here."""
    stub = tmp_path / "bin" / "embedd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/opt/embedd/bin/embedd " in text
    copy = tmp_path / "embedd.service"
    copy.write_text(text.replace("ExecStart=/opt/embedd/bin/embedd ", f"ExecStart={stub} "))
    return copy


def test_unit_has_the_required_settings() -> None:
    """Type=notify, watchdog, restart policy, user, credential and spool are as specified."""
    s = unit_settings()
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/embedd/bin/embedd run --config /etc/embedd/config.toml",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "TimeoutStopSec": "45",
        "User": "embedd",
        "Group": "embedd",
        "StateDirectory": "embedd",
        "LoadCredential": f"{CREDENTIAL_NAME}:/etc/embedd/{CREDENTIAL_NAME}",
        "ReadWritePaths": "/var/spool/embedd",
        "UMask": "0007",
        "ProtectSystem": "strict",
        "MemoryDenyWriteExecute": "true",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key


def test_config_points_at_the_units_folders() -> None:
    """systemd/config.toml sets exactly the spool root and state dir the unit grants, and
    serves metrics on loopback (127.0.0.1:9464)."""
    config = tomllib.loads((SYSTEMD / "config.toml").read_text())
    assert config == {
        "spool": {"root": "/var/spool/embedd", "state_dir": "/var/lib/embedd"},
        "metrics": {"listen": "127.0.0.1:9464"},
    }
    s = unit_settings()
    assert s["ReadWritePaths"] == [config["spool"]["root"]]
    assert "/var/lib/" + s["StateDirectory"][0] == config["spool"]["state_dir"]


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit with no warnings at all."""
    copy = copy_with_stub(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys or bad values; those show up on stderr.
    problems = [line for line in result.stderr.splitlines() if copy.name in line]
    assert result.returncode == 0, result.stderr
    assert problems == []


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is real: a misspelt key in the same unit is reported."""
    copy = copy_with_stub(tmp_path)
    copy.write_text(copy.read_text().replace("ProtectClock=", "ProtectClok="))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ProtectClok" in result.stderr


@needs_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit at most 1.5."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE


def account_id(path: Path) -> int:
    """The numeric id of `embedd` in an /etc/passwd- or /etc/group-style file."""
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == "embedd":
            return int(fields[2])
    raise AssertionError(f"no embedd entry in {path}")


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers / systemd-tmpfiles are not installed",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="creating owned folders needs root (chown)")
def test_sysusers_and_tmpfiles_build_a_safe_spool(tmp_path: Path) -> None:
    """sysusers + tmpfiles, applied to an empty root, give a setgid group-only spool."""
    (tmp_path / "etc").mkdir()
    for tool, name in (("systemd-sysusers", "embedd.sysusers"), ("systemd-tmpfiles", None)):
        args = [tool, f"--root={tmp_path}"]
        if name is None:
            args.append("--create")
            name = "embedd.tmpfiles"
        subprocess.run(
            [*args, "-"],
            input=(SYSTEMD / name).read_bytes(),
            capture_output=True,
            timeout=60,
            check=True,
        )
    uid = account_id(tmp_path / "etc" / "passwd")
    gid = account_id(tmp_path / "etc" / "group")
    spool = tmp_path / "var" / "spool" / "embedd"
    modes = {
        p.relative_to(spool).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in [spool, *spool.rglob("*")]
    }
    # The same modes the daemon gives folders it creates itself (embedd.files.spool).
    producer = {"tmp", "inbox", "inbox/sync"}
    assert set(modes) == {".", "tmp", "inbox", "inbox/sync", "outbox", "failed", "done", "work"}
    for name, mode in modes.items():
        assert mode == (PRODUCER_DIR_MODE if name in producer else DAEMON_DIR_MODE), name
    assert {(p.stat().st_uid, p.stat().st_gid) for p in [spool, *spool.rglob("*")]} == {(uid, gid)}
    check_spool_safety({name: spool / name for name in modes})
