"""libvirt's default event loop on a thread of its own, and the event registrations it serves.

The loop runs once per process; the BLOCK_JOB_2 registration is shared by every listener of a
domain on a connection.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

_event_loop_lock = threading.Lock()
_event_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """Run libvirt's default event loop on a thread; call before opening any connection.

    Without it libvirt delivers no domain events and cannot answer keepalives.
    Safe to call more than once: the loop starts once per process.
    """
    global _event_loop_thread  # noqa: PLW0603 - libvirt's event loop is per process
    with _event_loop_lock:
        if _event_loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _event_loop_thread = threading.Thread(
            target=_run_event_loop, name="libvirt-events", daemon=True
        )
        _event_loop_thread.start()


def event_loop_alive() -> bool:
    """True while the event loop thread runs (the daemon's watchdog depends on it)."""
    return _event_loop_thread is not None and _event_loop_thread.is_alive()


def _run_event_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


_BlockJobHandler = Callable[[str, int, int], None]  # (disk target, job type, status)


@dataclass
class _BlockJobListener:
    conn: Any
    callback_id: int
    handlers: list[_BlockJobHandler]


# libvirt tracks one BLOCK_JOB_2 callback per connection and domain ("event callback
# already tracked" for a second: the Python binding registers one C function for all), so
# every BlockJobs of a domain on a connection shares one registration.
_block_job_listeners: dict[tuple[int, str], _BlockJobListener] = {}
_block_job_listeners_lock = threading.Lock()


def subscribe_block_jobs(conn: Any, dom: Any, uuid: str, handler: _BlockJobHandler) -> None:  # noqa: ANN401
    """Call ``handler(disk, job type, status)`` for each BLOCK_JOB_2 event of ``dom`` on ``conn``.

    Raises:
        libvirt.libvirtError: libvirt refused the registration (no event loop, say).
    """
    with _block_job_listeners_lock:
        listener = _block_job_listeners.get((id(conn), uuid))
        if listener is None:
            handlers: list[_BlockJobHandler] = []

            def dispatch(_c: Any, _d: Any, disk: str, job: int, status: int, _o: Any) -> None:  # noqa: ANN401
                for each in list(handlers):
                    each(disk, job, status)

            callback_id = conn.domainEventRegisterAny(
                dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, dispatch, None
            )
            # The entry holds conn, so its id() cannot be reused while the entry exists.
            listener = _BlockJobListener(conn, callback_id, handlers)
            _block_job_listeners[(id(conn), uuid)] = listener
        listener.handlers.append(handler)


def unsubscribe_block_jobs(conn: Any, uuid: str, handler: _BlockJobHandler) -> None:  # noqa: ANN401
    """Stop calling ``handler``; the last handler to go takes the registration with it."""
    with _block_job_listeners_lock:
        listener = _block_job_listeners.get((id(conn), uuid))
        if listener is None or handler not in listener.handlers:
            return
        listener.handlers.remove(handler)
        if not listener.handlers:
            del _block_job_listeners[(id(conn), uuid)]
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(listener.callback_id)
