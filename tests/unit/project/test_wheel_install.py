"""The built wheel, installed into a fresh venv, runs the README's first commands (~15 s, offline).

The wheel is built from a copy of the sources (``pip wheel --no-build-isolation``, with the
setuptools of the test extras, so no index is asked) and installed with ``--no-index`` into
a venv made for the test. Its dependencies are not downloaded again: a ``.pth`` line puts
the project venv's site-packages after the fresh one's, where ``pip check`` finds every
requirement the wheel declares satisfied, and the test checks that virt_reclaim itself is
imported from the fresh venv. This keeps the test deterministic without a network
(libvirt-python would otherwise be built from source, or fetched), at the cost of not
proving that pip can resolve the dependencies from PyPI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import virt_reclaim

ROOT = Path(__file__).resolve().parents[3]
SITE_PACKAGES = f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(arg) for arg in argv], capture_output=True, text=True, timeout=180, cwd=cwd,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    # A copy: a build in the checkout would leave build/ and egg-info beside the sources.
    shutil.copytree(ROOT / "daemon", source / "daemon",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", work / "dist", source)  # fmt: skip
    [wheel] = (work / "dist").glob("virt_reclaim-*.whl")
    assert wheel.name.startswith(f"virt_reclaim-{virt_reclaim.__version__}-py3-none-any")
    fresh = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", fresh)
    run(*pip, "--python", fresh / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
        wheel)  # fmt: skip
    (fresh / SITE_PACKAGES / "zz-project-dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return fresh


def test_the_wheel_installs_with_its_dependencies_and_its_command(venv: Path) -> None:
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "--python", venv / "bin" / "python", "check")
    where = run(venv / "bin" / "python", "-c", "import virt_reclaim; print(virt_reclaim.__file__)")
    assert where.stdout.startswith(str(venv / SITE_PACKAGES)), where.stdout
    version = run(venv / "bin" / "virt-reclaim", "--version")
    assert version.stdout.strip() == f"virt-reclaim {virt_reclaim.__version__}"


def test_the_installed_command_checks_the_example_config(venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "etc"
    shutil.copytree(ROOT / "config", config)
    for path in (config, *config.rglob("*")):  # check wants them private to root
        path.chmod(0o700 if path.is_dir() else 0o600)
    done = run(venv / "bin" / "virt-reclaim", "check", "--config-dir", config, "--connect",
               "test:///default", "--json")  # fmt: skip
    report = json.loads(done.stdout)
    assert report["valid"] is True and report["errors"] == []
    assert {p["name"] for p in report["policies"]} == {"weekly-web", "monthly-tagged"}


def test_the_installed_command_prints_both_schemas(venv: Path) -> None:
    policy = json.loads(run(venv / "bin" / "virt-reclaim", "schema").stdout)
    daemon_schema = json.loads(run(venv / "bin" / "virt-reclaim", "schema", "--daemon").stdout)
    assert "policy" in policy["properties"]
    assert {"uri", "state_dir", "stats_interval"} <= daemon_schema["properties"].keys()


def test_the_installed_package_writes_the_man_page_and_completions(
    venv: Path, tmp_path: Path
) -> None:
    """The README's host steps generate them with the installed package."""
    done = run(venv / "bin" / "python", "-m", "virt_reclaim.shelldocs", tmp_path)
    assert {Path(line).name for line in done.stdout.splitlines()} == {
        "virt-reclaim.1", "virt-reclaim.bash", "_virt-reclaim"
    }  # fmt: skip
