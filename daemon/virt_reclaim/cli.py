"""The ``virt-reclaim`` command line: subcommands, output formats and exit statuses."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from pydantic import ByteSize, TypeAdapter, ValidationError

from virt_reclaim import (
    __version__,
    config,
    domxml,
    inventory,
    logs,
    planning,
    recovery,
    runner,
    selection,
    service,
)
from virt_reclaim.domainlock import DomainBusy
from virt_reclaim.errors import VirtError
from virt_reclaim.guestfree import FreeSpaceMethod
from virt_reclaim.job import (
    Compression,
    JobResult,
    JobSettings,
    OnShutdownTimeout,
    Outcome,
    Step,
)
from virt_reclaim.journal import DEFAULT_STATE_DIR, Journal, JournalError
from virt_reclaim.model import DEFAULT_URI, AgentInfo, DomainSnapshot, DomainState
from virt_reclaim.policy import Policy, PolicyFile, job_settings
from virt_reclaim.process import Priority
from virt_reclaim.units import format_bytes
from virt_reclaim.virt import Hypervisor

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SKIPPED = 3

_EXIT_BY_OUTCOME = {
    Outcome.RECLAIMED: EXIT_OK,
    Outcome.NOTHING_TO_DO: EXIT_OK,
    Outcome.DRY_RUN: EXIT_OK,
    Outcome.SKIPPED: EXIT_SKIPPED,
    Outcome.FAILED: EXIT_FAILED,
    Outcome.ABANDONED: EXIT_FAILED,
}
_BYTE_SIZE = TypeAdapter(ByteSize)


def _size(text: str) -> int:
    """Parse a size like "64MiB", "1GiB" or "500MB" (argparse type)."""
    try:
        return int(_BYTE_SIZE.validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 512MiB, 20GiB, 1000000)"
        ) from None


def _cluster_size(text: str) -> int:
    """Parse a qcow2 cluster size: a power of two from 512 bytes to 2 MiB."""
    size = _size(text)
    if size < 512 or size > 2 * 1024 * 1024 or size & (size - 1):
        raise argparse.ArgumentTypeError(
            f"{text!r} is {size} bytes; a qcow2 cluster size is a power of two from 512 to "
            "2MiB (write 64KiB, not 64K, which means 64000)"
        )
    return size


def _seconds(text: str) -> float:
    """Parse a positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="virt-reclaim",
        description=(
            "Reclaim the free space of idle KVM guests' qcow2 disks: trim or zero-fill "
            "inside the guest, then rewrite the image compacted and compressed."
        ),
        epilog=(
            "Exit status: 0 success, 1 failure, 2 usage error. "
            "Run 'virt-reclaim COMMAND --help' for a command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    domains = commands.add_parser(
        "domains",
        help="list every libvirt domain with its state, agent and disks",
        description=(
            "List every domain, active and inactive: its state, whether it is persistent, "
            "whether its guest agent is connected, and each disk with its format, source, "
            "virtual size, bytes allocated on the host, backing chain and number of "
            "internal snapshots. Changes nothing."
        ),
    )
    _add_connect(domains)
    domains.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    domains.add_argument(
        "--qemu-img",
        metavar="PATH",
        help="qemu-img program to read images with (default: the configured qemu_img, else "
        "qemu-img from PATH)",
    )
    _add_config_dir(domains)
    domains.set_defaults(handler=_cmd_domains)
    _add_run(commands)
    return parser


