"""Free the guest's unused space while it runs: trim, or a zero-fill through guest-exec."""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from virt_reclaim.ports import GuestAgentPort
from virt_reclaim.virt import AgentUnavailable, GuestFilesystem


class FreeSpaceMethod(enum.StrEnum):
    """How to free the guest's unused blocks before the rewrite."""

    AUTO = "auto"  # trim where every disk has discard, else zero
    TRIM = "trim"
    ZERO = "zero"
    NONE = "none"


# Runs in the guest with the mountpoint and a time bound as $1 and $2, never
# through a host shell. dd ends at ENOSPC; the file is removed on every path.
# dd runs in the background because a shell runs its INT/TERM trap only once the
# foreground command ends, and `wait` is interrupted at once: SIGTERM to this
# script (a stopping job) stops dd and removes the file within seconds.
ZERO_FILL_SCRIPT = (
    'f="$1/.virt-reclaim-zero.$$"; '
    "trap 'rm -f \"$f\"; sync' EXIT; "
    "trap 'kill $p 2>/dev/null; wait $p; exit 143' INT TERM; "
    'timeout "$2" dd if=/dev/zero of="$f" bs=1M 2>/dev/null & p=$!; '
    "wait $p; "
    "sync"
)


@dataclass(frozen=True)
class FreeSpaceResult:
    """What was done (``trim``, ``zero`` or ``none``) and, when nothing could be, why."""

    method: str
    filesystems: tuple[str, ...]
    problem: str | None = None


def choose_method(requested: FreeSpaceMethod, *, all_disks_discard: bool) -> FreeSpaceMethod:
    """Resolve ``auto``: a trim frees host space only when the disk passes discards through."""
    if requested is FreeSpaceMethod.AUTO:
        return FreeSpaceMethod.TRIM if all_disks_discard else FreeSpaceMethod.ZERO
    return requested


def free_guest_space(
    agent: GuestAgentPort,
    method: FreeSpaceMethod,
    filesystems: Sequence[GuestFilesystem],
    *,
    timeout: float,
    cancel: threading.Event | None = None,
) -> FreeSpaceResult:
    """Free unused space on ``filesystems`` (those on the disks being reclaimed).

    Never raises for what a guest does: an agent that is missing or refuses
    becomes ``problem``, and the rewrite goes on without it. ``cancel`` (the
    service stopping) ends a zero-fill early: ``GuestExecCancelled``.
    """
    mountpoints = tuple(fs.mountpoint for fs in filesystems)
    if method is FreeSpaceMethod.NONE:
        return FreeSpaceResult("none", ())
    if method is FreeSpaceMethod.TRIM:
        try:
            agent.fstrim()
        except AgentUnavailable as exc:
            return FreeSpaceResult("none", (), f"trim failed: {exc}")
        return FreeSpaceResult("trim", mountpoints)
    return _zero_fill(agent, mountpoints, timeout, cancel)


def _zero_fill(
    agent: GuestAgentPort,
    mountpoints: tuple[str, ...],
    timeout: float,
    cancel: threading.Event | None,
) -> FreeSpaceResult:
    if not mountpoints:
        return FreeSpaceResult("none", (), "the agent reports no filesystem on these disks")
    done: list[str] = []
    for mountpoint in mountpoints:
        try:
            result = agent.guest_exec(
                "/bin/sh",
                ["-c", ZERO_FILL_SCRIPT, "virt-reclaim", mountpoint, str(int(timeout))],
                timeout=timeout + 30,
                cancel=cancel,
            )
            problem = (
                None if result.exitcode == 0 else f"exited {result.exitcode}: {result.stderr[:200]}"
            )
        except AgentUnavailable as exc:
            problem = str(exc)
        if problem is not None:
            return FreeSpaceResult(
                "zero" if done else "none", tuple(done), f"zero-fill of {mountpoint}: {problem}"
            )
        done.append(mountpoint)
    return FreeSpaceResult("zero", tuple(done))
