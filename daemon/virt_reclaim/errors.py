"""The root of every exception virt-reclaim defines, and its branches; imports nothing.

Every exception class of the package derives from ``VirtReclaimError``, most of them
defined beside the code that raises them:

- ``JobOutcome``: not errors. A job's steps raise them to end the job early with the
  outcome they name (``job/results.py``: ``JobSkipped``, ``SpaceTaken``, ``NothingToDo``,
  ``FreedInPlace``, ``JobAbandoned``). A handler of errors lets them pass: catch
  ``JobOutcome`` before it, or catch the errors it means by name.
- ``Cancelled``: work stopped on request (a stopping service, Ctrl-C turned into a stop),
  whichever tool was doing it.
- the errors: ``VirtError`` (libvirt), ``QemuImgError``, ``JobFailed`` (``job/results.py``),
  ``HookFailed`` (``job/hooks.py``), ``CommandError`` (``process.py``; its
  ``CommandCancelled`` is turned into the caller's own ``Cancelled`` by the caller),
  ``DomainXMLError`` and ``DefinitionChanged`` (``domxml/``, also ``ValueError``),
  ``NotOurs`` (``image/imagefile.py``, also ``OSError``), ``GuardError``, ``DomainBusy``,
  ``JournalError``, ``UsageError`` (``cli/common.py``).

The one exception outside: ``cli.common.Terminated`` is a ``KeyboardInterrupt`` on
purpose (SIGTERM must unwind the way Ctrl-C does, past every ``except Exception``).
"""

from __future__ import annotations


class VirtReclaimError(Exception):
    """Base of every error virt-reclaim raises on purpose."""


class JobOutcome(VirtReclaimError):
    """Ends a job early with the outcome the subclass names; not an error of the job."""


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
