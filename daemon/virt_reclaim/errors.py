"""One hierarchy of the errors that cross module boundaries; imports nothing of libvirt.

Catch ``Cancelled`` for any work stopped on request (a stopping service, Ctrl-C
turned into a stop), whichever tool was doing it.
"""

from __future__ import annotations


class VirtReclaimError(Exception):
    """Base of every error virt-reclaim raises on purpose."""


class Cancelled(VirtReclaimError):
    """Work was stopped on request before it finished; whatever it started was ended."""


class VirtError(VirtReclaimError):
    """libvirt refused or failed a request."""


class AgentUnavailable(VirtError):
    """The guest agent is not connected, does not answer, or refuses the command."""


class BlockJobFailed(VirtError):
    """A block job failed, was cancelled, or ended without becoming ready."""


class NoBlockJob(BlockJobFailed):
    """There is no block job on the disk: nothing to wait for, pivot or abort."""


class GuestExecCancelled(Cancelled):
    """``cancel`` was set while a guest-exec ran; the guest process was asked to end."""


class QemuImgError(VirtReclaimError):
    """qemu-img failed or printed something we cannot understand."""


class QemuImgCancelled(QemuImgError, Cancelled):
    """qemu-img was killed because its caller cancelled the work."""
