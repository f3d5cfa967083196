"""The systemd unit passes systemd-analyze verify and stays hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[3] / "systemd" / "virt-reclaim.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def installed_copy(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointing at this checkout's program (verify wants it to exist)."""
    program = Path(sys.executable).parent / "virt-reclaim"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/virt-reclaim", str(program)))
    return unit


def test_unit_verifies(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path))],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "virt-reclaim.service" not in result.stderr, result.stderr


def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(installed_copy(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_is_notify_with_watchdog_reload_and_config_exit_status() -> None:
    text = UNIT.read_text()
    reload = (
        "ExecReload=/usr/local/bin/virt-reclaim reload --config-dir /etc/virt-reclaim"
        " --pid $MAINPID"
    )
    for line in ("Type=notify", reload, "WatchdogSec=60",
                 "RestartPreventExitStatus=78", "StateDirectory=virt-reclaim"):  # fmt: skip
        assert line in text.splitlines(), line
