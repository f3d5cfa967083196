"""Live reclaim on a real guest against a name planted where its overlay 1 goes.

Overlay 1's name is predictable once the job is journaled (it carries the job's id).
libvirt, left to create it, would follow a link planted there; the job creates it
itself (O_EXCL|O_NOFOLLOW) and hands it to libvirt with REUSE_EXT, so a planted link
must fail the job before the snapshot: the link's target (a host canary, a regular
file watched with inotify) never opened nor changed, the guest still running on its
image alone, nothing of the job's left.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fakes import OpenWatch
from testbed import data
from testbed.guests import Guest
from testbed.live import witnessed
from testbed.reclaim import chains, leftovers, parse_run, start_reclaim, wait_for_file
from virt_reclaim.job.modes.overlays import overlay_path
from virt_reclaim.journal.store import Journal

pytestmark = pytest.mark.guest


def test_a_link_planted_at_overlay_1_s_name_is_refused_and_never_followed(
    make_guest: Callable[..., Guest], tmp_path: Path
) -> None:
    guest = make_guest(data_size="64M", discard=True)
    data.write_deleted_random(guest, 8)
    image = guest.data_image
    canary = tmp_path / "host-canary"
    canary.write_bytes(b"host data\n" * 1000)
    canary.chmod(0o600)
    canary_before = canary.stat()
    state, paused, go = tmp_path / "state", tmp_path / "paused", tmp_path / "go"
    env = {"VIRT_RECLAIM_TEST_PAUSE": "snapshot", "VIRT_RECLAIM_TEST_PAUSE_FILE": str(paused),
           "VIRT_RECLAIM_TEST_GO_FILE": str(go)}  # fmt: skip

    watch = OpenWatch(canary)
    try:
        with witnessed(guest) as witness:
            job = start_reclaim(guest.name, "--live", "--min-gain", "0", "--state-dir",
                                str(state), env=env)  # fmt: skip
            try:
                wait_for_file(paused, 300, job)
                # What a local user who read the job's id (log, journal) could do.
                [journaled] = Journal(state).unfinished()
                planted = Path(overlay_path(str(image), journaled.id, 1))
                planted.symlink_to(canary)
                go.touch()
                stdout, stderr = job.communicate(timeout=300)
            except BaseException:
                job.kill()
                job.communicate(timeout=60)
                raise
            witness.assert_never_left_running()
        opened = watch.opened()
    finally:
        watch.close()
    run = parse_run(job.returncode, stdout, stderr)

    assert run.exitcode == 1, run.stderr[-3000:]
    assert run.result["outcome"] == "failed", run.result
    assert f"something is already at {planted}" in run.result["reason"], run.result
    assert [e["step"] for e in run.events("step.failed")] == ["snapshot"], run.log
    assert not opened, "the canary was opened"
    assert canary.read_bytes() == b"host data\n" * 1000
    after = canary.stat()
    assert (after.st_mtime_ns, after.st_mode, after.st_uid) == (
        canary_before.st_mtime_ns, canary_before.st_mode, canary_before.st_uid,
    )  # fmt: skip
    assert guest.is_running()
    assert chains(guest) == ((str(image),), (str(image),))
    assert str(planted) not in guest.dom.XMLDesc(0)
    assert guest.dom.blockJobInfo("vda", 0) == {}
    # The planted link is someone else's: left as it was. Nothing of the job's is left.
    assert planted.is_symlink() and os.readlink(planted) == str(canary)
    assert leftovers(image.parent) == [planted.name]
    assert Journal(state).unfinished() == []
    subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", str(image)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
