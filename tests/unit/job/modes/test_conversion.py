"""rewrite.convert through the ports: raw and VMDK disks converted, refused, undone, recovered.

Real images and the real qemu-img; the domain is faked (tests/fakes.py): its
``define_xml`` takes each disk's source and format from the new definition, as
the next start would. What a real guest shows (it boots from the new image) is
tested in tests/integration/test_convert.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from fakes import FakeDisk, FakeDomain, OpenWatch, make_image, sh
from virt_reclaim import backups
from virt_reclaim.config.policy import Policy, job_settings
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.modes import conversion, mode_of
from virt_reclaim.job.results import Outcome, Recovered, RecoveryOutcome
from virt_reclaim.job.settings import FreeSpaceMethod, JobSettings, ModeName
from virt_reclaim.journal.records import ConversionData, DiskState, JournalDisk
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

MIB = 1024 * 1024


def make_raw(path: Path, size: str = "64M") -> Path:
    """A sparse raw disk with a little data in it, as a guest wrote it."""
    sh("truncate", "-s", size, str(path))
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 8M", "-c", "write -P 0x62 40M 4M", str(path))
    return path


def guest_bytes(path: Path, fmt: str) -> bytes:
    """What the guest sees of an image (read with the format given, never probed)."""
    out = path.with_name(path.name + ".seen")
    sh("qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def info(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(sh("qemu-img", "info", "--output=json", "-f", "qcow2",
                                          str(path)))  # fmt: skip
    return found


def run(domain: FakeDomain, state: Path, **settings: Any) -> tuple[Any, Journal]:
    journal = Journal(state)
    before_step = settings.pop("before_step", None)
    others = settings.pop("others", {})
    job = ReclaimJob(
        domain,
        QemuImg(priority=None),
        JobSettings(**{"min_gain": 0, "convert": True, **settings}),
        images_of_other_domains=lambda: others,
        journal=journal,
        before_step=before_step,
    )
    return job.run(), journal


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".virt-reclaim-" in p.name)


@pytest.fixture
def raw_domain(tmp_path: Path) -> FakeDomain:
    raw = make_raw(tmp_path / "disk.raw")
    return FakeDomain([FakeDisk("vda", raw, discard=False, format="raw")])


def test_a_raw_disk_is_converted_and_the_guest_starts_from_the_new_image(
    raw_domain: FakeDomain, tmp_path: Path
) -> None:
    raw = raw_domain.disks[0].path
    seen = guest_bytes(raw, "raw")
    with structlog.testing.capture_logs() as logs:
        # No minimum gain for a conversion: it is wanted for itself.
        result, journal = run(raw_domain, tmp_path / "state", min_gain=1024 * MIB,
                              free_space=FreeSpaceMethod.NONE)  # fmt: skip

    new = tmp_path / "disk.qcow2"
    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.mode == "convert"
    [disk] = result.disks
    assert (disk.path, disk.format, disk.converted_to) == (str(raw), "raw", str(new))
    assert disk.bytes_after == new.stat().st_blocks * 512
    assert (raw_domain.disks[0].path, raw_domain.disks[0].format) == (new, "qcow2")
    assert raw_domain.calls[-2:] == ["define_xml", "start"]
    assert raw_domain.power is DomainState.RUNNING
    found = info(new)
    assert found["format-specific"]["data"]["compression-type"] == "zstd"
    assert found["cluster-size"] == 64 * 1024
    assert "backing-filename" not in found
    assert guest_bytes(new, "qcow2") == seen
    assert not raw.exists(), "the original is removed once the guest runs again"
    assert leftovers(tmp_path) == []
    [entry] = journal.history()
    assert entry.mode == "convert"
    assert entry.steps[-6:] == ("rewrite", "verify", "swap", "define", "restore", "cleanup")
    assert [d.state for d in entry.disks] == ["clean"]
    events = [e["event"] for e in logs]
    assert events.index("definition.updated") < events.index("convert.original_removed")
    [changed] = [e for e in logs if e["event"] == "job.mode_changed"]
    assert changed["mode"] == "convert"


def test_keep_backup_keeps_the_original_where_it_was(
    raw_domain: FakeDomain, tmp_path: Path
) -> None:
    raw = raw_domain.disks[0].path
    before = raw.read_bytes()

    result, journal = run(raw_domain, tmp_path / "state", keep_backup=3600.0,
                          free_space=FreeSpaceMethod.NONE)  # fmt: skip

    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.disks[0].backup == str(raw)
    [kept] = journal.backups()
    assert (kept.path, kept.inode) == (str(raw), raw.stat().st_ino)
    assert kept.expires_at - kept.created_at == 3600.0
    assert raw.read_bytes() == before
    assert raw_domain.disks[0].path == tmp_path / "disk.qcow2"


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat", "streamOptimized"])
def test_a_vmdk_disk_is_converted(tmp_path: Path, subformat: str) -> None:
    raw = make_raw(tmp_path / "source.raw")
    vmdk = tmp_path / "disk.vmdk"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
       str(raw), str(vmdk))  # fmt: skip
    seen = guest_bytes(raw, "raw")
    domain = FakeDomain([FakeDisk("vda", vmdk, format="vmdk")], power=DomainState.SHUTOFF)

    result, _ = run(domain, tmp_path / "state", compression="zlib", cluster_size=128 * 1024)

    new = tmp_path / "disk.qcow2"
    assert result.outcome is Outcome.RECLAIMED, result.reason
    assert result.disks[0].converted_to == str(new)
    assert domain.power is DomainState.SHUTOFF  # it was off: it stays off
    assert (domain.disks[0].path, domain.disks[0].format) == (new, "qcow2")
    found = info(new)
    assert found["format-specific"]["data"]["compression-type"] == "zlib"
    assert found["cluster-size"] == 128 * 1024
    assert guest_bytes(new, "qcow2") == seen
    # The descriptor and, for a flat VMDK, its extent are gone.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "disk.qcow2", "source.raw"]  # fmt: skip


def test_a_kept_flat_vmdk_is_kept_with_its_extent_and_both_expire(tmp_path: Path) -> None:
    """The extent holds the guest's data: kept and deleted at expiry with its descriptor."""
    raw = make_raw(tmp_path / "source.raw")
    vmdk = tmp_path / "disk.vmdk"
    sh("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
       str(raw), str(vmdk))  # fmt: skip
    domain = FakeDomain([FakeDisk("vda", vmdk, format="vmdk")], power=DomainState.SHUTOFF)

    result, journal = run(domain, tmp_path / "state", keep_backup=0.0)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    kept = sorted(Path(b.path).name for b in journal.backups())
    assert kept == ["disk-flat.vmdk", "disk.vmdk"]
    assert result.disks[0].backup_bytes == sum(b.bytes for b in journal.backups())
    assert [p.action for p in backups.prune(journal)] == ["removed", "removed"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "disk.qcow2", "source.raw"]  # fmt: skip


