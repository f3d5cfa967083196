"""The offline mode: shut the guest down, guard its images, rewrite, verify, swap.

SHUTDOWN -> GUARD -> PREFLIGHT -> REWRITE -> VERIFY -> SWAP (-> DEFINE, with
``guest.enable_discard``: discard turned on in the definition while the guest is
off), after the shared steps; the frame then brings the guest back (RESTORE).
From SHUTDOWN on, any failure (or interrupt) deletes the temporary files and
releases the guard; the original image is only ever replaced by a rename after
check and compare.
"""

from __future__ import annotations

import contextvars
import os
import threading
import time

from virt_reclaim.domxml import read
from virt_reclaim.errors import VirtError
from virt_reclaim.image import imagefile
from virt_reclaim.image.guard import lock_held
from virt_reclaim.image.qemu_img_argv import ImageInfo
from virt_reclaim.job.context import SHUTDOWN_REQUESTED, JobContext, Step
from virt_reclaim.job.ports import DomainLookup
from virt_reclaim.job.results import JobFailed, Recovered, RecoveryOutcome
from virt_reclaim.job.settings import ModeName, OnShutdownTimeout
from virt_reclaim.job.steps import define, preflight
from virt_reclaim.job.steps.rewrite import (
    remove_temporary_files,
    rewrite_disk,
    swap_disk,
    verify_disk,
)
from virt_reclaim.journal.records import JournalDisk, JournalJob
from virt_reclaim.model import DomainState
from virt_reclaim.process import holders_of, kill_qemu_img_holding

# How long a killed qemu-img may take to release its locks: SIGKILL ends a process in
# uninterruptible I/O only once that I/O completes, which under a host's writeback
# load took more than the kill's own 10 s wait once.
KILLED_RELEASE_S = 60.0
# How long a lock with no holder in sight may take to go: a process that is exiting has
# closed its file table (it no longer shows as a holder) before its last file is released.
UNSEEN_RELEASE_S = 5.0


class OfflineMode:
    """Reclaim with the guest shut down (see the module docstring)."""

    name = ModeName.OFFLINE
    stops_the_guest = True

    def run(self, job: JobContext) -> None:
        """Take the offline steps; on failure remove the new images and release the guard."""
        try:
            rewrite_while_down(job)
            with job.step(Step.SWAP):
                for disk in job.disks:
                    swap_disk(job, disk)
            if define.wanted(job):
                with job.step(Step.DEFINE):
                    # The reclaim is done: a definition left as it was is only a warning.
                    define.define_or_warn(job)
        except BaseException:
            remove_temporary_files(job)
            raise
        finally:
            job.guard.release()

    def after_restore(self, job: JobContext) -> None:
        """Nothing waits for the guest to be back."""

    def recover(
        self, journaled: JournalJob, result: Recovered, lookup_domain: DomainLookup
    ) -> None:
        """Undo a job that died before its swap, or finish one that died after it.

        A qemu-img that still writes the temporary file is killed (it also holds a
        lock that would stop the guest's start); a temporary file that still exists
        was never swapped in, so the original is intact and it is deleted; a backup
        hard link made just before a rename that never happened is removed.
        """
        past_swap = journaled.step in (Step.SWAP, Step.DEFINE, Step.RESTORE)
        swapped = 0
        for disk in journaled.disks:
            swapped += recover_rewritten_disk(disk, past_swap=past_swap, result=result)
        if journaled.disks and swapped == len(journaled.disks):
            result.outcome = RecoveryOutcome.RECLAIMED


