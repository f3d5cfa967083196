"""Running `virt-reclaim run` as operators do, and the facts every reclaim test asserts."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from testbed.guests import TESTBED_DIR, URI, Guest
from virt_reclaim.domxml.read import parse_domain

# One journal for the test bed's jobs; a test that needs its own passes --state-dir.
STATE_DIR = TESTBED_DIR / "state"


@dataclass(frozen=True)
class RunResult:
    exitcode: int
    result: dict[str, Any]
    log: list[dict[str, Any]]
    stderr: str

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("event") == name]


def run_argv(domain: str, *options: str) -> list[str]:
    """``virt-reclaim run DOMAIN --json`` with JSON log lines, against the test bed's libvirtd."""
    state = [] if "--state-dir" in options else ["--state-dir", str(STATE_DIR)]
    return [sys.executable, "-m", "virt_reclaim", "run", domain, "--json", "--connect", URI,
            "--log-format", "json", *state, *options]  # fmt: skip


def reclaim(domain: str, *options: str, timeout: float = 600) -> RunResult:
    """Run ``virt-reclaim run`` to its end and parse its result and its JSON log lines."""
    proc = subprocess.run(
        run_argv(domain, *options), capture_output=True, text=True, timeout=timeout, check=False
    )
    return parse_run(proc.returncode, proc.stdout, proc.stderr)


def start_reclaim(
    domain: str, *options: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``virt-reclaim run`` in the background (to act on the guest while it works)."""
    pipe = subprocess.PIPE
    return subprocess.Popen(run_argv(domain, *options), stdout=pipe, stderr=pipe, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip


@contextmanager
def killed_if_left_running(job: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Hold a background job; if the block ends (an assertion failed) while it runs, kill it."""
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate(timeout=60)


def parse_run(exitcode: int, stdout: str, stderr: str) -> RunResult:
    log = []
    for line in stderr.splitlines():
        try:
            log.append(json.loads(line))
        except ValueError:
            continue
    result = json.loads(stdout) if stdout.strip() else {}
    return RunResult(exitcode, result, log, stderr)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, st.st_mode


def qemu_img_check_clean(path: Path) -> None:
    argv = ["qemu-img", "check", "-U", "--output=json", str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    report = json.loads(out)
    assert not report.get("corruptions") and not report.get("leaks"), report
    assert not report.get("check-errors"), report


def image_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
    info: dict[str, Any] = json.loads(out)
    return info


def sources(guest: Guest) -> tuple[str | None, str | None]:
    """The disk's source in the live and in the persistent XML."""
    live, persistent = chains(guest)
    return live[0], persistent[0]


def chains(guest: Guest, target: str = "vda") -> tuple[tuple[str | None, ...], ...]:
    """The disk's images, top first with its backing stores, in the live and the persistent XML."""
    found = []
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        [disk] = [d for d in parse_domain(guest.dom.XMLDesc(flags)).disks if d.target == target]
        found.append(disk.chain)
    return tuple(found)


def offline_size(image: Path, tmp: Path) -> int:
    """What an offline zstd rewrite makes of the same image now."""
    out = tmp / "offline.qcow2"
    argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", "-c", "-o",
            "compression_type=zstd", str(image), str(out)]  # fmt: skip
    subprocess.run(argv, check=True, timeout=300)
    size = os.stat(out).st_blocks * 512
    out.unlink()
    return size


def recover_json(state_dir: Path, timeout: float = 300) -> list[dict[str, Any]]:
    """``virt-reclaim recover --json`` on the journal in ``state_dir``; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "recover", "--json", "--connect", URI,
         "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def backups_json(state_dir: Path, *options: str) -> dict[str, Any]:
    """``virt-reclaim backups --json`` (with ``options``) on the journal in ``state_dir``."""
    proc = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "backups", "--json", "--state-dir",
         str(state_dir), *options],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def leftovers(folder: Path) -> list[str]:
    """Temporary or backup files a job left beside its images."""
    return sorted(p.name for p in folder.iterdir() if ".virt-reclaim-" in p.name)


def wait_for_file(path: Path, timeout: float, job: subprocess.Popen[str] | None = None) -> None:
    """Poll for ``path`` with a deadline (a wrapper or the pause hook creates it).

    With ``job`` (the process that is to create it), fail at once if it ends first (it
    will never come), and kill it at the deadline: either way, with what it logged.
    """
    deadline = time.monotonic() + timeout
    while not path.exists():
        late = time.monotonic() >= deadline
        if job is not None and (late or job.poll() is not None):
            if late:
                job.kill()
            stdout, stderr = job.communicate(timeout=60)
            why = f"did not appear within {timeout} s" if late else "never came: the job ended"
            raise AssertionError(f"{path} {why} ({job.returncode})\n{stdout}\n{stderr[-5000:]}")
        assert not late, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def fake_qemu_img(folder: Path, prelude: str) -> Path:
    """A `qemu-img` that runs the shell ``prelude`` (with the arguments as $@), then the real one.

    Tests pass it with --qemu-img to pause, slow down or fail one subcommand.
    """
    wrapper = folder / "qemu-img"
    wrapper.write_text(f'#!/bin/sh\n{prelude}exec qemu-img "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def host_free(folder: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``folder``."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
