"""The demo: two real guests with dirty qcow2 disks, reclaimed with ``virt-reclaim run``.

vr-demo-1 runs; vr-demo-2 is shut off. Both hold compressible log text, some
random data, and random data that was written and deleted (still allocated
on the host). The demo shows them with ``virt-reclaim domains``, reclaims
both with ``virt-reclaim run`` (a dry run first), and shows them again.
Run again to recreate them; ``--remove`` removes them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import libvirt  # noqa: E402

from testbed import data  # noqa: E402
from testbed.guests import RUN_DIR, URI, create_guest, remove_domain  # noqa: E402

DEMO_GUESTS = ("vr-demo-1", "vr-demo-2")


def remove_demo(conn: libvirt.virConnect) -> None:
    """Remove the demo guests and their folders, if there are any."""
    for name in DEMO_GUESTS:
        remove_domain(conn, name)
        subprocess.run(["rm", "-rf", str(RUN_DIR / name)], check=True)


def make_dirty_guest(conn: libvirt.virConnect, name: str, *, leave_running: bool) -> None:
    """Create a guest whose disk holds text, random data and deleted random data."""
    print(
        f"demo: creating {name} and writing 64 MiB text, 16 MiB random, 96 MiB random deleted",
        flush=True,
    )
    guest = create_guest(conn, name=name, data_size="1G", discard=True)
    data.write_text(guest, "/data/app.log", 64)
    data.write_random(guest, "/data/blob.bin", 16)
    data.write_deleted_random(guest, 96)
    if not leave_running:
        guest.shutdown()


def main() -> int:
    """Recreate (or remove) the demo guests, then show them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--remove", action="store_true", help="remove the demo guests")
    args = parser.parse_args()
    conn = libvirt.open(URI)
    try:
        remove_demo(conn)
        if args.remove:
            print("demo: removed " + ", ".join(DEMO_GUESTS))
            return 0
        make_dirty_guest(conn, DEMO_GUESTS[0], leave_running=True)
        make_dirty_guest(conn, DEMO_GUESTS[1], leave_running=False)
    finally:
        conn.close()
    steps = [
        ["domains"],
        ["run", DEMO_GUESTS[0], "--dry-run"],
        ["run", DEMO_GUESTS[0]],
        ["run", DEMO_GUESTS[1]],
        ["domains"],
    ]
    cli = ROOT / ".venv" / "bin" / "virt-reclaim"
    for step in steps:
        print(f"\ndemo: $ virt-reclaim {' '.join(step)}", flush=True)
        # Only the outcome on stdout: the JSON log lines would drown it here.
        code = subprocess.run(
            [str(cli), *step, "--connect", URI, *(["--log-format", "json"] if step[0] == "run"
                                                 else [])],
            check=False, stderr=subprocess.DEVNULL if step[0] == "run" else None,
        ).returncode  # fmt: skip
        if code != 0:
            print(f"demo: 'virt-reclaim {' '.join(step)}' exited {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
