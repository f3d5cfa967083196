"""``virt-reclaim run --policy NAME`` without a domain: every domain the policy selects, now.

The daemon's own decisions, without its schedule: the domains the policy governs
(``config.selection``: the enabled policy of highest priority that matches), eligible as a
window takes them (``Windows.select``: no job of theirs running, ``min_interval`` passed,
idle by the policy's measure for ``idle.duration``), the dry runs that make them candidates
(``workers.estimate_each``, as the daemon's estimator thread), and the daemon's queue order
(``scheduler.queue_order``: largest estimated gain first). Then one job after the other,
each as ``run DOMAIN --policy NAME`` runs it. A domain left out gets a result too:
``skipped`` (or the dry run's ``nothing-to-do``) with the reason.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence

import structlog

from virt_reclaim.cli.common import UsageError
from virt_reclaim.config import loading, selection
from virt_reclaim.config.policy import Policy
from virt_reclaim.errors import VirtError
from virt_reclaim.job.lock import DomainBusy
from virt_reclaim.job.results import JobResult, Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.store import Journal
from virt_reclaim.model import DomainObservation, DomainState
from virt_reclaim.service import eligibility, idle, scheduler, windows, workers
from virt_reclaim.virt.connection import Hypervisor
from virt_reclaim.virt.domain import Domain

log = structlog.get_logger("virt_reclaim.cli")


@dataclasses.dataclass(frozen=True)
class Order:
    """The domains to reclaim, in the daemon's order, and those left out with their result."""

    queue: list[scheduler.Candidate]
    left_out: list[JobResult]


def skipped(name: str, reason: str, outcome: Outcome = Outcome.SKIPPED) -> JobResult:
    """The result of a domain that no job was started for (or that failed to start)."""
    return JobResult(domain=name, job_id="", outcome=outcome, reason=reason,
                     downtime_s=0.0, duration_s=0.0, disks=[], skipped_disks=[],
                     free_space=None)  # fmt: skip


def run_policy(
    policy: Policy,
    policies: Sequence[Policy],
    hypervisor: Hypervisor,
    journal: Journal,
    run_one: Callable[[Domain], JobResult],
    *,
    settings: JobSettings,
    daemon_config: loading.DaemonConfig,
    uri: str,
    state_dir: str,
) -> list[JobResult]:
    """Reclaim every domain ``policy`` selects, in the daemon's order; a result for each.

    ``run_one`` runs one domain's job with the command's settings (a dry run with
    ``--dry-run``: then busy guests are not watched for ``idle.duration`` but ordered with
    the others, their result saying so). Results: the queue's in order, then those left out.
    """
    if not policy.enabled:
        raise UsageError(f"policy {policy.name!r} is disabled (enabled = false): it selects no "
                         "domain; give a DOMAIN to run with its settings")  # fmt: skip
    mine, tied = governed(policy, policies, hypervisor.domains())
    judged = unobserved(policy) if settings.dry_run else policy
    views = observe(hypervisor, mine, judged, daemon_config.stats_interval.total_seconds())
    taken = order(judged, policies, views, journal, uri=uri, qemu_img=settings.qemu_img,
                  state_dir=state_dir)  # fmt: skip
    if settings.dry_run:
        names = ", ".join(f"{n}. {c.name}" for n, c in enumerate(taken.queue, 1)) or "none"
        print(f"virt-reclaim: order: {names}", file=sys.stderr)
    results = []
    for candidate in taken.queue:
        try:
            result = run_one(hypervisor.domain_by_uuid(candidate.uuid))
        except DomainBusy as exc:
            result = skipped(candidate.name, f"a job for it is running: {exc}")
        except VirtError as exc:
            result = skipped(candidate.name, str(exc), Outcome.FAILED)
        view = views.get(candidate.uuid)
        if judged is not policy and view and view.observed.state is not DomainState.SHUTOFF:
            wait = policy.idle.duration.total_seconds()
            result = dataclasses.replace(result, reason=f"{result.reason}; runs only if idle "
                                         f"for {wait:g} s (not watched in a dry run)")  # fmt: skip
        results.append(result)
    return results + taken.left_out + tied


