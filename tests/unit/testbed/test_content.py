"""The test bed's host-side reading of a stopped guest's files (testbed.content.files_in_image)."""

from __future__ import annotations

from pathlib import Path

from testbed.content import Content, files_in_image
from testbed.guests import make_data_image, run_host


def test_the_files_of_a_data_disk_are_read_as_the_guest_would_key_them(tmp_path: Path) -> None:
    files = Content(text={"app.log": 2}, random={"blob.bin": 1}, deleted_mib=1)
    sums = files.write(tmp_path / "files")
    (tmp_path / "files" / "sub").mkdir()
    (tmp_path / "files" / "sub" / "empty").touch()
    image = tmp_path / "data.qcow2"
    make_data_image(image, "32M", files=tmp_path / "files", deleted="garbage.bin")

    read = files_in_image(image, tmp_path / "read")

    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert read == {**sums, "/data/sub/empty": empty}


def test_a_folder_of_a_partitioned_disk_is_read_from_its_first_partition(tmp_path: Path) -> None:
    tree = tmp_path / "root"
    (tree / "srv" / "app").mkdir(parents=True)
    (tree / "srv" / "app" / "kept").write_bytes(b"kept\n")
    (tree / "etc").mkdir()
    (tree / "etc" / "elsewhere").write_bytes(b"not under the folder\n")
    raw = tmp_path / "disk.raw"
    run_host("truncate", "-s", "40M", str(raw))
    # One MBR entry, as build-debian-guest.sh writes it: type 0x83 from sector 2048.
    entry = bytes([0, 0xFE, 0xFF, 0xFF, 0x83, 0xFE, 0xFF, 0xFF])
    entry += (2048).to_bytes(4, "little") + (60 * 2048).to_bytes(4, "little")
    with raw.open("r+b") as disk:
        disk.seek(446)
        disk.write(entry)
        disk.seek(510)
        disk.write(b"\x55\xaa")
    run_host("mkfs.ext4", "-q", "-F", "-d", str(tree), "-E", "offset=1048576", str(raw), "30M")
    image = tmp_path / "disk.qcow2"
    run_host("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))

    read = files_in_image(image, tmp_path / "read", "/srv/app", mountpoint="/")

    assert read == {
        "/srv/app/kept": "78051faade059d70866df6a3fb83ef348721fd74a87e93ef95c493f87d0d236b"
    }
