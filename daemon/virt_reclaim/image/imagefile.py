"""Files on the host: temporary and backup names, free space, metadata, the atomic swap."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import time
from collections.abc import Callable
from pathlib import Path

from virt_reclaim.errors import VirtReclaimError

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


class NotOurs(VirtReclaimError, OSError):
    """The name of a file the job created now names another file (or none)."""


class NewImage:
    """A file the job creates itself, exclusively, and holds open while it writes and checks it.

    The name is created with O_EXCL|O_NOFOLLOW: a file or link planted there beforehand
    makes the creation fail instead of being written through. qemu-img reaches the file
    as ``/dev/fd/N`` (``fd_path``), which reopens this inode whatever the name points
    to meanwhile; owner, mode and labels are set through the descriptor; the name is
    renamed or removed only while it still names this inode.
    """

    def __init__(self, path: str) -> None:
        """Create ``path`` (mode 0600) and keep it open.

        Raises:
            OSError: It exists (also as a link), or cannot be created.
        """
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(path, flags, 0o600)
        st = os.fstat(self.fd)
        self._identity = (st.st_dev, st.st_ino)

    @property
    def fd_path(self) -> str:
        """The name a child process given ``fd`` (``pass_fds``) opens this file by."""
        return f"/dev/fd/{self.fd}"

    def is_named(self) -> bool:
        """Whether ``path`` still names this file (not a link, not a replacement)."""
        return self._names_this(self.path)

    def _names_this(self, name: str) -> bool:
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def ensure_named(self) -> None:
        """Raise NotOurs unless ``path`` still names this file."""
        if not self.is_named():
            raise NotOurs(f"{self.path} is no longer the file this job created")

    def link_to(self, other: str) -> None:
        """Give this file a second name, ``other``, which must not exist.

        Raises:
            FileExistsError: Something is at ``other``.
            NotOurs: ``path`` no longer named this file; nothing is left at ``other``.
        """
        os.link(self.path, other, follow_symlinks=False)
        if not self._names_this(other):
            os.unlink(other)
            raise NotOurs(f"{self.path} is no longer the file this job created")

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on its filesystem."""
        return os.fstat(self.fd).st_blocks * 512

    def fsync(self) -> None:
        """Flush the file's data to stable storage (qemu-img convert does not)."""
        os.fsync(self.fd)

    def take_metadata_of(self, source: str) -> None:
        """Give this file the owner, mode and xattrs (SELinux label...) of ``source``."""
        st = os.stat(source)
        os.fchown(self.fd, st.st_uid, st.st_gid)
        os.fchmod(self.fd, st.st_mode & 0o7777)
        with contextlib.suppress(OSError):
            for name in os.listxattr(source):
                if name.startswith(_SKIPPED_XATTR_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    os.setxattr(self.fd, name, os.getxattr(source, name))

    def remove(self) -> bool:
        """Delete ``path`` if it still names this file, and close it; True if deleted."""
        removed = False
        if self.is_named():
            os.unlink(self.path)
            removed = True
        self.close()
        return removed

    def close(self) -> None:
        """Close the descriptor; safe to call twice."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def same_file(first: str, second: str) -> bool:
    """Whether both names lead to one file (a hard link, the same inode); False if one is gone."""
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def remove_quietly(path: str) -> bool:
    """Delete ``path`` if it exists; True if it did."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def fsync_folder(folder: str) -> None:
    """Make a rename or unlink in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(
    new: NewImage,
    original: str,
    *,
    backup: str | None,
    kept: Callable[[str], None] | None = None,
) -> None:
    """Replace ``original`` with ``new`` in one ``rename()``; keep the original at ``backup``.

    The new file is flushed first and the folder after, so that after a crash
    the path holds either the whole old image or the whole new one. ``kept`` is
    told of the backup once it exists and before the rename: a backup is journaled
    before it can hold the only copy of the old image. The new file is closed after.

    Raises:
        NotOurs: ``new``'s name no longer names the file the job made.
    """
    new.fsync()
    if backup is not None:
        os.link(original, backup)
        if kept is not None:
            kept(backup)
    new.ensure_named()
    os.rename(new.path, original)
    new.close()
    fsync_folder(os.path.dirname(original) or ".")