def governed(
    policy: Policy, policies: Sequence[Policy], domains: Sequence[DomainObservation]
) -> tuple[list[DomainObservation], list[JobResult]]:
    """The domains that ``policy`` selects and no other policy takes from it.

    Also the results of those it ties for with another policy of the same priority: the
    daemon reclaims them under neither.
    """
    found, tied = [], []
    for observed in domains:
        choice = selection.select(policies, observed.name, observed.uuid, observed.xml)
        if choice.policy is not None and choice.policy.name == policy.name:
            found.append(observed)
        elif policy.name in choice.conflict:
            reason = (f"selected by policies {', '.join(choice.conflict)} with the same "
                      "priority: the daemon reclaims it under none")  # fmt: skip
            tied.append(skipped(observed.name, reason))
    return found, tied


def observe(
    hypervisor: Hypervisor,
    domains: Sequence[DomainObservation],
    policy: Policy,
    interval_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, eligibility.DomainView]:
    """Each domain's view, with statistics samples over ``idle.duration`` when it matters.

    Samples are taken only when the policy requires idle guests and one of them runs: a
    shut-off guest is idle. Takes ``idle.duration`` (the daemon judges with the same samples).
    """
    duration = policy.idle.duration.total_seconds()
    views = {s.uuid: eligibility.DomainView(s, idle.RecentSamples(duration)) for s in domains}
    if not policy.idle.required or all(s.state is DomainState.SHUTOFF for s in domains):
        return views
    print(f"virt-reclaim: observing {len(views)} domain(s) for {duration:g} s, the policy's "
          "idle.duration, to tell idle guests from busy ones", file=sys.stderr)  # fmt: skip
    began = clock()
    while True:
        now = clock()
        for _name, uuid, record in hypervisor.domain_stats():
            if uuid in views:
                views[uuid].recent.add(idle.sample_from_stats(record, now))
        if now - began >= duration:
            return views
        sleep(max(0.05, min(interval_s, began + duration - now)))


def unobserved(policy: Policy) -> Policy:
    """``policy`` with busy guests allowed: a dry run orders them without watching them."""
    return policy.model_copy(update={"idle": policy.idle.model_copy(update={"required": False})})


def order(
    policy: Policy,
    policies: Sequence[Policy],
    views: dict[str, eligibility.DomainView],
    journal: Journal,
    *,
    uri: str,
    qemu_img: str,
    state_dir: str,
) -> Order:
    """Choose and order the domains of ``views`` as a window of ``policy`` opening now would."""
    window = windows.Windows()
    window.open_window(policy, time.monotonic())
    chosen = window.select(
        policy, [policy if p.name == policy.name else p for p in policies], views,
        running=(), last_reclaimed_at=journal.last_reclaimed_at, wall=time.time(),
    )  # fmt: skip
    left_out = []
    for skip in chosen.skipped:
        log.info("domain.skipped", domain=skip.name, policy=policy.name, reason=skip.reason)
        left_out.append(skipped(skip.name, skip.reason))
    rate = scheduler.typical_rewrite_rate(journal.rewrite_rates())
    found = workers.estimate_each(uri, qemu_img, policy, chosen.chosen, rate, state_dir=state_dir)
    for estimate in found:
        if estimate.candidate is None:
            left_out.append(estimate.result or skipped(estimate.name, estimate.reason or ""))
    estimated = {e.name for e in found}
    for observed in chosen.chosen:
        if observed.name not in estimated:  # libvirtd went away during the dry runs
            left_out.append(skipped(observed.name, "not estimated: libvirtd did not answer"))
    queue = scheduler.queue_order(e.candidate for e in found if e.candidate is not None)
    return Order(queue, left_out)
