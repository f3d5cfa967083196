"""``check``, ``plan`` and ``schema``: what the configuration says and would do."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from typing import Any

from virt_reclaim import logs
from virt_reclaim.cli.common import EXIT_OK, EXIT_USAGE
from virt_reclaim.cli.render import print_plan
from virt_reclaim.config import loading, selection
from virt_reclaim.config.policy import PolicyFile
from virt_reclaim.errors import VirtError
from virt_reclaim.reports import advice, plan
from virt_reclaim.virt.connection import Hypervisor


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the settings and policies, then list the domains each policy selects."""
    loaded = loading.load(args.config_dir)
    errors = [str(e) for e in loaded.errors]
    policies = [policy for _file, policy in loaded.policies]
    domains: list[Any] | None = None
    uri = args.connect or loaded.daemon.uri
    try:
        with Hypervisor(uri, read_only=True) as hypervisor:
            domains = hypervisor.domains()
    except VirtError as exc:
        print(f"virt-reclaim: cannot list domains ({exc}); the files alone were checked",
              file=sys.stderr)  # fmt: skip
    selected: dict[str, list[str]] = {p.name: [] for p in policies}
    notes: dict[str, list[str]] = {p.name: [] for p in policies}
    for domain in domains or []:
        choice = selection.select(policies, domain.name, domain.uuid, domain.xml)
        if choice.conflict:
            errors.append(
                f"domain {domain.name}: policies {', '.join(choice.conflict)} all match with the "
                "same priority; give one a higher priority or exclude the domain"
            )
        elif choice.policy is not None:
            selected[choice.policy.name].append(domain.name)
            notes[choice.policy.name] += [
                f"{domain.name} {note}" for note in advice.disk_notes(choice.policy, domain.xml)
            ]
    for file, policy in loaded.policies:
        state = "" if policy.enabled else " (disabled)"
        names = ", ".join(selected[policy.name]) or "no domain now"
        shown = names if domains is not None else "domains not listed"
        print(f"{policy.name}{state}  [{file}, priority {policy.priority}]: {shown}")
        for note in notes[policy.name]:
            print(f"  note: {note}")
        for warning in advice.policy_warnings(policy):
            # Valid, so not an error: the exit status stays 0.
            print(f"warning: {file}: policy {policy.name!r}: {warning}", file=sys.stderr)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"virt-reclaim: {len(errors)} error(s) in {args.config_dir}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    """Show for every domain what would be reclaimed, when, and why not."""
    logs.configure(logs.LogFormat.AUTO, level=logging.WARNING)
    loaded = loading.load(args.config_dir)
    for error in loaded.errors:
        print(f"error: {error}", file=sys.stderr)
    policies = [policy for _file, policy in loaded.policies]
    # Read-write, though plan only reads: libvirt refuses agent queries on read-only connections.
    with Hypervisor(args.connect or loaded.daemon.uri) as hypervisor:
        entries = plan.plan(
            hypervisor, policies, qemu_img=loaded.daemon.qemu_img,
            now=datetime.datetime.now(datetime.UTC),
        )  # fmt: skip
    if args.json:
        json.dump([e.to_json() for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_plan(entries, sys.stdout)
    return EXIT_USAGE if loaded.errors else EXIT_OK


def cmd_schema(_args: argparse.Namespace) -> int:
    """Print the JSON Schema of a policy file."""
    json.dump(PolicyFile.model_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK
