"""``virt-reclaim domains``: every domain with its state, agent and disks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from virt_reclaim import logs
from virt_reclaim.cli.common import EXIT_OK
from virt_reclaim.cli.render import print_domain_table
from virt_reclaim.config import loading, selection
from virt_reclaim.config.policy import job_settings
from virt_reclaim.domxml import read
from virt_reclaim.errors import VirtError
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.model import AgentInfo, DomainObservation, DomainState
from virt_reclaim.reports import inventory, plan
from virt_reclaim.virt.connection import Hypervisor


@dataclasses.dataclass(frozen=True)
class DomainEstimate:
    """What a dry run of a domain's job says (``domains --estimate``)."""

    policy: str | None  # whose settings the dry run took (None: run's defaults)
    outcome: str
    reason: str
    reclaimable: dict[str, int | None]  # by disk target

    def to_json(self) -> dict[str, Any]:
        """The ``estimate`` of a domain in ``domains --estimate --json``."""
        return {"policy": self.policy, "outcome": self.outcome, "reason": self.reason}


def cmd_domains(args: argparse.Namespace) -> int:
    """List every domain with its state, agent and disks."""
    if args.estimate:
        # The dry runs log their steps; only warnings belong beside the table.
        logs.configure(logs.LogFormat.AUTO, level=logging.WARNING)
    # The agent answers only a read-write connection; without one, list what libvirt shows.
    try:
        hypervisor = Hypervisor(args.connect)
        read_only = False
    except VirtError:
        hypervisor = Hypervisor(args.connect, read_only=True)
        read_only = True
    estimates: dict[str, DomainEstimate] = {}
    with hypervisor:
        listed = hypervisor.domains()
        reports = [
            inventory.describe_domain(
                domain,
                qemu_img_path=args.qemu_img,
                agent=_agent_of(hypervisor, domain, read_only),
            )
            for domain in listed
        ]
        if args.estimate:
            estimates = _estimates(hypervisor, listed, args)
    if args.json:
        json.dump([_jsonable(r, estimates.get(r.uuid)) for r in reports], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        reclaimable = None
        if args.estimate:
            reclaimable = {
                (r.name, target): gain
                for r in reports
                if r.uuid in estimates
                for target, gain in estimates[r.uuid].reclaimable.items()
            }
        print_domain_table(reports, sys.stdout, reclaimable=reclaimable)
    return EXIT_OK


def _estimates(
    hypervisor: Hypervisor, listed: Sequence[DomainObservation], args: argparse.Namespace
) -> dict[str, DomainEstimate]:
    """A dry run of each domain's job: its policy's settings, else those ``run`` defaults to."""
    policies = [policy for _file, policy in loading.load(args.config_dir).policies]
    found: dict[str, DomainEstimate] = {}
    for observed in listed:
        choice = selection.select(policies, observed.name, observed.uuid, observed.xml)
        policy = choice.policy if not choice.conflict else None
        settings = (
            job_settings(policy, qemu_img=args.qemu_img)
            if policy is not None
            else JobSettings(qemu_img=args.qemu_img)
        )
        try:
            result = plan.dry_run(hypervisor.domain_by_uuid(observed.uuid), settings, listed)
        except VirtError as exc:
            found[observed.uuid] = DomainEstimate(
                policy.name if policy else None, "failed", str(exc), {}
            )
            continue
        gains = {
            d.target: plan.reclaimable(d.bytes_before, d.estimated_after) for d in result.disks
        }
        found[observed.uuid] = DomainEstimate(
            policy.name if policy else None, str(result.outcome), result.reason, gains
        )
    return found


def _agent_of(
    hypervisor: Hypervisor, domain: DomainObservation, read_only: bool
) -> AgentInfo | str | None:
    """What a running domain's agent says of itself, or why it could not be asked."""
    if domain.state is not DomainState.RUNNING:
        return None
    if read.parse_domain(domain.xml).agent_state != "connected":
        return None
    if read_only:
        return "read-only connection"
    try:
        return hypervisor.domain_by_uuid(domain.uuid).agent_info(timeout=5)
    except VirtError as exc:
        return str(exc)[:80]


def _jsonable(report: inventory.DomainReport, estimate: DomainEstimate | None) -> dict[str, Any]:
    found = dataclasses.asdict(report)
    if estimate is not None:
        found["estimate"] = estimate.to_json()
        for disk in found["disks"]:
            disk["estimated_reclaimable"] = estimate.reclaimable.get(disk["target"])
    return found