def _add_run(commands: Any) -> None:  # noqa: ANN401 - argparse's subparsers action is private
    run = commands.add_parser(
        "run",
        help="reclaim the disks of one domain now",
        description=(
            "Reclaim the qcow2 disks of DOMAIN now: free space inside the guest (trim or "
            "zero-fill through the guest agent), shut the guest down, rewrite each eligible "
            "disk compacted and compressed beside the original, verify it (qemu-img check and "
            "compare), swap it in with an atomic rename and bring the guest back to the state "
            "it had. Any failure leaves the original images and the guest as they were."
        ),
        epilog=(
            "Exit status: 0 reclaimed, nothing to do, or dry run; 1 failed (everything "
            "restored); 2 usage error; 3 skipped (the domain or its disks are not eligible). "
            "Logs: JSON lines on stderr (readable text on a terminal); --json prints the "
            "result as one JSON object on stdout."
        ),
    )
    run.add_argument("domain", metavar="DOMAIN", help="the libvirt domain name")
    _add_connect(run)
    run.add_argument(
        "--dry-run", action="store_true", help="inspect and estimate only; change nothing"
    )
    run.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout"
    )
    run.add_argument(
        "--free-space", choices=[m.value for m in FreeSpaceMethod],
        default=None,
        help="how to free the guest's unused blocks first: trim (frees host space only with "
        "discard='unmap' on the disk), zero (fill free space with zeros through guest-exec), "
        "auto (trim where every disk has discard, else zero), none (default: auto)",
    )  # fmt: skip
    run.add_argument(
        "--host-reserve", type=_size, default=None, metavar="SIZE",
        help="a zero-fill leaves at least SIZE free on each host filesystem beyond what the "
        "rewrite needs (default: the policy's, else the larger of 5%% and 2GiB)",
    )  # fmt: skip
    run.add_argument(
        "--compression", choices=[m.value for m in Compression], default=None,
        help="compression of the new image; zstd needs QEMU >= 5.1 to open it (default: zstd)",
    )  # fmt: skip
    run.add_argument(
        "--cluster-size", type=_cluster_size, metavar="SIZE",
        help="cluster size of the new image, e.g. 64KiB (default: keep each image's own; "
        "clusters above 64KiB make compressed images slow to read)",
    )  # fmt: skip
    run.add_argument(
        "--shutdown-timeout", type=_seconds, default=None, metavar="SECONDS",
        help="how long to wait for the guest to be off (default: 120)",
    )  # fmt: skip
    run.add_argument(
        "--on-shutdown-timeout", choices=[m.value for m in OnShutdownTimeout],
        default=None,
        help="abort: leave the guest running and change nothing; force: power it off "
        "(default: abort)",
    )  # fmt: skip
    run.add_argument(
        "--min-gain", type=_size, default=None, metavar="SIZE",
        help="do nothing when the estimated gain is below this (default: 64MiB); when the "
        "guest's usage is unknown (shut off, no agent) the estimate counts only what "
        "compression and dropping zero clusters free",
    )  # fmt: skip
    run.add_argument(
        "--keep-backup", action="store_true", default=None,
        help="keep each original image beside the new one (NAME.virt-reclaim-backup-TIME)",
    )  # fmt: skip
    run.add_argument(
        "--qemu-img", metavar="PATH",
        help="qemu-img program (default: the configured qemu_img, else qemu-img from PATH)",
    )  # fmt: skip
    run.add_argument(
        "--log-format", choices=[m.value for m in logs.LogFormat],
        default=logs.LogFormat.AUTO.value,
        help="log lines on stderr: json, console, or auto (console on a terminal)",
    )  # fmt: skip
    run.add_argument(
        "--policy", metavar="NAME",
        help="take the settings from this policy; options given here still win",
    )  # fmt: skip
    _add_config_dir(run)
    _add_state_dir(run)
    run.set_defaults(handler=_cmd_run)

    recover = commands.add_parser(
        "recover",
        help="finish or undo jobs whose process died",
        description=(
            "For every job the journal records as unfinished whose process is gone: kill a "
            "qemu-img it left running, delete its temporary files (the originals are intact "
            "until the swap), and start the guest again if it was running before. A job past "
            "its swap is finished. run does this by itself before it starts a job; running it "
            "twice does nothing the second time."
        ),
        epilog="Exit status: 0 done (also when nothing needed recovery), 1 failure.",
    )
    _add_connect(recover)
    _add_state_dir(recover)
    _add_config_dir(recover)
    recover.add_argument("--json", action="store_true", help="print a JSON list of what was done")
    recover.set_defaults(handler=_cmd_recover)

    history = commands.add_parser(
        "history",
        help="show past jobs from the journal",
        description="Past jobs, newest first, with outcome, reason, sizes, downtime and duration.",
        epilog="Exit status: 0 success, 1 the journal cannot be read.",
    )
    history.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain's jobs")
    _add_state_dir(history)
    _add_config_dir(history)
    history.add_argument("--json", action="store_true", help="print a JSON list")
    history.set_defaults(handler=_cmd_history)
    _add_config_commands(commands)
    _add_daemon_command(commands)


