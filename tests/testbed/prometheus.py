"""Prometheus' own tools as the tests' witnesses: promtool and node_exporter, from Debian.

``scripts/setup.sh`` downloads Debian's ``prometheus`` and ``prometheus-node-exporter``
packages and unpacks their binaries into the test bed (``TOOLS_DIR``); they are never
installed, so no Prometheus server or exporter runs as a service on the host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed.guests import TESTBED_DIR

TOOLS_DIR = TESTBED_DIR / "tools" / "bin"
PROMTOOL = "promtool"
NODE_EXPORTER = "prometheus-node-exporter"
# How long node_exporter may take to answer its first scrape (it does in a few ms).
EXPORTER_START_S = 15.0


def tool(name: str) -> Path:
    """The unpacked tool ``name``; a test without it is skipped, or fails in CI.

    In CI (``CI=true``) setup.sh has run, so a missing tool is a broken setup, not a
    reason to skip.
    """
    path = TOOLS_DIR / name
    if os.access(path, os.X_OK):
        return path
    why = (f"{path} is missing: 'bash scripts/setup.sh --venv-only' unpacks it from "
           "Debian's prometheus and prometheus-node-exporter packages")  # fmt: skip
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def promtool(
    *args: str, cwd: Path | None = None, stdin: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args`` (``stdin``: a file it reads); the caller asserts on it."""
    text = stdin.read_text() if stdin is not None else None
    return subprocess.run([str(tool(PROMTOOL)), *args], input=text, capture_output=True,
                          text=True, timeout=60, check=False, cwd=cwd)  # fmt: skip


def free_port() -> int:
    """A loopback TCP port free now (the exporter is started on it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def node_exporter(textfile_dir: Path) -> Iterator[str]:
    """node_exporter with only its textfile collector on ``textfile_dir``: its /metrics URL.

    It listens on a free loopback port; the URL is given once it answers. A port taken
    between ``free_port`` and the exporter's start is retried with another.
    """
    for _attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        proc = subprocess.Popen(
            [str(tool(NODE_EXPORTER)), "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={textfile_dir}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            if _answers(proc, url):
                yield url
                return
            _out, err = proc.communicate(timeout=10)
            if "address already in use" not in err:
                raise AssertionError(f"node_exporter exited {proc.returncode}: {err}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            if proc.stderr is not None:
                proc.stderr.close()
    raise AssertionError("node_exporter found no free port in 3 attempts")


def _answers(proc: subprocess.Popen[str], url: str) -> bool:
    """Poll ``url`` until it answers (True) or the process exits (False), with a deadline."""
    deadline = time.monotonic() + EXPORTER_START_S
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our loopback URL
                return True
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"node_exporter did not answer on {url}"
            time.sleep(0.05)
    return False


def scrape(url: str) -> str:
    """The text node_exporter serves at ``url``."""
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our loopback URL
        text: str = reply.read().decode()
        return text
