"""What the daemon would do for each domain, without doing it: ``virt-reclaim plan``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from virt_reclaim.config import crontab, selection
from virt_reclaim.config.policy import Policy, job_settings
from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.modes import conversion
from virt_reclaim.job.results import DiskResult, JobResult, Outcome, SkippedDisk
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.model import DomainObservation
from virt_reclaim.reports import advice, inventory, layout
from virt_reclaim.reports.layout import Layout
from virt_reclaim.virt.connection import Hypervisor
from virt_reclaim.virt.domain import Domain


@dataclass(frozen=True)
class PlanDisk:
    """One disk in the plan: its size now, its estimate, and what its rewrite would make."""

    target: str
    path: str
    bytes_allocated: int
    estimated_after: int | None
    estimated_reclaimable: int | None  # None: no estimate
    format: str = "qcow2"  # the image's format now
    converted_to: str | None = None  # where a raw or VMDK image's qcow2 would go
    discard: bool = True  # the definition has discard='unmap'
    layout: Layout | None = None  # the new image's layout and read cost

    def to_json(self) -> dict[str, Any]:
        """The disk as ``plan --json`` prints it in its entry's ``disks``."""
        return {
            "target": self.target,
            "path": self.path,
            "bytes_allocated": self.bytes_allocated,
            "estimated_after": self.estimated_after,
            "estimated_reclaimable": self.estimated_reclaimable,
            "format": self.format,
            "converted_to": self.converted_to,
            "discard": self.discard,
            "layout": None if self.layout is None else self.layout.to_json(),
        }


@dataclass
class PlanEntry:
    """One domain in the plan."""

    domain: str
    state: str
    policy: str | None
    next_run: str | None
    outcome: str
    reason: str
    disks: list[PlanDisk] = field(default_factory=list)
    skipped_disks: list[SkippedDisk] = field(default_factory=list)
    free_space: str | None = None  # the method the job would use, and why
    notes: list[str] = field(default_factory=list)  # what a policy setting would change

    @property
    def estimated_reclaimable(self) -> int | None:
        """Bytes the estimate says a reclaim frees on the host (None: no estimate)."""
        gains = [d.estimated_reclaimable for d in self.disks]
        known = [g for g in gains if g is not None]
        if not gains or len(known) < len(gains):
            return None
        return sum(known)

    def to_json(self) -> dict[str, Any]:
        """The entry of ``plan --json``."""
        return {
            "domain": self.domain,
            "state": self.state,
            "policy": self.policy,
            "next_run": self.next_run,
            "outcome": self.outcome,
            "reason": self.reason,
            "disks": [d.to_json() for d in self.disks],
            "skipped_disks": [d.to_json() for d in self.skipped_disks],
            "free_space": self.free_space,
            "notes": self.notes,
            "estimated_reclaimable": self.estimated_reclaimable,
        }


def next_run(policy: Policy, now: dt.datetime) -> str | None:
    """The next start of the policy's window after ``now``, ISO 8601 with its offset."""
    fire = crontab.next_fire(policy.schedule.cron, policy.schedule.timezone, now)
    return fire.isoformat() if fire else None


def dry_run_policy(
    domain: Domain,
    policy: Policy,
    listed: Sequence[DomainObservation],
    *,
    qemu_img: str,
    history: Callable[[str, str, str], float | None] | None = None,
) -> JobResult:
    """A dry run of ``policy``'s job on ``domain``: read-only, with an estimate per disk.

    ``listed`` are all domains (for the images other domains use), listed once by the caller.
    """
    settings = job_settings(policy, dry_run=True, qemu_img=qemu_img)
    return dry_run(domain, settings, listed, history=history)


def dry_run(
    domain: Domain,
    settings: JobSettings,
    listed: Sequence[DomainObservation],
    *,
    history: Callable[[str, str, str], float | None] | None = None,
) -> JobResult:
    """A dry run of a job with ``settings`` (``dry_run`` is forced) on ``domain``: read-only."""
    job = ReclaimJob(
        domain,
        QemuImg(settings.qemu_img),
        dataclasses.replace(settings, dry_run=True),
        images_of_other_domains=functools.partial(
            inventory.images_in_use, listed, exclude_uuid=domain.uuid
        ),
        history=history,
    )
    return job.run()


def reclaimable(bytes_before: int, estimated_after: int | None) -> int | None:
    """What an estimate says a disk's reclaim frees on the host, never below 0."""
    return None if estimated_after is None else max(0, bytes_before - estimated_after)


def plan(
    hypervisor: Hypervisor, policies: Sequence[Policy], *, qemu_img: str, now: dt.datetime
) -> list[PlanEntry]:
    """For every domain: its policy, next run, and a dry run of the job (read-only)."""
    listed = hypervisor.domains()
    entries = []
    for observed in listed:
        choice = selection.select(policies, observed.name, observed.uuid, observed.xml)
        entry = PlanEntry(observed.name, str(observed.state), None, None, "no-policy", "")
        if choice.conflict:
            entry.reason = f"policies {', '.join(choice.conflict)} match with the same priority"
        elif choice.policy is None:
            entry.reason = "no enabled policy selects it"
        else:
            policy = choice.policy
            entry.policy, entry.next_run = policy.name, next_run(policy, now)
            result = dry_run_policy(
                hypervisor.domain(observed.name), policy, listed, qemu_img=qemu_img
            )
            entry.outcome = (
                "would-reclaim" if result.outcome is Outcome.DRY_RUN else str(result.outcome)
            )
            entry.reason = "" if result.outcome is Outcome.DRY_RUN else result.reason
            entry.disks = [_plan_disk(policy, d) for d in result.disks]
            entry.skipped_disks = list(result.skipped_disks)
            entry.free_space = result.free_space_plan
            entry.notes = advice.disk_notes(policy, observed.xml)
        entries.append(entry)
    return entries


def _plan_disk(policy: Policy, disk: DiskResult) -> PlanDisk:
    """A disk of the dry run in the plan, with the layout its new image gets and its read cost."""
    rewrite = policy.rewrite
    return PlanDisk(
        target=disk.target,
        path=disk.path,
        bytes_allocated=disk.bytes_before,
        estimated_after=disk.estimated_after,
        estimated_reclaimable=reclaimable(disk.bytes_before, disk.estimated_after),
        format=disk.format,
        converted_to=None if disk.format == "qcow2" else conversion.new_path_for(disk.path),
        discard=disk.discard,
        layout=layout.describe(str(rewrite.compression), disk.cluster_size, rewrite.preallocation),
    )
