"""Live reclaim of the real Debian 12 guest, its root filesystem on the disk being rewritten.

Issue 12's bar: `virt-reclaim run --live` frees as much as an offline rewrite of the
same image would (within 5 %), the domain never leaves `running` (no lifecycle event,
no other state polled), the guest's largest stall during the job is at most 0.5 s
above its own stall under the same write load before the job (measured the same way),
and every file, also those written during the job, has the same checksum after a cold
restart. Both XMLs end on the original path, nothing is left beside the image, the
image is clean once off, and the guest is healthy.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed import data
from testbed.debian import DATA_DIR, DebianGuest
from testbed.live import (
    Ticker,
    assert_reclaimed_live,
    guest_writing,
    kill_live_jobs_at_random,
    largest_gap,
    witnessed,
)
from testbed.reclaim import leftovers, offline_size, qemu_img_check_clean, reclaim, sources

# Alone (serial): the bar is the job's own effect on the guest. With two busybox live
# tests beside it, the stall reached 0.29 s over a 0.03 s baseline (the bar: 0.33 s);
# 0.09-0.25 s without them. Other guests' load is not the job's.
pytestmark = [pytest.mark.guest, pytest.mark.serial]

MIB = 1024 * 1024
GARBAGE_MIB = 120
# How long the guest's own stall is measured before the job: a measurement window.
IDLE_WINDOW_S = 10.0
# The most the job may add to the guest's own largest stall. Measured on 2026-12-03, each
# time alone in the serial phase: +0.18 s, +0.32 s and +0.33 s (0.37 s over 0.04 s), so
# 0.3 s failed a quiet run. A guest paused by the job, or a pivot that blocks, stalls for
# seconds: 0.5 s still tells those apart. The stall's size is bench/live.py's to measure.
STALL_MARGIN_S = 0.5


def around_largest_gap(ticks: list[float], width: int = 3) -> list[float]:
    """The ticks either side of the largest gap, to tell a stall from a slow ticker."""
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    at = gaps.index(max(gaps)) if gaps else 0
    return ticks[max(0, at - width) : at + width + 2]


def assert_healthy_and_intact(guest: DebianGuest, written: int, *, cold_restart: bool) -> None:
    """Healthy now; shut down, its image is clean and holds every file the guest read.

    Checked first on the guest that lived through the jobs (its kernel log); ``written``
    is how many files the writer made meanwhile. With ``cold_restart`` the guest boots
    again and reads its files itself (30-50 s under TCG); without, they are read from the
    image on the host (testbed.content.files_in_image).
    """
    assert guest.health_problems() == []
    sums = data.checksums(guest, DATA_DIR)
    assert len([p for p in sums if p.startswith(f"{DATA_DIR}/w/")]) == written
    if not cold_restart:
        assert guest.files_once_off(DATA_DIR, mountpoint="/") == sums
        qemu_img_check_clean(guest.data_image)
        return
    guest.shutdown()
    qemu_img_check_clean(guest.data_image)
    guest.start()
    assert data.checksums(guest, DATA_DIR) == sums
    assert guest.health_problems() == []


def test_live_reclaim_of_a_writing_debian_guest_frees_as_offline_would_without_a_stall(
    make_debian_guest: Callable[..., DebianGuest], tmp_path: Path
) -> None:
    """Slow (about 45 s): the guest's own stalls measured for 10 s, the live job, an offline one."""
    guest = make_debian_guest(discard=True)
    guest.exec(f"mkdir -p {DATA_DIR}")
    data.write_text(guest, f"{DATA_DIR}/app.log", 30)
    data.write_random(guest, f"{DATA_DIR}/blob.bin", 20)
    data.write_deleted_random(guest, GARBAGE_MIB, "/var/tmp/garbage.bin")
    image = guest.data_image

    with witnessed(guest) as witness, guest_writing(guest, DATA_DIR) as writer:
        writer.wait_for_files(3)
        # The guest's own largest stall under the same load, measured the same way.
        ticker = Ticker(guest, DATA_DIR)
        time.sleep(IDLE_WINDOW_S)
        idle_ticks = ticker.stop()
        ticker = Ticker(guest, DATA_DIR)
        began = time.monotonic()
        run = reclaim(guest.name, "--live", "--min-gain", "0")
        job_s = time.monotonic() - began
        ticks = ticker.stop()
        written = writer.stop()
        witness.assert_never_left_running()

    assert_reclaimed_live(run)
    [disk] = run.result["disks"]
    offline = offline_size(image, tmp_path)
    now = os.stat(image).st_blocks * 512
    idle, stall = largest_gap(idle_ticks), largest_gap(ticks)
    step_s = {e["step"]: e["duration_s"] for e in run.events("step.finished")}
    print(
        f"\ndebian live: idle stall {idle:.3f} s ({len(idle_ticks)} ticks), job stall "
        f"{stall:.3f} s ({len(ticks)} ticks); {disk['bytes_before'] / MIB:.0f} -> "
        f"{disk['bytes_after'] / MIB:.0f} MiB, {now / MIB:.0f} MiB now, offline "
        f"{offline / MIB:.0f} MiB; job {run.result['duration_s']:.1f} s ({job_s:.1f} s with "
        f"the process); {written} files written\nsteps: {step_s}"
    )
    assert stall <= idle + STALL_MARGIN_S, (
        f"the guest stalled {stall:.2f} s during the job, {idle:.2f} s before it: "
        f"{around_largest_gap(ticks)}"
    )
    assert disk["bytes_before"] - disk["bytes_after"] > (GARBAGE_MIB - 50) * MIB, disk
    # As much freed as an offline rewrite of the same data would (within 5 %).
    assert now <= 1.05 * offline, (now, offline)
    assert sources(guest) == (str(image), str(image))
    assert leftovers(image.parent) == []
    # The slow tier's random kills boot it cold after the same live jobs.
    assert_healthy_and_intact(guest, written, cold_restart=False)


@pytest.mark.slow
def test_sigkill_at_random_moments_of_live_jobs_on_debian_then_recover(
    make_debian_guest: Callable[..., DebianGuest], tmp_path: Path
) -> None:
    """Slow tier (3-5 min): five live jobs on Debian killed at random moments, then recover.

    The same as the busybox guest's (testbed.live.kill_live_jobs_at_random), with
    Debian's own agent, systemd and a partitioned root disk; healthy and with every file
    the same after a cold restart. The guest's largest stall during each recovery is held
    to the live job's bar (STALL_MARGIN_S over its own stall under the same writes).
    """
    guest = make_debian_guest(discard=True)
    guest.exec(f"mkdir -p {DATA_DIR}")
    data.write_text(guest, f"{DATA_DIR}/app.log", 30)
    with guest_writing(guest, DATA_DIR) as writer:
        writer.wait_for_files(2)
        seen = kill_live_jobs_at_random(
            guest, tmp_path / "state",
            lambda: data.write_deleted_random(guest, 32, "/var/tmp/garbage.bin"),
            ticker_folder=DATA_DIR,
        )  # fmt: skip
        written = writer.stop()
    # Recovery finishes or undoes block jobs on a running guest: held to the job's own bar.
    assert seen.idle_stall is not None
    assert max(seen.recovery_stalls) <= seen.idle_stall + STALL_MARGIN_S, seen
    assert_healthy_and_intact(guest, written, cold_restart=True)
