"""What live-reclaim tests watch: the domain from its own connection, and the guest's writes.

``Witness`` records the domain's lifecycle and BLOCK_JOB_2 events and every state other
than running; ``GuestWriter`` keeps the guest writing fsync'ed files; ``Ticker`` records
the guest's clock every 20 ms, so that the largest gap is the largest stall it saw.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from testbed.daemon import DaemonProcess, daemon_toml, write_config
from testbed.guests import URI, Guest, GuestError
from testbed.reclaim import (
    RunResult,
    chains,
    killed_if_left_running,
    leftovers,
    reclaim,
    recover_json,
    start_reclaim,
)
from virt_reclaim.virt.events import start_event_loop

_BLOCK_JOB_STATUS = {
    libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
    libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "canceled",
    libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
}


class Witness:
    """The domain as the test bed sees it from its own connection, while a test runs.

    Records lifecycle events, BLOCK_JOB_2 events as (disk, type, status), and every
    state other than running that a poll every 50 ms finds.
    """

    def __init__(self, name: str) -> None:
        start_event_loop()  # before the connection opens, or it gets no events
        self.conn = libvirt.open(URI)
        self.dom = self.conn.lookupByName(name)
        self.lifecycle: list[tuple[int, int]] = []
        self.block_jobs: list[tuple[str, int, str]] = []
        self.not_running: list[int] = []
        self._stop = threading.Event()
        self._ids = [
            self.conn.domainEventRegisterAny(
                self.dom,
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                lambda _c, _d, event, detail, _o: self.lifecycle.append((event, detail)),
                None,
            ),
            self.conn.domainEventRegisterAny(
                self.dom,
                libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2,
                lambda _c, _d, disk, job, status, _o: self.block_jobs.append(
                    (disk, job, _BLOCK_JOB_STATUS.get(status, str(status)))
                ),
                None,
            ),
        ]
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            state, _reason = self.dom.state()
            if state != libvirt.VIR_DOMAIN_RUNNING:
                self.not_running.append(state)

    def close(self) -> None:
        self._stop.set()
        self._poller.join(timeout=10)
        for callback_id in self._ids:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(callback_id)
        self.conn.close()

    def assert_never_left_running(self) -> None:
        assert self.lifecycle == [], f"lifecycle events during the jobs: {self.lifecycle}"
        assert self.not_running == [], f"states seen during the jobs: {self.not_running}"

    def statuses(self, disk: str, job_type: int) -> list[str]:
        """The statuses of the BLOCK_JOB_2 events of one job type on one disk, in order."""
        return [status for d, t, status in self.block_jobs if d == disk and t == job_type]

    def wait_for_status(self, disk: str, job_type: int, status: str, timeout: float) -> None:
        """Wait for an event (it may trail the call that caused it)."""
        deadline = time.monotonic() + timeout
        while status not in self.statuses(disk, job_type):
            assert time.monotonic() < deadline, f"no {status} event: {self.block_jobs}"
            time.sleep(0.05)


@contextlib.contextmanager
def witnessed(guest: Guest) -> Iterator[Witness]:
    witness = Witness(guest.name)
    try:
        yield witness
    finally:
        witness.close()


# $1 is the folder: the files go into $1/w.
WRITER = """
mkdir -p "$1/w"
i=0
while [ ! -e /tmp/stop-writer ]; do
  dd if=/dev/urandom of="$1/w/f$i" bs=64k count=4 conv=fsync 2>/dev/null || exit 1
  i=$((i+1))
  sleep 0.1
done
echo $i
"""


class GuestWriter:
    """A loop in the guest writing 256 KiB files with fsync every 0.1 s, into FOLDER/w."""

    def __init__(self, guest: Guest, folder: str = "/data") -> None:
        self.guest = guest
        self.folder = f"{folder}/w"
        guest.exec("rm -f /tmp/stop-writer")
        argv = ["-c", WRITER, "sh", folder]
        self.pid = guest.agent("guest-exec", {"path": "/bin/sh", "arg": argv,
                                              "capture-output": True})["pid"]  # fmt: skip
        self.stopped = False

    def files(self) -> int:
        out = self.guest.exec(f"ls '{self.folder}' 2>/dev/null | wc -l").stdout
        return int(out.strip() or 0)

    def wait_for_files(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.files() < count:
            assert time.monotonic() < deadline, f"the writer wrote fewer than {count} files"
            time.sleep(0.2)

    def stop(self, timeout: float = 60) -> int:
        """Stop the loop and return how many files it wrote."""
        self.stopped = True
        self.guest.exec("touch /tmp/stop-writer")
        deadline = time.monotonic() + timeout
        while not (status := self.guest.agent("guest-exec-status", {"pid": self.pid}))["exited"]:
            if time.monotonic() > deadline:
                raise GuestError("the writer in the guest did not stop")
            time.sleep(0.1)
        assert status.get("exitcode") == 0, status
        count = int(base64.b64decode(status.get("out-data", "")).decode().strip())
        assert count == self.files()
        return count


@contextlib.contextmanager
def guest_writing(guest: Guest, folder: str = "/data") -> Iterator[GuestWriter]:
    writer = GuestWriter(guest, folder)
    try:
        yield writer
    finally:
        if not writer.stopped:
            with contextlib.suppress(Exception):
                writer.stop()


# Debian has no usleep, and a sleep forked per tick takes 0.15-0.3 s under TCG on a busy
# host; Perl, always there on Debian, ticks without forking.
PERL_TICKER = r"""
open(my $out, ">", $ARGV[0]) or die "$ARGV[0]: $!";
select $out; $| = 1;
until (-e "/tmp/stop-ticker") {
  open(my $up, "<", "/proc/uptime") or die "/proc/uptime: $!";
  print((split " ", <$up>)[0], "\n");
  close $up;
  select(undef, undef, undef, 0.02);
}
"""
# $1 is the file.
TICKER = f"""
if ! command -v usleep >/dev/null; then exec perl -e '{PERL_TICKER}' "$1"; fi
while [ ! -e /tmp/stop-ticker ]; do
  cut -d' ' -f1 /proc/uptime
  usleep 20000
