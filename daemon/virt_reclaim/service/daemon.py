"""The daemon: one main loop that owns every decision; other threads only report to it.

Threads and what they may do:
- libvirt's event loop thread: lifecycle events and the loss of the connection, put
  into the inbox;
- APScheduler's thread: "policy P fires", put into the inbox;
- an estimator thread per firing: dry runs of the policy's domains (qemu-img
  measure can take seconds), results into the inbox (``workers.estimate_candidates``);
- a thread per job: the job itself, on its own libvirt connection (``workers.run_candidate``).
Signal handlers only set flags; ``signal.set_wakeup_fd`` wakes the loop.

The decisions about windows (what to estimate, watch, queue, start, and when a
window closes) are made by ``windows.Windows``, given the time; ``dispatch`` feeds it,
logs what it decided and does it.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from typing import assert_never

import structlog

from virt_reclaim import backups, logs
from virt_reclaim.config import loading
from virt_reclaim.config.policy import Policy
from virt_reclaim.journal import recovery
from virt_reclaim.journal.records import JournalError
from virt_reclaim.journal.store import Journal
from virt_reclaim.metrics import writer
from virt_reclaim.service import dispatch, reloads, retention, scheduler, status, windows, workers
from virt_reclaim.service.hostview import HostView
from virt_reclaim.service.messages import (
    ConnectionClosed,
    Estimated,
    Fired,
    JobDone,
    JobEnd,
    Lifecycle,
    Message,
)
from virt_reclaim.service.scheduler import Candidate
from virt_reclaim.service.sdnotify import Notifier
from virt_reclaim.service.wakeup import Flags, Wakeup
from virt_reclaim.virt.events import event_loop_alive, start_event_loop

# sysexits.h EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus=78).
EXIT_CONFIG = 78
LOOP_TICK_S = 1.0
# While jobs restore their guests at a stop, systemd's stop timeout (TimeoutStopSec) is
# pushed this far ahead, again every third of it: a policy's shutdown timeout plus the
# guest's restart can be longer than any fixed TimeoutStopSec. Past STOP_EXTEND_MAX_S the
# daemon stops asking, and the unit's own timeout decides.
STOP_EXTEND_S = 60.0
STOP_EXTEND_MAX_S = 3600.0

log = structlog.get_logger("virt_reclaim.service")


class Daemon:
    """``virt-reclaim daemon``: watch, sample, schedule, run jobs, stop safely."""

    def __init__(
        self,
        config_dir: str,
        *,
        notifier: Notifier | None = None,
        strict_modes: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Prepare the daemon; ``run`` does the work."""
        self.config_dir = config_dir
        self.notifier = notifier or Notifier()
        self.strict_modes = strict_modes
        self.clock = clock
        self.daemon_config = loading.DaemonConfig()
        self.policies: tuple[Policy, ...] = ()
        self.host = HostView(clock)
        self.windows = windows.Windows()
        self.metrics = writer.DaemonMetrics()
        self.workers = workers.Workers(self._post, self.metrics.observations)
        self.running = self.workers.running  # by domain uuid
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.flags = Flags()
        self.next_sample = 0.0
        self.next_prune = 0.0  # expired backups: deleted at the start, then every hour
        self.next_forget = 0.0  # removed domains: forgotten at the start, then daily
        self.scheduler = scheduler.PolicyScheduler(lambda name: self._post(Fired(name)))
        self.wakeup = Wakeup()
        self.reloads = 0  # SIGHUPs handled, for ``virt-reclaim reload`` to know its answer
        self.rejected: str | None = None  # why the last reload was not applied, if it was not
        self.files: tuple[str, ...] = ()  # the policy files in force
        self.started_at, self.proc_start = time.time(), status.proc_start(os.getpid())
        self.publisher = status.Publisher()  # STATE_DIR/status.json, for ``virt-reclaim status``

    # -- start and stop -----------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status."""
        loaded = loading.load(self.config_dir, strict_modes=self.strict_modes)
        logs.configure(loaded.daemon.log_format)
        if loaded.errors:
            for error in loaded.errors:
                log.error("config.error", **error.log_fields())
            log.error("daemon.not_started", reason="the configuration has errors",
                      errors=len(loaded.errors))  # fmt: skip
            return EXIT_CONFIG
        self.wakeup.install_signal_handlers(self.flags)
        self._apply(loaded)
        start_event_loop()
        self.notifier.status(f"connecting to {self.daemon_config.uri}")
        while not self.flags.stop and self.host.hypervisor is None:
            self._ensure_connected()
            if self.host.hypervisor is None:
                self._publish(status.Phase.CONNECTING)
                self.wakeup.wait(self._seconds_to_next_event())
                self._watchdog()  # waiting for libvirtd is healthy; a stuck loop is not
        if self.flags.stop:
            return self._shutdown()
        self._recover()
        self.scheduler.start()
        self.scheduler.log_next_runs(self.policies, self.daemon_config, self.config_dir)
        log.info("daemon.started", policies=len(self.policies), domains=len(self.host.domains),
                 uri=self.daemon_config.uri, pid=os.getpid())  # fmt: skip
        self.notifier.ready(self._status())
        self.write_metrics()
        dispatch.find_late_windows(self)
        while not self.flags.stop:
            self.wakeup.wait(self._seconds_to_next_event())
            self._tick()
        return self._shutdown()

    def _tick(self) -> None:
        if self.flags.reload:
            self.flags.reload = False
            self._reload()
        self._drain_inbox()
        self._ensure_connected()
        now = self.clock()
        if self.host.hypervisor is not None and now >= self.next_sample:
            self._sample(now)
            self.next_sample = now + self.daemon_config.stats_interval.total_seconds()
            dispatch.watch_busy(self, now)
            self.write_metrics(periodic=True)
        if now >= self.next_prune:
            self.next_prune = now + backups.PRUNE_INTERVAL_S
            if backups.prune_in(self.daemon_config.state_dir):
                self.write_metrics()
        if now >= self.next_forget and self.host.hypervisor is not None and not self.host.outage:
            self.next_forget = now + retention.INTERVAL_S  # only on libvirt's full, fresh list
            domains = [view.observed for view in self.host.domains.values()]
            if retention.forget_removed(self.daemon_config, self.metrics.observations, domains):
                self.write_metrics()
        for late in self.windows.due_late(now):
            if (policy := self.policy_named(late.policy)) is not None:
                dispatch.open_window(self, policy, late)
        dispatch.start_due(self, now)
        self._watchdog()
        self.notifier.status(self._status())
        self._publish(status.Phase.RUNNING)

    def _shutdown(self) -> int:
        self.notifier.stopping(f"stopping ({self.flags.signal_name or 'requested'}); "
                               f"{len(self.running)} job(s) to end")  # fmt: skip
        log.info("daemon.stopping", signal=self.flags.signal_name, running_jobs=len(self.running))
        for name in list(self.windows.open):
            dispatch.log_closed(self, self.windows.close(name, windows.STOPPING))
        self.scheduler.shutdown()
        self.workers.stop.set()
        began = self.clock()
        next_extend = began
        while self.running:
            # Jobs past their guest's shutdown finish or restore; keep the watchdog fed meanwhile.
            now = self.clock()
            if now >= next_extend and now - began < STOP_EXTEND_MAX_S:
                self.notifier.extend_timeout(STOP_EXTEND_S)
                next_extend = now + STOP_EXTEND_S / 3
            self._publish(status.Phase.STOPPING)
            self.wakeup.wait(LOOP_TICK_S)
            self._drain_inbox()
            self._watchdog()
        self._publish(status.Phase.STOPPED)
        self.write_metrics()
        self.metrics.close()
        self.host.close()
        log.info("daemon.stopped")
        self.notifier.close()
        return 0

    # -- the inbox ------------------------------------------------------------------------

    def _post(self, message: Message) -> None:
        """Hand a message to the main loop (from any thread) and wake it."""
        self.inbox.put(message)
        self.wakeup.wake()

    def _seconds_to_next_event(self) -> float:
        deadlines = [LOOP_TICK_S]
        if self.host.outage is not None:
            deadlines.append(self.host.outage.next_try - self.clock())
        if self.notifier.watchdog_s:
            deadlines.append(self.notifier.watchdog_s / 4)
        deadlines += [late.opens_at - self.clock() for late in self.windows.late.values()]
        return max(0.05, min(deadlines))

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                self._handle(message)
            except Exception:  # one bad message must not stop months of service
                log.exception("daemon.handler_failed", message=message.kind)

    def _handle(self, message: Message) -> None:
        match message:
            case Fired(policy):
                self._on_fired(policy)
            case Lifecycle(uuid, name, event):
                self._on_lifecycle(uuid, name, event)
            case ConnectionClosed(reason):
                self._on_closed(reason)
            case Estimated(policy, candidates):
                self._on_estimated(policy, candidates)
            case JobDone(uuid, ended):
                self._on_job_done(uuid, ended)
            case _:
                assert_never(message)

    def _on_fired(self, policy_name: str) -> None:
        policy = self.policy_named(policy_name)
        if policy is None or self.flags.stop:
            return
        dispatch.open_window(self, policy)

    def _on_lifecycle(self, uuid: str, name: str, event: str) -> None:
        self.host.update(uuid, name, event)

    def _on_closed(self, reason: str) -> None:
        self.host.closed(reason)

    def _on_estimated(self, policy_name: str, candidates: list[Candidate]) -> None:
        dispatch.queue_estimated(self, policy_name, candidates)

    def _on_job_done(self, uuid: str, ended: JobEnd) -> None:
        job = self.workers.job_done(uuid)
        self.windows.job_ended()
        if job is not None:
            outcome = None if ended.outcome is None else str(ended.outcome)
            log.info("job.ended", domain=job.domain, policy=job.policy, outcome=outcome,
                     running_jobs=len(self.running))  # fmt: skip
            if ended.waits_for_space and self.windows.wait_for_space(job.candidate, self.clock()):
                log.info("job.waiting_for_space", domain=job.domain, policy=job.policy,
                         retry_s=windows.SPACE_RETRY_S)  # fmt: skip
        self.write_metrics()

    # -- configuration --------------------------------------------------------------------

    def _apply(self, loaded: loading.LoadedConfig) -> None:
        self.daemon_config = loaded.daemon
        self.policies = tuple(policy for _file, policy in loaded.policies)
        self.files = tuple(sorted({file for file, _policy in loaded.policies}))
        self.scheduler.apply(self.policies)
        self.windows.apply(self.policies)

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("config.reloading", config_dir=self.config_dir)
        loaded = loading.load(self.config_dir, strict_modes=self.strict_modes)
        if (applied := reloads.to_apply(self.daemon_config, loaded)) is not None:
            self._apply(applied)
            log.info("config.reloaded", policies=[p.name for p in self.policies])
            self.scheduler.log_next_runs(self.policies, self.daemon_config, self.config_dir)
            dispatch.find_late_windows(self)
        self.reloads += 1
        self.rejected = reloads.record_verdict(
            self.daemon_config.state_dir, self.reloads, len(loaded.errors)
        )
        self.notifier.ready(self._status())

    def policy_named(self, name: str) -> Policy | None:
        """The policy in force of that name, or None."""
        return next((p for p in self.policies if p.name == name), None)

    # -- libvirt --------------------------------------------------------------------------

    def _ensure_connected(self) -> None:
        came_back = self.host.connect(
            self.daemon_config.uri,
            on_lifecycle=lambda uuid, name, event: self._post(Lifecycle(uuid, name, event)),
            on_close=lambda reason: self._post(ConnectionClosed(reason)),
        )
        if came_back:
            for name in list(self.windows.open):
                policy = self.policy_named(name)
                if policy is not None:
                    dispatch.select_candidates(self, policy)

    def _recover(self) -> None:
        if self.host.hypervisor is None:
            return
        try:
            journal = Journal(self.daemon_config.state_dir)
            recovery.recover(
                journal, self.daemon_config.state_dir, self.host.hypervisor.domain_by_uuid
            )
        except JournalError as exc:
            log.error("recovery.failed", error=str(exc))

    def _sample(self, now: float) -> None:
        longest = max((p.idle.duration.total_seconds() for p in self.policies), default=0.0)
        self.host.sample(now, longest)

    def write_metrics(self, *, periodic: bool = False) -> None:
        """Have the metrics file written (on its thread), if one is configured."""
        self.metrics.request(
            self.daemon_config, [view.observed for view in self.host.domains.values()],
            sampled_at=self.host.last_sampled_at, periodic=periodic,
        )  # fmt: skip

    # -- systemd --------------------------------------------------------------------------

    def _watchdog(self) -> None:
        self.notifier.watchdog_if_due(self.clock(), healthy=event_loop_alive())

    def _status(self) -> str:
        """STATUS=: what the daemon does, and whether it runs on an older configuration."""
        return status.status_line(self)

    def _publish(self, phase: status.Phase) -> None:
        """Publish the snapshot ``virt-reclaim status`` reads (when it changed, or is due)."""
        self.publisher.publish(self.daemon_config.state_dir, status.snapshot_of(self, phase))
