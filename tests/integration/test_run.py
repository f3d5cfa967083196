"""`virt-reclaim run` end to end on real guests.

Every test asserts what matters: the data in /data has the same checksums
once the guest is back, the image passes qemu-img check, the domain is in its
previous power state, and the image keeps its owner and mode.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed import content, data
from testbed.content import Content, files_in_image
from testbed.guests import URI, Guest
from testbed.reclaim import (
    RunResult,
    backups_json,
    fake_qemu_img,
    image_info,
    killed_if_left_running,
    leftovers,
    owner_and_mode,
    parse_run,
    qemu_img_check_clean,
    reclaim,
    recover_json,
    sha256_file,
    start_reclaim,
    wait_for_file,
)
from virt_reclaim.errors import GuestExecCancelled
from virt_reclaim.job.freespace.agent import FreeSpaceResult, zero_fill
from virt_reclaim.job.freespace.budget import Fill
from virt_reclaim.virt.connection import Hypervisor

pytestmark = pytest.mark.guest

MIB = 1024 * 1024
CLUSTER = 64 * 1024


def compressed_size(blob: bytes) -> int:
    """What qcow2 compression makes of ``blob``: each 64 KiB cluster compressed on its own."""
    return sum(len(zlib.compress(blob[i : i + CLUSTER], 6)) for i in range(0, len(blob), CLUSTER))


def assert_back_as_before(guest: Guest, sums: dict[str, str], *, running: bool) -> None:
    """The guest is in its previous state and its data unchanged (read from its image if off)."""
    qemu_img_check_clean(guest.data_image)
    if running:
        assert guest.is_running()
        guest.wait_agent()
        assert data.checksums(guest) == sums
    else:
        assert guest.is_off()
        assert files_in_image(guest.data_image, guest.folder / "files-after") == sums


def assert_reclaimed(run: RunResult, guest: Guest, *, backup: bool = False) -> dict[str, Any]:
    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "reclaimed", run.result
    [disk] = run.result["disks"]
    assert isinstance(disk, dict)
    assert disk["path"] == str(guest.data_image)
    allocated_now = os.stat(guest.data_image).st_blocks * 512
    if guest.is_off():
        assert disk["bytes_after"] == allocated_now
    else:
        # Once restarted, the guest writes a little (ext4 superblock and journal at mount).
        assert disk["bytes_after"] <= allocated_now <= disk["bytes_after"] + 2 * MIB
    assert disk["bytes_after"] < disk["bytes_before"]
    kept = [Path(str(disk["backup"])).name] if backup else []
    assert (disk["backup"] is not None) == backup
    assert leftovers(guest.data_image.parent) == kept
    return disk


def dirty_guest(make_guest: Callable[..., Guest], **options: object) -> tuple[Guest, int]:
    """A running guest with 32 MiB of text, 8 MiB random kept and 64 MiB random deleted.

    Returns the guest and the compressed size of its live data.
    """
    files = Content(text={"app.log": 32}, random={"blob.bin": 8}, deleted_mib=64)
    guest = make_guest(**{"data_size": "1G", "content": files, **options})
    live = 32 * compressed_size(content.log_text(MIB)) + 8 * MIB
    return guest, live


def test_running_guest_is_reclaimed_and_compressed(make_guest: Callable[..., Guest]) -> None:
    guest, live_compressed = dirty_guest(make_guest, discard=True)
    sums = guest.content_sums
    owner = owner_and_mode(guest.data_image)

    run = reclaim(guest.name, "--min-gain", "0")

    disk = assert_reclaimed(run, guest)
    assert disk["bytes_before"] >= 100 * MIB
    assert disk["bytes_after"] <= 1.2 * live_compressed, (disk, live_compressed)
    # The estimate made before anything changed is within 25 % of the result.
    assert abs(disk["estimated_after"] - disk["bytes_after"]) <= 0.25 * disk["bytes_after"], disk
    assert image_info(guest.data_image)["format-specific"]["data"]["compression-type"] == "zstd"
    assert run.result["free_space"] == "trim"
    assert 0 < run.result["downtime_s"] < run.result["duration_s"]
    assert owner_and_mode(guest.data_image) == owner
    steps = [e["step"] for e in run.events("step.finished")]
    assert steps == ["inspect", "estimate", "preflight", "free-space", "shutdown", "guard",
                     "preflight", "rewrite", "verify", "swap", "restore"]  # fmt: skip
    # Each event names its job; the only others are recovery's look at jobs of other runs.
    strays = [e for e in run.log if e.get("job_id") != run.result["job_id"]]
    assert all(e["job_id"] and e["event"].startswith("recovery.") for e in strays), strays
    assert_back_as_before(guest, sums, running=True)


def test_guest_that_is_off_is_rewritten_and_stays_off_and_its_backup_expires(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    """The backup holds the old image's bytes until it expires; pruned, the host gets them."""
    folder = make_tmpfs("1500M")  # a filesystem of its own: its free space is the job's alone
    guest, _ = dirty_guest(make_guest, discard=False, image_dir=folder)
    sums = guest.content_sums
    guest.shutdown()
    owner = owner_and_mode(guest.data_image)
    original_hash = sha256_file(guest.data_image)
    state = tmp_path / "state"

    # No reserve: the tmpfs is the job's alone (the default 2 GiB is more than it holds).
    run = reclaim(guest.name, "--compression", "zlib", "--keep-backup", "4s", "--min-gain", "0",
                  "--host-reserve", "0", "--state-dir", str(state))  # fmt: skip

    disk = assert_reclaimed(run, guest, backup=True)
    backup = Path(str(disk["backup"]))
    assert sha256_file(backup) == original_hash
    assert disk["backup_bytes"] == disk["bytes_before"] == backup.stat().st_blocks * 512
    [listed] = backups_json(state)["backups"]
    assert (listed["path"], listed["bytes"]) == (str(backup), disk["backup_bytes"])
    assert listed["expires_at"] == disk["backup_expires_at"]
    free_before = shutil.disk_usage(folder).free
    # Not yet expired: --prune leaves it.
    deadline = time.time() + 60
    while backups_json(state, "--prune")["backups"]:
        assert backup.exists()
        assert time.time() < deadline, "the backup did not expire"
        time.sleep(0.5)
    assert not backup.exists()
    assert shutil.disk_usage(folder).free - free_before == disk["backup_bytes"]
    assert run.result["free_space"] is None
    assert run.result["downtime_s"] == 0
    # No free-space step: the deleted random data survives; the text is compressed.
    assert disk["bytes_after"] < disk["bytes_before"] - 20 * MIB
    assert image_info(guest.data_image)["format-specific"]["data"]["compression-type"] == "zlib"
    assert owner_and_mode(guest.data_image) == owner
    assert_back_as_before(guest, sums, running=False)


