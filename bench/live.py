"""Benchmark of live against offline reclaim: guest downtime and the guest's largest stall.

One busybox test guest (TCG) with the same data profile is reclaimed by `run` in each
mode in turn, round after round; while each job runs, the guest writes a 256 KiB file
with fsync every 0.1 s and records its uptime every 20 ms, so that the largest gap
between two records is the largest stall it saw. A baseline of the same load without a
job gives the guest's own stall. With ``--rate-limit`` each run also passes
``--rate-limit`` (qemu-img convert -r), to show the throttle's effect.

Reported per run: mode, job duration, downtime, bytes before and after, largest stall.

Usage: .venv/bin/python bench/live.py [--rounds N] [--rate-limit 20MiB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testbed import data  # noqa: E402
from testbed.guests import URI, Connection, Guest, create_guest, ensure_guest_built  # noqa: E402
from testbed.live import Ticker, guest_writing, largest_gap  # noqa: E402

MIB = 1024 * 1024
STATE_DIR = "/var/lib/virt-reclaim-bench"


def dirty(guest: Guest) -> None:
    """The same work for every run: 64 MiB of deleted random data, 8 MiB of new text."""
    guest.exec("rm -rf /data/w")  # the writer's files of the run before
    data.write_deleted_random(guest, 64)
    data.write_text(guest, "/data/round.log", 8)


def run_job(guest: Guest, mode: str, rate_limit: str | None) -> dict[str, object]:
    argv = [sys.executable, "-m", "virt_reclaim", "run", guest.name, "--json", "--connect", URI,
            "--min-gain", "0", "--log-format", "json", "--state-dir", STATE_DIR]  # fmt: skip
    if mode == "live":
        argv.append("--live")
    if rate_limit:
        argv += ["--rate-limit", rate_limit]
    ticks: list[float] = []
    began = time.monotonic()
    if mode == "live":
        # The guest keeps running: its writes and its clock are watched through the job.
        with guest_writing(guest) as writer:
            writer.wait_for_files(2)
            ticker = Ticker(guest)
            began = time.monotonic()
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
            elapsed = time.monotonic() - began
            ticks = ticker.stop()
            writer.stop()
    else:
        # Offline, the guest goes down: its downtime is the figure, from the job itself.
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
        elapsed = time.monotonic() - began
        guest.wait_agent()
    result: dict[str, Any] = (
        json.loads(proc.stdout) if proc.stdout.strip() else {"outcome": proc.stderr[-300:]}
    )
    [disk] = result.get("disks") or [{}]
    return {
        "mode": mode,
        "outcome": result.get("outcome"),
        "wall_s": round(elapsed, 1),
        "downtime_s": result.get("downtime_s"),
        "before_mib": round(int(disk.get("bytes_before") or 0) / MIB, 1),
        "after_mib": round(int(disk.get("bytes_after") or 0) / MIB, 1),
        "largest_stall_s": round(largest_gap(ticks), 3) if ticks else None,
    }


def baseline_stall(guest: Guest, seconds: float = 12) -> float:
    """The guest's own largest stall under the same write load, without any job."""
    with guest_writing(guest) as writer:
        writer.wait_for_files(2)
        ticker = Ticker(guest)
        time.sleep(seconds)  # the measurement window itself, not a wait for something
        ticks = ticker.stop()
        writer.stop()
    return largest_gap(ticks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate-limit", default=None, help="e.g. 20MiB (qemu-img convert -r)")
    args = parser.parse_args()
    ensure_guest_built()
    conn = Connection(URI)
    guest = create_guest(conn, data_size="1G", discard=True)
    try:
        data.write_text(guest, "/data/app.log", 64)
        data.write_random(guest, "/data/blob.bin", 16)
        print(f"baseline: largest stall without a job {baseline_stall(guest):.3f} s", flush=True)
        guest.exec("rm -rf /data/w")
        rows = []
        for _round in range(args.rounds):
            for mode in ("offline", "live"):
                dirty(guest)
                row = run_job(guest, mode, args.rate_limit)
                print(json.dumps(row), flush=True)
                rows.append(row)
        print("\n| mode | wall s | downtime s | before MiB | after MiB | largest stall s |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            cells = [row[k] for k in ("mode", "wall_s", "downtime_s", "before_mib", "after_mib",
                                      "largest_stall_s")]  # fmt: skip
            print("| " + " | ".join(str(c) for c in cells) + " |")
    finally:
        guest.remove()


if __name__ == "__main__":
    main()
