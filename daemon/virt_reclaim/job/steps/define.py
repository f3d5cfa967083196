"""The define step: the persistent definition changed while the guest is off.

Two changes, made together in one ``defineXML`` (libvirt replaces the definition
atomically: after a crash it is the old one or the new one):
- discard turned on (``guest.enable_discard``): ``discard='unmap'`` and
  ``detect_zeroes='unmap'`` on the job's disks that lack them, so that from the
  next start a trim in the guest frees host space and later reclaims trim instead
  of zero-filling;
- each converted disk pointed at its new qcow2 image (the convert mode).
Whether there is anything to change is decided on the definition the guard read;
the definition is read again just before the change: a change someone made since
is kept, and one that touched our disks stops the step.
"""

from __future__ import annotations

from virt_reclaim.domxml import edit
from virt_reclaim.domxml.read import DomainXMLError
from virt_reclaim.errors import VirtError
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.results import JobFailed


def wanted(job: JobContext) -> bool:
    """True when the job has something to change in the definition.

    Decided on the definition the guard read once the guest was off
    (``JobContext.definition``); ``define`` reads it again before changing it.
    """
    if any(d.converted_path for d in job.disks):
        return True
    if not job.settings.enable_discard:
        return False
    if job.definition is None:
        return True  # the step itself says what is wrong
    now = {d.target: d for d in job.definition.disks}
    return any(
        edit.lacks_discard(now[d.target].discard, now[d.target].detect_zeroes)
        for d in job.disks
        if d.target in now
    )


def define(job: JobContext) -> None:
    """Make the changes (see the module docstring) in one definition.

    Raises:
        JobFailed: The definition changed under the job, or libvirt refused the new one;
            the definition is then as it was.
    """
    try:
        old = job.domain.inactive_xml()
        new = edit.with_new_sources(old, [
            edit.NewSource(d.target, d.path, d.converted_path)
            for d in job.disks if d.converted_path
        ])  # fmt: skip
        discard_on: list[str] = []
        if job.settings.enable_discard:
            new, discard_on = edit.with_discard(new, [d.target for d in job.disks])
        if new == old:
            return
        job.domain.define_xml(new)
    except (VirtError, edit.DefinitionChanged, DomainXMLError) as exc:
        raise JobFailed(f"the definition was not changed: {exc}") from exc
    converted = {d.target: d.converted_path for d in job.disks if d.converted_path}
    for disk in job.disks:
        disk.discard_enabled = disk.target in discard_on
    job.log.info("definition.updated", discard_enabled=discard_on, converted=converted)


def define_or_warn(job: JobContext) -> None:
    """``define`` where it is only a bonus (discard after a reclaim): a failure is a warning."""
    try:
        define(job)
    except JobFailed as exc:
        job.log.warning("definition.not_updated", reason=str(exc))
