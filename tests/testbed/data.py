"""Data profiles written inside a test guest through its agent, and checksums of /data."""

from __future__ import annotations

from testbed.content import log_text
from testbed.guests import Guest

MIB = 1024 * 1024
SEED_PATH = "/tmp/vr-seed.txt"
# In RAM in both guests (busybox: the initramfs; Debian: a tmpfs), so not on the disk.
RANDOM_SEED = "/run/vr-seed.rand"
RANDOM_SEED_MIB = 4


def _repeated(path: str, times: int) -> str:
    """One ``cat`` of ``path`` ``times`` over: a process per copy cost Debian 0.2 s each."""
    return "cat " + " ".join([path] * times)


def write_text(guest: Guest, path: str, size_mib: int) -> None:
    """Write ``size_mib`` MiB of log-like text to ``path`` in the guest, then sync.

    One MiB of text is sent through the agent and repeated in the guest: qcow2
    compresses each cluster on its own, so repetition at a 1 MiB period gives
    the same ratio as text that never repeats.
    """
    guest.write_file(SEED_PATH, log_text(MIB))
    guest.exec(f"{_repeated(SEED_PATH, size_mib)} > '{path}'; sync", timeout=60 + size_mib)


def write_random(guest: Guest, path: str, size_mib: int) -> None:
    """Write ``size_mib`` MiB of incompressible random data to ``path`` in the guest, then sync.

    It is RANDOM_SEED_MIB of /dev/urandom, made once per boot in the guest's RAM
    (/run), repeated: qcow2 compresses each cluster (at most 2 MiB) on its own, so
    the copies stay incompressible. Whole copies by ``cat``, the rest by ``dd bs=1M``:
    busybox's ``head -c`` copies in small pieces, and under TCG it made 64 MiB take
    7.5 s instead of 0.9 s.
    """
    copies, rest = divmod(size_mib, RANDOM_SEED_MIB)
    tail = f"dd if={RANDOM_SEED} bs=1M count={rest} 2>/dev/null; " if rest else ""
    whole = f"{_repeated(RANDOM_SEED, copies)}; " if copies else ""
    guest.exec(
        f"[ -s {RANDOM_SEED} ] || head -c {RANDOM_SEED_MIB * MIB} /dev/urandom > {RANDOM_SEED}; "
        f"{{ {whole}{tail}}} > '{path}'; sync",
        timeout=60 + size_mib,
    )
    size = guest.exec(f"stat -c %s '{path}'").stdout.strip()
    assert size == str(size_mib * MIB), f"{path}: {size} bytes written, not {size_mib} MiB"


def write_deleted_random(guest: Guest, size_mib: int, path: str = "/data/garbage.bin") -> None:
    """Write random data, sync, delete it and sync: its clusters stay allocated on the host."""
    write_random(guest, path, size_mib)
    guest.exec(f"rm -f '{path}'; sync")


def checksums(guest: Guest, root: str = "/data") -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` in the guest, by path."""
    out = guest.exec(
        f"find '{root}' -path '{root}/lost+found' -prune -o -type f -print0 "
        f"| xargs -0 -r sha256sum",
        timeout=300,
    ).stdout
    sums = {}
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        sums[path] = digest
    return sums


def used_bytes(guest: Guest, mountpoint: str = "/data") -> int:
    """Bytes the guest's filesystem at ``mountpoint`` says are used (guest-get-fsinfo)."""
    for fs in guest.agent("guest-get-fsinfo"):
        if fs.get("mountpoint") == mountpoint:
            return int(fs["used-bytes"])
    raise AssertionError(f"{guest.name}: {mountpoint} is not mounted")
