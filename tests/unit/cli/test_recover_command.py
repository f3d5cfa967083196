"""``virt-reclaim recover`` prints and exits as before now that outcomes are enums."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from virt_reclaim.job.results import Outcome
from virt_reclaim.job.settings import JobSettings
from virt_reclaim.journal.records import JournalDisk
from virt_reclaim.journal.store import Journal


def recover(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "recover", "--connect", "test:///default",
         "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def killed_in_rewrite(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A state folder whose journal holds an offline job killed while it rewrote."""
    state = tmp_path / "state"
    image, temp = tmp_path / "disk.qcow2", tmp_path / ".disk.qcow2.virt-reclaim-j1.tmp"
    image.write_bytes(b"original")
    temp.write_bytes(b"half written")
    journal = Journal(state)
    journal.begin_job("j1", "vm1", "u1", JobSettings())
    journal.record_for_recovery("j1", "shutoff", [JournalDisk("vda", str(image), str(temp), None)])
    journal.enter_step("j1", "rewrite")
    journal.close()
    return state, image, temp


def test_an_offline_job_killed_in_its_rewrite_is_undone_and_printed_failed(tmp_path: Path) -> None:
    state, image, temp = killed_in_rewrite(tmp_path)

    done = recover(state, "--json")

    assert done.returncode == 0, done.stderr
    [entry] = json.loads(done.stdout)
    assert (entry["job_id"], entry["outcome"], entry["step"]) == ("j1", "failed", "rewrite")
    assert not temp.exists() and image.read_bytes() == b"original"
    [job] = Journal(state).history()
    assert job.outcome is Outcome.FAILED
    assert recover(state).stdout == "nothing to recover\n"


def test_the_text_output_names_the_outcome_as_before(tmp_path: Path) -> None:
    state, _image, temp = killed_in_rewrite(tmp_path)

    done = recover(state)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "vm1: job j1 (interrupted at rewrite): failed"
    assert f"  removed {temp}; " in done.stdout
