"""Converting a raw or VMDK file disk to qcow2: which disks qualify, and what is done to each.

The bytes of a raw disk are the guest's: every qemu-img call names the format the
domain XML states (``-f raw``, ``-f vmdk``; ``-F`` for compare), so that a qcow2
header a guest wrote into its raw disk, naming a host file as its backing, is
copied as the guest's bytes and never opened as an image.

The new image goes beside the original (``disk.raw`` -> ``disk.qcow2``), written
under a temporary name, checked and compared, then linked at its new name (never
over a file that appeared meanwhile). Each disk's progress is journaled in its
``state``, with what recovery needs in its ``data``:

``planned``  nothing changed yet;
``placed``   the verified image is at its new path; the definition still names the original;
``defined``  the definition names the new image (one atomic defineXML for all disks);
``clean``    the original removed once the guest runs again (or kept: ``keep_backup``).

Whatever the moment of a crash, the definition names a file that exists and holds
the guest's data: the original until ``defined``, the verified new image after.
"""

from __future__ import annotations

import os
import re
import stat

from virt_reclaim import process
from virt_reclaim.domxml import read
from virt_reclaim.errors import QemuImgError
from virt_reclaim.image import imagefile
from virt_reclaim.job.context import DiskWork, JobContext
from virt_reclaim.job.results import JobFailed, Recovered
from virt_reclaim.journal.records import ConversionData, DiskState, JournalDisk
from virt_reclaim.units import KIB

CONVERTIBLE_FORMATS = ("raw", "vmdk")
VMDK_CREATE_TYPES = ("monolithicSparse", "monolithicFlat", "streamOptimized")
# Suffixes that name the old format: replaced by .qcow2 (any other name gains .qcow2).
_FORMAT_SUFFIXES = (".raw", ".img", ".vmdk")


def new_path_for(source: str) -> str:
    """Where the qcow2 image of ``source`` goes: beside it, ``disk.raw`` -> ``disk.qcow2``."""
    root, suffix = os.path.splitext(source)
    if suffix.lower() in _FORMAT_SUFFIXES:
        return root + ".qcow2"
    return source + ".qcow2"


def wants(disk: read.DiskSpec) -> bool:
    """True for a disk a conversion is about (a disk, not a cdrom, that is not qcow2)."""
    return disk.device == "disk" and disk.format != "qcow2"


def definitions_differ(running: read.DomainSpec, persistent: read.DomainSpec) -> str | None:
    """Why a running guest's disks are not converted: its next start would change them anyway.

    Returns None when the running and the persistent definition have the same disks.
    """

    def key(d: read.DiskSpec) -> tuple[str, str, str | None, str | None, bool, bool]:
        return (d.device, d.type, d.format, d.source, d.readonly, d.shareable)

    live = {d.target: key(d) for d in running.disks}
    stored = {d.target: key(d) for d in persistent.disks}
    differing = sorted(t for t in live.keys() | stored.keys() if live.get(t) != stored.get(t))
    if not differing:
        return None
    return (
        f"the persistent definition differs from the running one ({', '.join(differing)}); a "
        "conversion rewrites the persistent definition: apply or undo that change first"
    )


