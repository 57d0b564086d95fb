"""deploy/systemd/lastseen.service names only settings that exist, passes ``systemd-analyze
verify`` where systemd is installed, and waits longer than the process's own stop deadline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lastseen.config.settings import OPTIONS, Settings
from lastseen.runtime.lifetime import stop_deadline

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "lastseen.service"
SETTINGS = {option.env for option in OPTIONS}


def _unit() -> dict[str, list[str]]:
    """The unit's directives: name -> values, in order."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_names_settings_that_exist_and_outwaits_the_stop_deadline() -> None:
    """Every LASTSEEN_* the unit sets is a setting, each secret comes from a credential, and
    systemd waits longer than the stop deadline of those settings with the delay the
    manifests use, before it kills what is left."""
    unit = _unit()
    env = dict(
        value.strip('"').split("=", 1) for value in unit["Environment"] if "LASTSEEN_" in value
    )
    assert set(env) <= SETTINGS, set(env) - SETTINGS
    credentials = {value.split(":", 1)[0] for value in unit["LoadCredential"]}
    assert env["LASTSEEN_ADMIN_TOKEN_FILE"] == "%d/admin-token"
    assert env["LASTSEEN_WEBHOOK_SECRET_FILE"] == "%d/webhook-secret"
    assert "passfile=%d/pgpass" in env["LASTSEEN_DATABASE_URL"]
    assert "target_session_attrs=read-write" in env["LASTSEEN_DATABASE_URL"]
    assert credentials == {"admin-token", "webhook-secret", "pgpass"}
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["KillMode"] == ["mixed"]
    settings = Settings.load({}, {"shutdown_delay": 5.0})
    assert float(unit["TimeoutStopSec"][0]) > stop_deadline(settings)
    assert unit["StateDirectory"] == ["lastseen"]
    assert env["LASTSEEN_DATA_DIR"] == "%S/lastseen"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd is not installed")
def test_systemd_analyze_verify_finds_nothing_in_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (which warns but exits 0) says nothing about the unit, with
    its ExecStart pointed at this environment's lastseen; and it does speak of a broken copy,
    so that its silence means something."""
    lastseen = Path(sys.executable).with_name("lastseen")
    text = UNIT.read_text().replace("/opt/lastseen/bin/lastseen", str(lastseen))

    def verify(unit_text: str) -> str:
        path = tmp_path / "lastseen.service"
        path.write_text(unit_text)
        done = subprocess.run(
            ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
        )
        return (done.stdout + done.stderr).strip()

    assert verify(text) == ""
    assert "kill mode" in verify(text.replace("KillMode=mixed", "KillMode=bogus"))