@pytest.mark.parametrize(("discard", "method"), [(True, "trim"), (False, "zero")])
def test_trim_and_zero_fill_free_the_deleted_data(
    make_guest: Callable[..., Guest], discard: bool, method: str
) -> None:
    # 256 MiB: the 144 MiB written leave about 80 MiB for a zero-fill to write under TCG.
    files = Content(random={"keep.bin": 16}, deleted_mib=128)
    guest = make_guest(data_size="256M", discard=discard, content=files)
    sums = guest.content_sums

    run = reclaim(guest.name, "--free-space", "auto", "--compression", "none", "--min-gain", "0")

    disk = assert_reclaimed(run, guest)
    assert run.result["free_space"] == method
    # 16 MiB live random plus filesystem metadata; the 128 MiB deleted is gone.
    assert disk["bytes_after"] < 40 * MIB, disk
    assert disk["bytes_before"] - disk["bytes_after"] > 100 * MIB
    assert_back_as_before(guest, sums, running=True)


def test_overlay_is_rewritten_over_an_untouched_backing_file(
    make_guest: Callable[..., Guest],
) -> None:
    # 256 MiB: 96 MiB written, so the zero-fill writes about 130 MiB under TCG.
    guest = make_guest(data_size="256M", backing=True, discard=False)
    assert guest.backing_image is not None
    data.write_text(guest, "/data/app.log", 32)
    data.write_deleted_random(guest, 64)
    sums = data.checksums(guest)
    base_hash = sha256_file(guest.backing_image)
    backing_before = image_info(guest.data_image)["backing-filename"]

    run = reclaim(guest.name, "--free-space", "zero", "--min-gain", "0")

    assert_reclaimed(run, guest)
    assert sha256_file(guest.backing_image) == base_hash
    info = image_info(guest.data_image)
    assert info["backing-filename"] == backing_before == str(guest.backing_image)
    assert info["backing-filename-format"] == "qcow2"
    assert_back_as_before(guest, sums, running=True)


