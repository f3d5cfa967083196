"""Run a policy's hooks: ``before_shutdown`` right before the guest stops, ``after_job`` last.

A hook is a program run without a shell, through ``process.run`` (its own process
group, killed with every child at the timeout), with the daemon's environment plus
the job's ``VIRT_RECLAIM_*`` variables. Like the policy files, the program must
belong to root (or to the user running virt-reclaim) and not be writable by group or
others, nor its folder: virt-reclaim runs it as root.

A ``before_shutdown`` hook that fails (exit status, timeout, not runnable) skips the
guest before anything changed; an ``after_job`` hook that fails is logged and the
job's outcome stands.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from virt_reclaim import process
from virt_reclaim.errors import VirtReclaimError
from virt_reclaim.job.context import JobContext
from virt_reclaim.job.results import JobAbandoned, JobSkipped, Outcome

BEFORE_SHUTDOWN = "before_shutdown"
AFTER_JOB = "after_job"


@dataclass(frozen=True)
class Ending:
    """How the job ended, as the after_job hook is told."""

    outcome: Outcome
    reason: str
    bytes_before: int
    bytes_after: int | None  # None: no disk was rewritten
    reclaimed: int
    downtime_s: float


class HookFailed(VirtReclaimError):
    """A hook could not run, exited non-zero or timed out; the message says which and why."""


def before_shutdown(job: JobContext, mode: str) -> None:
    """Run the policy's before_shutdown hook, if any, right before the guest is stopped.

    Raises:
        JobSkipped: The hook failed; the guest was not touched.
        JobAbandoned: The job was asked to stop while the hook ran (it was killed).
    """
    argv = job.settings.hooks.before_shutdown
    if not argv:
        return
    try:
        _run(job, BEFORE_SHUTDOWN, argv, _environment(job, BEFORE_SHUTDOWN, mode), cancel=True)
    except process.CommandCancelled as exc:
        raise JobAbandoned(
            "stopped during the before_shutdown hook: the service is stopping"
        ) from exc
    except HookFailed as exc:
        raise JobSkipped(f"{exc}; the guest was left running, nothing changed") from exc


def after_job(job: JobContext, mode: str, ending: Ending) -> None:
    """Run the policy's after_job hook, if any; a failure is logged, never raised.

    It is not cancelled when the service stops: it is what undoes a before hook's work.
    """
    argv = job.settings.hooks.after_job
    if not argv:
        return
    env = _environment(job, AFTER_JOB, mode)
    env.update({
        "VIRT_RECLAIM_OUTCOME": str(ending.outcome),
        "VIRT_RECLAIM_REASON": ending.reason,
        "VIRT_RECLAIM_BYTES_BEFORE": str(ending.bytes_before),
        "VIRT_RECLAIM_BYTES_AFTER": "" if ending.bytes_after is None else str(ending.bytes_after),
        "VIRT_RECLAIM_RECLAIMED_BYTES": str(ending.reclaimed),
        "VIRT_RECLAIM_DOWNTIME_S": f"{ending.downtime_s:.3f}",
    })  # fmt: skip
    with contextlib.suppress(HookFailed):  # logged by _run; the job's outcome stands
        _run(job, AFTER_JOB, argv, env, cancel=False)


def _environment(job: JobContext, phase: str, mode: str) -> dict[str, str]:
    return {
        **os.environ,
        "VIRT_RECLAIM_DOMAIN": job.domain.name,
        "VIRT_RECLAIM_DOMAIN_UUID": job.domain.uuid,
        "VIRT_RECLAIM_JOB_ID": job.job_id,
        "VIRT_RECLAIM_MODE": mode,
        "VIRT_RECLAIM_PHASE": phase,
    }


def _run(
    job: JobContext, phase: str, argv: Sequence[str], env: Mapping[str, str], *, cancel: bool
) -> None:
    """Run one hook; log how it went. Raises HookFailed (logged) or CommandCancelled."""
    timeout = job.settings.hooks.timeout_s
    began = job.clock()
    try:
        program = _trusted_program(argv[0])
        done = process.run([program, *argv[1:]], timeout=timeout, check=False, env=env,
                           cancel=job.stop if cancel else None)  # fmt: skip
    except process.CommandCancelled:
        job.log.warning("hook.failed", phase=phase, program=argv[0], status=None,
                        reason="killed: the service is stopping",
                        duration_s=round(job.clock() - began, 3))  # fmt: skip
        raise
    except process.CommandTimeout as exc:
        why = f"killed after {timeout:g} s timeout{_last_line(exc.stderr)}"
        _failed(job, phase, argv[0], status=None, why=why, began=began)
    except (process.CommandError, HookFailed) as exc:
        _failed(job, phase, argv[0], status=None, why=_message(exc), began=began)
    else:
        if done.returncode != 0:
            why = f"exited with status {done.returncode}{_last_line(done.stderr)}"
            _failed(job, phase, argv[0], status=done.returncode, why=why, began=began)
        job.log.info("hook.done", phase=phase, program=argv[0], status=0,
                     duration_s=round(job.clock() - began, 3))  # fmt: skip


def _failed(
    job: JobContext, phase: str, program: str, *, status: int | None, why: str, began: float
) -> NoReturn:
    job.log.warning("hook.failed", phase=phase, program=program, status=status, reason=why,
                    duration_s=round(job.clock() - began, 3))  # fmt: skip
    raise HookFailed(f"{phase} hook {program}: {why}")


def _message(exc: Exception) -> str:
    """A CommandError's message without the program's name in front (the caller names it)."""
    text = str(exc)
    if isinstance(exc, process.CommandError):
        return text.removeprefix(f"{exc.argv[0]}: ")
    return text


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f": {lines[-1][:200]}" if lines else ""


def _trusted_program(program: str) -> str:
    """The program's absolute path, once it and its folder are safe to run as root.

    Raises:
        HookFailed: Not found, not executable, or writable by someone who is not trusted.
    """
    path = program if program.startswith("/") else shutil.which(program)
    if path is None:
        raise HookFailed(f"{program!r} is not in PATH")
    trusted = {0, os.geteuid()}
    for checked in (path, os.path.dirname(path)):
        try:
            st = os.stat(checked)
        except OSError as exc:
            raise HookFailed(f"{checked}: {exc.strerror}") from None
        if st.st_uid not in trusted:
            raise HookFailed(f"{checked} is owned by uid {st.st_uid}, not root")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise HookFailed(f"{checked} is writable by group or others")
    if not os.access(path, os.X_OK):
        raise HookFailed(f"{path} is not executable")
    return path
