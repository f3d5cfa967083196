"""Keep QEMU from opening an image for writing while we rewrite it, with QEMU's own locks.

QEMU (>= 2.10) takes OFD byte-range read locks on its images: byte 100+bit
says "I hold this permission", 200+bit "I do not share it" (bit 1 = write,
3 = resize). Holding bytes 201 and 203 makes any QEMU that wants to write the
image fail to start ('Failed to get "write" lock') while qemu-img can still
read it. OFD locks belong to the open file description, so they end when our
process dies (nothing stale after a crash) and survive other descriptors of
the same file being closed, unlike POSIX locks. They belong to the inode: the
new image is locked too before it is renamed over the original.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct

from virt_reclaim.errors import VirtReclaimError

_WRITE_HELD = 101  # "someone holds write permission"
_UNSHARE_BYTES = (201, 203)  # "write" and "resize" are not shared
# struct flock on Linux x86_64/aarch64: short type, short whence, off_t start, off_t len, pid_t pid.
_FLOCK = "hh4xqqi4x"


class GuardError(VirtReclaimError):
    """The image cannot be guarded: it is open for writing, or cannot be opened."""


def _flock(fd: int, command: int, lock_type: int, byte: int, length: int = 1) -> tuple[int, int]:
    packed = struct.pack(_FLOCK, lock_type, os.SEEK_SET, byte, length, 0)
    result = fcntl.fcntl(fd, command, packed)
    l_type, _whence, _start, _len, l_pid = struct.unpack(_FLOCK, result)
    return l_type, l_pid


def lock_held(path: str) -> bool:
    """Whether some process holds any lock on the file at ``path`` (QEMU and qemu-img do).

    Asking whether a write lock over the whole file would conflict finds QEMU's
    open-file-description locks without seeing the process, which the unit's
    ProtectProc=invisible may hide.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        l_type, _ = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, 0, length=0)
        return l_type != fcntl.F_UNLCK
    finally:
        os.close(fd)


class ImageGuard:
    """Holds the "write and resize not shared" locks on a set of image files."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def lock(self, path: str) -> None:
        """Lock ``path``; a QEMU start that would write it fails until ``release``.

        Raises:
            GuardError: The image is open for writing (its guest runs) or cannot be opened.
        """
        if path in self._fds:
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise GuardError(f"{path}: cannot open to lock: {exc.strerror}") from exc
        try:
            l_type, _ = _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, _WRITE_HELD)
            if l_type != fcntl.F_UNLCK:
                raise GuardError(f"{path}: open for writing by another process")
            for byte in _UNSHARE_BYTES:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise GuardError(f"{path}: locked for writing by another process") from exc
            raise GuardError(f"{path}: cannot lock: {exc.strerror}") from exc
        except GuardError:
            os.close(fd)
            raise
        self._fds[path] = fd

    def release(self) -> None:
        """Drop every lock; safe to call more than once."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    @property
    def paths(self) -> list[str]:
        """The paths locked now."""
        return list(self._fds)
