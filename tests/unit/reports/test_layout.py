"""The layout's read cost that plan shows, and what check points out (warnings and notes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from virt_reclaim.config.policy import Policy
from virt_reclaim.reports import advice, layout

KIB = 1024


def policy(**fields: object) -> Policy:
    return Policy.model_validate({"name": "p", "match": {"names": ["*"]},
                                  "schedule": {"cron": "0 1 * * *"}, **fields})  # fmt: skip


def test_the_measured_read_costs_are_shown_against_uncompressed() -> None:
    zstd = layout.describe("zstd", 64 * KIB)
    assert zstd.random_read_iops == 3_700
    assert zstd.read_cost.startswith("zstd, 64K clusters: random 4K reads ~3,700 IOPS vs 11,500")
    assert layout.describe("none", None).read_cost.startswith("none, 64K clusters: random 4K")
    big = layout.describe("zstd", 2048 * KIB)
    assert big.random_read_iops == 248
    assert "each 4K read inflates a whole 2M cluster" in big.read_cost


def test_what_was_not_measured_says_so_and_gives_the_bounds() -> None:
    between = layout.describe("zlib", 256 * KIB)
    assert between.random_read_iops is None
    assert "not measured" in between.read_cost
    assert "~2,600 IOPS (64K) and ~100 (2M)" in between.read_cost
    small = layout.describe("zstd", 16 * KIB)
    assert "not measured; near the 64K figure" in small.read_cost
    prealloc = layout.describe("none", 1024 * KIB, "metadata")
    assert prealloc.read_cost.endswith("metadata preallocated: faster first writes, a larger file")
    assert prealloc.to_json()["preallocation"] == "metadata"


def test_compression_with_clusters_above_64k_is_warned_of() -> None:
    [warning] = advice.costly_settings(policy(rewrite={"cluster_size": "128KiB"}))
    assert "compression zstd with 128K clusters" in warning
    assert advice.costly_settings(policy(rewrite={"cluster_size": "64KiB"})) == []
    uncompressed = {"cluster_size": "2MiB", "compression": "none"}
    assert advice.costly_settings(policy(rewrite=uncompressed)) == []


DOMAIN = """<domain><name>d</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/i/a.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
  <source file='/i/b.qcow2'/><target dev='vdb'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'
  detect_zeroes='unmap'/><source file='/i/c.qcow2'/><target dev='vdc'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='/i/d.raw'/><target dev='vdd'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
  <source file='/i/e.iso'/><target dev='hda'/></disk>
</devices></domain>"""


def test_disks_a_setting_would_help_are_pointed_out() -> None:
    notes = advice.disk_notes(policy(), DOMAIN)

    assert [n.split(":")[0] for n in notes] == ["vda", "vdb", "vdd"]
    assert notes[0].startswith("vda: no discard='unmap' and detect_zeroes='unmap': a trim frees")
    assert notes[0].endswith("guest.enable_discard = true turns it on at the next offline job")
    assert notes[1].startswith("vdb: no detect_zeroes='unmap': zeros the guest writes take")
    assert notes[2] == ("vdd: a raw image, skipped; rewrite.convert = true converts it to qcow2")
    enabled = advice.disk_notes(policy(guest={"enable_discard": True},
                                       rewrite={"convert": True}), DOMAIN)  # fmt: skip
    assert enabled[0].endswith("the policy turns it on at its next offline job")
    assert enabled[2] == "vdd: a raw image, converted to qcow2 at its next offline job"


def test_check_warns_but_passes(tmp_path: Path) -> None:
    folder = tmp_path / "policies.d"
    folder.mkdir()
    for path in (tmp_path, folder):
        path.chmod(0o755)
    (folder / "big.toml").write_text(
        '[[policy]]\nname = "big"\nmatch.names = ["*"]\nschedule.cron = "0 1 * * *"\n'
        'rewrite.cluster_size = "2MiB"\nguest.enable_discard = true\nrewrite.convert = true\n'
    )
    (folder / "big.toml").chmod(0o644)

    result = subprocess.run([sys.executable, "-m", "virt_reclaim", "check", "--config-dir",
                             str(tmp_path), "--connect", "test:///default"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "warning: " in result.stderr and "policy 'big'" in result.stderr
    assert "compression zstd with 2M clusters" in result.stderr
    assert "error" not in result.stderr