def test_internal_snapshot_skips_the_disk(make_guest: Callable[..., Guest]) -> None:
    guest = make_guest(data_size="256M", start=False)
    subprocess.run(["qemu-img", "snapshot", "-c", "keep-me", str(guest.data_image)],
                   check=True, timeout=60)  # fmt: skip
    image_hash = sha256_file(guest.data_image)

    run = reclaim(guest.name)

    assert run.exitcode == 3, run.stderr
    assert run.result["outcome"] == "skipped"
    assert "internal snapshot" in run.result["reason"]
    assert run.result["skipped_disks"][0]["target"] == "vda"
    assert sha256_file(guest.data_image) == image_hash
    assert guest.is_off()


def ignore_shutdown(guest: Guest) -> None:
    """Make the guest's /sbin/shutdown (what qemu-ga runs) do nothing."""
    guest.exec("printf '#!/bin/sh\\nexit 0\\n' > /sbin/shutdown")


def test_guest_that_ignores_shutdown_abort_leaves_it_running(
    make_guest: Callable[..., Guest],
) -> None:
    guest = make_guest(data_size="256M")
    data.write_text(guest, "/data/app.log", 8)
    sums = data.checksums(guest)
    ignore_shutdown(guest)
    # Reading the checksums dirtied atimes; flush them now, not in the middle of the test.
    guest.exec("sync")
    image_hash = sha256_file(guest.data_image)

    run = reclaim(guest.name, "--free-space", "none", "--min-gain", "0",
                  "--shutdown-timeout", "5")  # fmt: skip

    assert run.exitcode == 1, run.stderr
    assert run.result["outcome"] == "failed"
    assert "did not shut down within 5 s" in run.result["reason"]
    assert run.events("shutdown.timeout")[0]["action"] == "abort"
    assert run.result["duration_s"] < 30, "the ignored shutdown request held the job up"
    assert guest.is_running()
    assert sha256_file(guest.data_image) == image_hash
    assert leftovers(guest.data_image.parent) == []
    # libvirt keeps the agent busy with the unanswered shutdown for 60 s; a power
    # cycle (after the assertions above) frees it sooner for the checksums.
    guest.dom.destroy()
    guest.start()
    assert data.checksums(guest) == sums


def test_guest_that_ignores_shutdown_force_powers_it_off(
    make_guest: Callable[..., Guest],
) -> None:
    guest, _ = dirty_guest(make_guest, discard=True)
    sums = guest.content_sums
    ignore_shutdown(guest)

    run = reclaim(guest.name, "--min-gain", "0", "--shutdown-timeout", "5",
                  "--on-shutdown-timeout", "force")  # fmt: skip

    assert_reclaimed(run, guest)
    assert run.events("shutdown.timeout")[0]["action"] == "force"
    assert_back_as_before(guest, sums, running=True)


