"""The demo: two real guests with dirty qcow2 disks, reclaimed by hand, by the daemon, live.

vr-demo-1 runs; vr-demo-2 is shut off. Both hold compressible log text, some
random data, and random data that was written and deleted (still allocated
on the host). The demo shows them with ``virt-reclaim domains --estimate``,
reclaims both with ``virt-reclaim run`` (a dry run first), and shows them again.

Then the daemon at work: vr-demo-1 writes and deletes more and goes quiet, vr-demo-2
starts and keeps its CPU busy, and ``virt-reclaim daemon`` runs in the foreground
with a policy whose window opened at the last full minute: a daemon started inside a
window opens it once it has 10 s of samples to judge idleness. It finds vr-demo-1 idle
and reclaims it (shut down, rewrite, start again), skips the busy vr-demo-2 and
says why; once the job is done the demo stops the daemon (SIGTERM) and shows
``virt-reclaim history`` and the metrics file the daemon wrote.

Last, live mode: vr-demo-1 writes and deletes more, a writer in it writes 256 KiB files,
each fsync'ed, 0.1 s apart, and a ticker reads its /proc/uptime every 20 ms (testbed.live's
GuestWriter and Ticker), and ``virt-reclaim run vr-demo-1 --live`` recompresses its disk
while it runs, its log lines shown. Then the guest's uptime, grown by more than the job
took (no reboot), the ticker's longest gap during the job, the files written during the
job, and their checksums read back from the new image (the guest's page cache dropped)
equal to those they were written with.

Run again to recreate everything; ``--remove`` removes the guests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import libvirt  # noqa: E402

from testbed import data  # noqa: E402
from testbed.daemon import write_config  # noqa: E402
from testbed.guests import RUN_DIR, URI, Guest, create_guest, remove_domain  # noqa: E402
from testbed.live import Ticker, guest_writing, largest_gap  # noqa: E402
from virt_reclaim.units import format_bytes  # noqa: E402

DEMO_GUESTS = ("vr-demo-1", "vr-demo-2")
DAEMON_DIR = RUN_DIR / "vr-demo-daemon"  # its configuration, journal and metrics file
CLI = ROOT / ".venv" / "bin" / "virt-reclaim"
# The window found open at the start opens after 10 s; the job of vr-demo-1 takes well
# under two minutes.
DAEMON_LIMIT_S = 240
# The live job of vr-demo-1 takes well under a minute; a stuck one is stopped (SIGTERM: it
# undoes or finishes what it began) rather than left to hold the demo.
LIVE_LIMIT_S = 300
WRITER_DIR = "/data/w"  # where testbed.live's GuestWriter writes
POLICY = """\
[[policy]]
name = "demo"
match.names = ["vr-demo-*"]
schedule.cron = "* * * * *"    # a window every minute, open now (a real one: "0 1 * * sun")
schedule.window = "10m"
idle.duration = "10s"          # quiet for 10 s counts as idle (a real one: "20m")
idle.cpu_percent = 30.0        # a TCG guest doing nothing uses a few percent for its timers
shutdown.timeout = "60s"
rewrite.min_gain = "32MiB"
"""


def remove_demo(conn: libvirt.virConnect) -> None:
    """Remove the demo guests, their folders and the daemon's folder, if there are any."""
    for name in DEMO_GUESTS:
        remove_domain(conn, name)
        shutil.rmtree(RUN_DIR / name, ignore_errors=True)
    shutil.rmtree(DAEMON_DIR, ignore_errors=True)


def make_dirty_guest(conn: libvirt.virConnect, name: str, *, leave_running: bool) -> Guest:
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
    return guest


def virt_reclaim(*args: str, quiet_log: bool = False) -> int:
    """Run one command as an operator would, showing it first."""
    print(f"\ndemo: $ virt-reclaim {' '.join(args)}", flush=True)
    # For `run`, only the outcome on stdout: its log lines would drown it here.
    extra = ["--log-format", "json"] if quiet_log else []
    stderr = subprocess.DEVNULL if quiet_log else None
    code = subprocess.run([str(CLI), *args, *extra], check=False, stderr=stderr).returncode
    if code != 0:
        print(f"demo: 'virt-reclaim {' '.join(args)}' exited {code}", file=sys.stderr)
    return code


def by_hand() -> int:
    """What the demo always showed: the inventory, a dry run, two reclaims, the inventory."""
    # The guests are small: below run's default minimum gain (64 MiB) once trimmed.
    gain = ["--min-gain", "16MiB"]
    steps = [
        ["domains", "--estimate", "--connect", URI],
        ["run", DEMO_GUESTS[0], "--dry-run", "--connect", URI, *gain],
        ["run", DEMO_GUESTS[0], "--connect", URI, *gain],
        ["run", DEMO_GUESTS[1], "--connect", URI, *gain],
        ["domains", "--connect", URI],
    ]
    for step in steps:
        code = virt_reclaim(*step, quiet_log=step[0] == "run")
        if code != 0:
            return code
    return 0


