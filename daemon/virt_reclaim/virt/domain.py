"""One domain: its state and XML, power actions, agent calls and guest-exec."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import libvirt
import libvirt_qemu
import structlog

from virt_reclaim.domxml import read
from virt_reclaim.errors import AgentUnavailable, GuestExecCancelled, VirtError
from virt_reclaim.model import (
    AgentInfo,
    BlockJob,
    DomainObservation,
    DomainState,
    GuestExecResult,
    GuestFilesystem,
    HostVersions,
    TrimmedPath,
)
from virt_reclaim.virt.agentreplies import (
    MAX_EXEC_OUTPUT,
    decode_b64,
    int_or_none,
    parse_agent_info,
    parse_fstrim,
    parse_guest_filesystems,
)
from virt_reclaim.virt.common import STATES, error_message, observe_domain

if TYPE_CHECKING:
    from virt_reclaim.virt.blockjobs import BlockJobs
    from virt_reclaim.virt.connection import Hypervisor

BLOCK_JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}
# How long a guest process may take to clean up after SIGTERM (a zero-fill removes its file).
GUEST_PROCESS_END_S = 60.0


class Domain:
    """One domain: its state and XML, power actions, and its guest agent."""

    def __init__(self, dom: Any, hypervisor: Hypervisor | None = None) -> None:  # noqa: ANN401 - libvirt.virDomain has no stubs
        self._dom = dom
        self._hypervisor = hypervisor
        self.name: str = dom.name()
        self.uuid: str = dom.UUIDString()

    def observe(self) -> DomainObservation:
        """The domain's identity, state and live XML now."""
        observed: DomainObservation = self._call("read domain", observe_domain)
        return observed

    def state(self) -> DomainState:
        """The domain's power state now."""
        state, _reason = self._call("read state", lambda d: d.state())
        return STATES.get(state, DomainState.NOSTATE)

    def inactive_xml(self) -> str:
        """The persistent definition: what the next start will use."""
        return str(self._call("read XML", lambda d: d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))

    def define_xml(self, xml: str) -> None:
        """Replace the persistent definition with ``xml`` (of this domain), validated by libvirt.

        libvirt writes the new definition to a temporary file and renames it over the old
        one: after a crash the definition is the old or the new one, never half of either.
        A running domain keeps its live definition until it is shut down.

        Raises:
            VirtError: libvirt refused the document, or it names another domain.
        """
        try:
            uuid = read.parse_domain(xml).uuid
        except read.DomainXMLError as exc:
            raise VirtError(f"{self.name}: cannot define: {exc}") from exc
        if uuid.lower() != self.uuid.lower():
            raise VirtError(f"{self.name}: refusing to define a document of domain {uuid!r}")
        self._call(
            "define",
            lambda d: d.connect().defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE),
        )

    def block_jobs(self) -> BlockJobs:
        """Snapshots and block jobs on this domain's disks (close it when done)."""
        from virt_reclaim.virt.blockjobs import BlockJobs  # noqa: PLC0415 - it imports Domain

        return BlockJobs(self)

    def versions(self) -> HostVersions:
        """The versions of the libvirt daemon and of the hypervisor (QEMU) this domain runs on."""
        libvirtd = self._call("read libvirt's version", lambda d: d.connect().getLibVersion())
        qemu = self._call("read QEMU's version", lambda d: d.connect().getVersion())
        return HostVersions(libvirt=int(libvirtd), qemu=int(qemu))

    def block_job(self, target: str) -> BlockJob | None:
        """The block job on disk ``target`` now, or None.

        Raises:
            VirtError: libvirt cannot tell (no such disk, the domain is not running).
        """
        info = self._call(
            f"read the block job of disk {target}",
            lambda d: d.blockJobInfo(target, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES),
        )
        if not info:
            return None
        return BlockJob(
            type=BLOCK_JOB_TYPES.get(info.get("type"), "unknown"),
            cur=int(info.get("cur", 0)),
            end=int(info.get("end", 0)),
            bandwidth=int(info.get("bandwidth", 0)),
        )

    def shutdown(self, *, use_agent: bool) -> None:
        """Ask the guest to shut down, through its agent or with the ACPI power button."""
        mode = (
            libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
            if use_agent
            else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        )
        self._call("shut down", lambda d: d.shutdownFlags(mode))

    def force_off(self) -> None:
        """Power the guest off: QEMU is asked to exit cleanly first, then killed."""
        try:
            self._call("force off", lambda d: d.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL))
        except VirtError:
            self._call("force off", lambda d: d.destroyFlags(0))

    def start(self) -> None:
        """Start the (persistent, shut off) domain."""
        self._call("start", lambda d: d.create())

    def wait_for_state(self, wanted: DomainState, timeout: float) -> bool:
        """Poll the state until it is ``wanted`` or ``timeout`` seconds pass; True if reached."""
        deadline = time.monotonic() + timeout
        while True:
            if self.state() == wanted:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def agent_ping(self, timeout: int = 5) -> bool:
        """True when the guest agent answers a ping."""
        try:
            self._agent("guest-ping", None, timeout)
        except AgentUnavailable:
            return False
        return True

    def wait_for_agent(self, timeout: float) -> bool:
        """Poll the agent until it answers or ``timeout`` seconds pass; True if it answered."""
        deadline = time.monotonic() + timeout
        while True:
            if self.agent_ping(timeout=2):
                return True
            if time.monotonic() >= deadline or self.state() != DomainState.RUNNING:
                return False
            time.sleep(0.5)

    def guest_filesystems(self) -> list[GuestFilesystem]:
        """The guest's mounted filesystems, from the agent, validated and bounded.

        Raises:
            AgentUnavailable: The agent does not answer or the reply is unusable.
        """
        try:
            info = self._reconnecting(
                lambda d: d.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM, 0)
            )
        except libvirt.libvirtError as exc:
            raise AgentUnavailable(f"guest filesystems: {error_message(exc)}") from exc
        return parse_guest_filesystems(info)

    def logged_in_users(self) -> list[str]:
        """Names of the users logged in to the guest, from the agent (bounded).

        Raises:
            AgentUnavailable: The agent does not answer or cannot tell.
        """
        try:
            info = self._reconnecting(lambda d: d.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_USERS, 0))
        except libvirt.libvirtError as exc:
            raise AgentUnavailable(f"logged-in users: {error_message(exc)}") from exc
        count = min(int_or_none(info.get("user.count")) or 0, 1024)
        return [str(info.get(f"user.{i}.name", "?"))[:64] for i in range(count)]

    def agent_info(self, timeout: int = 10) -> AgentInfo:
        """What the agent will do (``guest-info``) and which OS it runs in (``guest-get-osinfo``).

        Raises:
            AgentUnavailable: The agent does not answer or its reply is unusable.
        """
        return parse_agent_info(self._agent("guest-info", None, timeout), self._os_info(timeout))

    def _os_info(self, timeout: int) -> Any:  # noqa: ANN401 - an untrusted JSON value
        try:
            return self._agent("guest-get-osinfo", None, timeout)
        except AgentUnavailable:
            return None  # older or locked-down agents: the OS stays unknown

    def fstrim(self, timeout: float = 600.0) -> list[TrimmedPath]:
        """Trim every mounted filesystem in the guest (``guest-fstrim``) within ``timeout``.

        Sent as a raw agent command so that it has our deadline, not libvirt's default.

        Raises:
            AgentUnavailable: The agent refuses, does not answer in time, or replies garbage.
        """
        return parse_fstrim(self._agent("guest-fstrim", None, max(1, int(timeout))))

    def guest_exec(
        self,
        path: str,
        args: list[str],
        timeout: float,
        cancel: threading.Event | None = None,
    ) -> GuestExecResult:
        """Run a program in the guest through ``guest-exec`` and wait for it, with a deadline.

        Whatever ends the wait early (the deadline, ``cancel``, Ctrl-C) first sends the guest
        process SIGTERM, so that nothing it started outlives the job in the guest.

        Raises:
            AgentUnavailable: The agent refuses guest-exec (often blocked by policy on
                RHEL-family guests), does not answer, or the command outlives ``timeout``.
            GuestExecCancelled: ``cancel`` was set.
        """
        reply = self._agent("guest-exec", {"path": path, "arg": args, "capture-output": True}, 10)
        pid = reply.get("pid") if isinstance(reply, dict) else None
        if not isinstance(pid, int):
            raise AgentUnavailable(f"guest-exec returned no pid: {str(reply)[:200]}")
        deadline = time.monotonic() + timeout
        try:
            while True:
                result = self._exec_status(pid)
                if result is not None:
                    return result
                if time.monotonic() >= deadline:
                    raise AgentUnavailable(f"guest-exec {path}: still running after {timeout:g} s")
                if cancel is None:
                    time.sleep(0.5)
                elif cancel.wait(0.5):
                    raise GuestExecCancelled(f"guest-exec {path}: stopped on request")
        except BaseException:
            self._end_guest_process(pid)
            raise

    def _exec_status(self, pid: int) -> GuestExecResult | None:
        status = self._agent("guest-exec-status", {"pid": pid}, 10)
        if not (isinstance(status, dict) and status.get("exited")):
            return None
        return GuestExecResult(
            exitcode=int_or_none(status.get("exitcode")),
            signal=int_or_none(status.get("signal")),
            stdout=decode_b64(status.get("out-data")),
            stderr=decode_b64(status.get("err-data")),
        )

    def _end_guest_process(self, pid: int) -> None:
        """SIGTERM a guest-exec process and wait (bounded) for it to go; best effort."""
        try:
            self._agent(
                "guest-exec",
                {"path": "/bin/sh", "arg": ["-c", 'kill -TERM "$1"', "sh", str(pid)]},
                10,
            )
            deadline = time.monotonic() + GUEST_PROCESS_END_S
            while self._exec_status(pid) is None:
                if time.monotonic() >= deadline:
                    raise AgentUnavailable(f"still running {GUEST_PROCESS_END_S:g} s after SIGTERM")
                time.sleep(0.2)
        except (AgentUnavailable, KeyboardInterrupt) as exc:
            structlog.get_logger("virt_reclaim.virt").warning(
                "guest_exec.not_ended", domain=self.name, guest_pid=pid, reason=str(exc)
            )

    def _agent(self, command: str, arguments: dict[str, Any] | None, timeout: int) -> Any:  # noqa: ANN401
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        try:
            reply = self._reconnecting(
                lambda d: libvirt_qemu.qemuAgentCommand(d, json.dumps(request), timeout, 0)
            )
        except libvirt.libvirtError as exc:
            raise AgentUnavailable(f"{command}: {error_message(exc)}") from exc
        if len(reply) > 4 * MAX_EXEC_OUTPUT:
            raise AgentUnavailable(f"{command}: reply of {len(reply)} bytes is too large")
        try:
            return json.loads(reply)["return"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentUnavailable(f"{command}: unreadable reply") from exc

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:  # noqa: ANN401
        try:
            return self._reconnecting(fn)
        except libvirt.libvirtError as exc:
            raise VirtError(f"{self.name}: cannot {what}: {error_message(exc)}") from exc

    def _reconnecting(self, fn: Callable[[Any], Any]) -> Any:  # noqa: ANN401
        """Call ``fn(virDomain)``; if libvirtd went away, reconnect and retry once."""
        try:
            return fn(self._dom)
        except libvirt.libvirtError:
            if self._hypervisor is None or self._hypervisor.alive():
                raise
            self._hypervisor.reconnect()
            self._dom = self._hypervisor.lookup_uuid(self.uuid)
            return fn(self._dom)
