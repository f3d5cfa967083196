"""The convert mode: the offline steps, with raw and VMDK disks converted to qcow2 on the way.

A job of an offline policy with ``rewrite.convert`` (``run --convert``) takes this
mode once its inspection found a disk to convert (``conversion.disk_to_convert``); its
qcow2 disks are reclaimed exactly as offline. After the shared steps:

SHUTDOWN, GUARD, PREFLIGHT  as offline (the guard locks the originals);
REWRITE   each disk into a temporary file: a qcow2 one as offline, a converted one from
          its stated format (``-f raw``/``-f vmdk``) with the policy's compression and
          cluster size, beside its new path;
VERIFY    ``qemu-img check`` of the new image, ``qemu-img compare -f FORMAT -F qcow2``;
SWAP      a qcow2 disk renamed over its original; a converted one linked at its new
          path (``disk.raw`` -> ``disk.qcow2``), never over another file;
DEFINE    one defineXML: the converted disks name their new images (``type='qcow2'``),
          and discard is turned on with ``guest.enable_discard``;
(the frame) RESTORE: the guest starts again, from the new images;
CLEANUP   the originals removed (kept with ``keep_backup``): only now that the guest
          runs on the new images, or after a job that leaves the guest off.

A failure before DEFINE removes every new image; the definition still names the
originals, which were only ever read. Recovery reads the definition: a disk it names
on its new image is finished (its original removed), one it names on its original is
undone (the new image removed). Either way the guest's definition names a file that
exists and holds its data.
"""

from __future__ import annotations

from virt_reclaim.domxml import read
from virt_reclaim.errors import VirtError
from virt_reclaim.image import imagefile
from virt_reclaim.job.context import JobContext, Step
from virt_reclaim.job.modes import conversion, offline
from virt_reclaim.job.ports import DomainLookup
from virt_reclaim.job.results import JobUnfinished, Recovered, RecoveryOutcome
from virt_reclaim.job.settings import ModeName
from virt_reclaim.job.steps import define
from virt_reclaim.job.steps.rewrite import remove_temporary_files, swap_disk
from virt_reclaim.journal.records import DiskState, JournalJob

# Steps after which each qcow2 disk of the job was renamed over its original.
_PAST_SWAP = frozenset({Step.SWAP, Step.DEFINE, Step.RESTORE, Step.CLEANUP})


class ConvertMode:
    """Reclaim offline, converting raw and VMDK disks to qcow2 (see the module docstring)."""

    name = ModeName.CONVERT
    stops_the_guest = True

    def run(self, job: JobContext) -> None:
        """Take the steps up to DEFINE; on failure remove every new image, release the guard."""
        converting = [d for d in job.disks if d.converted_path]
        for disk in converting:
            conversion.record_intent(job, disk)
        placed: list[str] = []
        try:
            offline.rewrite_while_down(job)
            with job.step(Step.SWAP):
                for disk in job.disks:
                    if disk.converted_path:
                        conversion.place(job, disk)
                        placed.append(disk.target)
                    else:
                        swap_disk(job, disk)
            with job.step(Step.DEFINE):
                define.define(job)
                for disk in converting:
                    disk.swapped = True
                    conversion.record(job, disk, DiskState.DEFINED)
                    job.log.info("swap.done", target=disk.target, path=disk.converted_path,
                                 backup=None)  # fmt: skip
        except BaseException:
            remove_temporary_files(job)
            _remove_placed(job, placed)
            raise
        finally:
            job.guard.release()

    def after_restore(self, job: JobContext) -> None:
        """The guest runs on its new images (or stays off): the originals go, unless kept."""
        with job.step(Step.CLEANUP):
            for disk in job.disks:
                if disk.converted_path and disk.swapped:
                    conversion.remove_original(job, disk)

    def recover(
        self, journaled: JournalJob, result: Recovered, lookup_domain: DomainLookup
    ) -> None:
        """Finish or undo each disk of a convert job whose process died (module docstring)."""
        past_swap = journaled.step in _PAST_SWAP
        sources: dict[str, str | None] = {}
        if any(conversion.is_conversion(d) for d in journaled.disks):
            domain = lookup_domain(journaled.domain_uuid)
            spec = read.parse_domain(domain.inactive_xml())
            sources = {d.target: d.source for d in spec.disks}
        done = 0
        for disk in journaled.disks:
            if conversion.is_conversion(disk):
                done += conversion.recover_disk(disk, sources.get(disk.target), result)
            else:
                done += offline.recover_rewritten_disk(disk, past_swap=past_swap, result=result)
        if journaled.disks and done == len(journaled.disks):
            result.outcome = RecoveryOutcome.RECLAIMED


def _remove_placed(job: JobContext, placed: list[str]) -> None:
    """Remove the new images linked at their new paths, unless the definition names them.

    Raises:
        JobUnfinished: The definition cannot be read: recovery decides later.
    """
    if not placed:
        return
    try:
        sources = {d.target: d.source for d in read.parse_domain(job.domain.inactive_xml()).disks}
    except VirtError as exc:
        raise JobUnfinished(
            f"cannot tell which image the definition names ({exc}); 'virt-reclaim recover' "
            "finishes or undoes the conversion"
        ) from exc
    for disk in job.disks:
        if disk.target not in placed or disk.converted_path is None:
            continue
        if sources.get(disk.target) == disk.converted_path:
            disk.swapped = True  # the definition was changed before the failure: keep it
        elif imagefile.remove_quietly(disk.converted_path):
            job.log.info("cleanup.removed", path=disk.converted_path)
