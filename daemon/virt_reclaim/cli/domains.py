"""``virt-reclaim domains``: every domain with its state, agent and disks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from virt_reclaim import domxml, inventory
from virt_reclaim.cli.common import EXIT_OK
from virt_reclaim.cli.render import print_domain_table
from virt_reclaim.errors import VirtError
from virt_reclaim.model import AgentInfo, DomainSnapshot, DomainState
from virt_reclaim.virt import Hypervisor


def cmd_domains(args: argparse.Namespace) -> int:
    """List every domain with its state, agent and disks."""
    # The agent answers only a read-write connection; without one, list what libvirt shows.
    try:
        hypervisor = Hypervisor(args.connect)
        read_only = False
    except VirtError:
        hypervisor = Hypervisor(args.connect, read_only=True)
        read_only = True
    with hypervisor:
        reports = [
            inventory.describe_domain(
                domain,
                qemu_img_path=args.qemu_img,
                agent=_agent_of(hypervisor, domain, read_only),
            )
            for domain in hypervisor.domains()
        ]
    if args.json:
        json.dump([_jsonable(r) for r in reports], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_domain_table(reports, sys.stdout)
    return EXIT_OK


def _agent_of(
    hypervisor: Hypervisor, domain: DomainSnapshot, read_only: bool
) -> AgentInfo | str | None:
    """What a running domain's agent says of itself, or why it could not be asked."""
    if domain.state is not DomainState.RUNNING:
        return None
    if domxml.parse_domain(domain.xml).agent_state != "connected":
        return None
    if read_only:
        return "read-only connection"
    try:
        return hypervisor.domain_by_uuid(domain.uuid).agent_info(timeout=5)
    except VirtError as exc:
        return str(exc)[:80]


def _jsonable(report: inventory.DomainReport) -> dict[str, Any]:
    return dataclasses.asdict(report)
