"""External snapshots and block jobs: the moves of the live mode (README.md, "Live mode")."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import libvirt
import structlog

from virt_reclaim.domxml.blockjob import copy_destination_xml, mirror_ready, snapshot_xml
from virt_reclaim.domxml.read import parse_domain
from virt_reclaim.errors import BlockJobFailed, NoBlockJob, VirtError
from virt_reclaim.model import BlockJob
from virt_reclaim.virt.common import error_message
from virt_reclaim.virt.domain import BLOCK_JOB_TYPES, Domain
from virt_reclaim.virt.events import subscribe_block_jobs, unsubscribe_block_jobs

# A pivot or an abort normally leaves no job behind within a second; this bounds a stuck one.
BLOCK_JOB_END_TIMEOUT_S = 60.0
# How often a wait asks blockJobInfo itself, in case an event was missed (say, it fired
# while libvirtd was being reconnected to).
BLOCK_JOB_POLL_S = 0.5
# How long to wait for a vanished job's final event, to be able to say how it ended.
_FINAL_EVENT_GRACE_S = 2.0

_BLOCK_JOB_ENDINGS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed without becoming ready",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "was cancelled",
}


class BlockJobs:
    """External snapshots and block jobs on the disks of one running domain.

    From construction to ``close()`` it listens for the domain's BLOCK_JOB_2 events;
    create it before starting the jobs it is to wait for. The events need libvirt's
    event loop (``start_event_loop``, which ``Hypervisor`` starts before it connects);
    without it every wait falls back to polling ``blockJobInfo``.

    Every libvirt failure becomes a VirtError naming the domain, the disk and the action.
    A call that failed because libvirtd went away is retried once after reconnecting.
    """

    def __init__(self, domain: Domain) -> None:
        """Start listening for the block job events of ``domain``.

        Raises:
            VirtError: libvirt refused the event registration for another reason than
                a missing event loop.
        """
        self._domain = domain
        self._log = structlog.get_logger("virt_reclaim.virt").bind(domain=domain.name)
        self._changed = threading.Condition()
        # Guarded by _changed; written by libvirt's event thread.
        self._heard: dict[str, tuple[int, int]] = {}  # target: (job type, status) last heard
        self._expected: dict[str, int] = {}  # target: type of the job we started there
        self._events_conn: Any = None  # the connection _listen last registered on
        self._listening = False  # whether events come through it
        self._listen()

    def __enter__(self) -> BlockJobs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening for events; safe to call twice."""
        if self._events_conn is not None and self._listening:
            unsubscribe_block_jobs(self._events_conn, self._domain.uuid, self._on_event)
        self._events_conn = None
        self._listening = False

    def snapshot_disk_only(
        self, overlays: Mapping[str, str], *, quiesce: bool, reuse_existing: bool
    ) -> None:
        """Take an external disk-only snapshot without metadata, atomically.

        Each disk named in ``overlays`` continues in a qcow2 overlay at the given path;
        every other disk of the domain is left out. With ``reuse_existing`` (REUSE_EXT)
        the caller already created each overlay, with the disk's current image as its
        backing file and that image's format recorded: libvirt opens it and creates
        nothing. Without it the path must not exist and libvirt creates the file.
        With ``quiesce`` the guest agent freezes the guest's filesystems around it.

        Raises:
            VirtError: The snapshot was refused or failed; with ATOMIC no disk changed.
                If libvirtd went away during the call, check ``disk_source``.
        """
        names = ", ".join(f"{t} onto {p}" for t, p in overlays.items())
        live = self._domain._call("read the live XML", lambda d: d.XMLDesc(0))
        try:
            xml = snapshot_xml(overlays, (disk.target for disk in parse_domain(live).disks))
        except ValueError as exc:
            raise VirtError(f"{self._domain.name}: cannot snapshot {names}: {exc}") from exc
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
        )
        if quiesce:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
        if reuse_existing:
            flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        what = f"take a{' quiesced' if quiesce else 'n'} external snapshot of {names}"
        self._domain._call(what, lambda d: d.snapshotCreateXML(xml, flags))

    def copy_shallow(
        self, target: str, destination: str, *, destination_format: str = "qcow2"
    ) -> None:
        """Start mirroring the disk's top image onto an existing image at ``destination``.

        The caller created ``destination`` with the right backing file: only the top
        image is copied (SHALLOW, REUSE_EXT). The job is TRANSIENT_JOB, as libvirt
        requires for a persistent domain. Then ``wait_ready`` and ``pivot`` or ``abort``.

        Raises:
            VirtError: libvirt refused to start the copy.
        """
        what = f"start a shallow block copy of disk {target} onto {destination}"
        try:
            xml = copy_destination_xml(destination, destination_format)
        except ValueError as exc:
            raise VirtError(f"{self._domain.name}: cannot {what}: {exc}") from exc
        flags = (
            libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
            | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
            | libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
        )
        self._start(
            target,
            libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY,
            what,
            lambda d: d.blockCopy(target, xml, None, flags),
        )

    def commit_active(self, target: str) -> None:
        """Start committing the disk's top image into the image right below it.

        SHALLOW makes that the next backing file, not the bottom of the chain: for a
        disk that was a single image before the snapshot it is the same, for an overlay
        its own backing file stays untouched. Then ``wait_ready`` and ``pivot``.

        Raises:
            VirtError: libvirt refused to start the commit (no backing file, say).
        """
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | libvirt.VIR_DOMAIN_BLOCK_COMMIT_SHALLOW
        self._start(
            target,
            libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT,
            f"start an active block commit of disk {target}",
            lambda d: d.blockCommit(target, None, None, 0, flags),
        )

    def wait_ready(self, target: str, timeout: float) -> bool:
        """Wait until the copy or active commit on ``target`` is ready to pivot.

        Waits for libvirt's READY event; every BLOCK_JOB_POLL_S seconds it also reads
        ``blockJobInfo`` and the live XML's ``<mirror ready='yes'>`` in case the event
        was missed.

        Returns:
            True once the job is ready; False when ``timeout`` seconds passed first.
            The job then still runs: wait again, or ``abort`` it.

        Raises:
            NoBlockJob: There is no job on the disk and none was started or heard of
                there: nothing to wait for (raised at once, not after ``timeout``).
            BlockJobFailed: The job failed, was cancelled, or ended without becoming ready.
            VirtError: libvirt cannot tell (no such disk, the domain stopped).
        """
        deadline = time.monotonic() + timeout
        self._listen()
        while True:
            self._raise_if_ended(target)
            if self._heard_status(target) == libvirt.VIR_DOMAIN_BLOCK_JOB_READY:
                return True
            job = self.active_job(target)
            if job is None:
                self._raise_vanished(target)
            elif job.complete and mirror_ready(self._live_xml(target), target):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._changed:
                self._changed.wait_for(
                    lambda: target in self._heard, timeout=min(BLOCK_JOB_POLL_S, remaining)
                )

    def pivot(self, target: str, *, timeout: float = BLOCK_JOB_END_TIMEOUT_S) -> None:
        """Switch the disk to the copy's destination (or the commit's base) and end the job.

        Returns once ``blockJobInfo`` shows no job on the disk.

        Raises:
            NoBlockJob: There was no job to pivot (also when a pivot that succeeded is
                retried after libvirtd went away: check ``disk_source``).
            VirtError: libvirt refused the pivot (the job is not ready, say), or the job
                was still there after ``timeout`` seconds.
        """
        self._end(target, "pivot", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT, timeout)

    def abort(self, target: str, *, timeout: float = BLOCK_JOB_END_TIMEOUT_S) -> None:
        """End the disk's block job without a pivot: the disk stays on its current chain.

        Returns once ``blockJobInfo`` shows no job on the disk.

        Raises:
            NoBlockJob: There was no job to abort.
            VirtError: libvirt refused, or the job was still there after ``timeout`` seconds.
        """
        self._end(target, "abort", 0, timeout)

    def active_job(self, target: str) -> BlockJob | None:
        """The block job on the disk now, or None.

        Raises:
            VirtError: libvirt cannot tell (no such disk, the domain is not running).
        """
        return self._domain.block_job(target)

    def disk_source(self, target: str, *, live: bool) -> str | None:
        """The path of the disk's top image in the live or the persistent XML.

        Returns:
            The path, or None when there is no such disk (or it has no source).

        Raises:
            VirtError: The XML cannot be read.
        """
        chain = self.disk_chain(target, live=live)
        return chain[0] if chain else None

    def disk_chain(self, target: str, *, live: bool) -> tuple[str | None, ...]:
        """The disk's images in the live or the persistent XML, top first, then its backing stores.

        Returns:
            The paths (None for a layer without one); empty when there is no such disk.

        Raises:
            VirtError: The XML cannot be read.
        """
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
        which = "live" if live else "persistent"
        xml = self._domain._call(f"read the {which} XML", lambda d: d.XMLDesc(flags))
        for disk in parse_domain(xml).disks:
            if disk.target == target:
                return disk.chain
        return ()

    def _start(self, target: str, job_type: int, what: str, fn: Callable[[Any], Any]) -> None:
        # Expect the job before starting it: its READY can arrive before the call returns.
        with self._changed:
            self._expected[target] = job_type
            self._heard.pop(target, None)
        self._listen()
        try:
            self._domain._call(what, fn)
        except VirtError:
            with self._changed:
                self._expected.pop(target, None)
            raise

    def _end(self, target: str, action: str, flags: int, timeout: float) -> None:
        try:
            self._domain._call(
                f"{action} the block job of disk {target}",
                lambda d: d.blockJobAbort(target, flags),
            )
        except VirtError as exc:
            if self.active_job(target) is None:
                raise NoBlockJob(
                    f"{self._domain.name}: no block job on disk {target} to {action}"
                ) from exc
            raise
        deadline = time.monotonic() + timeout
        while (job := self.active_job(target)) is not None:
            if time.monotonic() >= deadline:
                raise VirtError(
                    f"{self._domain.name}: the {job.type} job on disk {target} is still "
                    f"there {timeout:g} s after the {action}"
                )
            time.sleep(0.1)
        # Take in the job's final event, so that it cannot pass for the next job's.
        if self._listening:
            with self._changed:
                self._changed.wait_for(
                    lambda: self._heard_status(target) in _BLOCK_JOB_ENDINGS,
                    timeout=_FINAL_EVENT_GRACE_S,
                )
        with self._changed:
            self._expected.pop(target, None)
            self._heard.pop(target, None)

    def _heard_status(self, target: str) -> int | None:
        with self._changed:
            heard = self._heard.get(target)
        return None if heard is None else heard[1]

    def _raise_if_ended(self, target: str) -> None:
        with self._changed:
            heard = self._heard.get(target)
        if heard is not None and heard[1] in _BLOCK_JOB_ENDINGS:
            job_type, status = heard
            raise BlockJobFailed(
                f"{self._domain.name}: the {BLOCK_JOB_TYPES.get(job_type, 'block')} job on "
                f"disk {target} {_BLOCK_JOB_ENDINGS[status]}"
            )

    def _raise_vanished(self, target: str) -> None:
        """The job is gone: say how it ended, from its final event if that comes soon."""
        with self._changed:
            started = target in self._expected
            if started or target in self._heard:
                self._changed.wait_for(
                    lambda: self._heard_status(target) in _BLOCK_JOB_ENDINGS,
                    timeout=_FINAL_EVENT_GRACE_S if self._listening else 0,
                )
        self._raise_if_ended(target)
        if started:
            raise BlockJobFailed(
                f"{self._domain.name}: the block job on disk {target} ended, never ready"
            )
        raise NoBlockJob(f"{self._domain.name}: no block job on disk {target} to wait for")

    def _live_xml(self, target: str) -> str:
        what = f"read the live XML for disk {target}"
        return str(self._domain._call(what, lambda d: d.XMLDesc(0)))

    def _listen(self) -> None:
        """Register for BLOCK_JOB_2 events on the domain's connection, again after a reconnect."""
        dom = self._domain._dom
        conn = dom.connect()
        if conn is self._events_conn:
            return
        self.close()
        self._events_conn = conn
        try:
            subscribe_block_jobs(conn, dom, self._domain.uuid, self._on_event)
            self._listening = True
        except libvirt.libvirtError as exc:
            # Without an event loop libvirt cannot even set up the event queue's timer.
            if exc.get_error_code() != libvirt.VIR_ERR_INTERNAL_ERROR:
                raise VirtError(
                    f"{self._domain.name}: cannot listen for block job events: {error_message(exc)}"
                ) from exc
            self._log.warning("block_jobs.no_events", reason=error_message(exc))

    def _on_event(self, disk: str, job_type: int, status: int) -> None:
        # On libvirt's event thread: record and wake the waiters, never call libvirt here.
        with self._changed:
            expected = self._expected.get(disk)
            if expected is not None and job_type != expected:
                return  # the late end of an earlier job on this disk
            self._heard[disk] = (job_type, status)
            self._changed.notify_all()
