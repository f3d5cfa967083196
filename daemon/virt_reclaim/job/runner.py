"""Run one reclaim job for one domain, as ``virt-reclaim run`` and the daemon both do.

The domain's lock is held for the whole job (one job per domain at a time,
across processes), and a job is refused while the journal still has an
unfinished one for the domain.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from virt_reclaim.image.qemu_img import QemuImg
from virt_reclaim.job.context import Step
from virt_reclaim.job.frame import ReclaimJob
from virt_reclaim.job.lock import DomainLock
from virt_reclaim.job.results import JobResult
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.process import Priority
from virt_reclaim.reports import inventory
from virt_reclaim.virt.connection import Hypervisor
from virt_reclaim.virt.domain import Domain


def run_job(
    hypervisor: Hypervisor,
    domain: Domain,
    settings: JobSettings,
    *,
    journal: Journal,
    state_dir: str,
    priority: Priority,
    on_progress: Callable[[str, float], None] | None = None,
    before_step: Callable[[Step], None] | None = None,
    stop: threading.Event | None = None,
) -> JobResult:
    """Reclaim ``domain`` under its lock and return the outcome.

    Raises:
        DomainBusy: Another job holds the domain.
        JournalError: The journal has an unfinished job of the domain, or cannot be used.
    """
    with DomainLock(state_dir, domain.uuid):
        unfinished = journal.unfinished(domain.uuid)
        if unfinished:
            raise JournalError(
                f"{domain.name} has an unfinished job ({unfinished[0].id}) that recovery could "
                "not close; see the log of 'virt-reclaim recover'"
            )

        def images_of_other_domains() -> dict[str, str]:
            return inventory.images_in_use(hypervisor.domains(), exclude_uuid=domain.uuid)

        job = ReclaimJob(
            domain,
            QemuImg(settings.qemu_img, priority, cancel=stop),
            settings,
            images_of_other_domains=images_of_other_domains,
            on_progress=on_progress,
            journal=journal,
            before_step=before_step,
            stop=stop,
        )
        return job.run()
