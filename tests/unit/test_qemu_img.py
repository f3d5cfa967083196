"""qemu_img argv builders, and its parsers against real qemu-img runs on images made here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from virt_reclaim import qemu_img

MIB = 1024 * 1024


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def test_info_argv_is_exact() -> None:
    assert qemu_img.info_argv("/i.qcow2") == [
        "qemu-img",
        "info",
        "--output=json",
        "--backing-chain",
        "/i.qcow2",
    ]
    assert qemu_img.info_argv(
        "/i.qcow2", qemu_img="/opt/q", backing_chain=False, force_share=True
    ) == ["/opt/q", "info", "--output=json", "-U", "/i.qcow2"]


def test_info_of_a_written_qcow2(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    sh("qemu-io", "-c", "write -P 0xab 0 3M", str(image))
    [layer] = qemu_img.info(str(image))
    assert layer.format == "qcow2"
    assert layer.virtual_size == 64 * MIB
    assert layer.actual_size == os.stat(image).st_blocks * 512
    assert layer.actual_size >= 3 * MIB
    assert layer.cluster_size == 65536
    assert layer.backing_filename is None
    assert layer.snapshot_count == 0
    assert not layer.encrypted
    assert layer.compression_type == "zlib"
    assert not layer.corrupt


def test_backing_chain_and_internal_snapshots(tmp_path: Path) -> None:
    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "raw", str(base), "32M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(mid))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    sh("qemu-img", "snapshot", "-c", "one", str(top))
    sh("qemu-img", "snapshot", "-c", "two", str(top))
    chain = qemu_img.info(str(top))
    assert [(c.filename, c.format) for c in chain] == [
        (str(top), "qcow2"),
        (str(mid), "qcow2"),
        (str(base), "raw"),
    ]
    assert chain[0].backing_filename == str(mid)
    assert chain[0].backing_format == "qcow2"
    assert chain[0].snapshot_count == 2
    assert chain[1].snapshot_count == 0
    assert chain[2].cluster_size is None
    assert len(qemu_img.info(str(top), backing_chain=False)) == 1


def test_encrypted_image_is_recognized(tmp_path: Path) -> None:
    # Legacy AES rather than LUKS: creating LUKS benchmarks PBKDF2 against the
    # thread CPU clock, which fails at random in this sandbox ("Unable to get
    # accurate CPU usage"). qemu-img reports both alike ("encrypted": true).
    image = tmp_path / "enc.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw"]
    sh(*create, "-o", "encrypt.format=aes,encrypt.key-secret=s0", str(image), "16M")
    [layer] = qemu_img.info(str(image))
    assert layer.encrypted


def test_zstd_compression_type_is_read(tmp_path: Path) -> None:
    image = tmp_path / "z.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(image), "8M")
    assert qemu_img.info(str(image))[0].compression_type == "zstd"


def test_missing_image_raises(tmp_path: Path) -> None:
    with pytest.raises(qemu_img.QemuImgError, match="No such file"):
        qemu_img.info(str(tmp_path / "missing.qcow2"))


def test_missing_program_raises(tmp_path: Path) -> None:
    with pytest.raises(qemu_img.QemuImgError, match="cannot be started"):
        qemu_img.info(str(tmp_path / "x"), qemu_img=str(tmp_path / "no-qemu-img"))


@pytest.mark.parametrize("text", ["", "not json", "{}", '[{"format": "qcow2"}]'])
def test_unexpected_output_raises(text: str) -> None:
    with pytest.raises(qemu_img.QemuImgError):
        qemu_img.parse_info(text)
