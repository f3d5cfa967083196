"""Originals kept as backups: journaled, counted as held, deleted at expiry and only if ours.

Real images and real qemu-img; the domain is faked (tests/fakes.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from fakes import FakeDisk, FakeDomain, linux_fs, make_image
from testbed.daemon import DaemonProcess, write_config
from testbed.reclaim import backups_json
from virt_reclaim import backups
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import BackupRecord
from virt_reclaim.journal.store import Journal

MIB = 1024 * 1024


def reclaim_keeping_backup(tmp_path: Path, keep_s: float) -> tuple[FakeDomain, Journal, object]:
    image = make_image(tmp_path / "disk.qcow2", "128M", ("write -P 0x61 0 16M",
                                                         "write -P 0 16M 32M"))  # fmt: skip
    domain = FakeDomain(
        [FakeDisk("vda", image)], filesystems=[linux_fs("/", "vda", total=120 * MIB, used=17 * MIB)]
    )
    journal = Journal(tmp_path / "state")
    job = ReclaimJob(
        domain, QemuImg(priority=None),
        JobSettings(min_gain=0, keep_backup=keep_s),
        images_of_other_domains=dict, journal=journal,
    )  # fmt: skip
    return domain, journal, job.run()


def test_a_kept_original_is_journaled_held_and_not_counted_as_reclaimed(tmp_path: Path) -> None:
    _domain, journal, result = reclaim_keeping_backup(tmp_path, keep_s=3600)

    assert result.outcome is Outcome.RECLAIMED, result.reason  # type: ignore[attr-defined]
    [disk] = result.disks  # type: ignore[attr-defined]
    [kept] = journal.backups()
    backup = Path(kept.path)
    assert disk.backup == kept.path and backup.name.startswith("disk.qcow2.virt-reclaim-backup-")
    assert os.stat(backup).st_nlink == 1  # the only name of the old image now
    assert disk.backup_bytes == kept.bytes == disk.bytes_before
    assert backups.held_bytes(kept) == backup.stat().st_blocks * 512
    assert kept.expires_at == kept.created_at + 3600
    assert disk.to_json()["backup_expires_at"].endswith("Z")
    # Not reclaimed while held: the gain counts once the backup is gone.
    [(_domain_name, outcome, _count, gain, _down)] = journal.outcome_totals()
    assert (outcome, gain) == ("reclaimed", 0)
    listed = backups_json(tmp_path / "state")
    assert [(b["path"], b["bytes"]) for b in listed["backups"]] == [(kept.path, kept.bytes)]


def test_prune_deletes_only_expired_backups_and_then_the_gain_counts(tmp_path: Path) -> None:
    _domain, journal, result = reclaim_keeping_backup(tmp_path, keep_s=0)
    [kept] = journal.backups()
    held = backups.held_bytes(kept)
    (tmp_path / "later").write_bytes(b"x")
    st = (tmp_path / "later").stat()
    later = BackupRecord(**{**kept.__dict__, "path": str(tmp_path / "later"), "inode": st.st_ino,
                            "device": st.st_dev, "expires_at": kept.created_at + 3600})  # fmt: skip
    journal.record_backup(later)

    listed = backups_json(tmp_path / "state", "--prune")

    [pruned] = listed["pruned"]
    assert (pruned["path"], pruned["action"], pruned["freed"]) == (kept.path, "removed", held)
    assert not Path(kept.path).exists()
    assert (tmp_path / "later").exists()
    assert [b["path"] for b in listed["backups"]] == [later.path]
    [removed] = [b for b in journal.backups(removed=True) if b.path == kept.path]
    assert removed.removed_why == "expired"
    # The job's gain counts once none of its backups holds the old image any more.
    [(_d, _o, _c, gain, _down)] = journal.outcome_totals()
    assert gain == 0
    [later_pruned] = backups.prune(journal, now=later.expires_at)
    assert later_pruned.action == "removed"
    [(_d, _o, _c, gain, _down)] = journal.outcome_totals()
    [disk] = result.disks  # type: ignore[attr-defined]
    assert gain == disk.bytes_before - disk.bytes_after


def test_an_expired_backup_whose_path_holds_another_file_is_left_alone(tmp_path: Path) -> None:
    _domain, journal, _result = reclaim_keeping_backup(tmp_path, keep_s=0)
    [kept] = journal.backups()
    # Someone replaced it (or planted a link to a file of theirs at its name).
    os.unlink(kept.path)
    precious = tmp_path / "precious"
    precious.write_bytes(b"not ours")
    os.symlink(precious, kept.path)

    [pruned] = backups.prune(journal)

    assert pruned.action == "changed"
    assert precious.read_bytes() == b"not ours" and os.path.islink(kept.path)
    assert journal.backups() == []


def test_a_backup_already_gone_is_journaled_as_gone(tmp_path: Path) -> None:
    _domain, journal, _result = reclaim_keeping_backup(tmp_path, keep_s=0)
    [kept] = journal.backups()
    os.unlink(kept.path)

    [pruned] = backups.prune(journal)

    assert pruned.action == "gone"
    [gone] = journal.backups(removed=True)
    assert gone.removed_why == "gone before it expired"


def test_the_daemon_deletes_expired_backups_at_its_start(tmp_path: Path) -> None:
    """On libvirt's test driver: the daemon's first pass needs no guest, only the journal."""
    _domain, journal, _result = reclaim_keeping_backup(tmp_path, keep_s=0)
    [kept] = journal.backups()
    state = tmp_path / "state"
    config_dir = write_config(
        tmp_path / "etc",
        f'uri = "test:///default"\nstate_dir = "{state}"\nlog_format = "json"\n',
        {},
    )
    daemon = DaemonProcess(config_dir)
    try:
        removed = daemon.wait_event("backup.removed", 60, path=kept.path)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(60) == 0, daemon.tail()
    finally:
        daemon.stop()

    assert removed["bytes"] == kept.bytes
    assert not Path(kept.path).exists()
    assert journal.backups() == []