def the_daemon(idle: Guest, busy: Guest) -> int:
    """The daemon finds the idle guest and reclaims it, and skips the busy one."""
    print("\ndemo: now the daemon. vr-demo-1 writes 96 MiB more log text (a rewrite compresses "
          "it), deletes 32 MiB and goes quiet; vr-demo-2 starts and keeps its CPU busy.",
          flush=True)  # fmt: skip
    data.write_text(idle, "/data/app-2.log", 96)
    data.write_deleted_random(idle, 32)
    busy.start()
    busy.exec("sh -c 'echo $$ >/run/busy.pid; while :; do :; done' >/dev/null 2>&1 &")
    metrics_file = DAEMON_DIR / "node-exporter" / "virt_reclaim.prom"
    metrics_file.parent.mkdir(parents=True, mode=0o755)
    settings = (
        f'uri = "{URI}"\nstate_dir = "{DAEMON_DIR / "state"}"\nstats_interval = "2s"\n'
        f'log_format = "console"\nmetrics_file = "{metrics_file}"\n'
    )
    config_dir = write_config(DAEMON_DIR / "etc", settings, {"10-demo.toml": POLICY})
    print(f"\ndemo: {config_dir}/policies.d/10-demo.toml:\n\n{POLICY}", flush=True)
    try:
        code = run_daemon(config_dir)
    finally:
        busy.exec("kill $(cat /run/busy.pid)", check=False)  # no core left spinning
    if code != 0:
        return code
    code = virt_reclaim("history", "--config-dir", str(config_dir))
    print(f"\ndemo: $ grep -v '^#' {metrics_file}   (node_exporter's textfile collector reads it)")
    for line in metrics_file.read_text().splitlines():
        if not line.startswith("#"):
            print(line)
    return code


