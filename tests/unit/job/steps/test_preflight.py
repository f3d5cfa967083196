"""How often one job reads each fact: the definitions, qemu-img measure, the preflight.

Each is read once per job and reused, and again only where the domain or the host may
have changed since (issue 22): these counts keep the repeats from creeping back.
Real images and qemu-img; the domain is faked (tests/fakes.py) and counts its XML reads.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import structlog

from fakes import FakeDisk, FakeDomain, linux_fs, make_image, write_data
from virt_reclaim.image import imagefile
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.image.qemu_img_argv import Extent, ImageInfo
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import FreeSpaceMethod, JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState

MIB = 1024 * 1024


class CountingQemuImg(QemuImg):
    """qemu-img that counts its runs by subcommand."""

    def __init__(self) -> None:
        super().__init__(priority=None)
        self.runs: Counter[str] = Counter()

    def info(
        self,
        path: str,
        *,
        force_share: bool = False,
        image_format: str | None = None,
        backing_chain: bool = True,
    ) -> list[ImageInfo]:
        self.runs["info"] += 1
        return super().info(path, force_share=force_share, image_format=image_format,
                            backing_chain=backing_chain)  # fmt: skip

    def measure(self, path: str, *, force_share: bool = False, image_format: str = "qcow2") -> int:
        self.runs["measure"] += 1
        return super().measure(path, force_share=force_share, image_format=image_format)

    def map(
        self, path: str, *, force_share: bool = False, image_format: str = "qcow2"
    ) -> list[Extent]:
        self.runs["map"] += 1
        return super().map(path, force_share=force_share, image_format=image_format)


@pytest.fixture
def domain(tmp_path: Path) -> FakeDomain:
    image = make_image(tmp_path / "disk.qcow2", "512M", ("write -P 0x61 0 32M",
                                                        "write -P 0 32M 32M"))  # fmt: skip
    return FakeDomain(
        [FakeDisk("vda", image, discard=False)],
        filesystems=[linux_fs("/", "vda", total=240 * MIB, used=33 * MIB)],
        fill_offset=128 * MIB,  # the guest's free space, where its zero-fill lands
    )


def run(
    domain: FakeDomain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> tuple[Outcome, Counter[str], list[str]]:
    """Run one job; its outcome, qemu-img's runs and the probes, and the events logged."""
    images = CountingQemuImg()
    probe = imagefile.probe_create

    def counted_probe(path: str) -> str | None:
        images.runs["probe"] += 1
        return probe(path)

    monkeypatch.setattr(imagefile, "probe_create", counted_probe)
    job = ReclaimJob(
        domain, images, JobSettings(**{"min_gain": 0, **settings}),
        images_of_other_domains=dict, journal=Journal(tmp_path / "state"),
    )  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        result = job.run()
    return result.outcome, images.runs, [str(e["event"]) for e in logs]


def test_a_job_on_a_running_guest_reads_each_fact_once_and_again_only_after_a_change(
    domain: FakeDomain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, runs, events = run(domain, tmp_path, monkeypatch,
                                free_space=FreeSpaceMethod.ZERO, enable_discard=True)  # fmt: skip

    assert outcome is Outcome.RECLAIMED
    # live: inspect. inactive: inspect, the guard (the guest was off for the first time
    # and someone may have edited it), the define (read right before it is replaced).
    assert domain.xml_reads == Counter(live=1, inactive=3)
    # inspect, the guard's re-read of the header
    assert runs["info"] == 2
    # The estimate's, then again after the zero-fill wrote into the image (before the
    # issue: four, one per preflight too).
    assert runs["measure"] == 2
    assert runs["map"] == 2  # the estimate, and the estimate again after the fill
    assert runs["probe"] == 1  # the folder is probed once (before: three times)
    # The host's room is checked before the fill, after it and right before the rewrite.
    assert events.count("preflight.space") == 3


def test_a_job_on_a_shut_off_guest_measures_once(
    domain: FakeDomain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    domain.power = DomainState.SHUTOFF

    outcome, runs, events = run(domain, tmp_path, monkeypatch)

    assert outcome is Outcome.RECLAIMED
    assert domain.xml_reads == Counter(live=1, inactive=2)
    assert runs["measure"] == 1  # nothing wrote the image since the estimate (before: 3)
    assert runs["info"] == 2  # inspect, the guard
    assert runs["probe"] == 1  # before: 2
    assert events.count("preflight.space") == 2


def test_an_image_written_since_its_measure_is_measured_again_before_the_rewrite(
    domain: FakeDomain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest writes until it is down: the room is checked on a fresh measure."""
    image = domain.disks[0].path
    domain.after_shutdown = lambda: write_data(image, 200 * MIB, b"x" * MIB)

    outcome, runs, events = run(domain, tmp_path, monkeypatch, free_space=FreeSpaceMethod.NONE)

    assert outcome is Outcome.RECLAIMED
    assert runs["measure"] == 2  # the estimate's; again once the guest is down
    assert events.count("preflight.space") == 2  # no free-space step: before it, after the stop


def test_a_convert_job_reads_the_definition_where_it_may_have_changed_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:  # sparse, with a little data, as a guest wrote it
        f.write(b"a" * MIB)
        f.truncate(64 * MIB)
    domain = FakeDomain([FakeDisk("vda", raw, discard=False, format="raw")])

    outcome, runs, events = run(domain, tmp_path, monkeypatch, convert=True,
                                free_space=FreeSpaceMethod.NONE)  # fmt: skip

    assert outcome is Outcome.RECLAIMED
    assert "job.mode_changed" in events
    # inspect; the guard once the guest is off; the define right before the new one
    assert domain.xml_reads == Counter(live=1, inactive=3)
    assert runs["measure"] == 1  # the guest wrote nothing since: the estimate's is reused
    assert runs["probe"] == 1
