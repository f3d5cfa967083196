"""Fixtures of the real test bed: a libvirt connection to the real libvirtd, and test guests."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from hypothesis import settings

from testbed.daemon import DaemonProcess
from testbed.debian import DebianGuest, create_debian_guest, ensure_debian_built
from testbed.guests import (
    RUN_DIR,
    URI,
    Connection,
    Guest,
    create_guest,
    ensure_guest_built,
    ensure_guest_saved,
    sweep_leftovers,
)
from testbed.reclaim import fake_qemu_img

# Property tests run the same examples every time and are never timed: a test that failed
# once under the parallel phase's load (hypothesis's 200 ms deadline per example) blocks a
# landing as surely as a bug. Speed lives in bench/.
settings.register_profile("suite", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("suite")


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    """An open connection to the real libvirtd, with the test guest built and leftovers swept."""
    try:
        conn = Connection(URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd at {URI} does not answer ({exc}); run 'make setup' first")
    ensure_guest_built()
    sweep_leftovers(conn)
    ensure_guest_saved(conn)
    yield conn
    conn.close()


@pytest.fixture
def make_guest(libvirt_conn: Any) -> Iterator[Callable[..., Guest]]:
    """A factory of test guests (see testbed.guests.create_guest); all removed after the test."""
    created: list[Guest] = []

    def factory(**options: Any) -> Guest:
        guest = create_guest(libvirt_conn, **options)
        created.append(guest)
        return guest

    yield factory
    for guest in created:
        guest.remove()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """The daemons a test starts (append them): each stopped after the test."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="session")
def debian_built(libvirt_conn: Any) -> None:
    """The cached Debian guest (testbed/build-debian-guest.sh): built here if setup did not."""
    ensure_debian_built()


@pytest.fixture
def make_debian_guest(
    libvirt_conn: Any, debian_built: None
) -> Iterator[Callable[..., DebianGuest]]:
    """A factory of Debian guests (see testbed.debian.create_debian_guest); removed after."""
    created: list[DebianGuest] = []

    def factory(**options: Any) -> DebianGuest:
        guest = create_debian_guest(libvirt_conn, **options)
        created.append(guest)
        return guest

    yield factory
    for guest in created:
        guest.remove()


@pytest.fixture
def make_tmpfs() -> Iterator[Callable[[str], Path]]:
    """A factory of small tmpfs folders (a filesystem to fill), unmounted after the test.

    They live under the test bed's folder: QEMU (libvirt-qemu) must reach them,
    and pytest's tmp_path is private to root.
    """
    mounted: list[Path] = []

    def factory(size: str) -> Path:
        folder = RUN_DIR / f"tmpfs-{os.getpid()}-{len(mounted)}"
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs",
                        str(folder)], check=True, timeout=30)  # fmt: skip
        mounted.append(folder)
        return folder

    yield factory
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False, timeout=30)
        folder.rmdir()


@pytest.fixture
def paused_qemu_img(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A qemu-img that stops before `convert` until told to go: the real one underneath.

    Yields (the wrapper, the file it creates when paused, the file that releases it).
    """
    paused, go = tmp_path / "paused", tmp_path / "go"
    wrapper = fake_qemu_img(
        tmp_path,
        'if [ "$1" = convert ]; then\n'
        f"  touch {paused}\n"
        f"  i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n"
        "fi\n",
    )
    yield wrapper, paused, go
    go.touch()


# A test slower than this says why in its docstring (a guest boot, a window, a job).
SLOW_TEST_S = 60.0
_durations: dict[str, float] = {}
_reasons: dict[str, str] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[None]:
    """Carry the first line of the test's docstring in its report (to the xdist controller)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip()
    why = ("why", doc.splitlines()[0] if doc else "")
    if why not in report.user_properties:
        report.user_properties.append(why)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add up each test's setup, call and teardown, with the reason it gives."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    _reasons.update((report.nodeid, str(v)) for k, v in report.user_properties if k == "why")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the tests over SLOW_TEST_S with the reason their docstring gives, or none."""
    slow = sorted(((s, n) for n, s in _durations.items() if s > SLOW_TEST_S), reverse=True)
    if not slow:
        return
    terminalreporter.write_sep("=", f"tests over {SLOW_TEST_S:g} s, and why")
    for seconds, nodeid in slow:
        why = _reasons.get(nodeid) or "NO REASON: say why in the test's docstring"
        terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
        terminalreporter.write_line(f"          {why}")
