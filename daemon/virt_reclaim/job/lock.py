"""One job per domain at a time, across processes: an flock on a file per domain UUID.

The lock dies with the process that holds it, which is how recovery tells a
job whose process is gone (recover it) from one still running (leave it be).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from virt_reclaim.errors import VirtReclaimError


class DomainBusy(VirtReclaimError):
    """Another virt-reclaim process holds the domain's lock."""


class DomainLock:
    """The lock of one domain, taken without waiting."""

    def __init__(self, state_dir: str | os.PathLike[str], domain_uuid: str) -> None:
        self.path = Path(state_dir) / "locks" / f"{domain_uuid}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            DomainBusy: Another process holds it.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DomainBusy(f"another virt-reclaim job holds {self.path}") from None
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DomainLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
