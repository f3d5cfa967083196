"""What a test guest's data disk holds from its creation: files made on the host.

Writing a test's starting data through the agent costs the guest's emulated CPU:
32 MiB of text, 8 MiB random kept and 64 MiB random deleted took a busybox guest
5.3 s under TCG, and the suite's parallel phase is bound by CPU. The host writes
the same files in a fraction of that and ``mkfs.ext4 -d`` puts them into the new
filesystem. A deleted file is copied in too and then removed with ``debugfs rm``:
its blocks keep their data in the image and are free for the filesystem, as after
an ``rm`` and a ``sync`` in the guest. Data written while a test runs (during a
job, after a reclaim) is still written by the guest: see testbed.data.
"""

from __future__ import annotations

import hashlib
import os
import random
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


def log_text(size: int, seed: int = 1) -> bytes:
    """Deterministic log-like text of ``size`` bytes; it compresses about 4-6x, like real logs."""
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
