"""The only module that imports libvirt; everything else uses the small interface here."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import libvirt
import libvirt_qemu
import structlog

from virt_reclaim.domxml import parse_domain
from virt_reclaim.errors import AgentUnavailable, GuestExecCancelled, VirtError
from virt_reclaim.model import (
    DEFAULT_URI,
    AgentInfo,
    DomainSnapshot,
    DomainState,
    GuestExecResult,
    GuestFilesystem,
    TrimmedPath,
)

# How long a job waits for libvirtd to come back before it gives up.
RECONNECT_TIMEOUT_S = 120.0


def _silence_default_error_handler(_ctx: object, _err: object) -> None:
    """Drop libvirt's own printing; every error reaches us as an exception anyway."""


libvirt.registerErrorHandler(_silence_default_error_handler, None)


_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Run libvirt's default event loop on a thread; call before opening any connection.

    Without it libvirt delivers no domain events and cannot answer keepalives.
    Safe to call more than once: the loop starts once per process.
    """
    global _event_loop_thread  # noqa: PLW0603 - libvirt's event loop is per process
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _event_loop_thread = threading.Thread(
            target=_run_event_loop, name="libvirt-events", daemon=True
        )
        _event_loop_thread.start()


def event_loop_alive() -> bool:
    """True while the event loop thread runs (the daemon's watchdog depends on it)."""
    return _event_loop_thread is not None and _event_loop_thread.is_alive()


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


# libvirt's virDomainEventType, named for logs
_LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timed out",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
}

LifecycleCallback = Callable[[str, str, str], None]  # (domain uuid, domain name, event)


# Bounds on what a guest may make us read (its replies are untrusted input).
MAX_EXEC_OUTPUT = 64 * 1024
MAX_FILESYSTEMS = 256
# How long a guest process may take to clean up after SIGTERM (a zero-fill removes its file).
GUEST_PROCESS_END_S = 60.0


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


