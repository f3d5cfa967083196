"""The estimated after-size against the real one, on real guests (issue 10).

The goal: within 25 % on first and repeated reclaims, with and without compression,
through a trim and through a zero-fill. A repeated reclaim by the daemon must also
believe the gain: with the policy's default min_gain (64 MiB) an estimate that
ignored compression would call the guest not worth it, window after window.

Every measured error is printed (run with -s to see them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from testbed import data
from testbed.content import Content
from testbed.daemon import DaemonProcess, daemon_toml, write_config
from testbed.guests import Guest
from testbed.reclaim import qemu_img_check_clean, reclaim

pytestmark = pytest.mark.guest

MIB = 1024 * 1024
TOLERANCE = 0.25
# cron "* * * * *", 10 min: the window found open at the start opens after 5 s; the job
# of a small guest takes 10-30 s under TCG.
WINDOW_WAIT_S = 30
JOB_S = 180


def estimate_error(case: str, estimated: int, real: int) -> float:
    """The estimate's error relative to the real after-size; printed for the record."""
    error = (estimated - real) / real
    print(f"\nestimate | {case} | estimated {estimated / MIB:.1f} MiB | real {real / MIB:.1f} MiB "
          f"| error {100 * error:+.1f} %")  # fmt: skip
    return error


def reclaimed_disk(guest: Guest, state: Path, *options: str) -> dict[str, Any]:
    """Reclaim the guest with `run` (journal in ``state``); its one disk's figures."""
    run = reclaim(guest.name, "--state-dir", str(state), "--min-gain", "0", *options)
    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "reclaimed", run.result
    [disk] = run.result["disks"]
    return {**disk, "free_space": run.result["free_space"]}


def dirty(text_mib: int) -> Content:
    """Log text and 4 MiB random kept, 32 MiB random deleted."""
    return Content(text={"app.log": text_mib}, random={"blob.bin": 4}, deleted_mib=32)


def policy(name: str, domain: str) -> str:
    """A window every minute, no interval between reclaims, and the default min_gain."""
    return (
        f'[[policy]]\nname = "{name}"\nmatch.names = ["{domain}"]\n'
        'schedule.cron = "* * * * *"\nschedule.window = "10m"\nschedule.min_interval = "0s"\n'
        # A TCG guest doing nothing uses a few percent of a core for its timers.
        'idle.duration = "5s"\nidle.cpu_percent = 30\nshutdown.timeout = "60s"\n'
    )


def history(state: Path, domain: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "history", "--json", "--state-dir", str(state),
         domain],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    jobs: list[dict[str, Any]] = json.loads(proc.stdout)
    return jobs


def test_second_reclaim_of_a_compressed_guest_is_estimated_from_history_and_done_by_the_daemon(
    make_guest: Callable[..., Guest], daemons: list[DaemonProcess], tmp_path: Path
) -> None:
    """Slow (2-3 min): two reclaims with a zero-fill each, the second by a daemon's window.

    The live data must be large (192 MiB of text) for the estimate's error to be measurable
    within 25 % (see below).
    """
    # No discard, so a zero-fill: the rewrite is what frees the new garbage. (A trim through
    # discard='unmap' frees it on the host at once, and the rewrite that follows gains too
    # little for the default min_gain: the job ends nothing-to-do.)
    guest = make_guest(data_size="512M", discard=False, content=dirty(text_mib=192))
    # Live data that compresses to about half the new garbage, as on a real guest (the
    # Debian guest of issue 10: 258 MiB after against 300 MB deleted). A zero-fill leaves
    # the root reserve alone, and ext4's placement decides whether the newest deleted data
    # lies there (then ~27 MB of it stays) or not (none stays); the estimate counts the
    # reserve's share of it (~11 MB). Beside 9 MB of live data that share alone is +120 %
    # or -45 %; beside 59 MB it is within 25 % either way.
    state = tmp_path / "state"
    first = reclaimed_disk(guest, state)
    assert first["estimate_basis"] == "sample", first
    first_error = estimate_error("first, zstd, zero", first["estimated_after"],
                                 first["bytes_after"])  # fmt: skip
    # New garbage in the compressed guest: a 96 MiB gain, above the default min_gain.
    guest.wait_agent()
    sums = data.checksums(guest)
    data.write_deleted_random(guest, 96)
    config_dir = write_config(
        tmp_path / "etc", daemon_toml(state), {"10-test.toml": policy("again", guest.name)}
    )
    daemon = DaemonProcess(config_dir)
    daemons.append(daemon)

    finished = daemon.wait_event(
        "job.finished", WINDOW_WAIT_S + JOB_S, domain=guest.name, dry_run=None
    )

    assert finished["outcome"] == "reclaimed", daemon.tail()
    [estimated] = daemon.events("disk.estimated", domain=guest.name, dry_run=None)
    assert estimated["basis"] == "history", estimated
    error = estimate_error("second, zstd, zero, by the daemon", finished["estimated_after"],
                           finished["bytes_after"])  # fmt: skip
    assert abs(first_error) <= TOLERANCE
    assert abs(error) <= TOLERANCE
    assert finished["bytes_before"] - finished["bytes_after"] > 64 * MIB, finished
    # history shows the estimate beside the result, newest first.
    jobs = history(state, guest.name)
    assert [j["outcome"] for j in jobs] == ["reclaimed", "reclaimed"], jobs
    assert jobs[0]["estimated_after"] == finished["estimated_after"]
    assert jobs[0]["bytes_after"] == finished["bytes_after"]
    qemu_img_check_clean(guest.data_image)
    guest.wait_agent()
    assert data.checksums(guest) == sums


@pytest.mark.parametrize(
    ("discard", "method", "compressions"),
    [(True, "trim", ("none", "zstd")), (False, "zero", ("none",))],
    ids=["trim", "zero"],
)
def test_first_reclaims_are_estimated_within_a_quarter_with_and_without_compression(
    make_guest: Callable[..., Guest],
    tmp_path: Path,
    discard: bool,
    method: str,
    compressions: tuple[str, ...],
) -> None:
    """The first reclaim with each compression; zstd through a zero-fill is the daemon test's."""
    # Written by the guest: where ext4 puts the deleted data decides what a zero-fill
    # leaves in the root reserve, and beside this little live data a file placed by
    # mkfs (testbed.content) put the estimate 42 % off.
    guest = make_guest(data_size="512M", discard=discard)
    data.write_text(guest, "/data/app.log", 16)
    data.write_random(guest, "/data/blob.bin", 4)
    data.write_deleted_random(guest, 32)
    state = tmp_path / "state"
    errors = {}

    for index, compression in enumerate(compressions):
        if index:
            # The first compressed reclaim of the now compact image, with new text and garbage.
            guest.wait_agent()
            data.write_text(guest, "/data/more.log", 8)
            data.write_deleted_random(guest, 32)
        disk = reclaimed_disk(guest, state, "--compression", compression)
        assert disk["free_space"] == method, disk
        assert disk["estimate_basis"] == "sample", disk
        errors[compression] = estimate_error(
            f"first, {compression}, {method}", disk["estimated_after"], disk["bytes_after"]
        )

    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors
