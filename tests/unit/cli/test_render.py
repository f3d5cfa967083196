"""Reclaimable space before any window: ``domains --estimate`` and the totals of ``plan``.

``domains --estimate`` runs against libvirt's test driver over a real image (the
dry run reads it with the real qemu-img); a real guest's estimate is checked in
tests/integration/test_daemon_metrics.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from virt_reclaim.cli.render import print_plan
from virt_reclaim.config.policy import Policy
from virt_reclaim.job.results import DiskResult, SkippedDisk
from virt_reclaim.reports import layout
from virt_reclaim.reports.plan import PlanDisk, PlanEntry, _plan_disk

MIB = 1024 * 1024
NODE = """<node>
<domain type='test'><name>alpha</name><memory>1024</memory><os><type>hvm</type></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'><host name='mon1'/></source>
  <target dev='vdb' bus='virtio'/></disk>
</devices></domain>
<domain type='test'><name>beta</name><memory>1024</memory><os><type>hvm</type></os>
<devices/></domain>
</node>"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virt_reclaim", *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_domains_estimate_adds_a_reclaimable_column_and_json_key(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    # 16 MiB of one byte pattern: compression frees nearly all of it.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 16M", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    node = tmp_path / "node.xml"
    node.write_text(NODE.format(image=image))
    uri = f"test://{node}"
    no_config = str(tmp_path / "etc")

    table = cli("domains", "--estimate", "--connect", uri, "--config-dir", no_config)
    as_json = cli("domains", "--estimate", "--json", "--connect", uri, "--config-dir", no_config)
    plain = cli("domains", "--connect", uri)

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = lines[0].split()
    assert header[-2:] == ["RECLAIMABLE", "SOURCE"]
    assert "RECLAIMABLE" not in plain.stdout
    alpha = lines[1].split()
    assert alpha[0] == "alpha" and alpha[-1] == str(image)
    gain, unit = alpha[-3:-1]
    assert unit == "MiB" and 14 < float(gain) <= 16.5, alpha
    vdb = next(line for line in lines if " vdb " in line).split()
    assert vdb[-2] == "-"  # a network disk: no estimate
    domains = {d["name"]: d for d in json.loads(as_json.stdout)}
    vda, vdb_json = domains["alpha"]["disks"]
    assert 14 * MIB < vda["estimated_reclaimable"] <= 16.5 * MIB
    assert vdb_json["estimated_reclaimable"] is None
    # run's defaults (no policy selects it): below their 64 MiB minimum gain, still estimated.
    estimate = domains["alpha"]["estimate"]
    assert (estimate["policy"], estimate["outcome"]) == (None, "nothing-to-do"), estimate
    assert domains["beta"]["estimate"]["outcome"] == "skipped"
    # The dry runs' log lines stay off stdout.
    assert as_json.stderr == ""


def entry(domain: str, policy: str | None, outcome: str, *gains: int | None) -> PlanEntry:
    disks = [
        PlanDisk(f"vd{chr(97 + i)}", f"/i/{domain}-{i}", bytes_allocated=100 * MIB,
                 estimated_after=None if g is None else 100 * MIB - g, estimated_reclaimable=g)
        for i, g in enumerate(gains)
    ]  # fmt: skip
    return PlanEntry(domain, "running", policy, None, outcome, "", disks)


def test_plan_shows_each_disks_gain_and_a_total_per_policy() -> None:
    entries = [
        entry("web-1", "weekly", "would-reclaim", 30 * MIB, 10 * MIB),
        entry("web-2", "weekly", "would-reclaim", 20 * MIB),
        entry("web-3", "weekly", "nothing-to-do", 1 * MIB),
        entry("db-1", "nightly", "skipped"),
        entry("db-2", "nightly", "would-reclaim", None),
        entry("misc", None, "no-policy"),
    ]
    out = io.StringIO()
    print_plan(entries, out)
    text = out.getvalue()

    assert "  vda  /i/web-1-0  100.0 MiB now, 70.0 MiB estimated after (30.0 MiB reclaimable)" in (
        text
    )
    assert entries[0].estimated_reclaimable == 40 * MIB
    assert entries[0].to_json()["estimated_reclaimable"] == 40 * MIB
    assert entries[4].estimated_reclaimable is None  # a disk without an estimate
    totals = text.split("estimated reclaimable, by policy:\n", 1)[1].splitlines()
    assert totals == [
        "  nightly: 0 B in 1 of 2 domain(s)",
        "  weekly: 60.0 MiB in 2 of 3 domain(s); 1.0 MiB more below its minimum gain",
        "  total: 60.0 MiB",
    ]


def test_plan_json_keeps_each_disks_keys_and_the_skipped_disks() -> None:
    policy = Policy.model_validate(
        {"name": "p", "match": {"names": ["*"]}, "schedule": {"cron": "0 2 * * *"}}
    )
    raw = DiskResult("vda", "/i/disk.raw", 1 << 30, 100 * MIB, None, 60 * MIB, "map", None, None,
                     format="raw", discard=False)  # fmt: skip
    skipped = SkippedDisk("vdb", "/i/cd.iso", "a cdrom")
    entry = PlanEntry("vm", "running", "p", None, "would-reclaim", "", [_plan_disk(policy, raw)],
                      [skipped])  # fmt: skip

    printed = json.loads(json.dumps(entry.to_json()))

    new_layout = layout.describe(str(policy.rewrite.compression), None, "off")
    assert printed["disks"] == [{
        "target": "vda", "path": "/i/disk.raw", "bytes_allocated": 100 * MIB,
        "estimated_after": 60 * MIB, "estimated_reclaimable": 40 * MIB, "format": "raw",
        "converted_to": "/i/disk.qcow2", "discard": False, "layout": new_layout.to_json(),
    }]  # fmt: skip
    assert list(printed["disks"][0]) == list(PlanDisk.__dataclass_fields__)
    assert printed["skipped_disks"] == [{"target": "vdb", "path": "/i/cd.iso", "reason": "a cdrom"}]
    out = io.StringIO()
    print_plan([entry], out)
    assert "      converted: raw -> /i/disk.qcow2\n" in out.getvalue()
    assert f"      new image: {new_layout.read_cost}\n" in out.getvalue()
    assert "  vdb  skipped: a cdrom\n" in out.getvalue()
