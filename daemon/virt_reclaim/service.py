"""The daemon: one main loop that owns every decision; other threads only report to it.

Threads and what they may do:
- libvirt's event loop thread: lifecycle events and the loss of the connection, put
  into the inbox;
- APScheduler's thread: "policy P fires", put into the inbox;
- an estimator thread per firing: dry runs of the policy's domains (qemu-img
  measure can take seconds), results into the inbox;
- a thread per job: the job itself, on its own libvirt connection.
Signal handlers only set flags; ``signal.set_wakeup_fd`` wakes the loop.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import structlog

from virt_reclaim import config, idle, logs, planning, recovery, runner, scheduler, selection
from virt_reclaim.domainlock import DomainBusy
from virt_reclaim.errors import AgentUnavailable, VirtError
from virt_reclaim.job import Outcome
from virt_reclaim.journal import Journal, JournalError
from virt_reclaim.model import DomainSnapshot, DomainState
from virt_reclaim.policy import Policy, job_settings
from virt_reclaim.process import Priority
from virt_reclaim.sdnotify import Notifier
from virt_reclaim.units import format_bytes
from virt_reclaim.virt import Hypervisor, event_loop_alive, start_event_loop

# sysexits.h EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus=78).
EXIT_CONFIG = 78
RECONNECT_MAX_DELAY_S = 60.0
LOOP_TICK_S = 1.0
SLOW_SAMPLE_MS = 1000.0
# The prefix of the reasons that say a domain is not idle (a later sample may say it is).
BUSY = "busy: "

log = structlog.get_logger("virt_reclaim.service")


@dataclass
class RunningJob:
    """A job thread and what the main loop knows of it."""

    domain: str
    policy: str
    thread: threading.Thread
    started: float


@dataclass
class Outage:
    """libvirtd unreachable: since when, and when to try again."""

    since: float
    reason: str
    attempts: int = 0
    next_try: float = 0.0
    delay: float = 0.5


@dataclass
class Flags:
    """What the signal handlers ask for."""

    reload: bool = False
    stop: bool = False
    signal_name: str = ""


@dataclass
class DomainView:
    """What the daemon knows of a domain, kept current by lifecycle events."""

    snapshot: DomainSnapshot
    window: idle.Window = field(default_factory=lambda: idle.Window(0.0))


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
        self.settings = config.DaemonConfig()
        self.policies: tuple[Policy, ...] = ()
        self.hypervisor: Hypervisor | None = None
        self.outage: Outage | None = None
        self.domains: dict[str, DomainView] = {}
        self.windows: dict[str, scheduler.Window] = {}
        self.queue: list[scheduler.Candidate] = []
        self.running: dict[str, RunningJob] = {}
        self.estimating: set[str] = set()
        self.inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.flags = Flags()
        self.stop_jobs = threading.Event()
        self.next_sample = 0.0
        self.sampled_once = False
        self.last_watchdog = float("-inf")
        self.scheduler = scheduler.PolicyScheduler(lambda name: self._post("fired", name))
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)

    # -- start and stop -----------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status."""
        loaded = config.load(self.config_dir, strict_modes=self.strict_modes)
        logs.configure(loaded.daemon.log_format)
        if loaded.errors:
            for error in loaded.errors:
                log.error("config.error", **_error_fields(error))
            log.error("daemon.not_started", reason="the configuration has errors",
                      errors=len(loaded.errors))  # fmt: skip
            return EXIT_CONFIG
        self._install_signal_handlers()
        self._apply(loaded)
        start_event_loop()
        self.notifier.status(f"connecting to {self.settings.uri}")
        while not self.flags.stop and self.hypervisor is None:
            self._ensure_connected()
            if self.hypervisor is None:
                self._wait(self._seconds_to_next_event())
                self._watchdog()  # waiting for libvirtd is healthy; a stuck loop is not
        if self.flags.stop:
            return self._shutdown()
        self._recover()
        self.scheduler.start()
        self._log_next_runs()
        log.info("daemon.started", policies=len(self.policies), domains=len(self.domains),
                 uri=self.settings.uri, pid=os.getpid())  # fmt: skip
        self.notifier.ready(self._status())
        while not self.flags.stop:
            self._wait(self._seconds_to_next_event())
            self._tick()
        return self._shutdown()

    def _tick(self) -> None:
        if self.flags.reload:
            self.flags.reload = False
            self._reload()
        self._drain_inbox()
        self._ensure_connected()
        now = self.clock()
        if self.hypervisor is not None and now >= self.next_sample:
            self._sample(now)
            self.next_sample = now + self.settings.stats_interval.total_seconds()
            self._recheck_busy()
        self._dispatch()
        self._watchdog()
        self.notifier.status(self._status())

    def _shutdown(self) -> int:
        self.notifier.stopping(f"stopping ({self.flags.signal_name or 'requested'}); "
                               f"{len(self.running)} job(s) to end")  # fmt: skip
        log.info("daemon.stopping", signal=self.flags.signal_name, running_jobs=len(self.running))
        for name in list(self.windows):
            self._close_window(name, "the daemon is stopping")
        self.scheduler.shutdown()
        self.stop_jobs.set()
        while self.running:
            # Jobs past their guest's shutdown finish or restore; keep the watchdog fed meanwhile.
            self._wait(LOOP_TICK_S)
            self._drain_inbox()
            self._watchdog()
        if self.hypervisor is not None:
            self.hypervisor.close()
        log.info("daemon.stopped")
        self.notifier.close()
        return 0

    def _install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            self.flags.stop = True
            self.flags.signal_name = signal.Signals(signum).name

        def on_reload(_signum: int, _frame: FrameType | None) -> None:
            self.flags.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    # -- the inbox ------------------------------------------------------------------------

    def _post(self, *message: Any) -> None:  # noqa: ANN401 - messages are tuples of any kind
        """Hand a message to the main loop (from any thread) and wake it."""
        self.inbox.put(message)
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _wait(self, timeout: float) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            if selector.select(max(0.0, timeout)):
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass

    def _seconds_to_next_event(self) -> float:
        deadlines = [LOOP_TICK_S]
        if self.outage is not None:
            deadlines.append(self.outage.next_try - self.clock())
        if self.notifier.watchdog_s:
            deadlines.append(self.notifier.watchdog_s / 4)
        return max(0.05, min(deadlines))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, *args = self.inbox.get_nowait()
            except queue.Empty:
                return
            handler = getattr(self, f"_on_{kind.replace('-', '_')}")
            try:
                handler(*args)
            except Exception:  # one bad message must not stop months of service
                log.exception("daemon.handler_failed", message=kind)

    def _on_fired(self, policy_name: str) -> None:
        policy = self._policy(policy_name)
        if policy is None or self.flags.stop:
            return
        ends_at = self.clock() + policy.schedule.window.total_seconds()
        # A firing while the window is open reopens it from now; the busy domains it
        # watches stay watched (and are not reported as skipped again).
        previous = self.windows.get(policy.name)
        busy = previous.busy if previous is not None else {}
        self.windows[policy.name] = scheduler.Window(policy.name, ends_at, busy)
        log.info("window.opened", policy=policy.name,
                 window_s=policy.schedule.window.total_seconds())  # fmt: skip
        if self.hypervisor is None:
            log.warning("window.waiting", policy=policy.name, reason="libvirtd is unreachable")
            return
        self._select_candidates(policy)

    def _on_lifecycle(self, uuid: str, name: str, event: str) -> None:
        if self.hypervisor is None:
            return
        try:
            snapshot = self.hypervisor.domain_by_uuid(uuid).snapshot()
        except VirtError:
            if self.domains.pop(uuid, None) is not None:
                log.info("domain.gone", domain=name, libvirt_event=event)
            return
        view = self.domains.get(uuid)
        if view is None:
            self.domains[uuid] = DomainView(snapshot)
            log.info("domain.added", domain=name, state=str(snapshot.state), libvirt_event=event)
        else:
            view.snapshot = snapshot

    def _on_closed(self, reason: str) -> None:
        if self.hypervisor is not None and not self.hypervisor.alive():
            self._lost_connection(reason)

    def _on_estimated(self, policy_name: str, candidates: list[scheduler.Candidate]) -> None:
        self.estimating.discard(policy_name)
        if policy_name not in self.windows:
            return
        queued = {c.uuid for c in self.queue}
        fresh = [c for c in candidates if c.uuid not in queued]
        self.queue = scheduler.queue_order([*self.queue, *fresh])
        for candidate in fresh:
            log.info("job.queued", domain=candidate.name, policy=policy_name,
                     estimated_gain=candidate.estimated_gain,
                     estimated_s=round(candidate.estimated_s))  # fmt: skip

    def _on_job_done(self, uuid: str, outcome: str | None) -> None:
        job = self.running.pop(uuid, None)
        if job is not None:
            job.thread.join()
            log.info("job.ended", domain=job.domain, policy=job.policy, outcome=outcome,
                     running_jobs=len(self.running))  # fmt: skip

    # -- configuration --------------------------------------------------------------------

    def _apply(self, loaded: config.LoadedConfig) -> None:
        self.settings = loaded.daemon
        self.policies = tuple(policy for _file, policy in loaded.policies)
        self.scheduler.apply(self.policies)
        self.windows = {n: w for n, w in self.windows.items() if self._policy(n) is not None}
        self.queue = [c for c in self.queue if c.policy in self.windows]

    def _reload(self) -> None:
        self.notifier.reloading()
        log.info("config.reloading", config_dir=self.config_dir)
        loaded = config.load(self.config_dir, strict_modes=self.strict_modes)
        if loaded.errors:
            for error in loaded.errors:
                log.error("config.error", **_error_fields(error))
            log.error("config.reload_failed", errors=len(loaded.errors),
                      kept="the last good configuration stays in force")  # fmt: skip
        else:
            fixed = {"uri": loaded.daemon.uri, "state_dir": loaded.daemon.state_dir}
            for name, value in fixed.items():
                if getattr(self.settings, name) != value:
                    log.warning("config.restart_needed", setting=name, new=value,
                                current=getattr(self.settings, name))  # fmt: skip
            kept = loaded.daemon.model_copy(
                update={"uri": self.settings.uri, "state_dir": self.settings.state_dir}
            )
            self._apply(config.LoadedConfig(kept, loaded.policies, ()))
            log.info("config.reloaded", policies=[p.name for p in self.policies])
            self._log_next_runs()
        self.notifier.ready(self._status())

    def _policy(self, name: str) -> Policy | None:
        return next((p for p in self.policies if p.name == name), None)

    def _log_next_runs(self) -> None:
        if not self.policies:
            log.warning("daemon.no_policies", policy_dir=self.settings.policy_dir
                        or os.path.join(self.config_dir, config.POLICY_FOLDER))  # fmt: skip
        for name, when in self.scheduler.next_runs().items():
            log.info("policy.scheduled", policy=name, next_run=when.isoformat() if when else None)

    # -- libvirt --------------------------------------------------------------------------

    def _ensure_connected(self) -> None:
        if self.hypervisor is not None:
            if self.hypervisor.alive():
                return
            self._lost_connection("the connection is dead")
        outage = self.outage
        now = self.clock()
        if outage is not None and now < outage.next_try:
            return
        try:
            hypervisor = Hypervisor(self.settings.uri)
            hypervisor.watch(
                on_lifecycle=lambda uuid, name, event: self._post("lifecycle", uuid, name, event),
                on_close=lambda reason: self._post("closed", reason),
            )
            snapshots = hypervisor.domains()
        except VirtError as exc:
            if outage is None:
                outage = self.outage = Outage(since=now, reason=str(exc))
                log.warning("libvirt.unreachable", uri=self.settings.uri, error=str(exc))
            outage.attempts += 1
            outage.next_try = now + outage.delay
            outage.delay = min(outage.delay * 2, RECONNECT_MAX_DELAY_S)
            return
        self.hypervisor = hypervisor
        self.domains = {s.uuid: self.domains.get(s.uuid, DomainView(s)) for s in snapshots}
        for snapshot in snapshots:
            self.domains[snapshot.uuid].snapshot = snapshot
        if outage is not None:
            log.info("libvirt.reconnected", uri=self.settings.uri,
                     outage_s=round(now - outage.since, 1), attempts=outage.attempts)  # fmt: skip
            self.outage = None
            for name in self.windows:
                policy = self._policy(name)
                if policy is not None:
                    self._select_candidates(policy)
        else:
            log.info("libvirt.connected", uri=self.settings.uri, domains=len(snapshots))

    def _lost_connection(self, reason: str) -> None:
        if self.hypervisor is not None:
            self.hypervisor.close()
            self.hypervisor = None
        if self.outage is None:
            # Logged once per outage; the reconnect logs how long it lasted.
            log.warning("libvirt.disconnected", uri=self.settings.uri, reason=reason)
            self.outage = Outage(since=self.clock(), reason=reason)

    def _recover(self) -> None:
        if self.hypervisor is None:
            return
        try:
            journal = Journal(self.settings.state_dir)
            recovery.recover(journal, self.settings.state_dir, self.hypervisor.domain_by_uuid)
        except JournalError as exc:
            log.error("recovery.failed", error=str(exc))

    # -- idle detection -------------------------------------------------------------------

    def _sample(self, now: float) -> None:
        if self.hypervisor is None:
            return
        began = time.perf_counter()
        try:
            records = self.hypervisor.domain_stats()
        except VirtError as exc:
            log.warning("stats.failed", error=str(exc))
            return
        longest = max((p.idle.duration.total_seconds() for p in self.policies), default=0.0)
        for _name, uuid, record in records:
            view = self.domains.get(uuid)
            if view is None:
                continue
            view.window.duration_s = longest
            view.window.add(idle.sample_from_stats(record, now))
        took_ms = (time.perf_counter() - began) * 1000
        # The first sample tells the operator what sampling costs on this host; later ones
        # are logged only when they hold the main loop up.
        if not self.sampled_once or took_ms > SLOW_SAMPLE_MS:
            emit = log.warning if took_ms > SLOW_SAMPLE_MS else log.info
            emit("stats.sampled", domains=len(records), duration_ms=round(took_ms, 1))
            self.sampled_once = True

    def busy_reason(self, view: DomainView, policy: Policy) -> str | None:
        """Why the domain is not idle by the policy's measure, or None."""
        if view.snapshot.state is DomainState.SHUTOFF:
            return None
        limits = idle.Thresholds(
            cpu_percent=policy.idle.cpu_percent,
            disk_bytes_per_s=float(policy.idle.disk_bytes_per_s),
            net_bytes_per_s=float(policy.idle.net_bytes_per_s),
            duration_s=policy.idle.duration.total_seconds(),
        )
        return idle.busy_reason(view.window, limits)

    # -- scheduling -----------------------------------------------------------------------

    def _select_candidates(self, policy: Policy, only: set[str] | None = None) -> None:
        """Pick the policy's eligible idle domains (or those of ``only``) and estimate them.

        A domain skipped for being busy is watched by the open window (``_recheck_busy``).
        """
        window = self.windows.get(policy.name)
        if window is None or policy.name in self.estimating:
            return
        try:
            journal = Journal(self.settings.state_dir)
            rate = scheduler.typical_rewrite_rate(journal.rewrite_rates())
        except JournalError as exc:
            log.error("window.journal_unusable", policy=policy.name, error=str(exc))
            return
        wall = time.time()
        chosen = []
        for uuid, view in sorted(self.domains.items(), key=lambda kv: kv[1].snapshot.name):
            snap = view.snapshot
            if only is not None and uuid not in only:
                continue
            choice = selection.select(self.policies, snap.name, snap.uuid, snap.xml)
            if choice.policy is None or choice.policy.name != policy.name:
                continue
            try:
                reason = self._ineligible(uuid, view, policy, journal, wall)
            except JournalError as exc:
                reason = f"the journal cannot be read: {exc}"
            if reason is None:
                window.busy.pop(uuid, None)
                chosen.append(snap)
                continue
            watched = uuid in window.busy
            if reason.startswith(BUSY):
                window.busy[uuid] = (snap.name, reason)
            else:
                window.busy.pop(uuid, None)
            if not watched:
                log.info("domain.skipped", domain=snap.name, policy=policy.name, reason=reason)
        if not chosen:
            if only is None and not window.busy:
                log.info("window.nothing_to_do", policy=policy.name)
            return
        self.estimating.add(policy.name)
        thread = threading.Thread(
            target=self._estimate, args=(policy, chosen, rate),
            name=f"estimate-{policy.name}", daemon=True,
        )  # fmt: skip
        thread.start()

    def _ineligible(
        self, uuid: str, view: DomainView, policy: Policy, journal: Journal, wall: float
    ) -> str | None:
        if uuid in self.running:
            return "a job for it is running"
        left = scheduler.interval_left(
            journal.last_reclaimed_at(uuid), wall, policy.schedule.min_interval.total_seconds()
        )
        if left > 0:
            return f"reclaimed recently: min_interval leaves {left / 3600:.1f} h to wait"
        busy = self.busy_reason(view, policy)
        if busy is not None:
            return f"{BUSY}{busy}"
        return None

    def _recheck_busy(self) -> None:
        """After each sample: queue the watched domains of open windows that went idle."""
        for name, window in list(self.windows.items()):
            policy = self._policy(name)
            if policy is None or not window.busy or name in self.estimating:
                continue
            went_idle = set()
            for uuid, (domain, _reason) in list(window.busy.items()):
                view = self.domains.get(uuid)
                if view is None:
                    del window.busy[uuid]
                    continue
                busy = self.busy_reason(view, policy)
                if busy is None:
                    went_idle.add(uuid)
                    log.info("domain.idle", domain=domain, policy=name,
                             window_left_s=round(window.left(self.clock())))  # fmt: skip
                else:
                    window.busy[uuid] = (domain, f"{BUSY}{busy}")
            if went_idle:
                self._select_candidates(policy, only=went_idle)

    def _estimate(self, policy: Policy, chosen: list[DomainSnapshot], rate: float) -> None:
        """On its own thread and connection: a dry run of each chosen domain."""
        structlog.contextvars.bind_contextvars(policy=policy.name)
        candidates: list[scheduler.Candidate] = []
        try:
            with Hypervisor(self.settings.uri) as hypervisor:
                everyone = hypervisor.domains()
                for snap in chosen:
                    candidate = self._estimate_one(hypervisor, everyone, policy, snap, rate)
                    if candidate is not None:
                        candidates.append(candidate)
        except VirtError as exc:
            log.warning("window.estimate_failed", error=str(exc))
        self._post("estimated", policy.name, candidates)

    def _estimate_one(
        self,
        hypervisor: Hypervisor,
        everyone: list[DomainSnapshot],
        policy: Policy,
        snap: DomainSnapshot,
        rate: float,
    ) -> scheduler.Candidate | None:
        try:
            domain = hypervisor.domain_by_uuid(snap.uuid)
            if policy.idle.no_logged_in_users and snap.state is DomainState.RUNNING:
                users = domain.logged_in_users()
                if users:
                    log.info("domain.skipped", domain=snap.name,
                             reason=f"busy: users logged in ({', '.join(users[:5])})")  # fmt: skip
                    return None
            result = planning.estimate(domain, policy, everyone, qemu_img=self.settings.qemu_img)
        except AgentUnavailable as exc:
            log.info("domain.skipped", domain=snap.name,
                     reason=f"busy: cannot tell whether users are logged in ({exc})")  # fmt: skip
            return None
        except VirtError as exc:
            log.info("domain.skipped", domain=snap.name, reason=str(exc))
            return None
        if result.outcome is not Outcome.DRY_RUN:
            log.info("domain.skipped", domain=snap.name, reason=result.reason,
                     outcome=str(result.outcome))  # fmt: skip
            return None
        before = sum(d.bytes_before for d in result.disks)
        after = sum(d.estimated_after or d.bytes_before for d in result.disks)
        return scheduler.Candidate(
            name=snap.name,
            uuid=snap.uuid,
            policy=policy.name,
            bytes_before=before,
            estimated_gain=before - after,
            estimated_s=scheduler.estimate_job_seconds(
                before, rate, policy.shutdown.timeout.total_seconds()
            ),
        )

    def _dispatch(self) -> None:
        now = self.clock()
        for name, window in list(self.windows.items()):
            if window.left(now) <= 0 and name not in self.estimating:
                self._close_window(name, "its time is up")
        if self.hypervisor is None or self.flags.stop:
            return
        waiting: list[scheduler.Candidate] = []
        for candidate in self.queue:
            if len(self.running) >= self.settings.max_concurrent_jobs:
                waiting.append(candidate)
                continue
            reason = self._start_refusal(candidate, now)
            if reason == "wait":
                waiting.append(candidate)
            elif reason is not None:
                log.info("domain.skipped", domain=candidate.name, policy=candidate.policy,
                         reason=reason)  # fmt: skip
                watching = self.windows.get(candidate.policy)
                if watching is not None and reason.startswith(BUSY):
                    watching.busy[candidate.uuid] = (candidate.name, reason)
            else:
                self._start_job(candidate)
        self.queue = waiting

    def _close_window(self, name: str, why: str) -> None:
        window = self.windows.pop(name)
        log.info("window.closed", policy=name, why=why,
                 not_started=[c.name for c in self.queue if c.policy == name],
                 stayed_busy=dict(window.busy.values()))  # fmt: skip
        self.queue = [c for c in self.queue if c.policy != name]

    def _start_refusal(self, candidate: scheduler.Candidate, now: float) -> str | None:
        """Why the candidate must not start now (None: start; "wait": later)."""
        window = self.windows.get(candidate.policy)
        policy = self._policy(candidate.policy)
        view = self.domains.get(candidate.uuid)
        if window is None or policy is None or view is None:
            return "its policy or the domain is gone"
        if candidate.uuid in self.running:
            return "wait"
        if not window.fits(candidate.estimated_s, now):
            return (f"estimated {candidate.estimated_s / 60:.0f} min does not fit in the "
                    f"{window.left(now) / 60:.0f} min left of the window")  # fmt: skip
        busy = self.busy_reason(view, policy)
        if busy is not None:
            return f"{BUSY}{busy}"
        return None

    def _start_job(self, candidate: scheduler.Candidate) -> None:
        policy = self._policy(candidate.policy)
        assert policy is not None  # noqa: S101 - checked by _start_refusal
        thread = threading.Thread(
            target=self._job_thread, args=(candidate, policy, self.settings),
            name=f"job-{candidate.name}",
        )  # fmt: skip
        self.running[candidate.uuid] = RunningJob(candidate.name, policy.name, thread, self.clock())
        log.info("job.starting", domain=candidate.name, policy=policy.name,
                 estimated_gain=format_bytes(candidate.estimated_gain))  # fmt: skip
        thread.start()

    def _job_thread(
        self, candidate: scheduler.Candidate, policy: Policy, settings: config.DaemonConfig
    ) -> None:
        structlog.contextvars.bind_contextvars(policy=policy.name, domain=candidate.name)
        outcome: str | None = None
        try:
            with Hypervisor(settings.uri) as hypervisor:
                domain = hypervisor.domain_by_uuid(candidate.uuid)
                result = runner.run_job(
                    hypervisor,
                    domain,
                    job_settings(policy, qemu_img=settings.qemu_img),
                    journal=Journal(settings.state_dir),
                    state_dir=settings.state_dir,
                    priority=Priority(settings.nice, settings.ionice_class, settings.ionice_level),
                    stop=self.stop_jobs,
                )
                outcome = str(result.outcome)
        except (VirtError, JournalError, DomainBusy) as exc:
            log.error("job.not_run", error=str(exc))
        except Exception:  # a bug in one job must not take the daemon down
            log.exception("job.crashed")
        finally:
            self._post("job-done", candidate.uuid, outcome)

    # -- systemd --------------------------------------------------------------------------

    def _watchdog(self) -> None:
        period = self.notifier.watchdog_s
        if not period or not event_loop_alive():
            return
        now = self.clock()
        if now - self.last_watchdog >= period / 4:
            self.notifier.watchdog()
            self.last_watchdog = now

    def _status(self) -> str:
        if self.outage is not None:
            return f"libvirtd unreachable for {self.clock() - self.outage.since:.0f} s"
        parts = []
        if self.running:
            names = ", ".join(sorted(j.domain for j in self.running.values()))
            parts.append(f"reclaiming {names}")
        if self.queue:
            parts.append(f"{len(self.queue)} queued")
        if self.windows:
            parts.append(f"window open: {', '.join(sorted(self.windows))}")
        if not parts:
            parts.append("waiting for the next window")
        parts.append(f"{len(self.policies)} policies, {len(self.domains)} domains")
        return "; ".join(parts)


def _error_fields(error: config.ConfigError) -> dict[str, Any]:
    return {
        "file": error.file,
        "policy": error.policy,
        "field": error.field,
        "value": None if error.value is None else str(error.value),
        "reason": error.message,
    }
