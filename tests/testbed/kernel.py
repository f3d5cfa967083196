"""The test guests' kernel, uncompressed, so that QEMU boots it directly (PVH).

A bzImage boots through SeaBIOS's linuxboot ROM and then decompresses itself; under
TCG that took 3 of the 7 seconds from start to agent of the busybox guest, and the
test suite boots guests a few hundred times. QEMU starts an uncompressed ELF kernel
with a PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``, which Debian's kernels carry) at
that entry directly: the same guest answered in 4 s. The ELF is extracted once beside
the bzImage; a kernel that is not XZ- or gzip-compressed, or has no PVH note, is
booted as it is.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from pathlib import Path

_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08\x00"
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def bootable_kernel(boot_dir: Path) -> Path:
    """``boot_dir``/vmlinux when it can be made from ``boot_dir``/vmlinuz, else vmlinuz."""
    compressed = boot_dir / "vmlinuz"
    uncompressed = boot_dir / "vmlinux"
    if uncompressed.exists() and uncompressed.stat().st_mtime >= compressed.stat().st_mtime:
        return uncompressed
    elf = _decompress(compressed.read_bytes())
    if elf is None or not _has_pvh_entry(elf):
        return compressed
    # Several test workers may get here at once: each writes its own file, the last wins.
    partial = boot_dir / f".vmlinux.{os.getpid()}"
    partial.write_bytes(elf)
    partial.chmod(0o644)
    os.replace(partial, uncompressed)
    return uncompressed


def _decompress(image: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage, or None."""
    if (at := image.find(_XZ_MAGIC)) >= 0:
        try:
            elf = lzma.LZMADecompressor().decompress(image[at:])
        except lzma.LZMAError:
            return None
    elif (at := image.find(_GZIP_MAGIC)) >= 0:
        try:
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(image[at:])
        except zlib.error:
            return None
    else:
        return None
    return elf if elf[:4] == b"\x7fELF" else None


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has a Xen PHYS32_ENTRY note (what PVH boot needs)."""
    if elf[4] != 2 or elf[5] != 1:  # ELFCLASS64, ELFDATA2LSB
        return False
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", elf, 0x20)[0],
        *struct.unpack_from("<HH", elf, 0x36),
    )
    for index in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, size = struct.unpack_from(
            "<IIQQQQ", elf, phoff + index * phentsize
        )
        if p_type == _PT_NOTE and _notes_have_pvh(elf[offset : offset + size]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, note_type = struct.unpack_from("<III", notes, at)
        name = notes[at + 12 : at + 12 + namesz].rstrip(b"\x00")
        if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