def disk_to_convert(  # noqa: PLR0911, PLR0912 - one return per rule, in order
    job: JobContext,
    disk: read.DiskSpec,
    others: dict[str, str],
    *,
    live: bool,
    differs: str | None,
) -> DiskWork | str:
    """The work of converting ``disk``, or why it cannot be converted."""
    if disk.type != "file":
        return f"a {disk.type} disk: only image files are converted (a block device stays as it is)"
    if disk.source is None:
        return "no medium"
    if disk.readonly or disk.shareable:
        return "read-only or shareable disk: not converted (others rely on its image as it is)"
    if disk.encrypted:
        return "encrypted disk: not converted"
    if disk.format not in CONVERTIBLE_FORMATS:
        return (
            "the definition states no format: not converted (qemu-img would have to probe)"
            if disk.format is None
            else f"a {disk.format} image: not converted (raw and VMDK are)"
        )
    if live:
        return (
            f"a {disk.format} image: live mode does not convert (that needs the guest off; "
            "a shut-off guest is converted)"
        )
    if differs is not None:
        return differs
    if disk.backing:
        return "it has a backing file: not converted"
    source = disk.source
    user = others.get(os.path.realpath(source))
    if user is not None:
        return f"the image is also used by domain {user}"
    if disk.format == "vmdk" and (outside := vmdk_extent_outside(source)) is not None:
        # Checked before qemu-img opens the descriptor: it would open what it names.
        return outside
    try:
        # The format the XML states, never a probe of what the guest wrote.
        chain = job.images.info(source, force_share=job.was_running, image_format=disk.format)
    except QemuImgError as exc:
        return f"unreadable image: {exc}"
    top = chain[0]
    if len(chain) > 1 or top.backing_filename:
        return "it has a backing file: not converted"
    data_file = None
    if disk.format == "vmdk":
        if top.create_type not in VMDK_CREATE_TYPES:
            return (
                f"a VMDK of type {top.create_type}: not converted "
                f"({', '.join(VMDK_CREATE_TYPES)} are)"
            )
        if len(top.extents) != 1:
            return f"a VMDK with {len(top.extents)} extent files: not converted"
        extent = os.path.join(os.path.dirname(source), top.extents[0])
        if os.path.realpath(extent) != os.path.realpath(source):
            data_file = extent
            user = others.get(os.path.realpath(extent))
            if user is not None:
                return f"its extent {extent} is also used by domain {user}"
    new_path = new_path_for(source)
    if os.path.lexists(new_path):
        return f"{new_path} already exists: not converted over it"
    user = others.get(os.path.realpath(new_path))
    if user is not None:
        return f"{new_path} is named by domain {user}"
    return DiskWork(
        target=disk.target,
        path=source,
        discard=disk.discard == "unmap",
        zeros_become_holes=disk.zeros_become_holes,
        info=top,
        temp=imagefile.temp_path(new_path, job.job_id),
        backup=None,  # the original stays at its own path until the cleanup
        format=disk.format,
        converted_path=new_path,
        data_file=data_file,
    )


def record(
    job: JobContext, disk: DiskWork, state: DiskState, data: ConversionData | None = None
) -> None:
    """Journal how far ``disk`` got (and, first, what recovery needs to know of it)."""
    if job.journal is not None:
        job.journal.record_disk(job.job_id, disk.target, state=state, data=data)


def record_intent(job: JobContext, disk: DiskWork) -> None:
    """Journal what recovery needs of a disk to convert, before anything is changed."""
    data = ConversionData(
        format=disk.format,
        new_path=str(disk.converted_path),
        data_file=disk.data_file,
        keep_original=job.settings.keep_backup is not None,
    )
    record(job, disk, DiskState.PLANNED, data)


def place(job: JobContext, disk: DiskWork) -> None:
    """Link the verified new image at its new path; never over a file that appeared meanwhile.

    Raises:
        JobFailed: Something else is at the new path now.
    """
    new_path = str(disk.converted_path)
    new = disk.new_image()
    new.take_metadata_of(disk.path)
    new.fsync()
    try:
        new.link_to(new_path)
    except FileExistsError:
        raise JobFailed(f"{new_path} appeared during the job: not converted") from None
    except imagefile.NotOurs as exc:
        raise JobFailed(f"{disk.target}: {exc}: not converted") from exc
    record(job, disk, DiskState.PLACED)
    new.remove()
    imagefile.fsync_folder(os.path.dirname(new_path) or ".")


def remove_original(job: JobContext, disk: DiskWork) -> None:
    """Once the guest runs on the new image: remove the original (or keep it: keep_backup)."""
    if job.settings.keep_backup is not None:
        disk.backup = disk.path
        for path in (disk.path, disk.data_file):
            if path is not None:
                job.keep_backup(disk, path)
        job.log.info("convert.original_kept", target=disk.target, path=disk.path,
                     reason="keep_backup")  # fmt: skip
    else:
        try:
            for path in (disk.path, disk.data_file):
                if path is not None and imagefile.remove_quietly(path):
                    job.log.info("convert.original_removed", target=disk.target, path=path)
        except OSError as exc:
            disk.backup = disk.path
            job.log.warning("convert.original_kept", target=disk.target, path=disk.path,
                            reason=f"cannot remove it: {exc.strerror}")  # fmt: skip
    record(job, disk, DiskState.CLEAN)


