"""The root conftest.py, which every test loads, imports no libvirt: unit tests run without it.

Checked in a fresh interpreter (this one has long imported libvirt for other tests), with
the same import path as pytest's: tests/ and the package.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]

LIBVIRT_LOADED = """
import importlib, sys
sys.path[:0] = [{tests!r}, {daemon!r}]
for module in {modules!r}:
    importlib.import_module(module)
print(" ".join(sorted(name for name in sys.modules if name.split(".")[0] == "libvirt")))
"""


def libvirt_loaded(*modules: str) -> list[str]:
    """The libvirt modules loaded once ``modules`` are imported in a new interpreter."""
    script = LIBVIRT_LOADED.format(tests=str(TESTS), daemon=str(TESTS.parent / "daemon"),
                                   modules=modules)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=60)  # fmt: skip
    return done.stdout.split()


def test_the_root_conftest_and_the_fakes_import_no_libvirt() -> None:
    assert libvirt_loaded("conftest", "fakes") == []


def test_the_check_sees_libvirt_when_it_is_imported() -> None:
    """The check can fail: the integration fixtures, which need libvirt, are seen importing it."""
    assert "libvirt" in libvirt_loaded("integration.conftest")
