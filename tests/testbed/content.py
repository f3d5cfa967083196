"""What a test guest's data disk holds from its creation: files made on the host.

Writing a test's starting data through the agent costs the guest's emulated CPU:
32 MiB of text, 8 MiB random kept and 64 MiB random deleted took a busybox guest
5.3 s under TCG, and the suite's parallel phase is bound by CPU. The host writes
the same files in a fraction of that and ``mkfs.ext4 -d`` puts them into the new
filesystem. A deleted file is copied in too and then removed with ``debugfs rm``:
its blocks keep their data in the image and are free for the filesystem, as after
an ``rm`` and a ``sync`` in the guest. Data written while a test runs (during a
job, after a reclaim) is still written by the guest: see testbed.data.

The other way round, ``files_in_image`` reads a stopped guest's files from its
image on the host with ``debugfs``: what the image holds, without a boot.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
MOUNTPOINT = "/data"
# The name the deleted data has in the filesystem before debugfs removes it.
DELETED_NAME = "garbage.bin"

_WORDS = (
    "GET", "POST", "PUT", "DELETE", "/api/v1/items", "/api/v1/users", "/healthz", "/login",
    "/static/app.js", "200", "201", "204", "301", "404", "500", "503", "INFO", "WARN",
    "ERROR", "DEBUG", "request", "served", "upstream", "cache", "hit", "miss", "user=alice",
    "user=bob", "user=carol", "latency_ms", "bytes", "referer", "agent=curl/8.5",
)  # fmt: skip


@functools.cache
def log_text(size: int, seed: int = 1) -> bytes:
    """Deterministic log-like text of ``size`` bytes; it compresses about 4-6x, like real logs.

    Kept once made: 32 MiB take 2.8 s of a core, and a dozen fast tests each wanted them.
    """
    rng = random.Random(seed)
    lines = []
    total = 0
    n = 0
    while total < size:
        n += 1
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9)))
        line = (
            f"2026-11-24T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}.{n % 1000:03d}Z "
            f"host-{rng.randint(1, 40):02d} pid={rng.randint(100, 65000)} {words} "
            f"id={rng.getrandbits(32):08x}\n"
        )
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


@dataclass(frozen=True)
class Content:
    """Files in /data from the start, by name: MiB of log text, MiB of random data.

    ``deleted_mib`` MiB of random data were written and deleted: allocated in the
    image, free in the filesystem, for a trim or a zero-fill to find.
    """

    text: Mapping[str, int] = field(default_factory=dict)
    random: Mapping[str, int] = field(default_factory=dict)
    deleted_mib: int = 0

    def write(self, folder: Path) -> dict[str, str]:
        """Write the files into ``folder`` (for ``mkfs.ext4 -d``); the kept ones' SHA-256.

        The checksums are keyed like testbed.data.checksums keys them: /data/NAME.
        """
        folder.mkdir(parents=True, exist_ok=True)
        # Text repeats at a 1 MiB period as testbed.data.write_text writes it: qcow2
        # compresses each cluster on its own, so the ratio is that of text that never repeats.
        sums = {}
        text = log_text(MIB)
        for name, mib in self.text.items():
            sums[f"{MOUNTPOINT}/{name}"] = _write(folder / name, mib, lambda: text)
        for name, mib in self.random.items():
            sums[f"{MOUNTPOINT}/{name}"] = _write(folder / name, mib, lambda: os.urandom(MIB))
        if self.deleted_mib:
            _write(folder / DELETED_NAME, self.deleted_mib, lambda: os.urandom(MIB))
        return sums


def _write(path: Path, mib: int, piece: Callable[[], bytes]) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(mib):
            chunk = piece()
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def files_in_image(
    image: Path, work: Path, root: str = MOUNTPOINT, mountpoint: str = MOUNTPOINT
) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` in a stopped guest's qcow2 image, by path.

    Keyed like testbed.data.checksums keys what the guest reads; ``mountpoint`` is where
    the guest mounts the image's filesystem: its first partition's, or the whole disk's
    when it has no partition table. Reading them this way is a host's ``qemu-img convert``
    and ``debugfs``, where a cold boot to read them in the guest costs a core 5 s for the
    busybox guest and 30-50 s for the Debian one under TCG.
    """
    work.mkdir(parents=True, exist_ok=True)
    # A folder of its own for each call: the same guest may be read more than once.
    out = Path(tempfile.mkdtemp(prefix="files-", dir=work))
    raw = out.with_suffix(".raw")
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
        check=True, timeout=300,
    )  # fmt: skip
    offset = first_partition_offset(raw)
    relative = os.path.relpath(root, mountpoint)
    inside = "/" if relative == "." else f"/{relative}"
    # debugfs reports a failed rdump on stderr with exit status 0: the folder is checked below.
    subprocess.run(
        ["debugfs", "-R", f"rdump {inside} {out}", f"{raw}?offset={offset}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    raw.unlink()
    top = out if inside == "/" else out / Path(inside).name
    if not top.is_dir():
        raise AssertionError(f"{root} is not in {image}")
    return {
        f"{root}/{path.relative_to(top)}": hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(top.rglob("*"))
        if path.is_file()
        and not path.is_symlink()
        and (inside != "/" or path.relative_to(top).parts[0] != "lost+found")
    }


def first_partition_offset(raw: Path) -> int:
    """Where the first partition of an MBR-partitioned raw disk starts, in bytes; else 0.

    The test bed's disks are ext4 on the whole disk, or MBR-partitioned (the Debian
    guest's, see build-debian-guest.sh): no GPT to read.
    """
    with raw.open("rb") as disk:
        sector = disk.read(512)
    kind, start = sector[446 + 4], int.from_bytes(sector[446 + 8 : 446 + 12], "little")
    return start * 512 if sector[510:512] == b"\x55\xaa" and kind != 0 else 0
