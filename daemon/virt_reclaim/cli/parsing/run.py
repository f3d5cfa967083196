"""The parser of ``run``: the domain or policy, each option and the default it falls back on."""

from __future__ import annotations

from typing import Any

from virt_reclaim import logs
from virt_reclaim.cli import argtypes
from virt_reclaim.cli.parsing.shared import Handler, add_config_dir, add_connect, add_state_dir
from virt_reclaim.job.settings import Compression, FreeSpaceMethod, OnShutdownTimeout


def add_run(commands: Any) -> None:  # noqa: ANN401 - argparse's subparsers action is private
    """Add the ``run`` command to ``commands``, the subparsers of ``build_parser``."""
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
    add_connect(run)
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
    add_config_dir(run)
    add_state_dir(run)
    run.set_defaults(handler=Handler("virt_reclaim.cli.run", "cmd_run"))
