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
