"""The argument parser of every subcommand: its help, options, exit statuses and handler.

``run``'s many options are in ``parsing.run``; what several commands share (the lazy ``Handler``
each names, ``--connect``, ``--config-dir``, ``--state-dir``) in ``parsing.shared``. Nothing
here imports a command's handler: each is imported only when its command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from virt_reclaim import __version__
from virt_reclaim.cli import argtypes
from virt_reclaim.cli.parsing.run import add_run
from virt_reclaim.cli.parsing.shared import Handler, add_config_dir, add_connect, add_state_dir


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
    add_connect(domains)
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
    add_config_dir(domains)
    domains.set_defaults(handler=Handler("virt_reclaim.cli.domains", "cmd_domains"))
    add_run(commands)
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
    add_config_dir(status)
    add_state_dir(status)


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
    add_connect(recover)
    add_state_dir(recover)
    add_config_dir(recover)
    recover.add_argument("--json", action="store_true", help="print a JSON list of what was done")
    recover.set_defaults(handler=Handler("virt_reclaim.cli.recover_command", "cmd_recover"))

    history = commands.add_parser(
        "history",
        help="show past jobs from the journal",
        description="Past jobs, newest first, with outcome, reason, sizes, downtime and duration.",
        epilog="Exit status: 0 success, 1 the journal cannot be read.",
    )
    history.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain's jobs")
    add_state_dir(history)
    add_config_dir(history)
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
    add_state_dir(kept)
    add_config_dir(kept)
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
    add_config_dir(check)
    add_connect(check)
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
    add_config_dir(plan)
    add_connect(plan)
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
    add_config_dir(daemon)
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
    add_config_dir(reload)
    add_state_dir(reload)
    reload.add_argument(
        "--pid", type=argtypes.pid, metavar="PID",
        help="the daemon's process id (default: $MAINPID, which systemd sets for ExecReload=)",
    )  # fmt: skip
    reload.add_argument(
        "--timeout", type=argtypes.seconds, default=30.0, metavar="SECONDS",
        help="how long to wait for the daemon's verdict (default: %(default)g)",
    )  # fmt: skip
    reload.set_defaults(handler=Handler("virt_reclaim.cli.reload_command", "cmd_reload"))
