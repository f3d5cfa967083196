"""The read-only steps (inspect, estimate, preflight) on a JobContext over the fake domain.

Real images and qemu-img; what is checked is what the steps leave: the disks chosen and
the reasons for the others, the journal's plan and figures, the estimate against the
data written, the space reserved, and no file created.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fakes import MIB, FakeDisk, FakeDomain, linux_fs, make_image, sh, write_data
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.image.qemu_img_argv import DEFAULT_CLUSTER
from virt_reclaim.image.sizing import metadata_bytes
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.freespace.budget import REWRITE_MARGIN, Reserve, host_filesystem
from virt_reclaim.job.results import JobSkipped, NothingToDo, SpaceTaken
from virt_reclaim.job.settings import Compression, FreeSpaceMethod, JobSettings
from virt_reclaim.job.steps import estimate, inspect, preflight
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

NO_RESERVE = Reserve(host_percent=0.0, host_min_bytes=0)


def context(
    tmp_path: Path,
    domain: FakeDomain,
    others: dict[str, str] | None = None,
    **settings: object,
) -> JobContext:
    """A job of ``domain`` begun in a journal under ``tmp_path``."""
    journal = Journal(tmp_path / "state")
    journal.begin_job("j1", domain.name, domain.uuid, JobSettings())
    return JobContext(
        domain=domain, images=QemuImg(), settings=JobSettings(**settings),  # type: ignore[arg-type]
        job_id="j1", images_of_other_domains=lambda: others or {}, journal=journal,
    )  # fmt: skip


def test_inspect_takes_the_eligible_disks_and_says_why_not_the_others(tmp_path: Path) -> None:
    good = make_image(tmp_path / "good.qcow2", "64M")
    readonly = make_image(tmp_path / "readonly.qcow2", "64M")
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(MIB))
    shared = make_image(tmp_path / "shared.qcow2", "64M")
    snapshotted = make_image(tmp_path / "snapshotted.qcow2", "64M")
    sh("qemu-img", "snapshot", "-c", "before", str(snapshotted))
    linked = tmp_path / "linked.qcow2"
    linked.symlink_to(good)
    domain = FakeDomain([
        FakeDisk("vda", good),
        FakeDisk("vdb", readonly, extra_xml="<readonly/>"),
        FakeDisk("vdc", raw, format="raw"),
        FakeDisk("vdd", shared),
        FakeDisk("vde", snapshotted),
        FakeDisk("vdf", linked),
    ], power=DomainState.SHUTOFF)  # fmt: skip
    job = context(tmp_path, domain, others={str(shared): "other-guest"}, keep_backup=3600.0)

    inspect.inspect(job)

    [disk] = job.disks
    assert (disk.target, disk.path, disk.discard) == ("vda", str(good), True)
    assert disk.temp == str(tmp_path / ".good.qcow2.virt-reclaim-j1.tmp")
    assert disk.backup is not None and disk.backup.startswith(f"{good}.virt-reclaim-backup-")
    reasons = {s.target: s.reason for s in job.skipped_disks}
    assert reasons["vdb"] == "read-only or shared disk"
    assert reasons["vdc"].startswith("not a file-backed qcow2 disk (type file, format raw)")
    assert "rewrite.convert = true" in reasons["vdc"]
    assert reasons["vdd"] == "the image is also used by domain other-guest"
    assert reasons["vde"] == "1 internal snapshot(s), which a rewrite would drop"
    assert reasons["vdf"].startswith(f"the source is a symlink to {good}")
    assert not job.was_running
    assert job.journal is not None
    [journaled] = job.journal.unfinished()
    assert journaled.previous_state == str(DomainState.SHUTOFF)
    assert [(d.target, d.path, d.temp_path, d.backup_path) for d in journaled.disks] == [
        ("vda", str(good), disk.temp, disk.backup)
    ]
    assert not Path(disk.temp).exists()


def test_inspect_skips_the_job_when_the_definitions_differ(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "64M")
    elsewhere = make_image(tmp_path / "next-boot.qcow2", "64M")
    domain = FakeDomain([FakeDisk("vda", image)])
    domain.inactive_override = FakeDomain([FakeDisk("vda", elsewhere)], uuid=domain.uuid)._xml()
    with pytest.raises(JobSkipped, match="vda: the running and the persistent definition use"):
        inspect.inspect(context(tmp_path, domain))


@pytest.mark.parametrize(
    ("power", "persistent", "why"),
    [
        (DomainState.PAUSED, True, "only running or shut off domains qualify"),
        (DomainState.RUNNING, False, "transient domain"),
    ],
)
def test_inspect_skips_a_domain_it_cannot_restart(
    tmp_path: Path, power: DomainState, persistent: bool, why: str
) -> None:
    image = make_image(tmp_path / "disk.qcow2", "64M")
    domain = FakeDomain([FakeDisk("vda", image)], power=power, persistent=persistent)
    job = context(tmp_path, domain)
    with pytest.raises(JobSkipped, match=why):
        inspect.inspect(job)
    assert job.journal is not None and job.journal.unfinished()[0].disks == ()


def test_the_estimate_of_a_shut_off_guest_counts_all_it_holds(tmp_path: Path) -> None:
    """32 MiB of one repeated byte (packs to almost nothing) and 16 MiB of random data."""
    image = make_image(tmp_path / "disk.qcow2", "256M", ("write -P 0xab 0 32M",))
    write_data(image, 64 * MIB, os.urandom(16 * MIB))
    job = context(tmp_path, FakeDomain([FakeDisk("vda", image)], power=DomainState.SHUTOFF),
                  min_gain=MIB)  # fmt: skip
    inspect.inspect(job)

    estimate.estimate(job)

    [disk] = job.disks
    assert disk.bytes_before == image.stat().st_blocks * 512
    assert disk.estimate is not None and disk.estimate.basis == "allocation"
    # All 48 MiB count as data (the estimate no longer reports that figure): with no guest
    # figure nothing is freed, so what is stored is the estimate less the metadata bound,
    # and the stored ratio is that over the data.
    stored = disk.estimate.after - metadata_bytes(
        disk.info.virtual_size, disk.info.cluster_size or DEFAULT_CLUSTER
    )
    assert stored / disk.estimate.stored_ratio == pytest.approx(48 * MIB, rel=1e-6)
    # The random half stays whole, the repeated half packs to a sector a cluster.
    assert disk.estimated_after is not None and 16 * MIB < disk.estimated_after < 17 * MIB
    assert job.journal is not None
    [journaled] = job.journal.unfinished()[0].disks
    assert (journaled.bytes_before, journaled.estimated_after) == (
        disk.bytes_before,
        disk.estimated_after,
    )


def test_a_gain_below_the_minimum_is_nothing_to_do(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "256M")
    write_data(image, 0, os.urandom(16 * MIB))
    job = context(tmp_path, FakeDomain([FakeDisk("vda", image)], power=DomainState.SHUTOFF),
                  compression=Compression.NONE, min_gain=MIB)  # fmt: skip
    inspect.inspect(job)
    with pytest.raises(NothingToDo, match="below the minimum of 1"):
        estimate.estimate(job)


def test_a_running_guest_with_discard_is_estimated_from_what_it_uses(tmp_path: Path) -> None:
    """The guest uses 8 MiB of the 48 MiB the image holds; a trim frees the rest."""
    image = make_image(tmp_path / "disk.qcow2", "256M")
    write_data(image, 0, os.urandom(48 * MIB))
    used = [linux_fs("/", "vda", total=256 * MIB, used=8 * MIB)]
    domain = FakeDomain([FakeDisk("vda", image)], filesystems=used)
    job = context(tmp_path, domain, min_gain=MIB)
    inspect.inspect(job)

    estimate.estimate(job)

    assert job.choice is not None and job.choice.method is FreeSpaceMethod.TRIM
    [disk] = job.disks
    assert disk.guest_used == 8 * MIB
    assert disk.estimate is not None
    assert (disk.estimate.basis, disk.estimate.freed_share) == ("sample", 1.0)
    assert disk.estimated_after is not None and 8 * MIB < disk.estimated_after < 9 * MIB


def test_preflight_reserves_the_rewrites_need_for_the_job(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "256M", ("write -P 0xab 0 32M",))
    job = context(tmp_path, FakeDomain([FakeDisk("vda", image)], power=DomainState.SHUTOFF),
                  reserve=NO_RESERVE)  # fmt: skip
    inspect.inspect(job)

    preflight.preflight(job)

    assert job.journal is not None
    device = host_filesystem(str(tmp_path)).device
    need = job.journal.reserved_elsewhere("another job", device)
    measured = QemuImg().measure(str(image), force_share=False)
    assert need == measured + max(REWRITE_MARGIN, measured // 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2", "state"]


def test_preflight_skips_what_cannot_keep_the_hosts_reserve(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "64M")
    free = host_filesystem(str(tmp_path)).free
    job = context(tmp_path, FakeDomain([FakeDisk("vda", image)], power=DomainState.SHUTOFF),
                  reserve=Reserve(host_percent=0.0, host_min_bytes=free))  # fmt: skip
    inspect.inspect(job)
    with pytest.raises(JobSkipped, match="must stay free") as raised:
        preflight.preflight(job)
    assert not isinstance(raised.value, SpaceTaken)


def test_preflight_tells_space_held_by_other_jobs_from_space_missing(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.qcow2", "64M")
    filesystem = host_filesystem(str(tmp_path))
    job = context(tmp_path, FakeDomain([FakeDisk("vda", image)], power=DomainState.SHUTOFF),
                  reserve=NO_RESERVE)  # fmt: skip
    assert job.journal is not None
    job.journal.begin_job("j0", "other", "other-uuid", JobSettings())
    job.journal.reserve("j0", filesystem.device, str(tmp_path), filesystem.free, lambda _: None)
    inspect.inspect(job)
    with pytest.raises(SpaceTaken, match="are reserved by other jobs"):
        preflight.preflight(job)
