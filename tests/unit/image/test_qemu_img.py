"""qemu_img argv builders, and its parsers against real qemu-img runs on images made here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from virt_reclaim.errors import QemuImgError
from virt_reclaim.image import qemu_img, qemu_img_argv
from virt_reclaim.image.imagefile import NewImage

MIB = 1024 * 1024


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def image_json(path: str) -> Any:
    out = subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", path],
                         check=True, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    return json.loads(out)


def test_info_argv_is_exact() -> None:
    assert qemu_img_argv.info_argv("/i.qcow2") == [
        "qemu-img",
        "info",
        "--output=json",
        "--backing-chain",
        "/i.qcow2",
    ]
    assert qemu_img_argv.info_argv(
        "/i.qcow2", qemu_img="/opt/q", backing_chain=False, force_share=True
    ) == ["/opt/q", "info", "--output=json", "-U", "/i.qcow2"]


def test_info_of_a_written_qcow2(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    sh("qemu-io", "-c", "write -P 0xab 0 3M", str(image))
    [layer] = qemu_img.QemuImg().info(str(image))
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
    chain = qemu_img.QemuImg().info(str(top))
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
    assert len(qemu_img.QemuImg().info(str(top), backing_chain=False)) == 1


def test_encrypted_image_is_recognized(tmp_path: Path) -> None:
    # Legacy AES rather than LUKS: creating LUKS benchmarks PBKDF2 against the
    # thread CPU clock, which fails at random in this sandbox ("Unable to get
    # accurate CPU usage"). qemu-img reports both alike ("encrypted": true).
    image = tmp_path / "enc.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw"]
    sh(*create, "-o", "encrypt.format=aes,encrypt.key-secret=s0", str(image), "16M")
    [layer] = qemu_img.QemuImg().info(str(image))
    assert layer.encrypted


def test_zstd_compression_type_is_read(tmp_path: Path) -> None:
    image = tmp_path / "z.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", str(image), "8M")
    assert qemu_img.QemuImg().info(str(image))[0].compression_type == "zstd"


def test_missing_image_raises(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError, match="No such file"):
        qemu_img.QemuImg().info(str(tmp_path / "missing.qcow2"))


def test_missing_program_raises(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError, match="cannot be started"):
        qemu_img.QemuImg(str(tmp_path / "no-qemu-img")).info(str(tmp_path / "x"))


@pytest.mark.parametrize("text", ["", "not json", "{}", '[{"format": "qcow2"}]'])
def test_unexpected_output_raises(text: str) -> None:
    with pytest.raises(QemuImgError):
        qemu_img_argv.parse_info(text)


def test_create_and_convert_argv_are_exact() -> None:
    """The file exists (the job made it): qemu-img creates the qcow2 in it and never the file."""
    assert qemu_img_argv.create_argv(
        "/dev/fd/5", size_bytes=1024, compression="zstd", cluster_size=65536
    ) == [
        "qemu-img", "create", "-q", "-f", "qcow2",
        "-o", "compression_type=zstd,cluster_size=65536", "/dev/fd/5", "1024",
    ]  # fmt: skip
    assert qemu_img_argv.create_argv(
        "/dev/fd/5", size_bytes=1024, compression=None, cluster_size=None, backing="base.qcow2",
        backing_format="raw", preallocation="metadata",
    ) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "raw",
        "-o", "preallocation=metadata", "/dev/fd/5", "1024",
    ]  # fmt: skip
    assert qemu_img_argv.convert_argv("/a.qcow2", "/t", compression="zstd") == [
        "qemu-img", "convert", "-p", "-n", "-f", "qcow2", "-O", "qcow2", "-W", "-m", "8", "-c",
        "--target-is-zero", "/a.qcow2", "/t",
    ]  # fmt: skip
    assert qemu_img_argv.convert_argv(
        "/a.qcow2", "/t", compression=None, backing="base.qcow2", backing_format="raw"
    ) == [
        "qemu-img", "convert", "-p", "-n", "-f", "qcow2", "-O", "qcow2", "-W", "-m", "8",
        "-B", "base.qcow2", "-F", "raw", "/a.qcow2", "/t",
    ]  # fmt: skip


def test_a_target_spec_names_every_format_and_never_a_relative_backing() -> None:
    assert qemu_img_argv.target_spec("/dev/fd/5") == (
        'json:{"driver":"qcow2","file":{"driver":"file","filename":"/dev/fd/5"},"backing":null}'
    )
    spec = json.loads(
        qemu_img_argv.target_spec("/dev/fd/5", backing="/v/b", backing_format="raw")[5:]
    )
    assert spec["backing"] == {"driver": "raw", "file": {"driver": "file", "filename": "/v/b"}}
    with pytest.raises(ValueError, match="without its format"):
        qemu_img_argv.target_spec("/dev/fd/5", backing="/v/b")


def test_rewrite_check_and_compare_on_real_images(tmp_path: Path) -> None:
    image, other = tmp_path / "a.qcow2", tmp_path / "c.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M")
    sh("qemu-io", "-c", "write -P 0x61 0 8M", "-c", "write -P 0 8M 8M", str(image))
    tool = qemu_img.QemuImg()
    progress: list[str] = []
    new = NewImage(str(tmp_path / "b.qcow2"))
    tool.convert(str(image), new, compression="zstd", cluster_size=None, backing=None,
                 backing_format=None, size_bytes=32 * MIB, on_progress=progress.append)  # fmt: skip
    assert "100.00/100%" in "".join(progress)
    tool.check(new, size_bytes=32 * MIB)
    tool.compare(str(image), new, size_bytes=32 * MIB)
    assert new.allocated_bytes() < 2 * MIB  # 8 MiB of one byte, and zeros
    assert image_json(new.path)["format-specific"]["data"]["compression-type"] == "zstd"
    sh("qemu-img", "convert", "-O", "qcow2", str(image), str(other))
    sh("qemu-io", "-c", "write -P 0x62 4M 4k", str(other))
    with pytest.raises(QemuImgError, match="differs"):
        tool.compare(str(image), str(other), size_bytes=32 * MIB)
    assert tool.measure(str(image), force_share=False) >= 8 * MIB


def test_an_overlay_is_rewritten_over_its_own_backing_file_named_as_before(tmp_path: Path) -> None:
    """The header keeps the relative name; check and compare open the base by absolute path."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M")
    sh("qemu-io", "-c", "write -P 0x61 0 8M", str(base))
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    sh("qemu-io", "-c", "write -P 0x62 0 1M", str(top))
    tool = qemu_img.QemuImg()
    new = NewImage(str(tmp_path / ".top.tmp"))
    tool.convert(str(top), new, compression=None, cluster_size=None, backing="base.qcow2",
                 backing_format="qcow2", size_bytes=16 * MIB, on_progress=None)  # fmt: skip
    tool.check(new, size_bytes=16 * MIB)
    tool.compare(str(top), new, size_bytes=16 * MIB, second_backing=str(base),
                 second_backing_format="qcow2")  # fmt: skip
    header = image_json(new.path)
    assert (header["backing-filename"], header["backing-filename-format"]) == (
        "base.qcow2", "qcow2",
    )  # fmt: skip
    assert new.allocated_bytes() < 4 * MIB  # the top layer only


