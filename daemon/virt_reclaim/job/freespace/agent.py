"""Free the guest's unused space while it runs: trim, or a bounded zero-fill through guest-exec."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from virt_reclaim.errors import AgentUnavailable, GuestExecCancelled
from virt_reclaim.job.freespace.budget import Fill
from virt_reclaim.job.ports import GuestAgentPort
from virt_reclaim.job.settings import FreeSpaceMethod
from virt_reclaim.model import AgentInfo
from virt_reclaim.units import MIB

# Runs in the guest with the mountpoint, a time bound and a size bound in MiB as $1, $2
# and $3, never through a host shell. dd ends at its count or at ENOSPC; the file is
# removed on every path, and its size is printed first so that the job can say how much
# was zeroed. dd runs in the background because a shell runs its INT/TERM trap only
# once the foreground command ends, and `wait` is interrupted at once: SIGTERM to this
# script (a stopping job, a host filesystem below its reserve) stops dd and removes the
# file within seconds.
ZERO_FILL_SCRIPT = (
    'f="$1/.virt-reclaim-zero.$$"; '
    'trap \'echo "zeroed $(stat -c %s "$f" 2>/dev/null || echo 0)"; rm -f "$f"; sync\' EXIT; '
    "trap 'kill $p 2>/dev/null; wait $p; exit 143' INT TERM; "
    'timeout "$2" dd if=/dev/zero of="$f" bs=1M count="$3" 2>/dev/null & p=$!; '
    "wait $p; "
    "sync"
)

# Runs in the guest, when a job died during its zero-fill (recovery): TERM to every
# process whose command line names a fill file (the fill script, its timeout and dd;
# the script's trap removes its file), up to 10 s for them to go, then KILL, then the
# files left on any mounted filesystem are removed. The marker is put together at run
# time (and searched for as a pattern) so that no command line of the script's own
# matches it. Prints "stopped N".
STOP_FILLS_SCRIPT = (
    'm=".virt-reclaim-"; m="${m}zero."; '
    # One grep reads every command line: a process per /proc entry (Debian has a hundred)
    # made each look take seconds under TCG, and the wait below looks a hundred times.
    # The bracketed pattern does not match grep's own command line.
    "fills() { for f in $(grep -l -e '[/][.]virt-reclaim-zero[.]' /proc/[0-9]*/cmdline "
    '2>/dev/null); do p=${f#/proc/}; p=${p%/cmdline}; [ "$p" = "$$" ] || echo "$p"; done; }; '
    "n=$(fills | wc -l); "
    "for p in $(fills); do kill -TERM $p 2>/dev/null; done; "
    'i=0; while [ $i -lt 100 ] && [ -n "$(fills)" ]; do sleep 0.1; i=$((i+1)); done; '
    "for p in $(fills); do kill -KILL $p 2>/dev/null; done; "
    "for mp in $(cut -d' ' -f2 /proc/mounts); do rm -f \"$mp\"/$m*; done; "
    "sync; "
    'echo "stopped $n"'
)


@dataclass(frozen=True)
class Choice:
    """The method a job will use, and why (for events, ``plan`` and ``domains``)."""

    method: FreeSpaceMethod
    why: str


def choose_method(  # noqa: PLR0911 - one return per rule, in the order they apply
    requested: FreeSpaceMethod, *, all_disks_discard: bool, agent: AgentInfo | None
) -> Choice:
    """Resolve ``requested`` against what the disks and the guest's agent allow.

    A trim frees host space only when the disk passes discards through; a zero-fill
    needs guest-exec (disabled by default in RHEL-family agents) and a POSIX shell
    (not on Windows).
    """
    if agent is None:
        return Choice(FreeSpaceMethod.NONE, "no guest agent answers")
    can_trim = agent.allows("guest-fstrim")
    can_zero = agent.allows("guest-exec", "guest-exec-status") and not agent.is_windows
    if requested is FreeSpaceMethod.NONE:
        return Choice(FreeSpaceMethod.NONE, "free_space.method = none")
    if requested is FreeSpaceMethod.TRIM or (
        requested is FreeSpaceMethod.AUTO and all_disks_discard
    ):
        if not can_trim:
            return Choice(FreeSpaceMethod.NONE, "the agent has guest-fstrim disabled")
        if not all_disks_discard:
            return Choice(FreeSpaceMethod.TRIM, "trim requested, but a disk lacks discard='unmap'")
        return Choice(FreeSpaceMethod.TRIM, "every disk passes discards through")
    if not can_zero:
        why = (
            "a Windows guest has no shell for a zero-fill"
            if agent.is_windows
            else "the agent has guest-exec disabled"
        )
        if requested is FreeSpaceMethod.AUTO and can_trim and agent.is_windows:
            return Choice(FreeSpaceMethod.TRIM, f"{why}; trim frees only thin-provisioned disks")
        return Choice(FreeSpaceMethod.NONE, f"{why} (and a disk lacks discard for a trim)")
    return Choice(FreeSpaceMethod.ZERO, "a disk lacks discard='unmap': zero-fill")


def freed_share(choice: Choice, *, all_disks_discard: bool, fill_reach: float) -> float:
    """Share of the guest's deleted data that the chosen method will free on the host."""
    if choice.method is FreeSpaceMethod.TRIM:
        return 1.0 if all_disks_discard else 0.0
    if choice.method is FreeSpaceMethod.ZERO:
        return fill_reach
    return 0.0