def run_daemon(config_dir: Path) -> int:
    """``virt-reclaim daemon`` in the foreground until vr-demo-1's job ended, then SIGTERM."""
    print(f"demo: $ virt-reclaim daemon --config-dir {config_dir}\n"
          "demo: (it is inside the window that opened at the last full minute: window.found_open, "
          "then window.opened once idle.duration of samples are in; the demo "
          "stops it with SIGTERM once the job ended)\n", flush=True)  # fmt: skip
    daemon = subprocess.Popen(
        [str(CLI), "daemon", "--config-dir", str(config_dir)],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    job_ended = threading.Event()

    def echo() -> None:
        for line in daemon.stderr or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            if "job.ended" in line and f"domain={DEMO_GUESTS[0]}" in line:
                job_ended.set()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        if job_ended.wait(DAEMON_LIMIT_S):
            print("\ndemo: the job ended; stopping the daemon (SIGTERM)\n", flush=True)
        else:
            print(f"demo: no job ended within {DAEMON_LIMIT_S} s; stopping the daemon",
                  file=sys.stderr)  # fmt: skip
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the daemon too: it stops safely by itself
        code = daemon.wait()
    reader.join(10)
    if code != 0 or not job_ended.is_set():
        print(f"demo: the daemon exited {code}", file=sys.stderr)
        return code or 1
    return 0


def live(guest: Guest) -> int:
    """The moonshot: vr-demo-1 reclaimed with ``run --live`` while it writes, never stopped."""
    print(f"\ndemo: now live. {guest.name} writes 64 MiB more log text and deletes 32 MiB; "
          f"then a writer in it writes 256 KiB files into {WRITER_DIR}, each fsync'ed, 0.1 s "
          "apart, and a ticker reads its /proc/uptime every 20 ms.", flush=True)  # fmt: skip
    data.write_text(guest, "/data/app-3.log", 64)
    data.write_deleted_random(guest, 32)
    with guest_writing(guest) as writer:
        writer.wait_for_files(2)
        ticker = Ticker(guest)
        files_before, uptime_before = writer.files(), uptime(guest)
        print(f"demo: {guest.name} has been up {uptime_before:.1f} s; "
              f"the writer has written {files_before} files", flush=True)  # fmt: skip
        result = run_live(guest.name)
        uptime_after, files_after = uptime(guest), writer.files()
        ticks = [t for t in ticker.stop() if uptime_before <= t <= uptime_after]
        written = writer.stop()
    if result is None:
        return 1
    print(f"\ndemo: {guest.name}: {result['outcome']} in {result['mode']} mode, downtime "
          f"{result['downtime_s']:.1f} s, duration {result['duration_s']:.1f} s")  # fmt: skip
    for disk in result["disks"]:
        print(f"demo:   {disk['target']}  {format_bytes(disk['bytes_before'])} -> "
              f"{format_bytes(disk['bytes_after'])}")  # fmt: skip
    grew = uptime_after - uptime_before
    print(f"demo: uptime {uptime_before:.1f} s -> {uptime_after:.1f} s: it grew {grew:.1f} s "
          f"over a {result['duration_s']:.1f} s job: "
          f"{'no reboot' if grew >= result['duration_s'] else 'it restarted'}")  # fmt: skip
    print(f"demo: the ticker: {len(ticks)} ticks during the job, the longest gap "
          f"{1000 * largest_gap(ticks):.0f} ms")  # fmt: skip
    read, differ = reread_differs(guest)
    intact = f"{len(differ)} of {read} read back differently: {', '.join(differ[:5])}"
    if not differ:
        intact = (f"all {read} read back from the new image (page cache dropped) with the "
                  "SHA-256 they were written with")  # fmt: skip
    print(f"demo: the writer: {files_after - files_before} files written during the job, "
          f"{written} in all: {intact}", flush=True)  # fmt: skip
    kept = result["outcome"] == "reclaimed" and grew >= result["duration_s"] and not differ
    return 0 if kept else 1


def uptime(guest: Guest) -> float:
    """The guest's own uptime (seconds since it booted), read from /proc/uptime by the agent."""
    return float(guest.exec("cut -d' ' -f1 /proc/uptime").stdout)


def reread_differs(guest: Guest) -> tuple[int, list[str]]:
    """Read the writer's files twice, as written (the page cache), then from the disk.

    Dropping the guest's page cache makes the second read come from the image the live job
    put in place, as a restart would, without restarting the guest the demo shows running.
    Only /data/w: summing the whole /data twice took 20 s under TCG.

    Returns:
        How many files were read, and those whose second SHA-256 differs from the first.
    """
    written = data.checksums(guest, WRITER_DIR)
    guest.exec("sync; echo 3 > /proc/sys/vm/drop_caches")
    read_back = data.checksums(guest, WRITER_DIR)
    return len(written), sorted(p for p in written if read_back.get(p) != written[p])


def run_live(name: str) -> dict[str, Any] | None:
    """``virt-reclaim run NAME --live``, its log lines shown as they come; its JSON result."""
    args = ["run", name, "--live", "--connect", URI, "--min-gain", "0", "--json",
            "--log-format", "console"]  # fmt: skip
    # --min-gain 0: the trim alone frees the deleted data in place, and the estimate of the
    # rewrite's gain (from this small guest's last job) can fall under any fixed minimum;
    # the demo shows every live step. Its log lines here, its result (--json) below.
    print(f"\ndemo: $ virt-reclaim {' '.join(args)}\n", flush=True)
    job = subprocess.Popen([str(CLI), *args], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    def echo_log() -> None:
        for line in job.stderr or ():
            sys.stdout.write(line)
            sys.stdout.flush()

    echo = threading.Thread(target=echo_log, daemon=True)
    echo.start()
    try:
        job.wait(LIVE_LIMIT_S)  # the JSON result on stdout is small: no pipe fills up
    except subprocess.TimeoutExpired:
        print(f"demo: the live job ran over {LIVE_LIMIT_S} s; stopping it", file=sys.stderr)
        job.send_signal(signal.SIGTERM)
        job.wait(LIVE_LIMIT_S)
    echo.join(10)
    out = job.stdout.read() if job.stdout else ""
    if job.returncode != 0 or not out.strip():
        print(f"demo: 'virt-reclaim {' '.join(args)}' exited {job.returncode}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(out)
    return result


def main() -> int:
    """Recreate (or remove) the demo guests, then show them reclaimed: by hand, daemon, live."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--remove", action="store_true", help="remove the demo guests")
    args = parser.parse_args()
    began = time.monotonic()
    conn = libvirt.open(URI)
    try:
        remove_demo(conn)
        if args.remove:
            print("demo: removed " + ", ".join(DEMO_GUESTS))
            return 0
        first = make_dirty_guest(conn, DEMO_GUESTS[0], leave_running=True)
        second = make_dirty_guest(conn, DEMO_GUESTS[1], leave_running=False)
        code = by_hand() or the_daemon(first, second) or live(first)
    finally:
        conn.close()
    print(f"\ndemo: done in {time.monotonic() - began:.0f} s; 'make clean-demo' removes the guests")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
