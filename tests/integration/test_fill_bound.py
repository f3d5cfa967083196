"""A zero-fill on a host filesystem too small for it, on real guests (issue 10).

The guest's data image lives on a small tmpfs, and its disk has no discard (nor
detect_zeroes), so each byte a zero-fill writes may allocate a byte on the host.
While `virt-reclaim run` works, a witness samples the tmpfs's free bytes and the
domain's state every 0.1 s and records its lifecycle events: the job must never
take the filesystem below its reserve and QEMU must never pause the guest.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from testbed import data
from testbed.content import Content
from testbed.daemon import DaemonProcess, daemon_toml, write_config
from testbed.guests import URI, Guest
from testbed.reclaim import (
    RunResult,
    host_free,
    killed_if_left_running,
    leftovers,
    parse_run,
    qemu_img_check_clean,
    start_reclaim,
)
from virt_reclaim.virt.events import start_event_loop

pytestmark = pytest.mark.guest

MIB = 1024 * 1024
RESERVE = 64 * MIB
ZERO_FILE = ".virt-reclaim-zero."
JOB_TIMEOUT_S = 300


def guest_free(guest: Guest, mountpoint: str = "/data") -> int:
    """Free bytes of the guest's filesystem, as its agent reports them."""
    for fs in guest.agent("guest-get-fsinfo"):
        if fs.get("mountpoint") == mountpoint:
            return int(fs["total-bytes"]) - int(fs["used-bytes"])
    raise AssertionError(f"{guest.name}: {mountpoint} is not mounted")


class Witness:
    """Samples a host folder's free bytes and the domain's state; records lifecycle events.

    The samples go through the test bed's connection; the events need a connection
    opened after libvirt's event loop started, so the witness opens its own.
    """

    def __init__(self, guest: Guest, folder: Path, poll_s: float = 0.1) -> None:
        self.guest = guest
        self.folder = folder
        self.poll_s = poll_s
        self.free: list[int] = []
        self.states: list[tuple[int, int]] = []
        self.lifecycle: list[tuple[int, int]] = []
        start_event_loop()  # before the connection opens, or it gets no events
        self._conn = libvirt.open(URI)
        self._callback = self._conn.domainEventRegisterAny(
            self._conn.lookupByName(guest.name),
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            lambda _c, _d, event, detail, _o: self.lifecycle.append((event, detail)),
            None,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.free.append(host_free(self.folder))
            with contextlib.suppress(libvirt.libvirtError):
                state, reason = self.guest.dom.state()
                self.states.append((state, reason))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.domainEventDeregisterAny(self._callback)
        self._conn.close()

    def assert_never_paused_nor_below(self, reserve: int) -> None:
        assert len(self.free) > 20, "the witness sampled too little to prove anything"
        assert min(self.free) >= reserve, (
            f"the host filesystem went down to {min(self.free)} bytes free"
        )
        # libvirt starts QEMU paused and resumes it once set up: that pause is no I/O error.
        paused = [
            (state, reason)
            for state, reason in self.states
            if state == libvirt.VIR_DOMAIN_PAUSED
            and reason != libvirt.VIR_DOMAIN_PAUSED_STARTING_UP
        ]
        assert not paused, f"the guest was paused: {paused}"
        suspended = [e for e in self.lifecycle if e[0] == libvirt.VIR_DOMAIN_EVENT_SUSPENDED]
        assert not suspended, f"lifecycle events: {self.lifecycle}"


@contextlib.contextmanager
def witnessed(guest: Guest, folder: Path) -> Iterator[Witness]:
    witness = Witness(guest, folder)
    try:
        yield witness
    finally:
        witness.close()


def reclaim_witnessed(guest: Guest, folder: Path, *options: str) -> tuple[RunResult, Witness]:
    """`virt-reclaim run` in the background, watched by a witness until it ends."""
    with witnessed(guest, folder) as witness:
        job = start_reclaim(guest.name, *options)
        with killed_if_left_running(job):
            stdout, stderr = job.communicate(timeout=JOB_TIMEOUT_S)
    return parse_run(job.returncode, stdout, stderr), witness


def assert_guest_intact(guest: Guest, sums: dict[str, str], folder: Path) -> None:
    qemu_img_check_clean(guest.data_image)
    assert leftovers(folder) == []
    assert guest.is_running()
    guest.wait_agent()
    assert data.checksums(guest) == sums
    assert ZERO_FILE not in guest.exec("ls -a /data").stdout


def fill_options(reserve: str) -> tuple[str, ...]:
    return ("--free-space", "zero", "--host-reserve", reserve, "--min-gain", "0")


def test_zero_fill_fills_what_fits_above_the_reserve_and_never_pauses_the_guest(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path]
) -> None:
    host = make_tmpfs("400M")
    files = Content(text={"app.log": 16}, random={"blob.bin": 8}, deleted_mib=24)
    guest = make_guest(data_size="1G", discard=False, image_dir=host, content=files)
    sums = guest.content_sums
    free_in_guest = guest_free(guest)
    # A full fill would need the whole free space of the guest: the host cannot take it.
    free_before = host_free(host)
    assert free_before < free_in_guest

    run, witness = reclaim_witnessed(guest, host, *fill_options("64MiB"))

    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "reclaimed", run.result
    assert run.result["free_space"] == "zero"
    witness.assert_never_paused_nor_below(RESERVE)
    [done] = run.events("free_space.done")
    # It zero-filled what fits, not everything.
    assert 0 < done["zeroed_bytes"] < free_in_guest, done
    [fill] = done["fills"]
    assert fill["zeroed_bytes"] == fill["limit_bytes"], fill
    # And it did take room on the host: its bound, not a lack of writing, kept the reserve.
    assert min(witness.free) < free_before - 64 * MIB, (free_before, min(witness.free))
    [disk] = run.result["disks"]
    assert disk["bytes_after"] < disk["bytes_before"], disk
    [estimated] = run.events("disk.estimated")
    print(f"\nzeroed {done['zeroed_bytes'] / MIB:.0f} MiB of {free_in_guest / MIB:.0f} MiB free, "
          f"host free at least {min(witness.free) / MIB:.1f} MiB; estimated after "
          f"{disk['estimated_after'] / MIB:.1f} MiB (freed share {estimated['freed_share']}), "
          f"real {disk['bytes_after'] / MIB:.1f} MiB")  # fmt: skip
    assert_guest_intact(guest, sums, host)


