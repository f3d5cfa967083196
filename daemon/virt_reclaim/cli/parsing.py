"""The argument parser of every subcommand, its option types, and the defaults from the config."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any

from virt_reclaim import __version__, logs
from virt_reclaim.cli import argtypes
from virt_reclaim.config.paths import DEFAULT_CONFIG_DIR
from virt_reclaim.job.settings import Compression, FreeSpaceMethod, OnShutdownTimeout
from virt_reclaim.journal.store import DEFAULT_STATE_DIR
from virt_reclaim.model import DEFAULT_URI


@dataclass(frozen=True)
class Handler:
    """A command's handler, imported only when that command runs.

    Each command imports what it needs (libvirt, pydantic, the scheduler, the metrics): naming
    the handlers instead of importing them keeps that cost off the commands that do not.
    """

    module: str
    function: str

    def __call__(self, args: argparse.Namespace) -> int:
        """Run the command; its exit status."""
        result: int = getattr(importlib.import_module(self.module), self.function)(args)
        return result


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
        "--estimate", action="store_true",
        help="add each disk's estimated reclaimable bytes: a dry run of the job (read-only), "
        "with the settings of the policy that selects the domain, else run's defaults",
    )  # fmt: skip
    domains.add_argument(
        "--qemu-img",
        metavar="PATH",
        help="qemu-img program to read images with (default: the configured qemu_img, else "
        "qemu-img from PATH)",
    )
    _add_config_dir(domains)
    domains.set_defaults(handler=Handler("virt_reclaim.cli.domains", "cmd_domains"))
    _add_run(commands)
    _add_journal_commands(commands)
    _add_config_commands(commands)
    _add_daemon_command(commands)
    _add_reload_command(commands)
    _add_status_command(commands)
    return parser


def _add_status_command(commands: Any) -> None:  # noqa: ANN401 - argparse's private type
    status = commands.add_parser(
        "status",
        help="what the running daemon is doing: windows, jobs, queue, backups, last results",
        description=(
            "Read the snapshot the daemon publishes in STATE_DIR/status.json (at every "
            "change, and every few seconds) and tell: whether it runs (pid, since when; a "
            "pid now held by another process does not count), its configuration (policy "
            "files, the last reload's verdict, whether it runs on the last good configuration), "
            "each policy's window (open until, next start), the jobs running (domain, step, "
            "rewrite progress), the queued domains (and those waiting for space), the backups "
            "held and each domain's last result from the journal. Changes nothing."
        ),
        epilog=(
            "Exit status: 0 the daemon runs; 3 it is not running (as systemctl status); "
            "1 the state folder or the journal cannot be read; 2 usage error."
        ),
    )
    status.add_argument(
        "--json", action="store_true", help="print one JSON object (keys in README.md)"
    )
    status.set_defaults(handler=Handler("virt_reclaim.cli.status_command", "cmd_status"))
    _add_config_dir(status)
    _add_state_dir(status)


def _add_run(commands: Any) -> None:  # noqa: ANN401 - argparse's subparsers action is private
    run = commands.add_parser(
        "run",
        help="reclaim the disks of one domain now (or of every domain a policy selects)",
        description=(
            "Reclaim the qcow2 disks of DOMAIN now: free space inside the guest (trim or "
            "zero-fill through the guest agent), shut the guest down, rewrite each eligible "
            "disk compacted and compressed beside the original, verify it (qemu-img check and "
            "compare), swap it in with an atomic rename and bring the guest back to the state "
            "it had. Any failure leaves the original images and the guest as they were. "
            "Without DOMAIN, --policy NAME reclaims every domain that policy selects, one after "
            "the other in the daemon's order (largest estimated gain first), its idle checks "
            "(watched for idle.duration), min_interval and min_gain applying; --dry-run shows "
            "the order and each dry run."
        ),
        epilog=(
            "Exit status: 0 reclaimed, nothing to do, or dry run; 1 failed (everything "
            "restored); 2 usage error; 3 skipped (the domain or its disks are not eligible). "
            "Logs: JSON lines on stderr (readable text on a terminal); --json prints the "
            "result as one JSON object on stdout. With --policy and no DOMAIN: 0 when every "
            "domain was reclaimed, had nothing to do or was skipped (reason given), 1 when "
            "any failed; --json prints a list of those objects."
        ),
    )
    run.add_argument(
        "domain", metavar="DOMAIN", nargs="?",
        help="the libvirt domain name (omitted: every domain --policy selects)",
    )  # fmt: skip
    _add_connect(run)
    run.add_argument(
        "--dry-run", action="store_true", help="inspect and estimate only; change nothing"
    )
    run.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout"
    )
    run.add_argument(
        "--live", action="store_true", default=None,
        help="keep a running guest running: recompress its disks through an external "
        "snapshot, block copy and commit (no downtime; single-image disks only). A shut-off "
        "guest is reclaimed offline",
    )  # fmt: skip
    run.add_argument(
        "--rate-limit", type=argtypes.size, default=None, metavar="BYTES_PER_S",
        help="limit the rewrite's I/O (qemu-img convert -r), e.g. 50MiB, so that the guest "
        "and its neighbours keep their disk bandwidth (default: the policy's, else none)",
    )  # fmt: skip
    run.add_argument(
        "--free-space", choices=[m.value for m in FreeSpaceMethod],
        default=None,
        help="how to free the guest's unused blocks first: trim (frees host space only with "
        "discard='unmap' on the disk), zero (fill free space with zeros through guest-exec), "
        "auto (trim where every disk has discard, else zero), none (default: auto)",
    )  # fmt: skip
    run.add_argument(
        "--host-reserve", type=argtypes.size, default=None, metavar="SIZE",
        help="each host filesystem keeps at least SIZE free through the job: a rewrite that "
        "would go below it is skipped before the guest is shut down, and a zero-fill leaves "
        "it free beyond what the rewrite needs (default: the policy's, else the larger of "
        "5%% and 2GiB)",
    )  # fmt: skip
    run.add_argument(
        "--compression", choices=[m.value for m in Compression], default=None,
        help="compression of the new image; zstd needs QEMU >= 5.1 to open it (default: zstd)",
    )  # fmt: skip
    run.add_argument(
        "--cluster-size", type=argtypes.cluster_size, metavar="SIZE",
        help="cluster size of the new image, e.g. 64KiB (default: keep each image's own; "
        "clusters above 64KiB make compressed images slow to read)",
    )  # fmt: skip
    run.add_argument(
        "--shutdown-timeout", type=argtypes.seconds, default=None, metavar="SECONDS",
        help="how long to wait for the guest to be off (default: 120)",
    )  # fmt: skip
    run.add_argument(
        "--on-shutdown-timeout", choices=[m.value for m in OnShutdownTimeout],
        default=None,
        help="abort: leave the guest running and change nothing; force: power it off "
        "(default: abort)",
    )  # fmt: skip
    run.add_argument(
        "--min-gain", type=argtypes.size, default=None, metavar="SIZE",
        help="do nothing when the estimated gain is below this (default: 64MiB); when the "
        "guest's usage is unknown (shut off, no agent) the estimate counts only what "
        "compression and dropping zero clusters free",
    )  # fmt: skip
    run.add_argument(
        "--keep-backup", type=argtypes.duration, default=None, metavar="DURATION",
        help="keep each original image beside the new one (NAME.virt-reclaim-backup-TIME) "
        "this long, e.g. 2d; its space comes back when it is deleted at expiry (by the "
        "daemon, or `virt-reclaim backups --prune`)",
    )  # fmt: skip
    run.add_argument(
        "--enable-discard", action="store_true", default=None,
        help="while the guest is off, set discard='unmap' and detect_zeroes='unmap' on its "
        "reclaimed disks in the persistent definition, so that later reclaims trim instead "
        "of zero-filling (default: the policy's guest.enable_discard)",
    )  # fmt: skip
    run.add_argument(
        "--convert", action="store_true", default=None,
        help="convert raw and VMDK file disks to qcow2 beside the original (disk.raw -> "
        "disk.qcow2), verify with qemu-img compare and point the definition at it while the "
        "guest is off; the original is removed once the guest runs again (kept with "
        "--keep-backup). Offline only (default: the policy's rewrite.convert)",
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
        help="take the settings from this policy; options given here still win. Without "
        "DOMAIN: reclaim every domain the policy selects",
    )  # fmt: skip
    _add_config_dir(run)
    _add_state_dir(run)
    run.set_defaults(handler=Handler("virt_reclaim.cli.run", "cmd_run"))


def _add_journal_commands(commands: Any) -> None:  # noqa: ANN401 - argparse's private type
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
    recover.set_defaults(handler=Handler("virt_reclaim.cli.recover_command", "cmd_recover"))

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
    history.add_argument(
        "--since", type=argtypes.since, metavar="DURATION|DATE",
        help="only jobs started since then: a duration back from now (30m, 12h, 7d) or a date "
        "(2026-12-01, 2026-12-01T08:00; UTC unless it has an offset such as +01:00)",
    )  # fmt: skip
    history.add_argument(
        "--limit", type=argtypes.count, default=1000, metavar="N",
        help="at most the N newest jobs (default: %(default)s)",
    )  # fmt: skip
    history.add_argument(
        "--outcome", type=argtypes.outcomes, action="append", metavar="OUTCOME",
        help=f"only jobs that ended so: {', '.join(argtypes.HISTORY_OUTCOMES)}; repeat the "
        "option or separate with commas for several",
    )  # fmt: skip
    history.set_defaults(handler=Handler("virt_reclaim.cli.history_command", "cmd_history"))

    kept = commands.add_parser(
        "backups",
        help="list the originals kept as backups; delete the expired ones with --prune",
        description=(
            "Every original image a job kept (policy rewrite.keep_backup, run --keep-backup), "
            "also of domains since removed: domain, disk, the bytes it holds on the host, when "
            "it expires, its path. A backup holds the old image's space until it is deleted; "
            "the daemon deletes expired ones at its start and every hour. Only a path that "
            "still holds the very file that was kept (same device and inode) is deleted."
        ),
        epilog="Exit status: 0 success, 1 the journal cannot be read.",
    )
    kept.add_argument("--prune", action="store_true", help="delete the expired backups first")
    kept.add_argument("--json", action="store_true", help="print JSON: backups, pruned")
    _add_state_dir(kept)
    _add_config_dir(kept)
    kept.set_defaults(handler=Handler("virt_reclaim.cli.backups_command", "cmd_backups"))


def _add_config_commands(commands: Any) -> None:  # noqa: ANN401 - argparse's private type
    check = commands.add_parser(
        "check",
        help="validate the daemon settings and the policy files",
        description=(
            "Validate CONFIG_DIR/virt-reclaim.toml and every CONFIG_DIR/policies.d/*.toml, "
            "report every error of every file at once (file:line, policy, field, value, why) "
            "and the warnings (valid settings that likely surprise), then list each policy with "
            "its next window and the domains it selects now. Files and folders must belong to "
            "root and not be writable by group or others."
        ),
        epilog=(
            "Exit status: 0 valid (also with warnings), 2 errors found (each printed on stderr)."
        ),
    )
    _add_config_dir(check)
    _add_connect(check)
    check.add_argument(
        "--json", action="store_true",
        help="print one JSON object: valid, errors, warnings, policies",
    )  # fmt: skip
    check.set_defaults(handler=Handler("virt_reclaim.cli.config_commands", "cmd_check"))
    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of a policy file (--daemon: of virt-reclaim.toml)",
        description=(
            "Print the JSON Schema of a policy file, with a description of every field and "
            "defaults and examples written as check accepts them (durations 4h, sizes 2GiB)."
        ),
    )
    schema.add_argument(
        "--daemon", action="store_true",
        help="the schema of the daemon settings, virt-reclaim.toml, instead",
    )  # fmt: skip
    schema.set_defaults(handler=Handler("virt_reclaim.cli.config_commands", "cmd_schema"))
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
    plan.set_defaults(handler=Handler("virt_reclaim.cli.plan_command", "cmd_plan"))


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
    daemon.set_defaults(handler=Handler("virt_reclaim.cli.daemon_command", "cmd_daemon"))


def _add_reload_command(commands: Any) -> None:  # noqa: ANN401 - argparse's private type
    reload = commands.add_parser(
        "reload",
        help="have the running daemon reload its configuration; fail if it keeps the old one",
        description=(
            "Validate CONFIG_DIR as the daemon would (errors printed with file and field; "
            "the daemon is then not signalled), send SIGHUP to the daemon, and wait for its "
            "verdict, which it records in STATE_DIR/reload.json. The unit's ExecReload= runs "
            "it, so that `systemctl reload virt-reclaim` fails when the daemon rejects the "
            "configuration and runs on the last good one."
        ),
        epilog=(
            "Exit status: 0 the daemon applied the configuration; 1 it rejected it (and runs "
            "on the last good one), did not answer within --timeout, or is not running; "
            "2 usage error; 78 the configuration has errors (the daemon was not signalled)."
        ),
    )
    _add_config_dir(reload)
    _add_state_dir(reload)
    reload.add_argument(
        "--pid", type=argtypes.pid, metavar="PID",
        help="the daemon's process id (default: $MAINPID, which systemd sets for ExecReload=)",
    )  # fmt: skip
    reload.add_argument(
        "--timeout", type=argtypes.seconds, default=30.0, metavar="SECONDS",
        help="how long to wait for the daemon's verdict (default: %(default)g)",
    )  # fmt: skip
    reload.set_defaults(handler=Handler("virt_reclaim.cli.reload_command", "cmd_reload"))


def _add_config_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir", default=DEFAULT_CONFIG_DIR, metavar="DIR",
        help="the configuration folder (default: %(default)s)",
    )  # fmt: skip


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
        help="libvirt connection URI (default: the configured uri, else $LIBVIRT_DEFAULT_URI, "
        f"else {DEFAULT_URI})",
    )