def _add_daemon_command(commands: Any) -> None:  # noqa: ANN401 - argparse's private type
    daemon = commands.add_parser(
        "daemon",
        help="run the service: schedules, idle detection, jobs (what systemd starts)",
        description=(
            "Watch the libvirt domains, sample their statistics every stats_interval, and when "
            "a policy's cron fires, reclaim its eligible idle domains, largest estimated gain "
            "first, one job per domain, at most max_concurrent_jobs at once, only while the "
            "estimated duration fits in the window. Finishes or undoes interrupted jobs at "
            "start. SIGHUP reloads the configuration (a broken one is reported and the last "
            "good one kept); SIGTERM/SIGINT abandon jobs that have not shut their guest down, "
            "let the others finish or restore, then exit 0. Speaks sd_notify when run by "
            "systemd (Type=notify, watchdog). Logs JSON lines unless log_format says otherwise "
            "or stderr is a terminal."
        ),
        epilog=(
            "Exit status: 0 stopped by a signal, 78 configuration errors at start (systemd "
            "does not restart on it), 1 other failure."
        ),
    )
    _add_config_dir(daemon)
    daemon.set_defaults(handler=_cmd_daemon)


def _cmd_daemon(args: argparse.Namespace) -> int:
    return service.Daemon(args.config_dir).run()


def _add_config_commands(commands: Any) -> None:  # noqa: ANN401 - argparse's private type
    check = commands.add_parser(
        "check",
        help="validate the daemon settings and the policy files",
        description=(
            "Validate CONFIG_DIR/virt-reclaim.toml and every CONFIG_DIR/policies.d/*.toml, "
            "report every error (file, policy, field, value, why), then list each policy with "
            "the domains it selects now. Files and folders must belong to root and not be "
            "writable by group or others."
        ),
        epilog="Exit status: 0 valid, 2 errors found (each printed on stderr).",
    )
    _add_config_dir(check)
    _add_connect(check)
    check.set_defaults(handler=_cmd_check)
    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of a policy file",
        description="Print the JSON Schema of a policy file, with a description of every field.",
    )
    schema.set_defaults(handler=_cmd_schema)
    plan = commands.add_parser(
        "plan",
        help="show what would be reclaimed, when, and why not",
        description=(
            "For every domain: the policy that selects it, the next start of that policy's "
            "window, each eligible disk with its bytes allocated now and the estimated bytes "
            "after, and the reason for each skip. Changes nothing: images are read with "
            "qemu-img -U, guests only asked read-only questions through their agent."
        ),
        epilog="Exit status: 0 success, 1 libvirt unreachable, 2 configuration errors.",
    )
    _add_config_dir(plan)
    _add_connect(plan)
    plan.add_argument("--json", action="store_true", help="print a JSON list")
    plan.set_defaults(handler=_cmd_plan)