def test_a_guest_written_qcow2_header_is_converted_as_the_guests_bytes(tmp_path: Path) -> None:
    """A raw disk's bytes are the guest's: never read as the image format they claim to be."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST-SECRET the guest must never see " * 2000)
    # What a hostile guest writes at the start of its raw disk: a qcow2 header whose
    # backing file is a host path (and whose "data" would then be that file).
    raw = tmp_path / "disk.raw"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(raw), "1M")
    with raw.open("r+b") as f:
        f.truncate(16 * MIB)
    probed = json.loads(sh("qemu-img", "info", "--output=json", str(raw)))
    assert probed.get("backing-filename") == str(secret)  # what a probe would believe
    guest_view = raw.read_bytes()
    domain = FakeDomain([FakeDisk("vda", raw, format="raw")], power=DomainState.SHUTOFF)

    result, _ = run(domain, tmp_path / "state")

    new = tmp_path / "disk.qcow2"
    assert result.outcome is Outcome.RECLAIMED, result.reason
    found = info(new)
    assert "backing-filename" not in found and "full-backing-filename" not in found
    content = guest_bytes(new, "qcow2")
    assert content == guest_view  # the guest's bytes, header included, as they were
    assert b"HOST-SECRET" not in content
    assert b"HOST-SECRET" not in new.read_bytes()


def refused(domain: FakeDomain, tmp_path: Path, **settings: Any) -> str:
    result, _ = run(domain, tmp_path / "state", **settings)
    assert result.outcome is Outcome.SKIPPED, result.reason
    assert "define_xml" not in domain.calls and "shutdown(agent=True)" not in domain.calls
    [skipped] = result.skipped_disks
    return str(skipped.reason)


@pytest.mark.parametrize(
    ("disk_options", "why"),
    [
        ({"extra_xml": "<shareable/>"}, "read-only or shareable disk"),
        ({"extra_xml": "<readonly/>"}, "read-only or shareable disk"),
        ({"type": "block", "path": Path("/dev/null")}, "a block disk: only image files"),
        ({"format": "qed"}, "a qed image: not converted (raw and VMDK are)"),
    ],
)
def test_disks_that_are_not_converted_say_why(
    tmp_path: Path, disk_options: dict[str, Any], why: str
) -> None:
    options = {"path": make_raw(tmp_path / "disk.raw"), "format": "raw", **disk_options}
    domain = FakeDomain([FakeDisk("vda", **options)])

    assert why in refused(domain, tmp_path)


def test_a_disk_with_a_backing_file_is_not_converted(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", str(base), "64M")
    vmdk = tmp_path / "disk.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-b", str(base), "-F", "vmdk", str(vmdk))
    domain = FakeDomain([FakeDisk("vda", vmdk, format="vmdk")])

    assert "it has a backing file" in refused(domain, tmp_path)


def test_a_vmdk_of_another_type_is_not_converted(tmp_path: Path) -> None:
    vmdk = tmp_path / "disk.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
       str(vmdk), "64M")  # fmt: skip
    domain = FakeDomain([FakeDisk("vda", vmdk, format="vmdk")])

    assert "a VMDK of type twoGbMaxExtentSparse: not converted" in refused(domain, tmp_path)


def test_a_file_already_at_the_new_path_is_never_overwritten(
    raw_domain: FakeDomain, tmp_path: Path
) -> None:
    (tmp_path / "disk.qcow2").write_bytes(b"someone's file")

    assert "disk.qcow2 already exists" in refused(raw_domain, tmp_path)
    assert (tmp_path / "disk.qcow2").read_bytes() == b"someone's file"


def test_a_guest_whose_definitions_differ_is_not_converted(
    raw_domain: FakeDomain, tmp_path: Path
) -> None:
    # A pending change for the next start (virsh edit on a running guest): vdb added.
    raw_domain.inactive_override = raw_domain.inactive_xml().replace(
        "</devices>", "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        "<source file='/x.qcow2'/><target dev='vdb' bus='virtio'/></disk></devices>")  # fmt: skip

    assert "the persistent definition differs from the running one (vdb)" in refused(
        raw_domain, tmp_path)  # fmt: skip


def test_live_mode_does_not_convert_a_running_guest(raw_domain: FakeDomain, tmp_path: Path) -> None:
    assert "live mode does not convert" in refused(raw_domain, tmp_path, mode=ModeName.LIVE)


def test_without_convert_a_raw_disk_is_skipped_with_a_hint(
    raw_domain: FakeDomain, tmp_path: Path
) -> None:
    why = refused(raw_domain, tmp_path, convert=False)

    assert "not a file-backed qcow2 disk (type file, format raw)" in why
    assert "rewrite.convert = true (run --convert) converts it" in why


def test_qcow2_disks_of_a_converting_job_are_reclaimed_as_offline(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path / "os.qcow2", "64M", ("write -P 0x63 0 8M", "write -P 0 8M 8M"))
    raw = make_raw(tmp_path / "data.raw")
    domain = FakeDomain([FakeDisk("vda", qcow2), FakeDisk("vdb", raw, format="raw")])

    result, _ = run(domain, tmp_path / "state", free_space=FreeSpaceMethod.NONE)

    assert result.outcome is Outcome.RECLAIMED, result.reason
    by_target = {d.target: d for d in result.disks}
    assert by_target["vda"].converted_to is None and by_target["vda"].bytes_after is not None
    assert by_target["vdb"].converted_to == str(tmp_path / "data.qcow2")
    assert [d.path for d in domain.disks] == [qcow2, tmp_path / "data.qcow2"]
    assert leftovers(tmp_path) == []


def test_a_job_with_nothing_to_convert_stays_offline(tmp_path: Path) -> None:
    qcow2 = make_image(tmp_path / "os.qcow2", "64M", ("write -P 0x63 0 8M", "write -P 0 8M 8M"))
    domain = FakeDomain([FakeDisk("vda", qcow2)])

    result, journal = run(domain, tmp_path / "state", free_space=FreeSpaceMethod.NONE)

    assert result.outcome is Outcome.RECLAIMED
    assert result.mode == journal.history()[0].mode == "offline"


@pytest.mark.parametrize("failing", ["rewrite", "verify", "swap", "define", "define-refused"])
def test_a_failure_before_the_definition_names_the_new_image_undoes_everything(
    raw_domain: FakeDomain, tmp_path: Path, failing: str
) -> None:
    raw = raw_domain.disks[0].path
    before = raw.read_bytes()
    if failing == "define-refused":
        raw_domain.define_error = "XML error"

    def fail_at(step: Step) -> None:
        if str(step) == failing:
            raise OSError(f"injected failure before {failing}")

    result, journal = run(raw_domain, tmp_path / "state", before_step=fail_at,
                          free_space=FreeSpaceMethod.NONE)  # fmt: skip

    assert result.outcome is Outcome.FAILED
    assert raw.read_bytes() == before
    assert (raw_domain.disks[0].path, raw_domain.disks[0].format) == (raw, "raw")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["disk.raw"]
    assert raw_domain.power is DomainState.RUNNING
    assert journal.history()[0].finished_at is not None


# -- recovery -------------------------------------------------------------------------


class CrashedDisk:
    """A converting disk as a job killed at some point left it: files and journal."""

    def __init__(self, folder: Path, *, keep: bool = False) -> None:
        self.original = make_raw(folder / "disk.raw")
        self.new = folder / "disk.qcow2"
        self.temp = folder / ".disk.qcow2.virt-reclaim-j1.tmp"
        self.data = ConversionData(
            format="raw", new_path=str(self.new), data_file=None, keep_original=keep
        )

    def converted(self, into: Path) -> None:
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(self.original), str(into))

    def journaled(self, state: str) -> JournalDisk:
        return JournalDisk(
            "vda", str(self.original), str(self.temp), None, DiskState(state), data=self.data
        )


def recover_one(disk: JournalDisk, source_now: str | None) -> tuple[bool, Recovered]:
    result = Recovered("j1", "fake", "x", RecoveryOutcome.FAILED, [])
    return conversion.recover_disk(disk, source_now, result), result


def test_recovery_removes_a_half_written_image(tmp_path: Path) -> None:
    crashed = CrashedDisk(tmp_path)
    crashed.temp.write_bytes(b"half an image")

    done, result = recover_one(crashed.journaled("planned"), str(crashed.original))

    assert not done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]
    assert any("removed" in a for a in result.actions)


def test_recovery_removes_an_image_linked_just_before_the_crash(tmp_path: Path) -> None:
    crashed = CrashedDisk(tmp_path)
    crashed.converted(crashed.temp)
    os.link(crashed.temp, crashed.new)  # linked; the "placed" state never written

    done, _ = recover_one(crashed.journaled("planned"), str(crashed.original))

    assert not done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]


def test_recovery_never_removes_a_file_it_did_not_make(tmp_path: Path) -> None:
    crashed = CrashedDisk(tmp_path)
    crashed.new.write_bytes(b"someone's")

    done, _ = recover_one(crashed.journaled("planned"), str(crashed.original))

    assert not done
    assert crashed.new.read_bytes() == b"someone's"


def test_recovery_undoes_a_placed_image_the_definition_does_not_name(tmp_path: Path) -> None:
    crashed = CrashedDisk(tmp_path)
    crashed.converted(crashed.new)

    done, _ = recover_one(crashed.journaled("placed"), str(crashed.original))

    assert not done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]


@pytest.mark.parametrize("keep", [False, True])
def test_recovery_finishes_a_disk_the_definition_names_on_its_new_image(
    tmp_path: Path, keep: bool
) -> None:
    crashed = CrashedDisk(tmp_path, keep=keep)
    crashed.converted(crashed.new)

    done, result = recover_one(crashed.journaled("placed"), str(crashed.new))

    assert done
    assert crashed.new.exists()
    assert crashed.original.exists() is keep
    assert any("converted" in a for a in result.actions)


def test_recovery_leaves_a_disk_someone_pointed_elsewhere(tmp_path: Path) -> None:
    crashed = CrashedDisk(tmp_path)
    crashed.converted(crashed.new)

    done, result = recover_one(crashed.journaled("placed"), "/srv/other.qcow2")

    assert not done
    assert crashed.original.exists() and crashed.new.exists()
    assert "left as it is" in result.actions[0]


def test_the_convert_mode_recovers_from_what_the_definition_names(tmp_path: Path) -> None:
    crashed = CrashedDisk(tmp_path)
    crashed.converted(crashed.new)
    domain = FakeDomain([FakeDisk("vda", crashed.new)], power=DomainState.SHUTOFF)
    journal = Journal(tmp_path / "state")
    journal.begin_job("j1", "fake", domain.uuid, JobSettings(), mode="convert")
    journal.record_for_recovery("j1", "shutoff", [crashed.journaled("planned")])
    journal.record_disk("j1", "vda", state=DiskState.DEFINED, data=crashed.data)
    journal.enter_step("j1", "cleanup")
    [job] = journal.unfinished()
    result = Recovered(job.id, job.domain, job.step, RecoveryOutcome.FAILED, [])

    mode_of("convert").recover(job, result, lambda _uuid: domain)

    assert result.outcome == "reclaimed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["disk.qcow2"]


def test_the_new_path_sits_beside_the_original() -> None:
    assert conversion.new_path_for("/v/disk.raw") == "/v/disk.qcow2"
    assert conversion.new_path_for("/v/disk.IMG") == "/v/disk.qcow2"
    assert conversion.new_path_for("/v/web.vmdk") == "/v/web.qcow2"
    assert conversion.new_path_for("/v/disk") == "/v/disk.qcow2"
    assert conversion.new_path_for("/v/disk.data") == "/v/disk.data.qcow2"


def test_the_policy_and_the_run_options_reach_the_job(tmp_path: Path) -> None:
    policy = Policy.model_validate({
        "name": "p", "match": {"names": ["*"]}, "schedule": {"cron": "0 1 * * *"},
        "rewrite": {"convert": True}, "guest": {"enable_discard": True},
    })  # fmt: skip
    settings = job_settings(policy)
    assert (settings.convert, settings.enable_discard) == (True, True)
    assert settings.record()["convert"] is True
    node = tmp_path / "node.xml"
    node.write_text(
        "<node><domain type='test'><name>net</name><memory>1024</memory><os><type>hvm</type>"
        "</os><devices><disk type='network' device='disk'><driver name='qemu' type='raw'/>"
        "<source protocol='rbd' name='pool/img'><host name='mon1'/></source>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain></node>"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "run", "net", "--json", "--convert",
         "--enable-discard", "--connect", f"test://{node}", "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    [skipped] = json.loads(proc.stdout)["skipped_disks"]
    assert skipped["reason"].startswith("a network disk: only image files are converted")


def flat_vmdk_naming(folder: Path, extent: str) -> Path:
    """A monolithicFlat descriptor whose extent line names ``extent`` (an imported appliance)."""
    made = folder / "made.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(made), "1M")
    descriptor = folder / "disk.vmdk"
    text = made.read_text().replace('"made-flat.vmdk"', f'"{extent}"')
    assert extent in text
    descriptor.write_text(text)
    return descriptor


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_a_vmdk_whose_extent_lies_outside_its_folder_is_refused_unread(
    tmp_path: Path, where: str
) -> None:
    """A host file the descriptor names is never opened, copied into the guest, or removed."""
    images = tmp_path / "images"
    images.mkdir()
    canary = tmp_path / "outside"
    canary.write_bytes(b"host secret\n" * 87382)  # 1 MiB: the size the extent line says
    extent = {"relative": "../outside", "absolute": str(canary), "symlink": "link-flat.vmdk"}[where]
    if where == "symlink":
        (images / "link-flat.vmdk").symlink_to(canary)
    vmdk = flat_vmdk_naming(images, extent)
    domain = FakeDomain([FakeDisk("vda", vmdk, format="vmdk")], power=DomainState.SHUTOFF)
    watch = OpenWatch(canary)
    try:
        result, _journal = run(domain, tmp_path / "state", free_space=FreeSpaceMethod.NONE)
        opened = watch.opened()
    finally:
        watch.close()

    assert result.outcome is not Outcome.RECLAIMED, result.reason
    [skipped] = result.skipped_disks
    assert "not converted" in skipped.reason and "extent" in skipped.reason, skipped.reason
    assert not opened, "the host file the descriptor names was opened"
    assert canary.read_bytes() == b"host secret\n" * 87382
    assert sorted(p.name for p in images.iterdir()) == sorted(
        ["disk.vmdk", "made.vmdk", "made-flat.vmdk"]
        + (["link-flat.vmdk"] if where == "symlink" else [])
    )
    assert domain.disks[0].path == vmdk
