"""What the daemon would do for each domain, without doing it: ``virt-reclaim plan``."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virt_reclaim import crontab, inventory, selection
from virt_reclaim.job import JobResult, Outcome, ReclaimJob
from virt_reclaim.model import DomainSnapshot
from virt_reclaim.policy import Policy, job_settings
from virt_reclaim.qemu_img import QemuImg
from virt_reclaim.virt import Domain, Hypervisor


@dataclass
class PlanEntry:
    """One domain in the plan."""

    domain: str
    state: str
    policy: str | None
    next_run: str | None
    outcome: str
    reason: str
    disks: list[dict[str, Any]] = field(default_factory=list)
    skipped_disks: list[dict[str, str]] = field(default_factory=list)
    free_space: str | None = None  # the method the job would use, and why

    def to_json(self) -> dict[str, Any]:
        """The entry of ``plan --json``."""
        return {
            "domain": self.domain,
            "state": self.state,
            "policy": self.policy,
            "next_run": self.next_run,
            "outcome": self.outcome,
            "reason": self.reason,
            "disks": self.disks,
            "skipped_disks": self.skipped_disks,
            "free_space": self.free_space,
        }


def next_run(policy: Policy, now: dt.datetime) -> str | None:
    """The next start of the policy's window after ``now``, ISO 8601 with its offset."""
    fire = crontab.next_fire(policy.schedule.cron, policy.schedule.timezone, now)
    return fire.isoformat() if fire else None


def estimate(
    domain: Domain, policy: Policy, snapshots: Sequence[DomainSnapshot], *, qemu_img: str
) -> JobResult:
    """A dry run of ``policy``'s job on ``domain``: read-only, with an estimate per disk.

    ``snapshots`` are all domains (for the images other domains use), listed once by the caller.
    """
    job = ReclaimJob(
        domain,
        QemuImg(qemu_img),
        job_settings(policy, dry_run=True, qemu_img=qemu_img),
        images_of_other_domains=functools.partial(
            inventory.images_in_use, snapshots, exclude_uuid=domain.uuid
        ),
    )
    return job.run()


def plan(
    hypervisor: Hypervisor, policies: Sequence[Policy], *, qemu_img: str, now: dt.datetime
) -> list[PlanEntry]:
    """For every domain: its policy, next run, and a dry run of the job (read-only)."""
    snapshots = hypervisor.domains()
    entries = []
    for snap in snapshots:
        choice = selection.select(policies, snap.name, snap.uuid, snap.xml)
        entry = PlanEntry(snap.name, str(snap.state), None, None, "no-policy", "")
        if choice.conflict:
            entry.reason = f"policies {', '.join(choice.conflict)} match with the same priority"
        elif choice.policy is None:
            entry.reason = "no enabled policy selects it"
        else:
            policy = choice.policy
            entry.policy, entry.next_run = policy.name, next_run(policy, now)
            result = estimate(hypervisor.domain(snap.name), policy, snapshots, qemu_img=qemu_img)
            entry.outcome = (
                "would-reclaim" if result.outcome is Outcome.DRY_RUN else str(result.outcome)
            )
            entry.reason = "" if result.outcome is Outcome.DRY_RUN else result.reason
            entry.disks = [
                {"target": d.target, "path": d.path, "bytes_allocated": d.bytes_before,
                 "estimated_after": d.estimated_after}
                for d in result.disks
            ]  # fmt: skip
            entry.skipped_disks = [d.to_json() for d in result.skipped_disks]
            entry.free_space = result.free_space_plan
        entries.append(entry)
    return entries
