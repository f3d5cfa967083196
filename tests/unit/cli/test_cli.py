"""The command line as operators script it: --version, --help, exit statuses, JSON shape.

Listing logic runs against libvirt's test driver; disks and the agent are
tested against the real libvirtd in tests/integration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from virt_reclaim import __version__

TEST_NODE = """<node>
<domain type='test'><name>alpha</name><memory>1024</memory><os><type>hvm</type></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{image}'/><target dev='vda' bus='virtio'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'><host name='mon1'/></source>
  <target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='{missing}'/><target dev='vdc' bus='virtio'/></disk>
</devices></domain>
<domain type='test'><name>beta</name><memory>1024</memory><os><type>hvm</type></os>
<devices/></domain>
</node>"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virt_reclaim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "10M"], check=True)
    node = tmp_path / "node.xml"
    node.write_text(TEST_NODE.format(image=image, missing=tmp_path / "gone.qcow2"))
    return f"test://{node}"


def test_version() -> None:
    result = cli("--version")
    assert (result.returncode, result.stdout) == (0, f"virt-reclaim {__version__}\n")


def test_help_lists_commands_and_exit_statuses() -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "domains" in result.stdout
    assert "Exit status: 0 success, 1 failure, 2 usage error" in result.stdout


def test_usage_errors_exit_2() -> None:
    assert cli().returncode == 2
    assert cli("no-such-command").returncode == 2
    assert cli("domains", "--no-such-option").returncode == 2


def test_unreachable_libvirt_exits_1_with_the_uri(tmp_path: Path) -> None:
    uri = f"qemu:///system?socket={tmp_path}/no.sock"
    result = cli("domains", "--connect", uri)
    assert result.returncode == 1
    assert result.stderr.startswith(f"virt-reclaim: cannot connect to {uri}:")
    assert "Traceback" not in result.stderr


def test_domains_json_shape(test_uri: str, tmp_path: Path) -> None:
    result = cli("domains", "--json", "--connect", test_uri)
    assert result.returncode == 0, result.stderr
    domains = {d["name"]: d for d in json.loads(result.stdout)}
    assert set(domains) == {"alpha", "beta"}
    alpha = domains["alpha"]
    assert (alpha["state"], alpha["persistent"], alpha["agent_connected"]) == (
        "running",
        True,
        False,
    )
    vda, vdb, vdc = alpha["disks"]
    assert vda == {
        "target": "vda",
        "device": "disk",
        "type": "file",
        "format": "qcow2",
        "source": str(tmp_path / "a.qcow2"),
        "virtual_size": 10 * 1024 * 1024,
        "allocated_bytes": (tmp_path / "a.qcow2").stat().st_blocks * 512,
        "backing_chain": [],
        "internal_snapshots": 0,
        "error": None,
    }
    assert (vdb["type"], vdb["source"], vdb["virtual_size"], vdb["error"]) == (
        "network",
        "rbd:pool/img",
        None,
        None,
    )
    assert vdc["allocated_bytes"] is None
    assert "No such file" in vdc["error"]
    assert domains["beta"]["disks"] == []


def test_domains_table(test_uri: str) -> None:
    result = cli("domains", "--connect", test_uri)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "DOMAIN",
        "STATE",
        "PERSISTENT",
        "AGENT",
        "OS",
        "FREE-SPACE",
        "DISK",
        "FORMAT",
        "VIRTUAL",
        "ALLOCATED",
        "SNAPSHOTS",
        "SOURCE",
    ]
    assert lines[1].split()[:10] == [
        "alpha",
        "running",
        "yes",
        "none",
        "-",
        "none",
        "vda",
        "qcow2",
        "10.0",
        "MiB",
    ]
    assert any("error:" in line and "No such file" in line for line in lines)
    assert any("free space: none (no guest agent answers)" in line for line in lines)
    assert lines[-1].split()[:2] == ["beta", "running"]
    assert lines[-1].endswith("(no disks)")