done > "$1"
"""


class Ticker:
    """The guest's uptime every 20 ms into FOLDER/ticks, until stopped: its stalls, measured."""

    def __init__(self, guest: Guest, folder: str = "/data") -> None:
        self.guest = guest
        self.path = f"{folder}/ticks"
        guest.exec(f"rm -f /tmp/stop-ticker '{self.path}'")
        argv = ["-c", TICKER, "sh", self.path]
        self.pid = guest.agent("guest-exec", {"path": "/bin/sh", "arg": argv})["pid"]

    def stop(self, timeout: float = 30) -> list[float]:
        """Stop it and return the ticks (seconds of guest uptime)."""
        self.guest.exec("touch /tmp/stop-ticker")
        deadline = time.monotonic() + timeout
        while not self.guest.agent("guest-exec-status", {"pid": self.pid})["exited"]:
            if time.monotonic() > deadline:
                raise GuestError("the ticker in the guest did not stop")
            time.sleep(0.1)
        out = self.guest.exec(f"cat '{self.path}'; rm -f '{self.path}'").stdout
        return [float(t) for t in out.split()]


def largest_gap(ticks: list[float]) -> float:
    """The longest time between two consecutive ticks."""
    return max((b - a for a, b in itertools.pairwise(ticks)), default=0.0)


LIVE_STEPS = ["inspect", "estimate", "preflight", "free-space", "snapshot", "rewrite", "verify",
              "swap", "copy", "commit", "cleanup", "restore"]  # fmt: skip


def assert_reclaimed_live(run: RunResult) -> None:
    """``run --live`` reclaimed with no downtime, through every live step in order."""
    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "reclaimed", run.result
    assert run.result["mode"] == "live"
    assert run.result["downtime_s"] == 0
    assert [e["step"] for e in run.events("step.finished")] == LIVE_STEPS


# Kills at random moments: `make test` takes 5 on the busybox guest, `make test-slow` 20 on
# it and 5 on Debian (VR_RANDOM_KILLS); the seed makes a failure reproducible
# (VR_RANDOM_KILL_SEED, printed with each delay).
RANDOM_KILLS = int(os.environ.get("VR_RANDOM_KILLS", "5"))
RANDOM_KILL_SEED = int(os.environ.get("VR_RANDOM_KILL_SEED", "20261203"))
# How long the guest's own stall is measured before the kills.
IDLE_TICK_S = 10.0


@dataclass
class RandomKills:
    """What kill_live_jobs_at_random saw: each kill, and the guest's stalls if measured."""

    outcomes: list[tuple[float, list[tuple[str, str]]]] = field(default_factory=list)
    idle_stall: float | None = None  # the guest's own largest stall, before any job
    recovery_stalls: list[float] = field(default_factory=list)  # the largest in each recover


