"""Benchmark of reclaim offline and live, without and with a throttle: downtime and stalls.

Two busybox test guests (TCG, 1 vCPU, 256 MiB each) run side by side on the host: the
reclaimed guest, whose 1 GiB data disk keeps 352 MiB (224 MiB of log-like text, 128 MiB of
random data), and a neighbour with its own 1 GiB disk. Each round reclaims the first guest
with `virt-reclaim run` four times: offline and with ``--live``, each without a throttle and
with ``--rate-limit`` (qemu-img convert -r; 20MiB a second unless ``--rate-limit`` says
otherwise). Every run, throttled or not, runs the rewrite under the daemon config's nice and
ionice (nice 10, ionice best-effort level 7 when no config says otherwise). Before each run the
guest writes and deletes 64 MiB of random data and writes 8 MiB of new text: the job's trim
frees the deleted data, and the rewrite converts the rest, about 370 MiB of guest data (about
200 MiB in the compressed image), so that a throttle of 20MiB adds some 15 s to it.

During every run the neighbour, and during live runs the reclaimed guest as well, writes a
256 KiB file with fsync every 0.1 s and records its uptime every 20 ms: the largest gap between
two records is the largest stall the guest saw, and the neighbour's files written per second
of the run (x 256 KiB) is its write throughput. In offline runs the neighbour is watched until
the reclaimed guest's agent answers again, so that its boot counts. A baseline window of the
same load on both guests, without a job, comes first.

Reported per run, as a JSON line and at the end as a markdown table: mode, throttle, job
duration, downtime, image size before and after, the reclaimed guest's largest stall (live runs
only: offline the guest is down), the neighbour's largest stall and its write throughput. The
writer sleeps 0.1 s between files, so the throughput is paced: always below 2.5 MiB/s.

Usage: .venv/bin/python bench/live.py [--rounds N] [--rate-limit 20MiB]
"""

from __future__ import annotations

import argparse
import contextlib
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
FILE_MIB = 0.25  # each file of the writer is 256 KiB
STATE_DIR = "/var/lib/virt-reclaim-bench"
BASELINE_S = 12.0
COLUMNS = ("mode", "throttle", "wall_s", "downtime_s", "before_mib", "after_mib",
           "guest_stall_s", "neighbour_stall_s", "neighbour_mib_s")  # fmt: skip
HEADER = ("mode", "throttle", "wall s", "downtime s", "before MiB", "after MiB",
          "guest stall s", "neighbour stall s", "neighbour MiB/s")  # fmt: skip


def fill(guest: Guest) -> None:
    """The data the guest keeps: 224 MiB of log-like text and 128 MiB of random data.

    The random data is 32 MiB from /dev/urandom four times over (urandom runs at a few MiB/s
    in a TCG guest): qcow2 compresses each cluster on its own, so it stays incompressible.
    """
    data.write_text(guest, "/data/app.log", 224)
    data.write_random(guest, "/data/random.seed", 32)
    guest.exec("for i in 1 2 3 4; do cat /data/random.seed; done > /data/blob.bin; "
               "rm -f /data/random.seed; sync", timeout=300)  # fmt: skip


def dirty(guest: Guest) -> None:
    """The same work for every run: 64 MiB of deleted random data, 8 MiB of new text.

    The deleted data is a copy of the kept random data: as incompressible, and far quicker
    to write than fresh urandom.
    """
    guest.exec("rm -rf /data/w")  # the writer's files of the run before
    guest.exec(f"head -c {64 * MIB} /data/blob.bin > /data/garbage.bin; sync; "
               "rm -f /data/garbage.bin; sync", timeout=300)  # fmt: skip
    data.write_text(guest, "/data/round.log", 8)


class Load:
    """A guest writing and ticking from now until finish(): its largest stall and throughput."""

    def __init__(self, guest: Guest, stack: contextlib.ExitStack) -> None:
        guest.exec("rm -rf /data/w")  # the writer's files of the window before
        self.writer = stack.enter_context(guest_writing(guest))
        self.writer.wait_for_files(2)
        self.ticker = Ticker(guest)
        self.files, self.since = self._count()

    def _count(self) -> tuple[int, float]:
        """The files written so far, and when: the middle of the agent call that counted them."""
        before = time.monotonic()
        files = self.writer.files()
        return files, (before + time.monotonic()) / 2

    def finish(self) -> tuple[float, float]:
        """Stop the load; return its largest stall in s and its write throughput in MiB/s."""
        files, until = self._count()
        ticks = self.ticker.stop()
        self.writer.stop()
        return largest_gap(ticks), (files - self.files) * FILE_MIB / (until - self.since)


