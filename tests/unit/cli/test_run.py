"""`virt-reclaim run` refusals and usage errors, against libvirt's test driver.

Nothing here reaches the rewrite; every path that does runs on real guests in
tests/integration/test_run.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NODE = """<node>
<domain type='test'><name>netonly</name><memory>1024</memory><os><type>hvm</type></os>
<devices><disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'><host name='mon1'/></source>
  <target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
  <source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk></devices></domain>
<domain type='test'><name>first</name><memory>1024</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{shared}'/><target dev='vda' bus='virtio'/></disk></devices></domain>
<domain type='test'><name>second</name><memory>1024</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{shared}'/><target dev='vdb' bus='virtio'/></disk></devices></domain>
</node>"""


def run(*args: str, state_dir: Path) -> tuple[int, dict[str, object], str]:
    argv = [sys.executable, "-m", "virt_reclaim", "run", "--state-dir", str(state_dir), *args]
    proc = subprocess.run(argv,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    result = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, result, proc.stderr


@pytest.fixture
def uri(tmp_path: Path) -> str:
    shared = tmp_path / "shared.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(shared), "8M"], check=True)
    node = tmp_path / "node.xml"
    node.write_text(NODE.format(shared=shared))
    return f"test://{node}"


def test_no_eligible_disk_is_skipped_with_each_reason(uri: str, tmp_path: Path) -> None:
    code, result, _ = run("netonly", "--json", "--connect", uri, state_dir=tmp_path)
    assert code == 3
    assert result["outcome"] == "skipped"
    skipped = result["skipped_disks"]
    assert isinstance(skipped, list)
    reasons = {d["target"]: d["reason"] for d in skipped}
    assert reasons == {
        "vda": "not a file-backed qcow2 disk (type network, format raw)",
        "sda": "a cdrom, not a disk",
    }


def test_an_image_used_by_another_domain_is_skipped(uri: str, tmp_path: Path) -> None:
    code, result, _ = run("first", "--json", "--connect", uri, state_dir=tmp_path)
    assert code == 3
    assert "the image is also used by domain second" in str(result["reason"])


def test_unknown_domain_fails_with_its_name(uri: str, tmp_path: Path) -> None:
    code, _, stderr = run("nope", "--connect", uri, state_dir=tmp_path)
    assert code == 1
    assert "domain 'nope'" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--cluster-size", "64K"], "64000 bytes; a qcow2 cluster size is a power of two"),
        (["--cluster-size", "4MiB"], "a qcow2 cluster size is a power of two"),
        (["--min-gain", "lots"], "is not a size"),
        (["--shutdown-timeout", "0"], "not a positive number of seconds"),
        (["--compression", "lz4"], "invalid choice"),
        (["--free-space", "shred"], "invalid choice"),
    ],
)
def test_bad_options_are_usage_errors(options: list[str], message: str, tmp_path: Path) -> None:
    code, _, stderr = run("any", *options, state_dir=tmp_path)
    assert code == 2
    assert message in stderr


def test_help_tells_the_exit_statuses() -> None:
    proc = subprocess.run([sys.executable, "-m", "virt_reclaim", "run", "--help"],
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    text = " ".join(proc.stdout.split())
    assert "0 reclaimed, nothing to do, or dry run; 1 failed (everything restored)" in text
    assert "3 skipped" in text