class Hypervisor:
    """A connection to libvirtd.

    Use as a context manager, or call ``close()``.
    """

    def __init__(self, uri: str = DEFAULT_URI, *, read_only: bool = False) -> None:
        """Connect to ``uri``.

        Raises:
            VirtError: libvirtd cannot be reached or refused the connection.
        """
        self.uri = uri
        self._read_only = read_only
        # Events (lifecycle, block jobs) reach only connections opened after the loop started.
        start_event_loop()
        try:
            self._conn: Any = self._open()
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot connect to {uri}: {_message(exc)}") from exc

    def _open(self) -> Any:  # noqa: ANN401 - libvirt.virConnect has no stubs
        return libvirt.openReadOnly(self.uri) if self._read_only else libvirt.open(self.uri)

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def alive(self) -> bool:
        """True while the connection to libvirtd works."""
        try:
            return bool(self._conn is not None and self._conn.isAlive() == 1)
        except libvirt.libvirtError:
            return False

    def reconnect(self, timeout: float = RECONNECT_TIMEOUT_S) -> None:
        """Open the connection again, with backoff, after libvirtd went away.

        Raises:
            VirtError: libvirtd did not come back within ``timeout`` seconds.
        """
        log = structlog.get_logger("virt_reclaim.virt").bind(uri=self.uri)
        log.warning("libvirt.disconnected")
        deadline = time.monotonic() + timeout
        delay = 0.5
        while True:
            try:
                self._conn = self._open()
            except libvirt.libvirtError as exc:
                if time.monotonic() + delay > deadline:
                    raise VirtError(
                        f"libvirtd at {self.uri} did not come back within {timeout:g} s: "
                        f"{_message(exc)}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("libvirt.reconnected")
            return

    def watch(
        self,
        on_lifecycle: LifecycleCallback,
        on_close: Callable[[str], None],
        keepalive: tuple[int, int] = (5, 3),
    ) -> None:
        """Deliver lifecycle events and the connection's loss; needs ``start_event_loop``.

        The callbacks run on the event loop's thread and must not block or call libvirt.
        With the keepalive (interval seconds, missed answers), a libvirtd that hangs or
        vanishes without closing the socket is noticed too.
        """
        interval, count = keepalive
        try:
            self._conn.setKeepAlive(interval, count)
        except libvirt.libvirtError as exc:
            # Only connections through a socket have keepalives (not test:///, say).
            if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise VirtError(f"cannot set a keepalive on {self.uri}: {_message(exc)}") from exc
        try:

            def lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:  # noqa: ANN401
                on_lifecycle(dom.UUIDString(), dom.name(), _LIFECYCLE_EVENTS.get(event, "other"))

            def agent(_conn: Any, dom: Any, _state: int, _reason: int, _opaque: Any) -> None:  # noqa: ANN401
                on_lifecycle(dom.UUIDString(), dom.name(), "agent")

            def closed(_conn: Any, reason: int, _opaque: Any) -> None:  # noqa: ANN401
                on_close(_CLOSE_REASONS.get(reason, "unknown"))

            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
            )
            self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent, None
            )
            self._conn.registerCloseCallback(closed, None)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot watch {self.uri} for events: {_message(exc)}") from exc

    def domain_stats(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, uuid, record) of every domain from one ``getAllDomainStats`` call.

        The record holds the state, CPU time, block and interface counters that
        idle detection reads (see ``idle.sample_from_stats``).
        """
        groups = (
            libvirt.VIR_DOMAIN_STATS_STATE
            | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BLOCK
            | libvirt.VIR_DOMAIN_STATS_INTERFACE
        )
        try:
            records = self._conn.getAllDomainStats(groups, 0)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot read domain statistics: {_message(exc)}") from exc
        return [(dom.name(), dom.UUIDString(), dict(record)) for dom, record in records]

    def lookup_uuid(self, uuid: str) -> Any:  # noqa: ANN401 - libvirt.virDomain has no stubs
        """The raw libvirt domain with this UUID (for Domain after a reconnect)."""
        return self._conn.lookupByUUIDString(uuid)

    def domains(self) -> list[DomainSnapshot]:
        """Return every domain, active and inactive, sorted by name.

        A domain that disappears while it is being read is left out.

        Raises:
            VirtError: The domains cannot be listed.
        """
        try:
            found = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise VirtError(f"cannot list domains: {_message(exc)}") from exc
        result = []
        for dom in found:
            try:
                result.append(_snapshot(dom))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise VirtError(f"cannot read domain: {_message(exc)}") from exc
        return sorted(result, key=lambda d: d.name)

    def domain(self, name: str) -> Domain:
        """Look a domain up by name.

        Raises:
            VirtError: There is no such domain.
        """
        try:
            return Domain(self._conn.lookupByName(name), self)
        except libvirt.libvirtError as exc:
            raise VirtError(f"domain {name!r}: {_message(exc)}") from exc

    def domain_by_uuid(self, uuid: str) -> Domain:
        """Look a domain up by UUID.

        Raises:
            VirtError: There is no such domain.
        """
        try:
            return Domain(self.lookup_uuid(uuid), self)
        except libvirt.libvirtError as exc:
            raise VirtError(f"domain {uuid}: {_message(exc)}") from exc


class Domain:
    """One domain: its state and XML, power actions, and its guest agent."""

    def __init__(self, dom: Any, hypervisor: Hypervisor | None = None) -> None:  # noqa: ANN401 - libvirt.virDomain has no stubs
        self._dom = dom
        self._hypervisor = hypervisor
        self.name: str = dom.name()
        self.uuid: str = dom.UUIDString()

    def snapshot(self) -> DomainSnapshot:
        """The domain's identity, state and live XML now."""
        snap: DomainSnapshot = self._call("read domain", _snapshot)
        return snap

    def state(self) -> DomainState:
        """The domain's power state now."""
        state, _reason = self._call("read state", lambda d: d.state())
        return _STATES.get(state, DomainState.NOSTATE)

    def inactive_xml(self) -> str:
        """The persistent definition: what the next start will use."""
        return str(self._call("read XML", lambda d: d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))

    def libvirt_snapshot_count(self) -> int:
        """Snapshots libvirt keeps metadata of (internal or external)."""
        return int(self._call("count snapshots", lambda d: d.snapshotNum(0)))

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
            raise AgentUnavailable(f"guest filesystems: {_message(exc)}") from exc
        return parse_guest_filesystems(info)

    def logged_in_users(self) -> list[str]:
        """Names of the users logged in to the guest, from the agent (bounded).

        Raises:
            AgentUnavailable: The agent does not answer or cannot tell.
        """
        try:
            info = self._reconnecting(lambda d: d.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_USERS, 0))
        except libvirt.libvirtError as exc:
            raise AgentUnavailable(f"logged-in users: {_message(exc)}") from exc
        count = min(_int_or_none(info.get("user.count")) or 0, 1024)
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
            exitcode=_int_or_none(status.get("exitcode")),
            signal=_int_or_none(status.get("signal")),
            stdout=_decode_b64(status.get("out-data")),
            stderr=_decode_b64(status.get("err-data")),
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
            raise AgentUnavailable(f"{command}: {_message(exc)}") from exc
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
            raise VirtError(f"{self.name}: cannot {what}: {_message(exc)}") from exc

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


