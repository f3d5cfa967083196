"""Crash safety on a real guest: SIGKILL of `virt-reclaim run` at every step, then `recover`.

After each: the data checksums are unchanged, the guest is in its previous
state, no temporary file or backup is left, the image passes qemu-img check,
and a second `recover` has nothing to do.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import data
from testbed.content import Content
from testbed.guests import Guest, create_guest, restart_libvirtd
from testbed.reclaim import (
    fake_qemu_img,
    killed_if_left_running,
    leftovers,
    qemu_img_check_clean,
    reclaim,
    recover_json,
    sha256_file,
    start_reclaim,
    wait_for_file,
)

# One worker runs them all: they share the module's guest, and pkill finds qemu-img by name.
pytestmark = [pytest.mark.guest, pytest.mark.xdist_group("crash")]

# Every step boundary of the job: the kill comes just before the step starts.
CRASH_POINTS = [
    "inspect", "estimate", "preflight", "free-space", "shutdown", "guard", "preflight:2",
    "rewrite", "verify", "swap", "restore",
]  # fmt: skip


class CrashBed:
    """One running guest with data, its checksums, and a journal folder for the crash tests."""

    def __init__(self, guest: Guest, state_dir: Path) -> None:
        self.guest = guest
        self.state_dir = state_dir
        self.sums = guest.content_sums

    def dirty(self) -> None:
        """Deleted data for the next job to reclaim (so that every run has work to do)."""
        data.write_deleted_random(self.guest, 16)

    def start_job(self, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return start_reclaim(self.guest.name, "--state-dir", str(self.state_dir),
                             "--min-gain", "0", *options, env=env)  # fmt: skip

    def recover(self) -> list[dict[str, Any]]:
        return recover_json(self.state_dir)

    def history(self) -> list[dict[str, Any]]:
        return history_json("--state-dir", str(self.state_dir))

    def assert_intact(self) -> None:
        assert self.guest.is_running()
        self.guest.wait_agent()
        assert data.checksums(self.guest) == self.sums
        assert leftovers(self.guest.data_image.parent) == []
        qemu_img_check_clean(self.guest.data_image)
        assert self.recover() == [], "a second recover found work"


@pytest.fixture(scope="module")
def bed(libvirt_conn: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrashBed]:
    files = Content(text={"app.log": 16}, random={"blob.bin": 8})
    guest = create_guest(libvirt_conn, data_size="512M", discard=True, content=files)
    try:
        yield CrashBed(guest, tmp_path_factory.mktemp("journal"))
    finally:
        guest.remove()


def kill_job(job: subprocess.Popen[str]) -> None:
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_before_each_step_then_recover(bed: CrashBed, point: str, tmp_path: Path) -> None:
    """Up to a minute under load: from the shutdown on, the job and then recovery boot the guest."""
    bed.dirty()
    marker = tmp_path / "paused"
    job = bed.start_job(env={"VIRT_RECLAIM_TEST_PAUSE": point,
                             "VIRT_RECLAIM_TEST_PAUSE_FILE": str(marker)})  # fmt: skip
    try:
        wait_for_file(marker, 120, job)
    finally:
        kill_job(job)

    [recovered] = bed.recover()

    assert recovered["step"] == point.split(":", maxsplit=1)[0]
    # Past the swap the job is finished; before it, nothing of it remains.
    assert recovered["outcome"] == ("reclaimed" if point == "restore" else "failed")
    bed.assert_intact()
    assert bed.history()[0]["outcome"] == recovered["outcome"]


@pytest.fixture
def slow_qemu_img(tmp_path: Path) -> tuple[Path, Path]:
    """The real qemu-img, but `convert` limited to 1 MiB/s (its own -r) so it is caught writing."""
    marker = tmp_path / "converting"
    wrapper = fake_qemu_img(
        tmp_path,
        'if [ "$1" = convert ]; then\n'
        '  shift; qemu-img convert -r 1M "$@" &\n'
        f"  sleep 1; touch {marker}; wait $!; exit $?\n"
        "fi\n",
    )
    return wrapper, marker


def temp_files(bed: CrashBed) -> list[str]:
    return [n for n in leftovers(bed.guest.data_image.parent) if n.endswith(".tmp")]


def test_sigkill_in_the_middle_of_the_rewrite_then_recover(
    bed: CrashBed, slow_qemu_img: tuple[Path, Path]
) -> None:
    wrapper, converting = slow_qemu_img
    bed.dirty()
    job = bed.start_job("--qemu-img", str(wrapper))
    try:
        wait_for_file(converting, 120)
        assert temp_files(bed), "qemu-img has not started writing"
    finally:
        kill_job(job)
    # The orphaned qemu-img writes on and holds a lock on the original image.
    assert temp_files(bed)

    [recovered] = bed.recover()

    assert recovered["step"] == "rewrite"
    assert any("killed qemu-img" in a for a in recovered["actions"])
    bed.assert_intact()


def test_qemu_img_killed_during_the_rewrite_fails_and_restores(
    bed: CrashBed, slow_qemu_img: tuple[Path, Path]
) -> None:
    wrapper, converting = slow_qemu_img
    bed.dirty()
    job = bed.start_job("--qemu-img", str(wrapper))
    wait_for_file(converting, 120)
    subprocess.run(["pkill", "-KILL", "-f", "qemu-img convert -r 1M"], check=True, timeout=30)
    stdout, stderr = job.communicate(timeout=300)

    assert job.returncode == 1, stderr
    result = json.loads(stdout)
    assert result["outcome"] == "failed"
    assert "qemu-img" in result["reason"]
    bed.assert_intact()


def test_full_filesystem_during_the_rewrite_fails_and_restores(
    libvirt_conn: Any, make_tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    # The image's filesystem passes the preflight, then fills up as the rewrite starts.
    folder = make_tmpfs("200M")
    guest = create_guest(libvirt_conn, data_size="256M", image_dir=folder)
    try:
        data.write_text(guest, "/data/app.log", 8)
        data.write_deleted_random(guest, 24)
        sums = data.checksums(guest)
        wrapper = fake_qemu_img(
            tmp_path,
            'if [ "$1" = convert ]; then\n'
            f"  dd if=/dev/zero of={folder}/filler bs=1M 2>/dev/null\n"
            "fi\n",
        )

        # No reserve: the point is a filesystem that fills under the rewrite.
        run = reclaim(guest.name, "--min-gain", "0", "--qemu-img", str(wrapper),
                      "--host-reserve", "0", "--state-dir", str(tmp_path / "state"))  # fmt: skip

        assert run.exitcode == 1, run.stderr
        assert run.result["outcome"] == "failed"
        assert "No space left on device" in run.result["reason"]
        assert [e["step"] for e in run.events("step.failed")] == ["rewrite"]
        (folder / "filler").unlink()
        assert sorted(p.name for p in folder.iterdir()) == ["data.qcow2"]
        assert guest.is_running()
        guest.wait_agent()
        assert data.checksums(guest) == sums
        qemu_img_check_clean(guest.data_image)
    finally:
        guest.remove()


def test_corrupt_journal_stops_every_job_and_touches_nothing(bed: CrashBed, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "journal.sqlite3").write_bytes(b"this is not a database" * 100)
    bed.guest.exec("sync")
    before = sha256_file(bed.guest.data_image)

    run = reclaim(bed.guest.name, "--state-dir", str(state), "--min-gain", "0")

    assert run.exitcode == 1
    assert "journal" in run.stderr and "cannot be used" in run.stderr
    assert "Traceback" not in run.stderr
    assert bed.guest.is_running()
    assert sha256_file(bed.guest.data_image) == before


@pytest.mark.restarts_libvirtd
def test_libvirtd_restarted_in_the_middle_of_a_job(
    bed: CrashBed, paused_qemu_img: tuple[Path, Path, Path]
) -> None:
    wrapper, paused, go = paused_qemu_img
    bed.dirty()
    with killed_if_left_running(bed.start_job("--qemu-img", str(wrapper))) as job:
        wait_for_file(paused, 120)
        restart_libvirtd()
        go.touch()
        stdout, stderr = job.communicate(timeout=300)

    assert job.returncode == 0, stderr
    assert json.loads(stdout)["outcome"] == "reclaimed"
    assert "libvirt.reconnected" in stderr
    bed.assert_intact()


def test_a_second_job_for_a_busy_domain_is_refused(
    bed: CrashBed, paused_qemu_img: tuple[Path, Path, Path]
) -> None:
    wrapper, paused, go = paused_qemu_img
    bed.dirty()
    with killed_if_left_running(bed.start_job("--qemu-img", str(wrapper))) as first:
        wait_for_file(paused, 120)
        second = reclaim(bed.guest.name, "--state-dir", str(bed.state_dir), "--min-gain", "0")
        assert second.exitcode == 1
        assert "another virt-reclaim job holds" in second.stderr
        # Recovery leaves a job alone while its process lives.
        assert bed.recover() == []
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert json.loads(stdout)["outcome"] == "reclaimed", stderr
    bed.assert_intact()


def test_history_shows_each_outcome_with_its_figures(
    bed: CrashBed, make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    snapshotted = make_guest(data_size="64M", start=False)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(snapshotted.data_image)],
                   check=True, timeout=60)  # fmt: skip
    bed.dirty()
    reclaimed = reclaim(bed.guest.name, *state, "--min-gain", "0")
    skipped = reclaim(snapshotted.name, *state)
    nothing = reclaim(bed.guest.name, *state, "--min-gain", "100GiB")
    failing = fake_qemu_img(tmp_path, '[ "$1" = check ] && exit 1\n')
    bed.dirty()
    failed = reclaim(bed.guest.name, *state, "--min-gain", "0", "--qemu-img", str(failing))
    runs = (reclaimed, skipped, nothing, failed)
    assert [r.result["outcome"] for r in runs] == [
        "reclaimed", "skipped", "nothing-to-do", "failed"]  # fmt: skip

    history = history_json(*state)
    only_bed = history_json(bed.guest.name, *state)

    assert [h["outcome"] for h in history] == ["failed", "nothing-to-do", "skipped", "reclaimed"]
    assert [h["outcome"] for h in only_bed] == ["failed", "nothing-to-do", "reclaimed"]
    by_outcome = {h["outcome"]: h for h in history}
    for run in runs:
        entry = by_outcome[run.result["outcome"]]
        assert entry["job_id"] == run.result["job_id"]
        assert entry["domain"] == run.result["domain"]
        assert entry["reason"] == run.result["reason"]
        assert entry["duration_s"] == pytest.approx(run.result["duration_s"], abs=0.01)
        assert entry["downtime_s"] == pytest.approx(run.result["downtime_s"], abs=0.01)
    [disk] = reclaimed.result["disks"]
    assert by_outcome["reclaimed"]["bytes_before"] == disk["bytes_before"]
    assert by_outcome["reclaimed"]["bytes_after"] == disk["bytes_after"]
    assert by_outcome["reclaimed"]["downtime_s"] > 0
    assert "internal snapshot" in by_outcome["skipped"]["reason"]
    assert by_outcome["skipped"]["steps"] == ["inspect"]
    assert by_outcome["failed"]["bytes_after"] is None
    assert "qemu-img check" in by_outcome["failed"]["reason"]
    bed.assert_intact()


def history_json(*args: str) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "virt_reclaim", "history", "--json", *args],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result
