"""``virt-reclaim reload`` (the unit's ExecReload=): it fails when the configuration is not applied.

Against a real ``virt-reclaim daemon`` on libvirt's test driver, with a socket standing in for
systemd's NOTIFY_SOCKET to read its STATUS=.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.daemon import DaemonProcess, NotifyListener, write_config
from virt_reclaim.service.daemon import Daemon
from virt_reclaim.service.hostview import Outage
from virt_reclaim.service.reloads import RELOAD_FILE

LAST_GOOD = "running on the last good configuration"


def policy(name: str, cron: str = "0 3 * * *") -> str:
    return f'[[policy]]\nname = "{name}"\nmatch.names = ["nothing-*"]\nschedule.cron = "{cron}"\n'


def reload(
    config_dir: Path, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "reload", "--config-dir", str(config_dir),
         *options],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip


class Running:
    """A daemon with its configuration folder, state folder and sd_notify listener."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state"
        daemon_file = f'uri = "test:///default"\nstate_dir = "{self.state}"\nlog_format = "json"\n'
        self.etc = write_config(tmp_path / "etc", daemon_file, {"10-first.toml": policy("first")})
        self.notify = NotifyListener(tmp_path / "notify.sock")
        self.daemon = DaemonProcess(self.etc, notify_socket=self.notify.path)
        self.notify.wait_for("READY", "1")
        self.daemon.wait_event("daemon.started", 60)

    @property
    def pid(self) -> str:
        return str(self.daemon.proc.pid)

    def last_status(self) -> str:
        return [fields["STATUS"] for _at, fields in self.notify.messages if "STATUS" in fields][-1]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    daemon = Running(tmp_path)
    yield daemon
    daemon.daemon.stop()
    daemon.notify.close()


def test_a_good_configuration_is_applied_and_exits_0(running: Running) -> None:
    (running.etc / "policies.d" / "20-second.toml").write_text(policy("second"))

    result = reload(running.etc, "--pid", running.pid)

    assert result.returncode == 0, result.stderr + running.daemon.tail()
    assert f"pid {running.pid}) applied" in result.stdout
    reloaded = running.daemon.wait_event("config.reloaded", 10)
    assert reloaded["policies"] == ["first", "second"]
    record = json.loads((running.state / RELOAD_FILE).read_text())
    assert (record["pid"], record["count"], record["verdict"]) == (int(running.pid), 1, "applied")

    # As systemd runs it: the pid from $MAINPID; a second reload waits for its own answer.
    again = reload(running.etc, env={**os.environ, "MAINPID": running.pid})

    assert again.returncode == 0, again.stderr
    assert json.loads((running.state / RELOAD_FILE).read_text())["count"] == 2
    assert LAST_GOOD not in running.last_status()


def test_a_broken_policy_exits_78_and_the_daemon_is_not_signalled(running: Running) -> None:
    broken = running.etc / "policies.d" / "20-second.toml"
    broken.write_text(policy("second", cron="61 * * * *"))

    result = reload(running.etc, "--pid", running.pid)

    assert result.returncode == 78
    # FILE:LINE since check gives the line (issue23-check).
    where = re.escape(str(broken))
    assert re.search(rf"{where}:\d+: policy .second.: schedule.cron", result.stderr)
    assert "was not asked to reload" in result.stderr
    assert running.daemon.events("config.reloading") == []
    assert not (running.state / RELOAD_FILE).exists()
    assert running.daemon.proc.poll() is None


def test_a_configuration_the_daemon_rejects_exits_1_and_status_says_so(
    running: Running, tmp_path: Path
) -> None:
    """The command validates one folder, the daemon reads another that breaks meanwhile.

    The same as a file edited between the command's check and the daemon's reading of it.
    """
    checked = tmp_path / "checked"
    shutil.copytree(running.etc, checked)
    (running.etc / "policies.d" / "20-second.toml").write_text(policy("second", cron="61 * * *"))

    result = reload(checked, "--pid", running.pid)

    assert result.returncode == 1, result.stdout
    assert "rejected the configuration (1 error(s)" in result.stderr
    assert "runs on the last good one" in result.stderr
    running.daemon.wait_event("config.reload_failed", 10)
    reloading = running.notify.wait_for("RELOADING", "1")
    ready = running.notify.wait_for("READY", "1", after=reloading)
    assert LAST_GOOD in running.notify.messages[ready][1]["STATUS"]
    assert running.daemon.proc.poll() is None
    assert json.loads((running.state / RELOAD_FILE).read_text())["verdict"] == "rejected"

    # Fixed: applied, and STATUS= no longer speaks of the last good configuration.
    (running.etc / "policies.d" / "20-second.toml").write_text(policy("second"))
    fixed = reload(running.etc, "--pid", running.pid)

    assert fixed.returncode == 0, fixed.stderr
    after = running.notify.wait_for("READY", "1", after=ready + 1)
    assert LAST_GOOD not in running.notify.messages[after][1]["STATUS"]
    running.daemon.signal(signal.SIGTERM)
    assert running.daemon.wait_exit(60) == 0


def test_a_process_that_never_answers_exits_1_after_the_timeout(tmp_path: Path) -> None:
    etc = write_config(tmp_path / "etc", f'state_dir = "{tmp_path / "state"}"\n', {})
    deaf = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, "
         "signal.SIG_IGN); print(flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert deaf.stdout is not None
        deaf.stdout.readline()  # SIGHUP is ignored from now on
        result = reload(etc, "--pid", str(deaf.pid), "--timeout", "1")
    finally:
        deaf.kill()
        deaf.wait()

    assert result.returncode == 1
    assert "did not answer within 1 s" in result.stderr


def test_no_daemon_exits_1_and_no_pid_is_a_usage_error(tmp_path: Path) -> None:
    etc = write_config(tmp_path / "etc", f'state_dir = "{tmp_path / "state"}"\n', {})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    result = reload(etc, "--pid", str(gone.pid))
    assert result.returncode == 1
    assert f"cannot signal the daemon (pid {gone.pid})" in result.stderr

    env = {k: v for k, v in os.environ.items() if k != "MAINPID"}
    usage = reload(etc, env=env)
    assert usage.returncode == 2
    assert "--pid PID" in usage.stderr
    assert reload(etc, "--pid", "zero").returncode == 2


def test_status_names_a_rejected_reload_during_an_outage_too(tmp_path: Path) -> None:
    """With libvirtd away after a rejected reload, STATUS= still says which configuration runs."""
    daemon = Daemon(str(tmp_path), clock=lambda: 100.0)
    daemon.host.outage = Outage(since=40.0, reason="gone")
    assert daemon._status() == "libvirtd unreachable for 60 s"

    daemon.rejected = "the reload at 2026-12-03 16:00:00 UTC was rejected (1 error(s))"

    assert daemon._status() == (
        "libvirtd unreachable for 60 s; running on the last good configuration: the reload at "
        "2026-12-03 16:00:00 UTC was rejected (1 error(s))"
    )