# An extent line of a VMDK text descriptor: access, sectors, type, "file name"[, offset].
_EXTENT_LINE = re.compile(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]*)"', re.MULTILINE)
_VMDK4_MAGIC = b"KDMV"  # a sparse VMDK: its embedded descriptor's extent is the file itself
_DESCRIPTOR_MAX = 64 * KIB


def vmdk_extent_outside(descriptor: str) -> str | None:
    """Why the files a VMDK descriptor names are not its own, or None when they are.

    An imported descriptor is not ours to trust: each extent must be a bare file
    name, a regular file (not a symlink) in the descriptor's own folder, owned by the
    descriptor's owner. Otherwise ``../x`` or ``/etc/shadow`` would be read into the
    guest's new disk and deleted with the original.
    """
    try:
        with open(descriptor, "rb") as file:
            head = file.read(_DESCRIPTOR_MAX)
    except OSError as exc:
        return f"unreadable image: {exc.strerror}"
    if head.startswith(_VMDK4_MAGIC):
        return None
    folder = os.path.dirname(descriptor) or "."
    owner = os.stat(descriptor).st_uid
    for raw in _EXTENT_LINE.findall(head):
        if (problem := _extent_problem(folder, raw.decode("utf-8", "replace"), owner)) is not None:
            return problem
    return None


def _extent_problem(folder: str, name: str, owner: int) -> str | None:
    if not name or "/" in name or name in (".", ".."):
        return f"its extent {name!r} is not a file in its own folder: not converted"
    path = os.path.join(folder, name)
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"its extent {path}: {exc.strerror}: not converted"
    if not stat.S_ISREG(st.st_mode):
        return f"its extent {path} is not a regular file (a symlink?): not converted"
    if st.st_uid != owner:
        return (
            f"its extent {path} belongs to uid {st.st_uid}, the descriptor to uid "
            f"{owner}: not converted"
        )
    return None


def is_conversion(disk: JournalDisk) -> bool:
    """True for a journaled disk that a convert job was converting."""
    return isinstance(disk.data, ConversionData)


def recover_disk(disk: JournalDisk, source_now: str | None, result: Recovered) -> bool:
    """Finish (the definition names the new image) or undo (it names the original) a disk.

    Returns True when the disk ends converted.
    """
    data = disk.data
    if not isinstance(data, ConversionData):
        raise ValueError(f"{disk.target}: the journal holds no conversion for this disk")
    new_path = data.new_path
    temp = disk.temp_path
    # The link from the temporary name to the new one may have been made just before the crash.
    ours = disk.state in _PLACED_OR_LATER or imagefile.same_file(temp, new_path)
    killed = process.kill_qemu_img_holding(temp)
    if killed:
        result.actions.append(f"killed qemu-img {killed} still writing {temp}")
    if imagefile.remove_quietly(temp):
        result.actions.append(f"removed {temp}")
    if source_now == new_path:
        if not os.path.exists(new_path):
            result.actions.append(f"{disk.target}: the definition names {new_path}, which is gone")
            return False
        originals = [p for p in (disk.path, data.data_file) if p]
        if data.keep_original:
            result.actions.append(f"{disk.target}: converted; the original {disk.path} is kept")
        else:
            for path in originals:
                if imagefile.remove_quietly(str(path)):
                    result.actions.append(f"{disk.target}: converted; removed the original {path}")
        return True
    if source_now == disk.path:
        if ours and imagefile.remove_quietly(new_path):
            result.actions.append(
                f"{disk.target}: removed {new_path}; the definition names the original {disk.path}"
            )
        return False
    result.actions.append(
        f"{disk.target}: left as it is: the definition names {source_now or 'no image'}"
    )
    return False


# The states at which the new image was linked at its new path by the job.
_PLACED_OR_LATER = frozenset({DiskState.PLACED, DiskState.DEFINED, DiskState.CLEAN})