def test_check_reports_a_broken_image(tmp_path: Path) -> None:
    image = tmp_path / "broken.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M")
    sh("qemu-io", "-c", "write 0 1M", str(image))
    # Point the first L1 entry at a cluster beyond the end of the file.
    with image.open("r+b") as f:
        f.seek(40)
        l1_offset = int.from_bytes(f.read(8), "big")
        f.seek(l1_offset)
        f.write((0x8000000000000000 | (1 << 40)).to_bytes(8, "big"))
    with pytest.raises(QemuImgError, match="qemu-img check"):
        qemu_img.QemuImg().check(str(image), size_bytes=16 * MIB)


def test_a_raw_disk_whose_guest_wrote_a_qcow2_header_is_read_as_raw(tmp_path: Path) -> None:
    """The guest's bytes are the guest's: the format comes from the domain XML, never a probe."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"host data the guest must never see" * 1000)
    # What a hostile guest can write into its raw disk: a qcow2 header whose backing
    # file is a host path.
    raw = tmp_path / "guest.raw"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(raw), "1M")
    with raw.open("ab") as f:
        f.truncate(8 * MIB)
    probed = subprocess.run(["qemu-img", "info", "--output=json", str(raw)], capture_output=True,
                            text=True, timeout=60, check=True).stdout  # fmt: skip
    assert str(secret) in probed  # what a probe would have believed

    [layer] = qemu_img.QemuImg().info(str(raw), image_format="raw")
    assert (layer.format, layer.backing_filename) == ("raw", None)
    assert qemu_img_argv.measure_argv(str(raw), image_format="raw")[3:5] == ["-f", "raw"]
    assert qemu_img.QemuImg().measure(str(raw), image_format="raw") > 0
    assert qemu_img_argv.info_argv("/i", image_format="raw")[3:5] == ["-f", "raw"]