def parse_guest_filesystems(info: dict[str, Any]) -> list[GuestFilesystem]:
    """Turn libvirt's typed-parameter ``fs.N.*`` keys into filesystems, dropping malformed ones."""
    count = min(_int_or_none(info.get("fs.count")) or 0, MAX_FILESYSTEMS)
    result = []
    for i in range(count):
        mountpoint = info.get(f"fs.{i}.mountpoint")
        if not isinstance(mountpoint, str) or not mountpoint.startswith("/") or "\0" in mountpoint:
            continue
        disks = min(_int_or_none(info.get(f"fs.{i}.disk.count")) or 0, 64)
        targets = tuple(
            str(alias)
            for j in range(disks)
            if isinstance(alias := info.get(f"fs.{i}.disk.{j}.alias"), str)
        )
        result.append(
            GuestFilesystem(
                mountpoint=mountpoint[:4096],
                fstype=str(info.get(f"fs.{i}.fstype", ""))[:64],
                used_bytes=_int_or_none(info.get(f"fs.{i}.used-bytes")),
                total_bytes=_int_or_none(info.get(f"fs.{i}.total-bytes")),
                disk_targets=targets,
            )
        )
    return result


MAX_AGENT_COMMANDS = 512


def parse_agent_info(info: object, osinfo: object) -> AgentInfo:
    """Turn ``guest-info`` and ``guest-get-osinfo`` replies into AgentInfo, bounded and validated.

    Raises:
        AgentUnavailable: ``guest-info`` is not an object with a command list.
    """
    if not isinstance(info, dict) or not isinstance(info.get("supported_commands"), list):
        raise AgentUnavailable("guest-info: the reply lists no commands")
    enabled = frozenset(
        str(c["name"])[:64]
        for c in info["supported_commands"][:MAX_AGENT_COMMANDS]
        if isinstance(c, dict) and isinstance(c.get("name"), str) and c.get("enabled") is True
    )
    os_id = os_name = None
    if isinstance(osinfo, dict):
        os_id = _short_text(osinfo.get("id"))
        os_name = _short_text(osinfo.get("pretty-name") or osinfo.get("name"))
    return AgentInfo(str(info.get("version", ""))[:32], enabled, os_id, os_name)


def parse_fstrim(reply: object) -> list[TrimmedPath]:
    """Read a ``guest-fstrim`` reply as Linux and Windows agents write it.

    Linux reports ``trimmed`` and ``minimum`` per mount point; Windows agents report
    each volume by its drive path, often without ``trimmed``, and an ``error`` text for a
    volume that could not be retrimmed.
    """
    paths = reply.get("paths") if isinstance(reply, dict) else None
    if not isinstance(paths, list):
        raise AgentUnavailable("guest-fstrim: the reply has no paths")
    result = []
    for entry in paths[:MAX_FILESYSTEMS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        error = entry.get("error")
        result.append(
            TrimmedPath(
                path=entry["path"][:4096],
                trimmed=_int_or_none(entry.get("trimmed")),
                error=str(error)[:200] if error is not None else None,
            )
        )
    return result


def _short_text(value: object) -> str | None:
    return value[:64] if isinstance(value, str) and value.isprintable() else None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _decode_b64(value: object) -> str:
    if not isinstance(value, str):
        return ""
    try:
        raw = base64.b64decode(value[: MAX_EXEC_OUTPUT * 2], validate=False)
    except ValueError:
        return ""
    return raw[:MAX_EXEC_OUTPUT].decode("utf-8", errors="replace")


def _snapshot(dom: Any) -> DomainSnapshot:  # noqa: ANN401 - libvirt.virDomain has no stubs
    state, _reason = dom.state()
    return DomainSnapshot(
        name=dom.name(),
        uuid=dom.UUIDString(),
        state=_STATES.get(state, DomainState.NOSTATE),
        persistent=bool(dom.isPersistent()),
        xml=dom.XMLDesc(0),
    )


def _message(exc: Any) -> str:  # noqa: ANN401 - libvirt.libvirtError has no stubs
    return str(exc.get_error_message() or exc)


# -- Block jobs: the moves of the live mode (see live-reclaim.md) --------------------------

# A pivot or an abort normally leaves no job behind within a second; this bounds a stuck one.
BLOCK_JOB_END_TIMEOUT_S = 60.0
# How often a wait asks blockJobInfo itself, in case an event was missed (say, it fired
# while libvirtd was being reconnected to).
BLOCK_JOB_POLL_S = 0.5
# How long to wait for a vanished job's final event, to be able to say how it ended.
_FINAL_EVENT_GRACE_S = 2.0

_BLOCK_JOB_TYPES = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL: "pull",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY: "copy",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT: "commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT: "active-commit",
    libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_BACKUP: "backup",
}
_BLOCK_JOB_ENDINGS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed without becoming ready",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "was cancelled",
}
# XML 1.0 cannot carry other characters, escaped or not (NUL, most control characters,
# and the lone surrogates Python uses for undecodable bytes in file names).
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class BlockJobFailed(VirtError):
    """A block job failed, was cancelled, or ended without becoming ready."""


