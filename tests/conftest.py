"""Fixtures of the real test bed: a libvirt connection to the real libvirtd, and test guests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import libvirt
import pytest

from testbed.guests import URI, Guest, create_guest, ensure_guest_built, sweep_leftovers


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    """An open connection to the real libvirtd, with the test guest built and leftovers swept."""
    try:
        conn = libvirt.open(URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd at {URI} does not answer ({exc}); run 'make setup' first")
    ensure_guest_built()
    sweep_leftovers(conn)
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
