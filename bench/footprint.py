"""The daemon's footprint with many domains: resident memory, one stats sample, CPU while idle.

Runs `virt-reclaim daemon` against libvirt's test driver with generated
domains (each with a qcow2 disk and an agent channel), every domain selected
by a policy whose window does not open during the run, statistics sampled
every 10 s (six times the default rate, to be on the safe side). Reads the
time of a sample from the daemon's own `stats.sampled` event, its memory and
CPU time from /proc.

    .venv/bin/python bench/footprint.py [--domains 500] [--seconds 60]

Targets (issue 6): RSS under 80 MB, a sample under 100 ms, under 0.5 % of a core idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

TARGET_RSS_MB = 80.0
TARGET_SAMPLE_MS = 100.0
TARGET_CPU_PERCENT = 0.5


def node_xml(count: int) -> str:
    """A test-driver node with ``count`` running domains."""
    domains = []
    for i in range(count):
        domains.append(f"""
  <domain type='test'>
    <name>bench-{i:04d}</name>
    <uuid>{uuid.uuid5(uuid.NAMESPACE_DNS, f"bench-{i}")}</uuid>
    <memory>1048576</memory>
    <vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2' discard='unmap'/>
        <source file='/var/lib/libvirt/images/bench-{i:04d}.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <channel type='unix'>
        <target type='virtio' name='org.qemu.guest_agent.0'/>
      </channel>
    </devices>
  </domain>""")
    return "<node>" + "".join(domains) + "\n</node>\n"


def write_config(folder: Path, node: Path) -> None:
    folder.mkdir(mode=0o700)
    (folder / "virt-reclaim.toml").write_text(
        f'uri = "test://{node}"\nstate_dir = "{folder / "state"}"\n'
        'stats_interval = "10s"\nlog_format = "json"\n'
    )
    (folder / "policies.d").mkdir(mode=0o700)
    (folder / "policies.d" / "10-all.toml").write_text(
        '[[policy]]\nname = "all"\nmatch.names = ["bench-*"]\n'
        # 1 January, 03:00: not during the benchmark.
        'schedule.cron = "0 3 1 1 *"\n'
    )


def proc_stat(pid: int) -> tuple[float, float]:
    """(CPU seconds used, resident MB) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks
    rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return cpu_s, rss_pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle time measured")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vr-footprint-") as tmp:
        root = Path(tmp)
        node = root / "node.xml"
        node.write_text(node_xml(args.domains))
        write_config(root / "etc", node)
        proc = subprocess.Popen(
            [sys.executable, "-m", "virt_reclaim", "daemon", "--config-dir", str(root / "etc")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        events: list[dict[str, Any]] = []

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    print(line, end="", file=sys.stderr)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 120
            while not any(e.get("event") == "stats.sampled" for e in events):
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("the daemon did not sample; its log:", events, file=sys.stderr)
                    return 1
                time.sleep(0.1)
            cpu_before, _ = proc_stat(proc.pid)
            began = time.monotonic()
            time.sleep(args.seconds)
            cpu_after, rss_mb = proc_stat(proc.pid)
            elapsed = time.monotonic() - began
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    sample = next(e for e in events if e.get("event") == "stats.sampled")
    cpu_percent = (cpu_after - cpu_before) / elapsed * 100
    results = {
        "domains": sample["domains"],
        "rss_mb": round(rss_mb, 1),
        "sample_ms": sample["duration_ms"],
        "idle_cpu_percent": round(cpu_percent, 3),
        "measured_s": round(elapsed, 1),
    }
    print(json.dumps(results))
    checks = [
        ("resident memory", results["rss_mb"], TARGET_RSS_MB, "MB"),
        ("one stats sample", results["sample_ms"], TARGET_SAMPLE_MS, "ms"),
        ("CPU while idle", results["idle_cpu_percent"], TARGET_CPU_PERCENT, "% of a core"),
    ]
    met = True
    for name, value, target, unit in checks:
        ok = value < target
        met &= ok
        print(f"{name:18} {value:>8} {unit:12} target < {target:g}  {'ok' if ok else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