def kill_live_jobs_at_random(
    guest: Guest,
    state: Path,
    dirty: Callable[[], None],
    kills: int = RANDOM_KILLS,
    ticker_folder: str | None = None,
) -> RandomKills:
    """One live job, measured, then ``kills`` more, each SIGKILLed at a random moment.

    The moment is uniform over twice the first job's duration (later jobs, into an image
    the guest keeps writing, took up to twice as long), after the process's own start:
    kills land inside steps (a convert or compare reading, a block job running, a pivot
    asked for), not at their starts. ``dirty`` gives each job garbage to free. After each
    kill ``recover`` must end the job: the domain running, both definitions naming the
    image alone, no block job, none of the job's files, and a second recover idle.

    With ``ticker_folder`` a Ticker (files in that guest folder) measures the guest's own
    largest stall for IDLE_TICK_S first, then its largest stall during each recovery: a
    recovery finishing a copy or a commit must not stall the guest more than a job does.

    Returns:
        Per kill its delay and the (step, outcome) of each job recovered; the stalls.
    """
    rng = random.Random(RANDOM_KILL_SEED)
    image = guest.data_image
    options = ("--live", "--min-gain", "0", "--state-dir", str(state))
    seen = RandomKills()
    if ticker_folder is not None:
        ticker = Ticker(guest, ticker_folder)
        time.sleep(IDLE_TICK_S)  # a measurement window, not a wait for something
        seen.idle_stall = largest_gap(ticker.stop())
    dirty()
    began = time.monotonic()
    first = reclaim(guest.name, *options)
    assert_reclaimed_live(first)
    startup = time.monotonic() - began - first.result["duration_s"]
    window = 2 * first.result["duration_s"]
    for attempt in range(kills):
        dirty()
        delay = startup + rng.uniform(0, window)
        with killed_if_left_running(start_reclaim(guest.name, *options)) as job:
            try:
                job.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                job.send_signal(signal.SIGKILL)
            job.communicate(timeout=60)
        watching = Ticker(guest, ticker_folder) if ticker_folder is not None else None
        recovered = recover_json(state, timeout=600)
        if watching is not None:
            seen.recovery_stalls.append(largest_gap(watching.stop()))
        where = f"kill {attempt}, {delay:.2f} s in (seed {RANDOM_KILL_SEED}): {recovered}"
        seen.outcomes.append((round(delay, 2), [(r["step"], r["outcome"]) for r in recovered]))
        assert [r["outcome"] for r in recovered] in ([], ["reclaimed"], ["failed"]), where
        assert guest.is_running(), where
        assert chains(guest) == ((str(image),), (str(image),)), where
        assert guest.dom.blockJobInfo("vda", 0) == {}, where
        assert leftovers(image.parent) == [], where
        assert recover_json(state, timeout=600) == [], f"{where}: a second recover found work"
    print(f"\nrandom kills over a {window:.1f} s window: {seen.outcomes}; guest stalls: "
          f"idle {seen.idle_stall}, in each recovery {seen.recovery_stalls}")  # fmt: skip
    return seen


def _daemon_config(folder: Path, state: Path, domain: str | None) -> Path:
    """A daemon that reclaims ``domain`` live in an always-open window; None: no policy."""
    daemon_file = daemon_toml(state)
    policies = {}
    if domain is not None:
        policies["10-live.toml"] = (
            f'[[policy]]\nname = "live"\nmatch.names = ["{domain}"]\nmode = "live"\n'
            'schedule.cron = "* * * * *"\nschedule.window = "10m"\n'
            'schedule.min_interval = "0s"\nidle.required = false\nidle.duration = "2s"\n'
            'rewrite.min_gain = "0"\n'
        )
    return write_config(folder, daemon_file, policies)


def kill_live_daemons_at_random(
    guest: Guest, folder: Path, dirty: Callable[[], None], kills: int = RANDOM_KILLS
) -> list[tuple[float, str]]:
    """The daemon's live job, measured, then ``kills`` more, each daemon SIGKILLed mid-job.

    As kill_live_jobs_at_random, but the process that dies is the daemon (its qemu-img
    and block jobs orphaned), and what recovers is the next daemon, at its start (it logs
    ``daemon.started`` once recovery is done; that one has no policy, so starts no job).

    Returns:
        Per kill: its delay after the job started, and how the killed job ended.
    """
    rng = random.Random(RANDOM_KILL_SEED)
    image = guest.data_image
    state = folder / "state"
    live = _daemon_config(folder / "live", state, guest.name)
    recover_only = _daemon_config(folder / "recover", state, None)
    dirty()
    daemon = DaemonProcess(live)
    try:
        first = daemon.wait_event("job.finished", 300, domain=guest.name, dry_run=None)
        assert first["outcome"] == "reclaimed", daemon.tail()
    finally:
        daemon.stop()
    window = 2 * first["duration_s"]
    outcomes = []
    for attempt in range(kills):
        dirty()
        delay = rng.uniform(0, window)
        daemon = DaemonProcess(live)
        try:
            started = daemon.wait_event("job.started", 120, domain=guest.name, dry_run=None)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not daemon.events(
                "job.finished", job_id=started["job_id"]
            ):
                time.sleep(0.02)
            daemon.proc.kill()
            daemon.wait_exit()
        finally:
            daemon.stop()
        ended = daemon.events("job.finished", job_id=started["job_id"])
        recovering = DaemonProcess(recover_only)
        try:
            recovering.wait_event("daemon.started", 600)
            recovered = recovering.events("recovery.done")
        finally:
            recovering.stop()
        how = (
            ended[0]["outcome"]
            if ended
            else "killed; recovered " + ",".join(str(r.get("outcome")) for r in recovered)
        )
        where = f"daemon kill {attempt}, {delay:.2f} s in (seed {RANDOM_KILL_SEED}): {how}"
        outcomes.append((round(delay, 2), how))
        assert recovering.events("recovery.failed") == [], where
        assert recovering.events("recovery.incomplete") == [], where
        assert guest.is_running(), where
        assert chains(guest) == ((str(image),), (str(image),)), where
        assert guest.dom.blockJobInfo("vda", 0) == {}, where
        assert leftovers(image.parent) == [], where
        assert recover_json(state, timeout=600) == [], f"{where}: a second recover found work"
    print(f"\ndaemons killed at random over a {window:.1f} s window: {outcomes}")
    return outcomes