@dataclass(frozen=True)
class FilledFilesystem:
    """What the zero-fill did in one guest filesystem (an entry of ``free_space.done``'s fills)."""

    mountpoint: str
    limit_bytes: int  # what the plan let it write; 0 or less: not filled, ``skipped`` says why
    zeroed_bytes: int
    left_bytes: int  # the guest's free space the fill did not reach
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        """The entry as the ``free_space.done`` event logs it (``skipped`` only when skipped)."""
        entry: dict[str, object] = {
            "mountpoint": self.mountpoint,
            "limit_bytes": self.limit_bytes,
            "zeroed_bytes": self.zeroed_bytes,
            "left_bytes": self.left_bytes,
        }
        if self.limit_bytes <= 0:
            entry["skipped"] = self.skipped
        return entry


@dataclass
class FreeSpaceResult:
    """What was done (trim, zero or none: never auto), how much, and what went wrong."""

    method: FreeSpaceMethod
    filesystems: tuple[str, ...]
    problem: str | None = None
    trimmed_bytes: int | None = None
    fills: list[FilledFilesystem] = field(default_factory=list)

    @property
    def zeroed_bytes(self) -> int:
        """Bytes of zeros written in all."""
        return sum(f.zeroed_bytes for f in self.fills)


def trim(agent: GuestAgentPort, mountpoints: Sequence[str], *, timeout: float) -> FreeSpaceResult:
    """Trim the guest's filesystems; never raises for what the guest does."""
    try:
        paths = agent.fstrim(timeout)
    except AgentUnavailable as exc:
        return FreeSpaceResult(FreeSpaceMethod.NONE, (), f"trim failed: {exc}")
    errors = [f"{p.path}: {p.error}" for p in paths if p.error]
    trimmed = [p.trimmed for p in paths if p.trimmed is not None]
    return FreeSpaceResult(
        FreeSpaceMethod.TRIM,
        tuple(mountpoints),
        "; ".join(errors)[:500] or None,
        sum(trimmed) if trimmed else None,
    )


def zero_fill(
    agent: GuestAgentPort,
    fills: Sequence[Fill],
    *,
    timeout: float,
    cancel: threading.Event | None = None,
) -> FreeSpaceResult:
    """Write at most each fill's limit of zeros into its filesystem, then remove the file.

    ``cancel`` ends the fill early (``GuestExecCancelled``): the service stopping, or the
    watch seeing a host filesystem fall below its reserve. An agent that refuses is
    reported as ``problem``.
    """
    result = FreeSpaceResult(FreeSpaceMethod.NONE, ())
    done: list[str] = []
    for fill in fills:
        # Listed before it runs: a fill stopped or refused is reported with nothing zeroed.
        skipped = fill.why_not if fill.limit <= 0 else None
        entry = FilledFilesystem(fill.mountpoint, fill.limit, 0, fill.guest_free, skipped)
        result.fills.append(entry)
        if fill.limit <= 0:
            continue
        try:
            ran = agent.guest_exec(
                "/bin/sh",
                ["-c", ZERO_FILL_SCRIPT, "virt-reclaim", fill.mountpoint, str(int(timeout)),
                 str(fill.limit // MIB)],
                timeout=timeout + 30,
                cancel=cancel,
            )  # fmt: skip
        except GuestExecCancelled:
            result.method = FreeSpaceMethod.ZERO if done else FreeSpaceMethod.NONE
            result.filesystems = tuple(done)
            raise
        except AgentUnavailable as exc:
            result.problem = f"zero-fill of {fill.mountpoint}: {exc}"
            break
        # The guest's own figure: a guest that claims more than the fill may write would
        # make the job count host space it never had.
        zeroed = _reported(ran.stdout, "zeroed", fill.limit)
        result.fills[-1] = replace(
            entry, zeroed_bytes=zeroed, left_bytes=max(0, fill.guest_free - zeroed)
        )
        if ran.exitcode != 0:
            result.problem = (
                f"zero-fill of {fill.mountpoint}: exited {ran.exitcode}: " + (ran.stderr[:200])
            )
            break
        done.append(fill.mountpoint)
    result.method = FreeSpaceMethod.ZERO if done else FreeSpaceMethod.NONE
    result.filesystems = tuple(done)
    if not done and result.problem is None:
        result.problem = (
            "; ".join(f"{f.mountpoint}: {f.why_not}" for f in fills if f.why_not)
            or "no filesystem to fill"
        )
    return result


def stop_fills(agent: GuestAgentPort) -> int:
    """End a zero-fill a dead job left running in the guest; how many processes it had.

    Raises:
        AgentUnavailable: The agent did not answer or refused guest-exec.
    """
    ran = agent.guest_exec("/bin/sh", ["-c", STOP_FILLS_SCRIPT], timeout=60)
    return _reported(ran.stdout, "stopped", 1000)


def _reported(stdout: str, word: str, cap: int) -> int:
    """The number a guest script printed last as ``WORD N`` (0 if none), at most ``cap``.

    The guest writes its own output: only the last lines are read, and the figure bounded.
    """
    for line in stdout.splitlines()[-5:]:
        first, _, number = line.strip().partition(" ")
        if first == word and number.isdigit():
            return min(int(number), cap)
    return 0