class NoBlockJob(BlockJobFailed):
    """There is no block job on the disk: nothing to wait for, pivot or abort."""


@dataclass(frozen=True)
class BlockJob:
    """The block job running on one disk, as ``blockJobInfo`` reports it.

    ``type`` is ``copy``, ``active-commit``, ``commit``, ``pull``, ``backup`` or
    ``unknown``; ``bandwidth`` is in bytes per second, 0 for unlimited.
    """

    type: str
    cur: int
    end: int
    bandwidth: int

    @property
    def complete(self) -> bool:
        """True when cur == end > 0.

        libvirt 9 holds ``cur`` below ``end`` until QEMU says a copy or an active
        commit is ready, so for those this means ready to pivot.
        """
        return self.end > 0 and self.cur == self.end


def snapshot_xml(overlays: Mapping[str, str], targets: Iterable[str]) -> str:
    """The ``<domainsnapshot>`` document of an external disk-only snapshot.

    Args:
        overlays: Disk target (``vda``) to the absolute path of its new qcow2 overlay.
        targets: Every disk target of the domain; those without an overlay get
            ``snapshot='no'``, so that libvirt invents no overlay for them.

    Raises:
        ValueError: There is no overlay, an overlay is for a target not in ``targets``,
            a path is relative, or a name holds a character XML cannot carry.
    """
    ordered = list(dict.fromkeys(t for t in targets if t))
    if not overlays:
        raise ValueError("no disk to snapshot")
    unknown = sorted(set(overlays) - set(ordered))
    if unknown:
        raise ValueError(f"no disk with target {', '.join(unknown)}")
    for target, path in overlays.items():
        if not path.startswith("/"):
            raise ValueError(f"the overlay of {target} is not an absolute path: {path!r}")
    for text in [*ordered, *overlays.values()]:
        _check_xml_text(text)
    root = ET.Element("domainsnapshot")
    disks = ET.SubElement(root, "disks")
    for target in ordered:
        if target in overlays:
            disk = ET.SubElement(disks, "disk", name=target, snapshot="external", type="file")
            ET.SubElement(disk, "driver", type="qcow2")
            ET.SubElement(disk, "source", file=overlays[target])
        else:
            ET.SubElement(disks, "disk", name=target, snapshot="no")
    return ET.tostring(root, encoding="unicode")


def copy_destination_xml(path: str, image_format: str) -> str:
    """The ``<disk>`` document naming a block copy's destination file.

    Raises:
        ValueError: The path is relative, the format is not a plain word, or a character
            cannot be carried in XML.
    """
    if not path.startswith("/"):
        raise ValueError(f"the copy destination is not an absolute path: {path!r}")
    if not re.fullmatch("[a-z0-9]+", image_format):
        raise ValueError(f"not an image format: {image_format!r}")
    _check_xml_text(path)
    disk = ET.Element("disk", type="file")
    ET.SubElement(disk, "driver", type=image_format)
    ET.SubElement(disk, "source", file=path)
    return ET.tostring(disk, encoding="unicode")


def mirror_ready(domain_xml: str, target: str) -> bool:
    """True when the live XML shows the disk's copy or active commit ready to pivot.

    libvirt marks it ``<mirror ready='yes'>`` once QEMU said so; while a pivot or an
    abort is under way the value is ``pivot`` or ``abort``.
    """
    root = ET.fromstring(domain_xml)  # noqa: S314 - the XML comes from libvirtd, not a guest
    for disk in root.findall("./devices/disk"):
        found = disk.find("target")
        if found is not None and found.get("dev") == target:
            mirror = disk.find("mirror")
            return mirror is not None and mirror.get("ready") == "yes"
    return False


