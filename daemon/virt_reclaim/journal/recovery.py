"""Finish or undo the jobs whose process died, from what the journal recorded.

For each unfinished job whose domain lock is free (its process is gone), the
job's mode (``modes``) finishes or undoes what it did to the disks; then a guest
that was running before the job and is off now is started again, and the job is
marked finished: ``reclaimed`` when the mode says every disk was done, else
``failed``, with what recovery did as the reason. Running it again finds nothing
to do.
"""

from __future__ import annotations

import structlog
from structlog.typing import FilteringBoundLogger

from virt_reclaim.errors import VirtError
from virt_reclaim.job.context import SHUTDOWN_REQUESTED, Step
from virt_reclaim.job.freespace import agent
from virt_reclaim.job.lock import DomainBusy, DomainLock
from virt_reclaim.job.modes import mode_of
from virt_reclaim.job.ports import DomainLookup
from virt_reclaim.job.results import Outcome, Recovered, RecoveryOutcome
from virt_reclaim.journal.records import JournalJob
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainState


class RecoveryIncomplete(VirtError):
    """A job could not be finished or undone now; its journal entry stays unfinished."""

    def __init__(self, message: str, result: Recovered) -> None:
        super().__init__(message)
        self.result = result


FREE_SPACE_STEP = str(Step.FREE_SPACE)
# After a crash in the middle of a shutdown the guest may still be going down.
SETTLE_TIMEOUT_S = 60.0


def recover(
    journal: Journal,
    state_dir: str,
    lookup_domain: DomainLookup,
    *,
    agent_timeout_s: float = 120.0,
) -> list[Recovered]:
    """Recover every unfinished job whose process is gone; return what was found and done.

    A job that cannot be ended now is returned with the outcome ``unfinished`` and stays
    unfinished in the journal, for the next recovery (the daemon's, at its start).
    """
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
            try:
                result = _recover_job(job, lookup_domain, agent_timeout_s, log)
            except RecoveryIncomplete as exc:
                # Left unfinished, every file in place: the next recovery tries again.
                exc.result.outcome = RecoveryOutcome.UNFINISHED
                done.append(exc.result)
                continue
            journal.finish_job(
                job.id,
                # Recovery ends a job reclaimed or failed: the job outcomes of those names.
                outcome=Outcome(result.outcome),
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
    lookup_domain: DomainLookup,
    agent_timeout_s: float,
    log: FilteringBoundLogger,
) -> Recovered:
    log = log.bind(job_id=job.id, domain=job.domain)
    result = Recovered(job.id, job.domain, job.step, RecoveryOutcome.FAILED, [])
    if job.step == FREE_SPACE_STEP:
        _stop_fills(job, lookup_domain, result)
    try:
        mode = mode_of(job.mode)
    except ValueError as exc:
        result.actions.append(f"left the disks as they are: {exc}")
    else:
        try:
            mode.recover(job, result, lookup_domain)
        except VirtError as exc:
            result.actions.append(f"could not finish: {exc}")
            log.error("recovery.incomplete", reason=str(exc))
            raise RecoveryIncomplete(str(exc), result) from exc
    if job.previous_state == str(DomainState.RUNNING):
        _bring_back(job, lookup_domain, agent_timeout_s, result)
    for action in result.actions:
        log.info("recovery.action", action=action)
    log.info("recovery.done", step=job.step, outcome=result.outcome)
    return result


def _stop_fills(job: JournalJob, lookup_domain: DomainLookup, result: Recovered) -> None:
    """End a zero-fill the dead job left running: it would fill the guest unwatched."""
    try:
        domain = lookup_domain(job.domain_uuid)
        if domain.state() is not DomainState.RUNNING:
            return
        stopped = agent.stop_fills(domain)
    except VirtError as exc:  # the agent gone or refusing guest-exec among them
        result.actions.append(f"could not look for a zero-fill left running in the guest: {exc}")
        return
    if stopped:
        result.actions.append(
            f"stopped the zero-fill left running in the guest ({stopped} process(es)) and "
            "removed its files"
        )


def _bring_back(
    job: JournalJob, lookup_domain: DomainLookup, agent_timeout_s: float, result: Recovered
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
        result.outcome = RecoveryOutcome.FAILED
        result.actions.append(f"could not start the guest again: {exc}")
