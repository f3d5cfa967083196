"""Fixtures of the real test bed: a libvirt connection to the real libvirtd, and test guests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from testbed.daemon import DaemonProcess
from testbed.debian import DebianGuest, create_debian_guest, ensure_debian_built
from testbed.guests import (
    URI,
    Connection,
    Guest,
    create_guest,
    ensure_guest_built,
    ensure_guest_saved,
    sweep_leftovers,
)
from testbed.reclaim import fake_qemu_img


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    """An open connection to the real libvirtd, with the test guest built and leftovers swept."""
    try:
        conn = Connection(URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd at {URI} does not answer ({exc}); run 'make setup' first")
    ensure_guest_built()
    sweep_leftovers(conn)
    ensure_guest_saved(conn)
    yield conn
    conn.close()


@pytest.fixture
def make_guest(libvirt_conn: Any) -> Iterator[Callable[..., Guest]]:
    """A factory of test guests (see testbed.guests.create_guest); all removed after the test."""
    created: list[Guest] = []

    def factory(**options: Any) -> Guest:
        guest = create_guest(libvirt_conn, **options)
        created.append(guest)
        return guest

    yield factory
    for guest in created:
        guest.remove()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """The daemons a test starts (append them): each stopped after the test."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="session")
def debian_built(libvirt_conn: Any) -> None:
    """The cached Debian guest (testbed/build-debian-guest.sh): built here if setup did not."""
    ensure_debian_built()


@pytest.fixture
def make_debian_guest(
    libvirt_conn: Any, debian_built: None
) -> Iterator[Callable[..., DebianGuest]]:
    """A factory of Debian guests (see testbed.debian.create_debian_guest); removed after."""
    created: list[DebianGuest] = []

    def factory(**options: Any) -> DebianGuest:
        guest = create_debian_guest(libvirt_conn, **options)
        created.append(guest)
        return guest

    yield factory
    for guest in created:
        guest.remove()


@pytest.fixture
def paused_qemu_img(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A qemu-img that stops before `convert` until told to go: the real one underneath.

    Yields (the wrapper, the file it creates when paused, the file that releases it).
    """
    paused, go = tmp_path / "paused", tmp_path / "go"
    wrapper = fake_qemu_img(
        tmp_path,
        'if [ "$1" = convert ]; then\n'
        f"  touch {paused}\n"
        f"  i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n"
        "fi\n",
    )
    yield wrapper, paused, go
    go.touch()
