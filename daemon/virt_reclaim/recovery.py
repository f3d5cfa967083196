"""Finish or undo the jobs whose process died, from what the journal recorded.

For each unfinished job whose domain lock is free (its process is gone):
- a qemu-img that the dead job started and that still writes its temporary
  file is killed (it also holds a lock that would stop the guest's start);
- a temporary file that still exists was never swapped in: it is deleted,
  the original image is intact;
- a backup hard link made just before a rename that never happened is removed;
- a guest that was running before the job and is off now is started again;
- the job is marked finished: ``reclaimed`` when every swap was done, else
  ``failed``, with what recovery did as the reason.
Running it again finds nothing to do.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from virt_reclaim import imagefile
from virt_reclaim.domainlock import DomainBusy, DomainLock
from virt_reclaim.errors import VirtError
from virt_reclaim.job import SHUTDOWN_REQUESTED
from virt_reclaim.journal import Journal, JournalJob
from virt_reclaim.model import DomainState

# After a crash in the middle of a shutdown the guest may still be going down.
SETTLE_TIMEOUT_S = 60.0


@dataclass
class Recovered:
    """What recovery did for one job."""

    job_id: str
    domain: str
    step: str | None
    outcome: str
    actions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The entry of ``recover --json``."""
        return {
            "job_id": self.job_id,
            "domain": self.domain,
            "step": self.step,
            "outcome": self.outcome,
            "actions": self.actions,
        }


def recover(
    journal: Journal,
    state_dir: str,
    lookup_domain: Callable[[str], Any],
    *,
    agent_timeout_s: float = 120.0,
) -> list[Recovered]:
    """Recover every unfinished job whose process is gone; return what was done."""
    log = structlog.get_logger("virt_reclaim.recovery")
    done = []
    for job in journal.unfinished():
        lock = DomainLock(state_dir, job.domain_uuid)
        try:
            lock.acquire()
        except DomainBusy:
            log.info("recovery.job_alive", job_id=job.id, domain=job.domain)
            continue
        try:
            result = _recover_job(job, lookup_domain, agent_timeout_s, log)
            journal.finish_job(
                job.id,
                outcome=result.outcome,
                reason="recovered after the job was interrupted at step "
                f"{job.step or 'start'}: " + "; ".join(result.actions or ["nothing to undo"]),
                bytes_before=None,
                bytes_after=None,
                downtime_s=None,
                duration_s=None,
            )
            done.append(result)
        finally:
            lock.release()
    return done


def _recover_job(
    job: JournalJob,
    lookup_domain: Callable[[str], Any],
    agent_timeout_s: float,
    log: Any,  # noqa: ANN401
) -> Recovered:
    log = log.bind(job_id=job.id, domain=job.domain)
    result = Recovered(job.id, job.domain, job.step, "failed")
    swapped = 0
    for disk in job.disks:
        killed = kill_writers_of(disk.temp_path)
        if killed:
            result.actions.append(f"killed qemu-img {killed} still writing {disk.temp_path}")
        if imagefile.remove_quietly(disk.temp_path):
            result.actions.append(f"removed {disk.temp_path}; {disk.path} is the original")
        elif job.step in ("swap", "restore"):
            swapped += 1
        if disk.backup_path and _same_file(disk.backup_path, disk.path):
            # The link was made but the rename never came: the "backup" is the image itself.
            os.unlink(disk.backup_path)
            result.actions.append(f"removed {disk.backup_path} (the swap never happened)")
    if job.disks and swapped == len(job.disks):
        result.outcome = "reclaimed"
    if job.previous_state == str(DomainState.RUNNING):
        _bring_back(job, lookup_domain, agent_timeout_s, result)
    for action in result.actions:
        log.info("recovery.action", action=action)
    log.info("recovery.done", step=job.step, outcome=result.outcome)
    return result


def _bring_back(
    job: JournalJob, lookup_domain: Callable[[str], Any], agent_timeout_s: float, result: Recovered
) -> None:
    try:
        domain = lookup_domain(job.domain_uuid)
        if job.step == SHUTDOWN_REQUESTED and domain.state() is DomainState.RUNNING:
            # The shutdown the job asked for may still be under way.
            domain.wait_for_state(DomainState.SHUTOFF, SETTLE_TIMEOUT_S)
        if domain.state() is DomainState.SHUTOFF:
            domain.start()
            result.actions.append("started the guest again (it was running before the job)")
            if not domain.wait_for_agent(agent_timeout_s):
                result.actions.append("the guest agent did not answer after the start")
    except VirtError as exc:
        result.outcome = "failed"
        result.actions.append(f"could not start the guest again: {exc}")


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def kill_writers_of(path: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process whose command line names ``path`` (a dead job's qemu-img)."""
    wanted = os.fsencode(path)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in args:
            pids.append(int(entry))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except OSError:
        return False