def _cmd_check(args: argparse.Namespace) -> int:
    loaded = config.load(args.config_dir)
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
    for domain in domains or []:
        choice = selection.select(policies, domain.name, domain.uuid, domain.xml)
        if choice.conflict:
            errors.append(
                f"domain {domain.name}: policies {', '.join(choice.conflict)} all match with the "
                "same priority; give one a higher priority or exclude the domain"
            )
        elif choice.policy is not None:
            selected[choice.policy.name].append(domain.name)
    for file, policy in loaded.policies:
        state = "" if policy.enabled else " (disabled)"
        names = ", ".join(selected[policy.name]) or "no domain now"
        shown = names if domains is not None else "domains not listed"
        print(f"{policy.name}{state}  [{file}, priority {policy.priority}]: {shown}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"virt-reclaim: {len(errors)} error(s) in {args.config_dir}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    logs.configure(logs.LogFormat.AUTO, level=logging.WARNING)
    loaded = config.load(args.config_dir)
    for error in loaded.errors:
        print(f"error: {error}", file=sys.stderr)
    policies = [policy for _file, policy in loaded.policies]
    # Read-write, though plan only reads: libvirt refuses agent queries on read-only connections.
    with Hypervisor(args.connect or loaded.daemon.uri) as hypervisor:
        entries = planning.plan(
            hypervisor, policies, qemu_img=loaded.daemon.qemu_img,
            now=datetime.datetime.now(datetime.UTC),
        )  # fmt: skip
    if args.json:
        json.dump([e.to_json() for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for entry in entries:
            when = f", next run {entry.next_run}" if entry.next_run else ""
            print(f"{entry.domain} ({entry.state}): {entry.policy or '-'}{when}: "
                  f"{entry.outcome}{' - ' + entry.reason if entry.reason else ''}")  # fmt: skip
            if entry.free_space:
                print(f"  free space first: {entry.free_space}")
            for disk in entry.disks:
                print(f"  {disk['target']}  {disk['path']}  "
                      f"{format_bytes(disk['bytes_allocated'])} now, "
                      f"{format_bytes(disk['estimated_after'])} estimated after")  # fmt: skip
            for skipped in entry.skipped_disks:
                print(f"  {skipped['target']}  skipped: {skipped['reason']}")
    return EXIT_USAGE if loaded.errors else EXIT_OK


def _cmd_schema(_args: argparse.Namespace) -> int:
    json.dump(PolicyFile.model_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


def _add_config_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir", default=config.DEFAULT_CONFIG_DIR, metavar="DIR",
        help="the configuration folder (default: %(default)s)",
    )  # fmt: skip


def _apply_daemon_settings(args: argparse.Namespace) -> None:
    """Fill the options not given from CONFIG_DIR/virt-reclaim.toml (then built-in defaults)."""
    if not hasattr(args, "config_dir") or args.command == "daemon":
        return  # the daemon reports its configuration errors in its own log
    daemon, errors = config.load_daemon(args.config_dir)
    if errors:
        raise UsageError("\n  ".join(["the daemon settings are not valid:", *map(str, errors)]))
    args.daemon = daemon
    for option, value in (("connect", daemon.uri), ("state_dir", daemon.state_dir),
                          ("qemu_img", daemon.qemu_img)):  # fmt: skip
        if hasattr(args, option) and getattr(args, option) is None:
            setattr(args, option, value)


def _policy_named(name: str, config_dir: str) -> Policy:
    """The valid policy ``name`` from ``config_dir``; UsageError naming what is wrong."""
    loaded = config.load(config_dir)
    for _file, policy in loaded.policies:
        if policy.name == name:
            return policy
    known = ", ".join(p.name for _f, p in loaded.policies) or "none"
    problems = "".join(f"\n  {e}" for e in loaded.errors)
    raise UsageError(f"no valid policy named {name!r} in {config_dir} (valid: {known}){problems}")


class UsageError(Exception):
    """The command line names something that does not exist or is not valid."""


def _add_state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", metavar="DIR",
        help="where the job journal lives (default: the configured state_dir, else "
        f"{DEFAULT_STATE_DIR})",
    )  # fmt: skip


def _add_connect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--connect",
        metavar="URI",
        help=f"libvirt connection URI (default: the configured uri, else {DEFAULT_URI})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _apply_daemon_settings(args)
        result: int = args.handler(args)
    except UsageError as exc:
        print(f"virt-reclaim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (VirtError, JournalError, DomainBusy) as exc:
        print(f"virt-reclaim: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Terminated:
        print("virt-reclaim: terminated (SIGTERM); the job restored what it had changed",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    return result


def _cmd_domains(args: argparse.Namespace) -> int:
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


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; raised where Ctrl-C would be, so that the job restores first."""


def _interrupt_on_sigterm(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signum}")


def _cmd_run(args: argparse.Namespace) -> int:
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
        "dry_run": args.dry_run,
        "qemu_img": args.qemu_img,
    }
    if args.policy:
        settings = job_settings(_policy_named(args.policy, args.config_dir), **overrides)
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
        domain = hypervisor.domain(args.domain)
        recovery.recover(journal, args.state_dir, hypervisor.domain_by_uuid)
        bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
        try:
            result = runner.run_job(
                hypervisor,
                domain,
                settings,
                journal=journal,
                state_dir=args.state_dir,
                priority=Priority(
                    args.daemon.nice, args.daemon.ionice_class, args.daemon.ionice_level
                ),
                on_progress=bar.update if bar else None,
                before_step=_test_pause_hook(),
            )
        finally:
            if bar:
                bar.close()
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_job_result(result, sys.stdout)
    return _EXIT_BY_OUTCOME[result.outcome]


def _test_pause_hook() -> Callable[[Step], None] | None:
    """For crash tests only: VIRT_RECLAIM_TEST_PAUSE=STEP[:N] stops before the Nth STEP.

    The job writes VIRT_RECLAIM_TEST_PAUSE_FILE and sleeps there until it is killed.
    """
    spec = os.environ.get("VIRT_RECLAIM_TEST_PAUSE")
    marker = os.environ.get("VIRT_RECLAIM_TEST_PAUSE_FILE")
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
                while True:
                    time.sleep(3600)

    return pause


def _cmd_recover(args: argparse.Namespace) -> int:
    logs.configure(logs.LogFormat.AUTO)
    journal = Journal(args.state_dir)
    with Hypervisor(args.connect) as hypervisor:
        done = recovery.recover(journal, args.state_dir, hypervisor.domain_by_uuid)
    if args.json:
        json.dump([r.to_json() for r in done], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not done:
        print("nothing to recover")
    for item in done if not args.json else []:
        print(f"{item.domain}: job {item.job_id} (interrupted at {item.step}): {item.outcome}")
        for action in item.actions:
            print(f"  {action}")
    return EXIT_OK


def _cmd_history(args: argparse.Namespace) -> int:
    jobs = Journal(args.state_dir).history(args.domain)
    if args.json:
        json.dump([job.to_json() for job in jobs], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    header = (
        "STARTED", "DOMAIN", "OUTCOME", "BEFORE", "ESTIMATE", "AFTER", "DOWNTIME", "DURATION"
    )  # fmt: skip
    rows = [
        (
            job.to_json()["started_at"] or "-", job.domain, job.outcome or "unfinished",
            format_bytes(job.bytes_before), format_bytes(job.estimated_after),
            format_bytes(job.bytes_after),
            "-" if job.downtime_s is None else f"{job.downtime_s:.1f} s",
            "-" if job.duration_s is None else f"{job.duration_s:.1f} s",
        )
        for job in jobs
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row, job in zip((header, *rows), (None, *jobs), strict=True):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(line + ("  REASON" if job is None else f"  {job.reason or ''}"))
    return EXIT_OK


class _ProgressBar:
    """A one-line progress bar of the rewrite on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = False

    def update(self, target: str, percent: float) -> None:
        filled = int(percent / 100 * 30)
        self.out.write(f"\r  rewriting {target} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"{percent:5.1f}%")  # fmt: skip
        self.out.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.out.write("\n")
            self.out.flush()


def print_job_result(result: JobResult, out: TextIO) -> None:
    """Print a job's outcome for a person."""
    out.write(f"{result.domain}: {result.outcome} - {result.reason}\n")
    for disk in result.disks:
        after = disk["bytes_after"] if disk["bytes_after"] is not None else disk["estimated_after"]
        label = "" if disk["bytes_after"] is not None else " (estimated)"
        out.write(f"  {disk['target']}  {disk['path']}  {format_bytes(disk['bytes_before'])} -> "
                  f"{format_bytes(after)}{label}\n")  # fmt: skip
        if disk["backup"]:
            out.write(f"      original kept at {disk['backup']}\n")
    for skipped in result.skipped_disks:
        out.write(f"  {skipped['target']}  skipped: {skipped['reason']}\n")
    out.write(f"  downtime {result.downtime_s:.1f} s, duration {result.duration_s:.1f} s\n")


def _jsonable(report: inventory.DomainReport) -> dict[str, Any]:
    return dataclasses.asdict(report)


def print_domain_table(reports: Sequence[inventory.DomainReport], out: TextIO) -> None:
    """Print one row per disk (one per domain without disks), backing files indented below."""
    header = (
        "DOMAIN",
        "STATE",
        "PERSISTENT",
        "AGENT",
        "OS",
        "FREE-SPACE",
        "DISK",
        "FORMAT",
        "VIRTUAL",
        "ALLOCATED",
        "SNAPSHOTS",
        "SOURCE",
    )
    rows: list[tuple[str, ...]] = []
    notes: dict[int, list[str]] = {}
    for report in reports:
        agent = (
            ("connected" if report.agent_connected else "disconnected")
            if report.has_agent_channel
            else "none"
        )
        method, _, why = report.free_space.partition(" ")
        domain_cols = (report.name, str(report.state), "yes" if report.persistent else "no", agent,
                       report.os or "-", method)  # fmt: skip
        if not report.disks:
            rows.append((*domain_cols, "-", "-", "-", "-", "-", "(no disks)"))
        for disk in report.disks:
            rows.append(
                (
                    *domain_cols,
                    disk.target,
                    disk.format or "-",
                    format_bytes(disk.virtual_size),
                    format_bytes(disk.allocated_bytes),
                    "-" if disk.internal_snapshots is None else str(disk.internal_snapshots),
                    disk.source or "-",
                )
            )
            extra = [f"backing: {b.path} ({b.format or '?'})" for b in disk.backing_chain]
            if disk.error:
                extra.append(f"error: {disk.error}")
            if why and domain_cols[0]:
                extra.append(f"free space: {method} {why}")
            if extra:
                notes[len(rows) - 1] = extra
            domain_cols = ("", "", "", "", "", "")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    indent = sum(widths) + 2 * len(widths)
    for index, row in enumerate((header, *rows)):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")
        for note in notes.get(index - 1, []):
            out.write(" " * indent + "└ " + note + "\n")