def baseline(guest: Guest, neighbour: Guest) -> dict[str, object]:
    """The same load on both guests for BASELINE_S, without any job."""
    with contextlib.ExitStack() as stack:
        near = Load(neighbour, stack)
        own = Load(guest, stack)
        time.sleep(BASELINE_S)  # the measurement window itself, not a wait for something
        near_stall, near_rate = near.finish()
        own_stall, _ = own.finish()
    return {
        "mode": "no job (baseline)",
        "throttle": "-",
        "guest_stall_s": round(own_stall, 3),
        "neighbour_stall_s": round(near_stall, 3),
        "neighbour_mib_s": round(near_rate, 2),
    }


def run_job(guest: Guest, neighbour: Guest, mode: str, rate_limit: str | None) -> dict[str, object]:
    argv = [sys.executable, "-m", "virt_reclaim", "run", guest.name, "--json", "--connect", URI,
            "--min-gain", "0", "--log-format", "json", "--state-dir", STATE_DIR]  # fmt: skip
    if mode == "live":
        argv.append("--live")
    if rate_limit:
        argv += ["--rate-limit", rate_limit]
    with contextlib.ExitStack() as stack:
        near = Load(neighbour, stack)
        # Live, the guest keeps running: its writes and its clock are watched through the job.
        # Offline it goes down: its downtime is the figure, from the job itself.
        own = Load(guest, stack) if mode == "live" else None
        began = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
        elapsed = time.monotonic() - began
        if own is None:
            guest.wait_agent()  # its boot weighs on the neighbour too
        near_stall, near_rate = near.finish()
        own_stall = own.finish()[0] if own is not None else None
    result: dict[str, Any] = (
        json.loads(proc.stdout) if proc.stdout.strip() else {"outcome": proc.stderr[-300:]}
    )
    [disk] = result.get("disks") or [{}]
    return {
        "mode": mode,
        "throttle": rate_limit or "none",
        "outcome": result.get("outcome"),
        "wall_s": round(elapsed, 1),
        "downtime_s": result.get("downtime_s"),
        "before_mib": round(int(disk.get("bytes_before") or 0) / MIB, 1),
        "after_mib": round(int(disk.get("bytes_after") or 0) / MIB, 1),
        "guest_stall_s": round(own_stall, 3) if own_stall is not None else None,
        "neighbour_stall_s": round(near_stall, 3),
        "neighbour_mib_s": round(near_rate, 2),
    }


def print_table(rows: list[dict[str, object]]) -> None:
    print("\n| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        cells = ("-" if row.get(k) is None else str(row[k]) for k in COLUMNS)
        print("| " + " | ".join(cells) + " |")
    failed = [row for row in rows if row.get("outcome", "reclaimed") != "reclaimed"]
    for row in failed:
        print(f"\nnot reclaimed: {row['mode']}, throttle {row['throttle']}: {row['outcome']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.rsplit("\nUsage:", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of four runs (default: 2)")
    parser.add_argument(
        "--rate-limit", default="20MiB", metavar="BYTES_PER_S",
        help="the throttle of the throttled runs, passed to `run --rate-limit` (qemu-img "
        "convert -r), e.g. 20MiB (default: 20MiB)",
    )  # fmt: skip
    args = parser.parse_args()
    ensure_guest_built()
    conn = Connection(URI)
    started = time.monotonic()
    with contextlib.ExitStack() as guests:
        guest = create_guest(conn, data_size="1G", discard=True)
        guests.callback(guest.remove)
        neighbour = create_guest(conn, data_size="1G", discard=True)
        guests.callback(neighbour.remove)
        fill(guest)
        print(f"guests up and filled in {time.monotonic() - started:.0f} s", flush=True)
        rows = [baseline(guest, neighbour)]
        print(json.dumps(rows[0]), flush=True)
        for n in range(1, args.rounds + 1):
            round_began = time.monotonic()
            for mode in ("offline", "live"):
                for rate_limit in (None, args.rate_limit):
                    dirty(guest)
                    rows.append(run_job(guest, neighbour, mode, rate_limit))
                    print(json.dumps(rows[-1]), flush=True)
            print(f"round {n}: {time.monotonic() - round_began:.0f} s", flush=True)
        print_table(rows)
    print(f"\ntotal: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