def test_zero_fill_that_cannot_fit_is_skipped_with_the_reason(
    make_guest: Callable[..., Guest], make_tmpfs: Callable[[str], Path]
) -> None:
    host = make_tmpfs("240M")  # the rewrite fits beside the reserve; a fill does not
    files = Content(text={"app.log": 8}, deleted_mib=32)
    guest = make_guest(data_size="1G", discard=False, image_dir=host, content=files)
    sums = guest.content_sums

    run, witness = reclaim_witnessed(guest, host, *fill_options("64MiB"))

    # The rewrite still fits: the job compresses what the image holds, without a fill.
    assert run.exitcode == 0, run.stderr
    assert run.result["outcome"] == "reclaimed", run.result
    assert run.result["free_space"] == "none"
    witness.assert_never_paused_nor_below(RESERVE)
    [unavailable] = run.events("free_space.unavailable")
    assert f"no room on the host filesystem of {host}" in unavailable["reason"], unavailable
    assert not any(e.get("zeroed_bytes") for e in run.events("free_space.done"))
    [disk] = run.result["disks"]
    print(f"\n{unavailable['reason']}; estimated after {disk['estimated_after'] / MIB:.1f} MiB, "
          f"real {disk['bytes_after'] / MIB:.1f} MiB")  # fmt: skip
    assert_guest_intact(guest, sums, host)


def test_two_daemon_jobs_whose_rewrites_do_not_fit_together_take_turns(
    make_guest: Callable[..., Guest],
    make_tmpfs: Callable[[str], Path],
    daemons: list[DaemonProcess],
    tmp_path: Path,
) -> None:
    """Two idle guests on one small filesystem, two daemon workers: one job waits for space.

    Each rewrite needs about 100 MiB (its data and the 64 MiB margin): one fits beside
    the 130 MiB reserve, two do not. The second job must wait for the first to end,
    then run; the filesystem never goes below the reserve.
    """
    host = make_tmpfs("400M")
    files = Content(text={"app.log": 8}, random={"blob.bin": 24}, deleted_mib=16)
    folders = [host / "a", host / "b"]
    for folder in folders:
        folder.mkdir(mode=0o755)  # QEMU (libvirt-qemu) must reach the image
    guests = [make_guest(data_size="1G", image_dir=f, content=files) for f in folders]
    daemon_file = daemon_toml(tmp_path / "state", max_concurrent_jobs="2")
    names = ", ".join(f'"{g.name}"' for g in guests)
    policy = (
        f'[[policy]]\nname = "turns"\nmatch.names = [{names}]\nschedule.cron = "* * * * *"\n'
        'schedule.window = "10m"\nidle.duration = "5s"\nidle.cpu_percent = 15\n'
        'free_space.method = "trim"\nfree_space.host_reserve = "130MiB"\n'
        'free_space.host_reserve_percent = 0\nrewrite.min_gain = "0"\nshutdown.timeout = "60s"\n'
    )
    with contextlib.ExitStack() as stack:
        witnesses = [stack.enter_context(witnessed(g, host)) for g in guests]
        daemon = DaemonProcess(write_config(tmp_path / "etc", daemon_file, {"10-t.toml": policy}))
        daemons.append(daemon)
        # The job that does not fit ends skipped and waits: its second try is the reclaim.
        finished = [daemon.wait_event("job.finished", JOB_TIMEOUT_S, domain=g.name,
                                      outcome="reclaimed") for g in guests]  # fmt: skip
        daemon.stop()

    assert all(f["bytes_after"] < f["bytes_before"] for f in finished), finished
    [waited] = daemon.events("job.waiting_for_space")
    [skipped] = daemon.events("job.finished", domain=waited["domain"], outcome="skipped")
    assert "reserved by other jobs" in skipped["reason"], skipped
    for guest, witness, folder in zip(guests, witnesses, folders, strict=True):
        witness.assert_never_paused_nor_below(130 * MIB)
        assert_guest_intact(guest, guest.content_sums, folder)