def _lock_released(path: str, killed: list[int]) -> bool:
    """Whether the lock on ``path`` is gone, or goes within the time its holder needs to exit.

    A holder in sight that is not a qemu-img is not waited for: nothing here ends it.
    """
    if not lock_held(path):
        return True
    if not killed and holders_of(path):
        return False
    deadline = time.monotonic() + (KILLED_RELEASE_S if killed else UNSEEN_RELEASE_S)
    while lock_held(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def recover_rewritten_disk(disk: JournalDisk, *, past_swap: bool, result: Recovered) -> bool:
    """Undo (or find finished) the rewrite of one disk in place; True when it was swapped."""
    swapped = False
    killed = kill_qemu_img_holding(disk.temp_path)
    if killed:
        result.actions.append(f"killed qemu-img {killed} still writing {disk.temp_path}")
    if not _lock_released(disk.temp_path, killed):
        # A writer this process cannot see (under the unit's ProtectProc=invisible, a
        # qemu-img that `run` started from a root shell) or may not end (not a qemu-img).
        # Its lock would also stop the guest.
        seen = ", ".join(f"{comm} (pid {pid})" for pid, comm in holders_of(disk.temp_path))
        who = (
            f"held by {seen}"
            if seen
            else "a qemu-img started from a shell is hidden from the service"
        )
        raise VirtError(
            f"{disk.temp_path} is still locked by a process this recovery cannot see or end "
            f"({who}): end it, or run `virt-reclaim recover` as root from a shell"
        )
    if imagefile.remove_quietly(disk.temp_path):
        result.actions.append(f"removed {disk.temp_path}; {disk.path} is the original")
    elif past_swap:
        swapped = True
    if disk.backup_path and imagefile.same_file(disk.backup_path, disk.path):
        # The link was made but the rename never came: the "backup" is the image itself.
        os.unlink(disk.backup_path)
        result.actions.append(f"removed {disk.backup_path} (the swap never happened)")
    return swapped


def rewrite_while_down(job: JobContext) -> None:
    """SHUTDOWN -> GUARD -> PREFLIGHT -> REWRITE -> VERIFY: every mode that stops the guest.

    The caller removes the new images and releases the guard when this raises.
    """
    with job.step(Step.SHUTDOWN):
        shut_down(job)
    with job.step(Step.GUARD):
        guard(job)
    with job.step(Step.PREFLIGHT):
        # The guest is down: its image is final, and the host may have changed.
        preflight.check_room(job)
    with job.step(Step.REWRITE):
        for disk in job.disks:
            rewrite_disk(job, disk, lock=True)
    with job.step(Step.VERIFY):
        for disk in job.disks:
            verify_disk(job, disk)


def shut_down(job: JobContext) -> None:
    """Shut the guest down and wait for it to be off; abort or force it on a timeout."""
    if not job.was_running:
        return
    use_agent = job.agent_connected and job.domain.agent_ping()
    job.down_since = job.clock()
    timeout = job.settings.shutdown_timeout_s
    # Recovery waits for a shutdown under way only when one was really asked for.
    job.mark(SHUTDOWN_REQUESTED)
    _request_shutdown(job, use_agent, timeout)
    if job.domain.wait_for_state(DomainState.SHUTOFF, timeout):
        return
    if job.settings.on_shutdown_timeout is OnShutdownTimeout.ABORT:
        job.log.warning("shutdown.timeout", timeout_s=timeout, action="abort")
        raise JobFailed(
            f"the guest did not shut down within {timeout:g} s; left running, "
            "nothing changed (on-shutdown-timeout=abort)"
        )
    job.log.warning("shutdown.timeout", timeout_s=timeout, action="force")
    job.domain.force_off()
    if not job.domain.wait_for_state(DomainState.SHUTOFF, 60):
        raise JobFailed("the guest is still not off after a forced power-off")


def _request_shutdown(job: JobContext, use_agent: bool, timeout: float) -> None:
    """Ask for the shutdown without letting the request itself eat the deadline.

    qemu-ga never answers a guest-shutdown that works (the guest goes away);
    when the guest ignores it, libvirt waits 60 s for that answer. So the
    request runs on a thread and only the domain's state decides.
    """
    failures: list[VirtError] = []

    def request() -> None:
        try:
            job.domain.shutdown(use_agent=use_agent)
        except VirtError as exc:
            failures.append(exc)

    # A copy of the context so that the thread's log events keep the job's identity.
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run, args=(request,), name="shutdown-request", daemon=True
    )
    thread.start()
    thread.join(min(5.0, timeout))
    if not failures:
        return
    if not use_agent:
        raise failures[0]
    if job.domain.state() is not DomainState.RUNNING:
        # It worked: the guest went down while libvirt still waited on the agent's socket,
        # which it reports as an error ("End of file from agent socket").
        return
    job.log.info("shutdown.agent_failed", reason=str(failures[0]))
    try:
        job.domain.shutdown(use_agent=False)
    except VirtError:
        if job.domain.state() is DomainState.RUNNING:
            raise


def guard(job: JobContext) -> None:
    """Lock every image against a start, then make sure nothing started or changed meanwhile.

    Changed since inspect means: the definition's path or format of a disk, or the
    image's header (its format, size, backing file and its format, internal
    snapshots: a snapshot taken during the free-space step would be dropped by the
    convert).
    """
    for disk in job.disks:
        job.guard.lock(disk.path)
    # A start could have come between the stop and the lock: now it can no longer.
    state = job.domain.state()
    if state is not DomainState.SHUTOFF:
        raise JobFailed(f"the domain was started during the job (it is {state})")
    # Read again: the guest is off and can no longer start, but the definition may
    # have been edited since inspect. The define step decides on this reading.
    job.definition = read.parse_domain(job.domain.inactive_xml())
    current = {d.target: d for d in job.definition.disks}
    for disk in job.disks:
        spec = current.get(disk.target)
        if spec is None or spec.source != disk.path or spec.format != disk.format:
            now = "no disk" if spec is None else f"{spec.source} ({spec.format})"
            raise JobFailed(
                f"{disk.target}: the definition changed during the job "
                f"({disk.path} ({disk.format}) -> {now})"
            )
        # Our own guard holds the image: -U reads the header past our lock.
        header = job.images.info(disk.path, force_share=True, image_format=disk.format)[0]
        if changes := _header_changes(disk.info, header):
            raise JobFailed(f"{disk.target}: the image changed during the job: {changes}")


def _header_changes(before: ImageInfo, now: ImageInfo) -> str:
    """What differs between two readings of one image's header, or ``""``."""
    fields = ("format", "virtual_size", "backing_filename", "backing_format", "snapshot_count")
    return "; ".join(
        f"{name} {getattr(before, name)} -> {getattr(now, name)}"
        for name in fields
        if getattr(before, name) != getattr(now, name)
    )