def block_guest_exec(guest: Guest) -> None:
    """Restart the guest's qemu-ga with guest-exec blocked, as RHEL-family policies do."""
    guest.exec(
        "(sleep 1; kill $(pidof qemu-ga); sleep 1; "
        "for f in /sys/class/virtio-ports/*/name; do "
        '  [ "$(cat $f)" = org.qemu.guest_agent.0 ] && p=$(basename $(dirname $f)); done; '
        "qemu-ga -m virtio-serial -p /dev/$p -b guest-exec,guest-exec-status -d"
        ") >/dev/null 2>&1 &"
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            guest.agent("guest-exec", {"path": "/bin/true"})
        except libvirt.libvirtError as exc:
            if "disabled" in str(exc):
                return
        assert time.monotonic() < deadline, "qemu-ga never came back with guest-exec blocked"
        time.sleep(0.5)


def test_agent_refusing_guest_exec_is_logged_and_the_rewrite_goes_on(
    make_guest: Callable[..., Guest],
) -> None:
    guest, _ = dirty_guest(make_guest, discard=False)
    sums = guest.content_sums
    block_guest_exec(guest)

    run = reclaim(guest.name, "--free-space", "zero", "--min-gain", "0")

    assert_reclaimed(run, guest)
    assert run.result["free_space"] == "none"
    # Known before relying on it: guest-info lists guest-exec as disabled.
    [refusal] = run.events("free_space.unavailable")
    assert "guest-exec disabled" in refusal["reason"]
    # The restarted guest runs its normal agent again: checksums through guest-exec work.
    assert_back_as_before(guest, sums, running=True)


def test_start_during_the_rewrite_is_refused_and_the_job_completes(
    make_guest: Callable[..., Guest], paused_qemu_img: tuple[Path, Path, Path]
) -> None:
    wrapper, paused, go = paused_qemu_img
    guest, _ = dirty_guest(make_guest, discard=True)
    sums = guest.content_sums

    job = start_reclaim(guest.name, "--min-gain", "0", "--qemu-img", str(wrapper))
    with killed_if_left_running(job):
        wait_for_file(paused, 120)
        assert guest.is_off()
        with pytest.raises(libvirt.libvirtError, match='Failed to get "write" lock'):
            guest.dom.create()
        assert guest.is_off()
        go.touch()
        stdout, stderr = job.communicate(timeout=300)
    run = parse_run(job.returncode, stdout, stderr)

    assert_reclaimed(run, guest)
    assert_back_as_before(guest, sums, running=True)


def test_failed_verification_restores_image_and_guest(
    make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    # The real qemu-img for everything but compare, which reports a difference.
    wrapper = fake_qemu_img(
        tmp_path, 'if [ "$1" = compare ]; then echo "Content mismatch at offset 0!"; exit 1; fi\n'
    )
    guest, _ = dirty_guest(make_guest, discard=True)
    sums = guest.content_sums
    guest.exec("sync")
    owner = owner_and_mode(guest.data_image)

    run = reclaim(guest.name, "--min-gain", "0", "--free-space", "none",
                  "--qemu-img", str(wrapper))  # fmt: skip

    assert run.exitcode == 1, run.stderr
    assert run.result["outcome"] == "failed"
    assert "differs" in run.result["reason"]
    assert [e["step"] for e in run.events("step.failed")] == ["verify"]
    assert run.events("cleanup.removed")
    assert leftovers(guest.data_image.parent) == []
    assert run.result["downtime_s"] > 0
    assert owner_and_mode(guest.data_image) == owner
    assert_back_as_before(guest, sums, running=True)


def test_sigterm_during_the_rewrite_restores_everything(
    make_guest: Callable[..., Guest], paused_qemu_img: tuple[Path, Path, Path]
) -> None:
    wrapper, paused, _go = paused_qemu_img
    guest, _ = dirty_guest(make_guest, discard=True)
    sums = guest.content_sums

    job = start_reclaim(guest.name, "--min-gain", "0", "--qemu-img", str(wrapper))
    with killed_if_left_running(job):
        wait_for_file(paused, 120)
        job.terminate()
        _stdout, stderr = job.communicate(timeout=300)

    assert job.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr
    assert leftovers(guest.data_image.parent) == []
    assert_back_as_before(guest, sums, running=True)


ZERO_FILE = ".virt-reclaim-zero."


def slow_disk_guest(make_guest: Callable[..., Guest]) -> Guest:
    """A guest whose 1 GiB data disk QEMU throttles to 16 MiB/s: a zero-fill takes a minute.

    So a stop finds the fill under way, and a fill that kept going is still there after it.
    """
    guest = make_guest(data_size="1G")
    guest.dom.setBlockIoTune("vda", {"write_bytes_sec": 16 * MIB}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    return guest


def wait_for_zero_fill(guest: Guest) -> None:
    deadline = time.monotonic() + 120
    while ZERO_FILE not in guest.exec("ls -a /data").stdout:
        assert time.monotonic() < deadline, "the zero-fill did not start"
        time.sleep(0.2)


def assert_zero_fill_gone(guest: Guest, used_before: int) -> None:
    """Stopped with the job, not at the fill's own time bound: no dd, no file, the space back."""
    assert ZERO_FILE not in guest.exec("ls -a /data").stdout
    assert guest.exec("pidof dd", check=False).exitcode != 0
    assert data.used_bytes(guest) < used_before + 4 * MIB


def test_sigterm_during_the_zero_fill_stops_it_and_removes_its_file(
    make_guest: Callable[..., Guest],
) -> None:
    guest = slow_disk_guest(make_guest)
    data.write_text(guest, "/data/app.log", 8)
    sums = data.checksums(guest)
    used = data.used_bytes(guest)

    job = start_reclaim(guest.name, "--free-space", "zero", "--min-gain", "0")
    with killed_if_left_running(job):
        wait_for_zero_fill(guest)
        job.terminate()
        _stdout, stderr = job.communicate(timeout=120)

    assert job.returncode == 143, stderr
    assert_zero_fill_gone(guest, used)
    assert_back_as_before(guest, sums, running=True)


def test_sigkill_during_the_zero_fill_then_recover_ends_the_fill_in_the_guest(
    make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    """A killed job cannot end its fill: recovery must, or it fills the guest unwatched."""
    guest = slow_disk_guest(make_guest)
    data.write_text(guest, "/data/app.log", 8)
    sums = data.checksums(guest)
    used = data.used_bytes(guest)
    state = tmp_path / "state"

    job = start_reclaim(guest.name, "--free-space", "zero", "--min-gain", "0",
                        "--state-dir", str(state))  # fmt: skip
    with killed_if_left_running(job):
        wait_for_zero_fill(guest)
        job.kill()
        job.communicate(timeout=60)
    assert ZERO_FILE in guest.exec("ls -a /data").stdout  # the fill outlived the job
    [recovered] = recover_json(state)

    # Ended, not waited for: the fill's processes were stopped and its file is gone.
    assert recovered["step"] == "free-space", recovered
    assert any("stopped the zero-fill" in a for a in recovered["actions"]), recovered
    assert_zero_fill_gone(guest, used)
    assert_back_as_before(guest, sums, running=True)


def test_a_stopping_service_cancels_the_zero_fill_in_the_guest(
    make_guest: Callable[..., Guest],
) -> None:
    """The daemon's path: its stop event, not a signal in this thread, ends the fill."""
    guest = slow_disk_guest(make_guest)
    used = data.used_bytes(guest)
    stop = threading.Event()
    outcome: list[BaseException | FreeSpaceResult] = []

    with Hypervisor(URI) as hypervisor:
        domain = hypervisor.domain_by_uuid(guest.dom.UUIDString())
        filesystems = [fs for fs in domain.guest_filesystems() if fs.mountpoint == "/data"]

        def fill() -> None:
            try:
                fills = [Fill(fs.mountpoint, 1 << 40, 1 << 40) for fs in filesystems]
                outcome.append(zero_fill(domain, fills, timeout=600, cancel=stop))
            except BaseException as exc:
                outcome.append(exc)

        filler = threading.Thread(target=fill)
        filler.start()
        wait_for_zero_fill(guest)
        stop.set()
        filler.join(timeout=120)

    assert not filler.is_alive()
    [ended] = outcome
    assert isinstance(ended, GuestExecCancelled), ended
    assert_zero_fill_gone(guest, used)


def test_a_rewrite_that_would_go_below_the_reserve_is_skipped_before_the_shutdown(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path]
) -> None:
    folder = make_tmpfs("400M")
    guest = make_guest(data_size="1G", image_dir=folder, content=Content(random={"blob.bin": 56}))
    sums = guest.content_sums
    uptime = float(guest.exec("cut -d' ' -f1 /proc/uptime").stdout)

    # About 120 MiB needed of about 340 free: it fits, but not beside a 300 MiB reserve.
    run = reclaim(guest.name, "--min-gain", "0", "--host-reserve", "300MiB",
                  "--free-space", "none")  # fmt: skip

    assert run.exitcode == 3, run.stderr
    assert run.result["outcome"] == "skipped"
    reason = run.result["reason"]
    assert f"not enough free space on the filesystem of {folder}" in reason, reason
    assert "300.0 MiB must stay free (free_space.host_reserve)" in reason, reason
    assert [e["step"] for e in run.events("step.started")][-1] == "preflight"
    assert float(guest.exec("cut -d' ' -f1 /proc/uptime").stdout) > uptime  # never down
    assert leftovers(folder) == []
    assert_back_as_before(guest, sums, running=True)


def test_dry_run_changes_nothing_and_reports_the_estimate(
    make_guest: Callable[..., Guest],
) -> None:
    guest, live_compressed = dirty_guest(make_guest, discard=True)
    image_hash = sha256_file(guest.data_image)
    used = data.used_bytes(guest)

    run = reclaim(guest.name, "--dry-run", "--min-gain", "0")

    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "dry-run"
    [disk] = run.result["disks"]
    assert disk["bytes_before"] == os.stat(guest.data_image).st_blocks * 512
    # The estimate knows compression: near the compressed live data, well below the used bytes.
    assert 0.75 * live_compressed <= disk["estimated_after"] <= 1.25 * live_compressed, disk
    assert disk["estimated_after"] < used
    assert disk["bytes_after"] is None
    assert guest.is_running()
    assert sha256_file(guest.data_image) == image_hash
    assert run.events("step.started")[-1]["step"] == "preflight"


def test_min_gain_above_the_estimate_is_nothing_to_do(make_guest: Callable[..., Guest]) -> None:
    guest, _ = dirty_guest(make_guest, discard=True)
    image_hash = sha256_file(guest.data_image)

    run = reclaim(guest.name, "--min-gain", "10GiB")

    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "nothing-to-do"
    assert "below the minimum" in run.result["reason"]
    assert guest.is_running()
    assert sha256_file(guest.data_image) == image_hash
