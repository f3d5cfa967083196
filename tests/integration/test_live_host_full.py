"""A job on a host filesystem that another writer fills, on a real guest (issue 19).

The guest's data image lives on a small tmpfs. Once the live job's rewrite writes
(slowed by --rate-limit so that it is caught under way), a program on the host takes
the filesystem below its reserve: the job must stop its own writes, commit the
snapshot back at once, never take the filesystem below half the reserve, and leave
the guest running (never paused) on its original image alone, its data as it was.
The same writer during an offline job's rewrite: the convert is stopped, its temporary
image removed, the original untouched and the guest started again.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed import data
from testbed.content import Content
from testbed.guests import Guest
from testbed.live import witnessed
from testbed.reclaim import (
    RunResult,
    chains,
    host_free,
    killed_if_left_running,
    leftovers,
    parse_run,
    qemu_img_check_clean,
    start_reclaim,
)

pytestmark = pytest.mark.guest

MIB = 1024 * 1024
RESERVE = 64 * MIB


class FreeSampler:
    """Samples a folder's free bytes every 20 ms on a thread, until closed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.free: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.free.append(host_free(self.folder))

    def close(self) -> list[int]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.free


def wait_for_temp(folder: Path, job: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait (with a deadline) until the rewrite's temporary image exists beside the image."""
    deadline = time.monotonic() + timeout
    while not any(p.name.endswith(".tmp") for p in folder.iterdir()):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            stdout, stderr = job.communicate(timeout=60)
            raise AssertionError(f"the rewrite never started\n{stdout}\n{stderr[-5000:]}")
        time.sleep(0.02)


def guest_on_a_small_host(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path]
) -> tuple[Guest, Path]:
    """A guest with text and deleted data, its image on a 400 MiB tmpfs."""
    host = make_tmpfs("400M")
    files = Content(text={"app.log": 8}, deleted_mib=16)
    return make_guest(data_size="256M", discard=False, image_dir=host, content=files), host


def run_while_the_host_fills(
    guest: Guest, host: Path, hog: Path, state: Path, *options: str
) -> tuple[RunResult, list[int]]:
    """`run` (reserve 64 MiB, slowed); once it writes, ``hog`` takes the host below the reserve.

    Returns the run and the host's free bytes sampled from the hog's write to the run's end.
    """
    job = start_reclaim(guest.name, *options, "--min-gain", "0", "--free-space", "none",
                        "--rate-limit", "1MiB", "--host-reserve", "64MiB",
                        "--state-dir", str(state))  # fmt: skip
    with killed_if_left_running(job):
        wait_for_temp(host, job)
        # Another program leaves the filesystem 16 MiB below its reserve.
        subprocess.run(["fallocate", "-l", str(host_free(host) - RESERVE + 16 * MIB), str(hog)],
                       check=True, timeout=30)  # fmt: skip
        sampler = FreeSampler(host)
        try:
            stdout, stderr = job.communicate(timeout=120)
        finally:
            free = sampler.close()
    return parse_run(job.returncode, stdout, stderr), free


def test_a_live_job_returns_to_the_original_chain_when_the_host_fills(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    guest, host = guest_on_a_small_host(make_guest, make_tmpfs)
    sums = guest.content_sums
    image = guest.data_image
    hog = host / "another-program.img"

    with witnessed(guest) as witness:
        run, free = run_while_the_host_fills(guest, host, hog, tmp_path / "state", "--live")
        witness.assert_never_left_running()

    assert run.exitcode == 1, run.stderr
    assert run.result["outcome"] == "failed", run.result
    assert f"the host filesystem of {host} fell to" in run.result["reason"], run.result
    assert "below its reserve of 64.0 MiB" in run.result["reason"]
    assert [e["target"] for e in run.events("live.undone")] == ["vda"]
    # Our writes after the other program's: never down to half the reserve.
    assert len(free) > 5, "the sampler saw too little to prove anything"
    assert min(free) >= RESERVE // 2, (min(free), RESERVE)
    print(f"\n{run.result['reason']}; host free at least {min(free) / MIB:.1f} MiB "
          f"after the other program's write ({len(free)} samples)")  # fmt: skip
    assert chains(guest) == ((str(image),), (str(image),))
    assert leftovers(host) == []
    assert sorted(p.name for p in host.iterdir()) == sorted([image.name, hog.name])
    assert guest.is_running()
    guest.wait_agent()
    assert data.checksums(guest) == sums
    hog.unlink()
    qemu_img_check_clean(image)


def test_an_offline_rewrite_stops_and_the_guest_comes_back_when_the_host_fills(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    """The same writer during an offline job: the convert stops, the original stays."""
    guest, host = guest_on_a_small_host(make_guest, make_tmpfs)
    sums = guest.content_sums
    image = guest.data_image
    hog = host / "another-program.img"

    run, free = run_while_the_host_fills(guest, host, hog, tmp_path / "state")

    assert run.exitcode == 1, run.stderr
    assert run.result["outcome"] == "failed", run.result
    assert "vda: stopped the rewrite: the host filesystem of" in run.result["reason"], run.result
    assert "below its reserve of 64.0 MiB" in run.result["reason"]
    assert len(free) > 5, "the sampler saw too little to prove anything"
    assert min(free) >= RESERVE // 2, (min(free), RESERVE)
    assert sorted(p.name for p in host.iterdir()) == sorted([image.name, hog.name])
    assert guest.is_running(), "the guest was not started again"
    guest.wait_agent()
    assert data.checksums(guest) == sums
    hog.unlink()
    qemu_img_check_clean(image)
