"""The zero-fill reports each guest filesystem as a record, logged with the keys it always had."""

from __future__ import annotations

import threading

from fakes import MIB
from virt_reclaim.errors import AgentUnavailable
from virt_reclaim.job.freespace.agent import FilledFilesystem, trim, zero_fill
from virt_reclaim.job.freespace.budget import Fill
from virt_reclaim.job.settings import FreeSpaceMethod
from virt_reclaim.model import GuestExecResult, TrimmedPath


class ScriptedAgent:
    """An agent whose fills report what it is told, filesystem by filesystem."""

    def __init__(self, answers: list[GuestExecResult | AgentUnavailable]) -> None:
        self.answers = answers
        self.filled: list[str] = []

    def guest_exec(
        self, path: str, args: list[str], timeout: float, cancel: threading.Event | None = None
    ) -> GuestExecResult:
        self.filled.append(args[3])  # the script's mountpoint argument
        answer = self.answers.pop(0)
        if isinstance(answer, AgentUnavailable):
            raise answer
        return answer

    def fstrim(self, timeout: float = 600.0) -> list[TrimmedPath]:
        raise AssertionError("a zero-fill does not trim")


def test_each_fill_is_logged_with_the_old_keys_and_skipped_only_when_skipped() -> None:
    agent = ScriptedAgent([GuestExecResult(0, None, f"zeroed {40 * MIB}\n", "")])
    fills = [Fill("/", 0, 300 * MIB, "the guest's share"), Fill("/data", 64 * MIB, 100 * MIB)]

    result = zero_fill(agent, fills, timeout=60)

    assert agent.filled == ["/data"]
    assert [f.to_json() for f in result.fills] == [
        {"mountpoint": "/", "limit_bytes": 0, "zeroed_bytes": 0, "left_bytes": 300 * MIB,
         "skipped": "the guest's share"},
        {"mountpoint": "/data", "limit_bytes": 64 * MIB, "zeroed_bytes": 40 * MIB,
         "left_bytes": 60 * MIB},
    ]  # fmt: skip
    assert result.zeroed_bytes == 40 * MIB
    assert (result.method, result.filesystems, result.problem) == (
        FreeSpaceMethod.ZERO,
        ("/data",),
        None,
    )


def test_a_skipped_fill_without_a_reason_still_logs_the_key() -> None:
    entry = FilledFilesystem("/", 0, 0, 10, None)

    assert entry.to_json() == {"mountpoint": "/", "limit_bytes": 0, "zeroed_bytes": 0,
                               "left_bytes": 10, "skipped": None}  # fmt: skip


def test_a_fill_the_agent_refuses_is_reported_with_nothing_zeroed() -> None:
    agent = ScriptedAgent([AgentUnavailable("guest-exec is disabled")])

    result = zero_fill(agent, [Fill("/data", 64 * MIB, 100 * MIB)], timeout=60)

    assert result.fills == [FilledFilesystem("/data", 64 * MIB, 0, 100 * MIB)]
    assert result.method is FreeSpaceMethod.NONE and result.zeroed_bytes == 0
    assert result.problem == "zero-fill of /data: guest-exec is disabled"


def test_a_fill_that_fails_keeps_what_it_zeroed() -> None:
    agent = ScriptedAgent([GuestExecResult(1, None, f"zeroed {8 * MIB}\n", "dd: no space")])

    result = zero_fill(agent, [Fill("/data", 64 * MIB, 100 * MIB)], timeout=60)

    assert result.fills == [FilledFilesystem("/data", 64 * MIB, 8 * MIB, 92 * MIB)]
    assert result.problem == "zero-fill of /data: exited 1: dd: no space"


def test_a_trim_reports_its_method_as_the_enum_of_the_old_string() -> None:
    class Trimming(ScriptedAgent):
        def fstrim(self, timeout: float = 600.0) -> list[TrimmedPath]:
            return [TrimmedPath("/", 5 * MIB, None)]

    result = trim(Trimming([]), ["/"], timeout=60)

    assert result.method is FreeSpaceMethod.TRIM and str(result.method) == "trim"
    assert (result.trimmed_bytes, result.problem, result.fills) == (5 * MIB, None, [])