def _check_xml_text(text: str) -> None:
    bad = _NOT_XML_CHAR.search(text)
    if bad:
        raise ValueError(f"{text!r} holds {bad.group()!r}, which XML cannot carry")


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
            _unsubscribe_block_jobs(self._events_conn, self._domain.uuid, self._on_event)
        self._events_conn = None
        self._listening = False

    def snapshot_disk_only(self, overlays: Mapping[str, str], *, quiesce: bool) -> None:
        """Take an external disk-only snapshot without metadata, atomically.

        Each disk named in ``overlays`` continues in a new qcow2 overlay at the given
        path (which must not exist); every other disk of the domain is left out. With
        ``quiesce`` the guest agent freezes the guest's filesystems around it.

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
        info = self._domain._call(
            f"read the block job of disk {target}",
            lambda d: d.blockJobInfo(target, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES),
        )
        if not info:
            return None
        return BlockJob(
            type=_BLOCK_JOB_TYPES.get(info.get("type"), "unknown"),
            cur=int(info.get("cur", 0)),
            end=int(info.get("end", 0)),
            bandwidth=int(info.get("bandwidth", 0)),
        )

    def disk_source(self, target: str, *, live: bool) -> str | None:
        """The path of the disk's top image in the live or the persistent XML.

        Returns:
            The path, or None when there is no such disk (or it has no source).

        Raises:
            VirtError: The XML cannot be read.
        """
        flags = 0 if live else libvirt.VIR_DOMAIN_XML_INACTIVE
        which = "live" if live else "persistent"
        xml = self._domain._call(f"read the {which} XML", lambda d: d.XMLDesc(flags))
        for disk in parse_domain(xml).disks:
            if disk.target == target:
                return disk.source
        return None

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
                f"{self._domain.name}: the {_BLOCK_JOB_TYPES.get(job_type, 'block')} job on "
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
            _subscribe_block_jobs(conn, dom, self._domain.uuid, self._on_event)
            self._listening = True
        except libvirt.libvirtError as exc:
            # Without an event loop libvirt cannot even set up the event queue's timer.
            if exc.get_error_code() != libvirt.VIR_ERR_INTERNAL_ERROR:
                raise VirtError(
                    f"{self._domain.name}: cannot listen for block job events: {_message(exc)}"
                ) from exc
            self._log.warning("block_jobs.no_events", reason=_message(exc))

    def _on_event(self, disk: str, job_type: int, status: int) -> None:
        # On libvirt's event thread: record and wake the waiters, never call libvirt here.
        with self._changed:
            expected = self._expected.get(disk)
            if expected is not None and job_type != expected:
                return  # the late end of an earlier job on this disk
            self._heard[disk] = (job_type, status)
            self._changed.notify_all()


_BlockJobHandler = Callable[[str, int, int], None]  # (disk target, job type, status)


@dataclass
class _BlockJobListener:
    conn: Any
    callback_id: int
    handlers: list[_BlockJobHandler]


# libvirt tracks one BLOCK_JOB_2 callback per connection and domain ("event callback
# already tracked" for a second: the Python binding registers one C function for all), so
# every BlockJobs of a domain on a connection shares one registration.
_block_job_listeners: dict[tuple[int, str], _BlockJobListener] = {}
_block_job_listeners_lock = threading.Lock()


def _subscribe_block_jobs(conn: Any, dom: Any, uuid: str, handler: _BlockJobHandler) -> None:  # noqa: ANN401
    with _block_job_listeners_lock:
        listener = _block_job_listeners.get((id(conn), uuid))
        if listener is None:
            handlers: list[_BlockJobHandler] = []

            def dispatch(_c: Any, _d: Any, disk: str, job: int, status: int, _o: Any) -> None:  # noqa: ANN401
                for each in list(handlers):
                    each(disk, job, status)

            callback_id = conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, dispatch, None
            )
            # The entry holds conn, so its id() cannot be reused while the entry exists.
            listener = _BlockJobListener(conn, callback_id, handlers)
            _block_job_listeners[(id(conn), uuid)] = listener
        listener.handlers.append(handler)


def _unsubscribe_block_jobs(conn: Any, uuid: str, handler: _BlockJobHandler) -> None:  # noqa: ANN401
    with _block_job_listeners_lock:
        listener = _block_job_listeners.get((id(conn), uuid))
        if listener is None or handler not in listener.handlers:
            return
        listener.handlers.remove(handler)
        if not listener.handlers:
            del _block_job_listeners[(id(conn), uuid)]
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(listener.callback_id)
