"""The libvirt URI, as virsh finds it.

--connect, then the configured uri, then $LIBVIRT_DEFAULT_URI, then qemu:///system.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.daemon import write_config
from virt_reclaim.config import loading

NODE = """<node><domain type='test'><name>{name}</name><memory>1024</memory>
<os><type>hvm</type></os><devices/></domain></node>"""


def node_uri(tmp_path: Path, name: str) -> str:
    """A test-driver URI whose only domain is named ``name``: the names tell the URIs apart."""
    path = tmp_path / f"{name}.xml"
    path.write_text(NODE.format(name=name))
    return f"test://{path}"


def domain_names(config_dir: Path, env_uri: str | None, *options: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    if env_uri is not None:
        env["LIBVIRT_DEFAULT_URI"] = env_uri
    result = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "domains", "--json",
         "--config-dir", str(config_dir), *options],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [domain["name"] for domain in json.loads(result.stdout)]


def test_the_environment_gives_the_uri_when_nothing_else_does(tmp_path: Path) -> None:
    etc = write_config(tmp_path / "etc", 'log_format = "json"\n', {})

    assert domain_names(etc, node_uri(tmp_path, "from-env")) == ["from-env"]


def test_the_config_file_wins_over_the_environment(tmp_path: Path) -> None:
    etc = write_config(tmp_path / "etc", f'uri = "{node_uri(tmp_path, "from-file")}"\n', {})

    assert domain_names(etc, node_uri(tmp_path, "from-env")) == ["from-file"]


def test_the_option_wins_over_both(tmp_path: Path) -> None:
    etc = write_config(tmp_path / "etc", f'uri = "{node_uri(tmp_path, "from-file")}"\n', {})

    names = domain_names(
        etc, node_uri(tmp_path, "from-env"), "--connect", node_uri(tmp_path, "from-option")
    )

    assert names == ["from-option"]


@pytest.mark.parametrize(
    ("environ", "uri"),
    [
        ({}, "qemu:///system"),
        ({"LIBVIRT_DEFAULT_URI": ""}, "qemu:///system"),
        ({"LIBVIRT_DEFAULT_URI": "qemu+ssh://kvm1/system"}, "qemu+ssh://kvm1/system"),
    ],
)
def test_default_uri(environ: dict[str, str], uri: str) -> None:
    assert loading.default_uri(environ) == uri


def test_the_daemon_settings_take_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///default")

    assert loading.DaemonConfig().uri == "test:///default"
    assert loading.DaemonConfig(uri="qemu:///session").uri == "qemu:///session"


def test_help_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "virt_reclaim", "domains", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "$LIBVIRT_DEFAULT_URI" in " ".join(result.stdout.split())
