"""Fixtures and hooks of every test: none of them imports libvirt.

The real test bed's fixtures (a connection to libvirtd, test guests, daemons) are in
tests/integration/conftest.py: a unit test runs on a host without libvirt's bindings
(tests/unit/project/test_conftest_imports.py checks this file imports none).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Property tests run the same examples every time and are never timed: a test that failed
# once under the parallel phase's load (hypothesis's 200 ms deadline per example) blocks a
# landing as surely as a bug. Speed lives in bench/.
settings.register_profile("suite", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("suite")


@pytest.fixture
def make_tmpfs() -> Iterator[Callable[[str], Path]]:
    """A factory of small tmpfs folders (a filesystem to fill), unmounted after the test.

    They live under the test bed's folder: QEMU (libvirt-qemu) must reach them,
    and pytest's tmp_path is private to root.
    """
    from testbed.guests import RUN_DIR  # noqa: PLC0415 - it imports libvirt: only tmpfs users pay

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
