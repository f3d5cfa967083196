"""The start guard against real QEMU tools: a writer is refused, readers are not."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virt_reclaim.image import guard


def qemu_io_write(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image)],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def test_a_guarded_image_cannot_be_opened_for_writing(image: Path) -> None:
    held = guard.ImageGuard()
    held.lock(str(image))
    try:
        refused = qemu_io_write(image)
        assert refused.returncode != 0
        assert 'Failed to get "write" lock' in refused.stderr
        # Readers are fine: qemu-img itself reads the image while it is guarded.
        info = subprocess.run(["qemu-img", "info", str(image)], capture_output=True,
                              timeout=60, check=False)  # fmt: skip
        assert info.returncode == 0
    finally:
        held.release()
    assert qemu_io_write(image).returncode == 0


def test_release_is_idempotent_and_relocking_works(image: Path) -> None:
    held = guard.ImageGuard()
    held.lock(str(image))
    held.lock(str(image))
    assert held.paths == [str(image)]
    held.release()
    held.release()
    assert held.paths == []
    assert qemu_io_write(image).returncode == 0


def test_an_image_open_for_writing_cannot_be_guarded(image: Path) -> None:
    # qemu-io holds the write permission lock while it waits on its stdin.
    pipe = subprocess.PIPE
    argv = ["qemu-io", "-f", "qcow2", str(image)]
    writer = subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=pipe, text=True)
    try:
        assert writer.stdin is not None and writer.stdout is not None
        # Once qemu-io answers a command, it has opened the image (and taken its locks).
        writer.stdin.write("info\n")
        writer.stdin.flush()
        assert "cluster size" in writer.stdout.readline() + writer.stdout.readline()
        assert guard.lock_held(str(image))
        with pytest.raises(guard.GuardError, match="open for writing by another process"):
            guard.ImageGuard().lock(str(image))
    finally:
        writer.kill()
        writer.wait()
    assert not guard.lock_held(str(image))


def test_missing_image_is_a_guard_error(tmp_path: Path) -> None:
    with pytest.raises(guard.GuardError, match="cannot open to lock"):
        guard.ImageGuard().lock(str(tmp_path / "missing.qcow2"))
