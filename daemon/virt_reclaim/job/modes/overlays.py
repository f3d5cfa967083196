"""The live mode's overlays: files the job creates itself, beside each image.

libvirt would create a snapshot's overlay at the name it is given, and that name is
predictable (it carries the job's id, which the journal and the log show): a link or
a file planted there would be followed or reused. So the job creates every overlay
itself, exclusively and never through a link (``imagefile.NewImage``), a qcow2 whose
header records its backing file and that file's format (never probed), and lets
libvirt open it (REUSE_EXT). It removes an overlay only while the name still names
the file it made.
"""

from __future__ import annotations

import os

from virt_reclaim import process
from virt_reclaim.errors import VirtError
from virt_reclaim.image import imagefile
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.ports import BlockJobsPort, ImagePort
from virt_reclaim.job.results import JobFailed
from virt_reclaim.journal.records import JournalDisk


def overlay_path(image: str, job_id: str, n: int) -> str:
    """Overlay ``n`` (1 or 2) beside ``image``: hidden and recognisable, like the temp file.

    Beside the image because QEMU must reach it: a filesystem mounted after the guest
    started is not in QEMU's mount namespace.
    """
    folder, name = os.path.split(image)
    return os.path.join(folder, f".{name}{imagefile.TEMP_MARK}{job_id}.overlay{n}")


def take_snapshot(job: JobContext, jobs: BlockJobsPort) -> dict[str, imagefile.NewImage]:
    """Create every disk's overlay 1, then move the guest onto them in one atomic snapshot.

    libvirt would create the overlay itself at a name anyone who knows the job's id
    can predict, following a link or reusing a file planted there; with REUSE_EXT it
    opens the file the job made instead. On a failure the overlays the guest does not
    run on are removed (only while their names still name the files made here).

    Raises:
        JobFailed: An overlay could not be created (something is already at its name).
        VirtError: libvirt refused or failed the snapshot.
    """
    made: dict[str, imagefile.NewImage] = {}
    try:
        for disk in job.disks:
            made[disk.target] = new_overlay(
                job.images,
                overlay_path(disk.path, job.job_id, 1),
                disk.path,
                disk.format,
                disk.target,
            )
        jobs.snapshot_disk_only(
            {target: overlay.path for target, overlay in made.items()},
            quiesce=False,
            reuse_existing=True,
        )
    except BaseException:
        _remove_unless_in_use(job, jobs, made)
        close_overlays(list(made.values()))
        raise
    return made


def _remove_unless_in_use(
    job: JobContext, jobs: BlockJobsPort, made: dict[str, imagefile.NewImage]
) -> None:
    """Remove the overlays no disk runs on: a snapshot that failed may still have been taken.

    (libvirtd going away during the call, say.) When libvirt cannot tell, every
    overlay stays, for recovery to judge from the chains it then sees.
    """
    try:
        in_use = {path for d in job.disks for path in jobs.disk_chain(d.target, live=True)}
    except VirtError:
        return
    for overlay in made.values():
        if overlay.path not in in_use:
            overlay.remove()


def new_overlay(
    images: ImagePort, path: str, backing: str, backing_format: str, target: str
) -> imagefile.NewImage:
    """Create ``path`` (O_EXCL|O_NOFOLLOW), a qcow2 over ``backing`` in the format given.

    The file stays open until it is removed (``remove_overlays``) or closed: while it
    is open its inode number cannot pass to another file, so the removal, which
    checks that ``path`` still names this device and inode, cannot delete a file
    put at the name after ours was deleted by someone else.

    Raises:
        JobFailed: Something (a file, a link) is already at ``path``, or it cannot
            be created; whatever is there is left as it is.
    """
    try:
        new = imagefile.NewImage(path)
    except FileExistsError as exc:
        raise JobFailed(
            f"{target}: something is already at {path} (not a file this job made): "
            f"refused, and left as it is"
        ) from exc
    except OSError as exc:
        raise JobFailed(f"{target}: cannot create {path}: {exc.strerror}") from exc
    try:
        images.create_overlay(new, backing=backing, backing_format=backing_format)
        new.take_metadata_of(backing)
        new.fsync()
        new.ensure_named()
    except BaseException:
        new.remove()
        raise
    return new


def remove_overlays(overlays: list[imagefile.NewImage]) -> None:
    """Remove the overlays this job made, each only while its name still names that file."""
    for overlay in overlays:
        overlay.remove()


def close_overlays(overlays: list[imagefile.NewImage]) -> None:
    """Close the overlays left in place (for recovery, which finds them by name)."""
    for overlay in overlays:
        overlay.close()


def named_by(disk: JournalDisk, jobs: BlockJobsPort) -> set[str | None]:
    """Every file the live and the persistent definition name for the disk."""
    return set(jobs.disk_chain(disk.target, live=True) + jobs.disk_chain(disk.target, live=False))


def clear_dead_overlay(path: str, named: set[str | None]) -> None:
    """Remove the dead job's overlay 2 before the copy is made again, and nothing else.

    Its name carries the job's id; a link or anything but a regular file there is not
    what the job made, and one a definition names or a process holds is still in use.

    Raises:
        VirtError: Something other than the dead job's unused overlay is at ``path``.
    """
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isfile(path):
        raise VirtError(f"{path}: not a file the job made (a link or another kind): left as it is")
    if not remove_unused(path, named):
        raise VirtError(f"{path}: still in use (a definition names it or a process holds it)")


def remove_unused(path: str, named: set[str | None]) -> bool:
    """Delete ``path`` unless a definition names it (``named``) or a process holds it open."""
    if not os.path.lexists(path) or path in named or process.holders_of(path):
        return False
    return imagefile.remove_quietly(path)
