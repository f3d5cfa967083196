"""The one hierarchy of ``errors.py``: every exception the package defines is a VirtReclaimError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import virt_reclaim
from virt_reclaim.cli.common import Terminated
from virt_reclaim.errors import JobOutcome, VirtReclaimError
from virt_reclaim.job.results import (
    FreedInPlace,
    JobAbandoned,
    JobFailed,
    JobSkipped,
    JobUnfinished,
    NothingToDo,
    SpaceTaken,
)

# SIGTERM must unwind the way Ctrl-C does, past every ``except Exception``.
OUTSIDE = {Terminated}


def defined_exceptions() -> set[type[BaseException]]:
    """Every exception class defined in a module of the package (``__main__``s not run)."""
    found: set[type[BaseException]] = set()
    for info in pkgutil.walk_packages(virt_reclaim.__path__, "virt_reclaim."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found.add(value)
    return found


def test_every_exception_of_the_package_is_a_virt_reclaim_error() -> None:
    found = defined_exceptions()
    assert {JobFailed, FreedInPlace, Terminated} <= found  # the walk reached job/ and cli/
    outside = {cls.__qualname__ for cls in found - OUTSIDE if not issubclass(cls, VirtReclaimError)}
    assert outside == set()


def test_the_job_outcomes_are_a_branch_apart_from_the_errors() -> None:
    outcomes = {JobSkipped, SpaceTaken, NothingToDo, FreedInPlace, JobAbandoned}
    assert all(issubclass(cls, JobOutcome) for cls in outcomes)
    assert not issubclass(JobFailed, JobOutcome)
    assert not issubclass(JobUnfinished, JobOutcome)


def test_freed_in_place_is_a_success_not_nothing_to_do() -> None:
    assert not issubclass(FreedInPlace, NothingToDo)
