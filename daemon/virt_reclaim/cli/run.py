"""``virt-reclaim run``: reclaim one domain's disks now."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virt_reclaim import logs
from virt_reclaim.cli.common import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, Terminated, UsageError
from virt_reclaim.cli.render import ProgressBar, print_job_result
from virt_reclaim.config import loading
from virt_reclaim.config.policy import Policy, job_settings
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import run_job
from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.job.settings import (
    Compression,
    FreeSpaceMethod,
    JobSettings,
    ModeName,
    OnShutdownTimeout,
)
from virt_reclaim.journal import recovery
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics import writer
from virt_reclaim.process import Priority
from virt_reclaim.virt.connection import Hypervisor
from virt_reclaim.virt.domain import Domain

_EXIT_BY_OUTCOME = {
    Outcome.RECLAIMED: EXIT_OK,
    Outcome.NOTHING_TO_DO: EXIT_OK,
    Outcome.DRY_RUN: EXIT_OK,
    Outcome.SKIPPED: EXIT_SKIPPED,
    Outcome.FAILED: EXIT_FAILED,
    Outcome.ABANDONED: EXIT_FAILED,
}


def _interrupt_on_sigterm(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signum}")


def cmd_run(args: argparse.Namespace) -> int:
    """Reclaim one domain's disks now (or a policy's domains); the exit status tells the outcome."""
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    logs.configure(logs.LogFormat(args.log_format))
    overrides: dict[str, Any] = {
        "free_space": args.free_space and FreeSpaceMethod(args.free_space),
        "compression": args.compression and Compression(args.compression),
        "cluster_size": args.cluster_size,
        "shutdown_timeout_s": args.shutdown_timeout,
        "on_shutdown_timeout": args.on_shutdown_timeout
        and OnShutdownTimeout(args.on_shutdown_timeout),
        "min_gain": args.min_gain,
        "keep_backup": args.keep_backup,
        "enable_discard": args.enable_discard,
        "convert": args.convert,
        "dry_run": args.dry_run,
        "mode": ModeName.LIVE if args.live else None,
        "rate_limit": args.rate_limit,
        "qemu_img": args.qemu_img,
    }
    if args.domain is None and not args.policy:
        raise UsageError("give the DOMAIN to reclaim, or --policy NAME to reclaim every domain "
                         "that policy selects")  # fmt: skip
    loaded = loading.load(args.config_dir) if args.policy else None
    policy = _policy_named(args.policy, args.config_dir, loaded) if loaded else None
    if policy is not None:
        settings = job_settings(policy, **overrides)
    else:
        settings = JobSettings(**{k: v for k, v in overrides.items() if v is not None})
    if args.host_reserve is not None:
        settings = dataclasses.replace(
            settings,
            reserve=dataclasses.replace(
                settings.reserve, host_percent=0.0, host_min_bytes=args.host_reserve
            ),
        )
    journal = Journal(args.state_dir)
    with Hypervisor(args.connect) as hypervisor:

        def run_one(domain: Domain) -> JobResult:
            return _run_one(args, hypervisor, domain, settings, journal)

        if args.domain is None:
            # Here only: it brings the daemon's windows and workers, which one domain's run
            # does not need (each `run` process pays for its imports).
            from virt_reclaim.cli import batch  # noqa: PLC0415

            assert policy is not None and loaded is not None  # noqa: S101 - checked above
            recovery.recover(journal, args.state_dir, hypervisor.domain_by_uuid)
            results = batch.run_policy(
                policy, [p for _f, p in loaded.policies], hypervisor, journal, run_one,
                settings=settings, daemon_config=args.daemon_config, uri=args.connect,
                state_dir=args.state_dir,
            )  # fmt: skip
        else:
            domain = hypervisor.domain(args.domain)
            recovery.recover(journal, args.state_dir, hypervisor.domain_by_uuid)
            results = [run_one(domain)]
        if args.daemon_config.metrics_file:
            writer.write_for_run(args.daemon_config.metrics_file, journal, hypervisor.domains,
                                  args.qemu_img)  # fmt: skip
    if args.domain is None:
        return _report_all(results, as_json=args.json)
    result = results[0]
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_job_result(result, sys.stdout)
    return _EXIT_BY_OUTCOME[result.outcome]


def _run_one(
    args: argparse.Namespace,
    hypervisor: Hypervisor,
    domain: Domain,
    settings: JobSettings,
    journal: Journal,
) -> JobResult:
    """One domain's job, with a progress bar on a terminal."""
    bar = ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        return run_job(
            hypervisor,
            domain,
            settings,
            journal=journal,
            state_dir=args.state_dir,
            priority=Priority(
                args.daemon_config.nice,
                args.daemon_config.ionice_class,
                args.daemon_config.ionice_level,
            ),
            on_progress=bar.update if bar else None,
            before_step=_test_pause_hook(),
        )
    finally:
        if bar:
            bar.close()


def _report_all(results: list[JobResult], *, as_json: bool) -> int:
    """Print each domain's result; 1 when any failed (skipped ones do not count)."""
    if as_json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for result in results:
            print_job_result(result, sys.stdout)
        if not results:
            print("the policy selects no domain")
    failed = any(_EXIT_BY_OUTCOME[r.outcome] == EXIT_FAILED for r in results)
    return EXIT_FAILED if failed else EXIT_OK


def _policy_named(name: str, config_dir: str, loaded: loading.LoadedConfig) -> Policy:
    """The valid policy ``name`` of ``loaded`` (from ``config_dir``); UsageError if none."""
    for _file, policy in loaded.policies:
        if policy.name == name:
            return policy
    known = ", ".join(p.name for _f, p in loaded.policies) or "none"
    problems = "".join(f"\n  {e}" for e in loaded.errors)
    raise UsageError(f"no valid policy named {name!r} in {config_dir} (valid: {known}){problems}")


def _test_pause_hook() -> Callable[[Step], None] | None:
    """For crash tests only: VIRT_RECLAIM_TEST_PAUSE=STEP[:N] stops before the Nth STEP.

    The job writes VIRT_RECLAIM_TEST_PAUSE_FILE and sleeps there until it is killed, or,
    with VIRT_RECLAIM_TEST_GO_FILE, until that file exists (then it goes on).
    """
    spec = os.environ.get("VIRT_RECLAIM_TEST_PAUSE")
    marker = os.environ.get("VIRT_RECLAIM_TEST_PAUSE_FILE")
    go = os.environ.get("VIRT_RECLAIM_TEST_GO_FILE")
    if not spec or not marker:
        return None
    step_name, _, nth = spec.partition(":")
    wanted = Step(step_name)
    count = int(nth or 1)
    seen = 0

    def pause(step: Step) -> None:
        nonlocal seen
        if step is wanted:
            seen += 1
            if seen == count:
                Path(marker).touch()
                while go is None or not Path(go).exists():
                    time.sleep(0.05)

    return pause
