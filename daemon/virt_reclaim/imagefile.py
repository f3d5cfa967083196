"""Files on the host: temporary and backup names, free space, metadata, the atomic swap."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import time
from collections.abc import Callable
from pathlib import Path

TEMP_MARK = ".virt-reclaim-"
# libvirt's own record of the owner/label it changed; copying it would leak
# libvirt's refcount onto the new inode.
_SKIPPED_XATTR_PREFIX = "trusted.libvirt.security."


def temp_path(image: str, job_id: str) -> str:
    """The rewrite target beside ``image``: hidden, and recognisable by recovery."""
    path = Path(image)
    return str(path.with_name(f".{path.name}{TEMP_MARK}{job_id}.tmp"))


def backup_path(image: str, now: float | None = None) -> str:
    """Where ``--keep-backup`` keeps the original: beside it, with the time of the swap."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{image}{TEMP_MARK}backup-{stamp}"


def allocated_bytes(path: str) -> int:
    """Bytes the file occupies on its filesystem."""
    return os.stat(path).st_blocks * 512


# The users QEMU runs as under libvirt (Debian, RHEL): they may own an image folder.
QEMU_USERS = ("libvirt-qemu", "qemu")


def folder_problem(folder: str) -> str | None:
    """Why another user could plant a file or a link in ``folder``, or None.

    The job creates, renames and deletes files there as root: only root and the user
    QEMU runs as may write the folder.
    """
    st = os.stat(folder)
    trusted_uids, trusted_gids = {0}, {0}
    for name in QEMU_USERS:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            trusted_uids.add(entry.pw_uid)
            trusted_gids.add(entry.pw_gid)
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return f"the image folder {folder} is writable by every user (mode {mode:04o})"
    if mode & stat.S_IWGRP and st.st_gid not in trusted_gids:
        return f"the image folder {folder} is writable by group {st.st_gid} (mode {mode:04o})"
    if mode & stat.S_IWUSR and st.st_uid not in trusted_uids:
        return f"the image folder {folder} belongs to uid {st.st_uid}, who may write it"
    return None


def probe_create(path: str) -> str | None:
    """Create ``path`` as the job would (exclusively, not through a link), then remove it.

    Returns None when that works, else why not (a read-only filesystem, a folder the
    service may not write, a file already there): found before the guest is stopped,
    not after.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)  # fmt: skip
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    os.close(fd)
    os.unlink(path)
    return None


def remove_quietly(path: str) -> bool:
    """Delete ``path`` if it exists; True if it did."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def copy_metadata(source: str, target: str) -> None:
    """Give ``target`` the owner, mode and extended attributes (SELinux label...) of ``source``."""
    st = os.stat(source)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, st.st_mode & 0o7777)
    with contextlib.suppress(OSError):
        for name in os.listxattr(source):
            if name.startswith(_SKIPPED_XATTR_PREFIX):
                continue
            with contextlib.suppress(OSError):
                os.setxattr(target, name, os.getxattr(source, name))


def fsync_file(path: str) -> None:
    """Flush the file's data to stable storage (qemu-img convert does not)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: str) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(
    new: str,
    original: str,
    *,
    backup: str | None,
    kept: Callable[[str], None] | None = None,
) -> None:
    """Replace ``original`` with ``new`` in one ``rename()``; keep the original at ``backup``.

    The new file is flushed first and the folder after, so that after a crash
    the path holds either the whole old image or the whole new one. ``kept`` is
    told of the backup once it exists and before the rename: a backup is journaled
    before it can hold the only copy of the old image.
    """
    fsync_file(new)
    if backup is not None:
        os.link(original, backup)
        if kept is not None:
            kept(backup)
    os.rename(new, original)
    fsync_folder(os.path.dirname(original) or ".")
