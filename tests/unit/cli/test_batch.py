"""``virt-reclaim run --policy NAME`` without a domain, against libvirt's test driver.

Real qcow2 images of different gains on shut-off test domains give the daemon's order
(largest estimated gain first); a running test domain has no CPU statistics, so the idle
check finds it busy. Only dry runs and jobs that end before the rewrite run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed.daemon import write_config
from virt_reclaim.cli import batch, run
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.store import Journal

DOMAIN = """<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
<name>{name}</name><uuid>{uuid}</uuid><memory>1024</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{image}'/><target dev='vda' bus='virtio'/></disk></devices>{state}</domain>"""
SHUTOFF = "<test:runstate>5</test:runstate>"
# name: (MiB of compressible data in its image, shut off)
DOMAINS = {"vm-a-small": (3, True), "vm-big": (12, True), "vm-mid": (6, True),
           "vm-empty": (0, True), "vm-busy": (4, False), "other": (6, True)}  # fmt: skip


def uuid(index: int) -> str:
    return f"00000000-0000-0000-0000-{index:012d}"


def policy(name: str, names: str, extra: str = "") -> str:
    return (f'[[policy]]\nname = "{name}"\nmatch.names = [{names}]\nschedule.cron = "0 3 * * *"\n'
            f'idle.duration = "1s"\nrewrite.min_gain = "1MiB"\n{extra}')  # fmt: skip


@pytest.fixture
def host(tmp_path: Path) -> tuple[str, Path]:
    """(the test driver's URI, the configuration folder) with the domains above."""
    domains = []
    for index, (name, (mib, off)) in enumerate(DOMAINS.items()):
        image = tmp_path / f"{name}.qcow2"
        raw = tmp_path / f"{name}.raw"
        raw.write_bytes(b"abcdefgh" * (131072 * mib) or b"\0" * 65536)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                        str(image)], check=True, timeout=60)  # fmt: skip
        raw.unlink()
        domains.append(DOMAIN.format(name=name, uuid=uuid(index), image=image,
                                     state=SHUTOFF if off else ""))  # fmt: skip
    node = tmp_path / "node.xml"
    node.write_text(f"<node>{''.join(domains)}</node>")
    daemon_file = f'state_dir = "{tmp_path / "state"}"\nstats_interval = "1s"\n'
    etc = write_config(tmp_path / "etc", daemon_file, {
        "10-fleet.toml": policy("fleet", '"vm-*"'),
        "20-other.toml": policy("other", '"other", "vm-mid"', "priority = 10\n"),
        "30-off.toml": policy("off", '"nothing"', "enabled = false\n"),
    })  # fmt: skip
    return f"test://{node}", etc


def run_cli(uri: str, etc: Path, *args: str) -> tuple[int, Any, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "run", "--connect", uri, "--config-dir", str(etc),
         "--log-format", "json", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    data = json.loads(proc.stdout) if "--json" in args and proc.stdout.strip() else None
    return proc.returncode, data, proc.stderr


def test_a_dry_run_shows_the_daemons_order_and_every_domain_left_out(
    host: tuple[str, Path],
) -> None:
    uri, etc = host

    code, results, stderr = run_cli(uri, etc, "--policy", "fleet", "--dry-run", "--json")

    assert code == 0, stderr
    got = [(r["domain"], r["outcome"]) for r in results]
    # Largest estimated gain first, not by name; vm-mid belongs to the policy of higher
    # priority; the empty image is left out with its dry run's verdict.
    assert got == [("vm-big", "dry-run"), ("vm-busy", "dry-run"), ("vm-a-small", "dry-run"),
                   ("vm-empty", "nothing-to-do")]  # fmt: skip
    by_name = {r["domain"]: r for r in results}
    assert set(by_name) == {"vm-a-small", "vm-big", "vm-empty", "vm-busy"}
    assert by_name["vm-empty"]["outcome"] == "nothing-to-do"
    assert "below the minimum of 1.0 MiB" in by_name["vm-empty"]["reason"]
    assert by_name["vm-busy"]["reason"].endswith(
        "runs only if idle for 1 s (not watched in a dry run)"
    )
    assert "virt-reclaim: order: 1. vm-big, 2. vm-busy, 3. vm-a-small" in stderr
    assert "observing" not in stderr  # a dry run does not wait for idle.duration


def test_a_run_skips_the_busy_and_the_recent_with_their_reasons(host: tuple[str, Path]) -> None:
    uri, etc = host
    journal = Journal(etc.parent / "state")
    for name in ("vm-big", "vm-a-small"):  # reclaimed an hour ago: min_interval (7 d) holds
        index = list(DOMAINS).index(name)
        journal.begin_job(f"j-{name}", name, uuid(index), JobSettings())
        journal.finish_job(f"j-{name}", outcome=Outcome.RECLAIMED, reason="", bytes_before=2,
                           bytes_after=1, downtime_s=1.0, duration_s=1.0)  # fmt: skip
    journal.close()

    code, results, stderr = run_cli(uri, etc, "--policy", "fleet", "--json")

    assert code == 0, stderr
    reasons = {r["domain"]: (r["outcome"], r["reason"]) for r in results}
    assert reasons["vm-busy"] == ("skipped", "busy: CPU statistics unavailable")
    assert reasons["vm-big"][0] == "skipped"
    assert reasons["vm-big"][1].startswith("reclaimed recently: min_interval leaves ")
    assert reasons["vm-empty"][0] == "nothing-to-do"
    assert set(reasons) == {"vm-a-small", "vm-big", "vm-empty", "vm-busy"}
    assert "observing 4 domain(s) for 1 s" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the DOMAIN to reclaim, or --policy NAME"),
        (["--policy", "nope"], "no valid policy named 'nope'"),
        (["--policy", "off"], "policy 'off' is disabled"),
    ],
)
def test_usage_errors_say_what_to_give(
    host: tuple[str, Path], args: list[str], message: str
) -> None:
    uri, etc = host
    code, _, stderr = run_cli(uri, etc, *args)
    assert code == 2
    assert message in stderr


def test_a_domain_with_policy_keeps_its_meaning(host: tuple[str, Path]) -> None:
    """DOMAIN --policy NAME: that one domain, with the policy's settings (min_gain 1MiB here)."""
    uri, etc = host
    code, result, stderr = run_cli(uri, etc, "vm-mid", "--policy", "fleet", "--dry-run", "--json")
    assert code == 0, stderr
    assert (result["domain"], result["outcome"]) == ("vm-mid", "dry-run")


def test_only_a_failure_fails_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    results = [batch.skipped("a", "busy"), batch.skipped("b", "x", Outcome.NOTHING_TO_DO)]
    assert run._report_all(results, as_json=True) == 0
    assert [r["domain"] for r in json.loads(capsys.readouterr().out)] == ["a", "b"]
    failed = [*results, batch.skipped("c", "libvirt said no", Outcome.FAILED)]
    assert run._report_all(failed, as_json=False) == 1
    assert "c: failed - libvirt said no" in capsys.readouterr().out
