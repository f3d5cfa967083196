"""Prometheus' own tools as the tests' witnesses: promtool, node_exporter, Prometheus.

``scripts/setup.sh`` downloads Debian's ``prometheus`` and ``prometheus-node-exporter``
packages and unpacks their binaries into the test bed (``TOOLS_DIR``); they are never
installed, so no Prometheus server or exporter runs as a service on the host: the tests
start them on free loopback ports, with their data in the test's own folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from testbed.guests import TESTBED_DIR

TOOLS_DIR = TESTBED_DIR / "tools" / "bin"
PROMTOOL = "promtool"
NODE_EXPORTER = "prometheus-node-exporter"
PROMETHEUS = "prometheus"
# How long a tool may take to answer first (node_exporter does in a few ms, Prometheus in
# about a second).
START_S = 20.0


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

    It listens on a free loopback port; the URL is given once it answers.
    """
    with _serve(NODE_EXPORTER, lambda address: [
        "--collector.disable-defaults", "--collector.textfile",
        f"--collector.textfile.directory={textfile_dir}",
        f"--web.listen-address={address}", "--log.level=warn",
    ], "/metrics") as base:  # fmt: skip
        yield f"{base}/metrics"


@contextmanager
def prometheus(scrape_url: str, folder: Path) -> Iterator[str]:
    """A Prometheus server scraping ``scrape_url`` every second: its base URL, once ready.

    Its configuration and data go into ``folder``. Its first scrape comes about 5 s after
    it is ready (its discovery hands targets over at most every 5 s).
    """
    target = urllib.parse.urlsplit(scrape_url)
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: node\n    metrics_path: {target.path}\n"
        f"    static_configs: [{{targets: ['{target.netloc}']}}]\n"
    )
    with _serve(PROMETHEUS, lambda address: [
        f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address={address}", "--log.level=warn",
    ], "/-/ready") as base:  # fmt: skip
        yield base


def query(base: str, expr: str) -> list[dict[str, Any]]:
    """The result of an instant query of ``expr`` (an error of Prometheus fails the test)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our loopback URL
            answer = json.load(reply)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{expr}: {exc.read().decode()}") from exc
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


@contextmanager
def _serve(name: str, argv: Callable[[str], list[str]], ready: str) -> Iterator[str]:
    """Run tool ``name`` listening on a free loopback port; its base URL once ``ready`` answers.

    A port taken between ``free_port`` and the tool's start is retried with another.
    """
    for _attempt in range(3):
        address = f"127.0.0.1:{free_port()}"
        base = f"http://{address}"
        proc = subprocess.Popen([str(tool(name)), *argv(address)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            if _answers(proc, base + ready, name):
                yield base
                return
            _out, err = proc.communicate(timeout=10)
            if "address already in use" not in err:
                raise AssertionError(f"{name} exited {proc.returncode}: {err}")
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
    raise AssertionError(f"{name} found no free port in 3 attempts")


def _answers(proc: subprocess.Popen[str], url: str, name: str) -> bool:
    """Poll ``url`` until it answers (True) or the process exits (False), with a deadline."""
    deadline = time.monotonic() + START_S
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our loopback URL
                return True
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"{name} did not answer on {url}"
            time.sleep(0.05)
    return False


def scrape(url: str) -> str:
    """The text node_exporter serves at ``url``."""
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our loopback URL
        text: str = reply.read().decode()
        return text
