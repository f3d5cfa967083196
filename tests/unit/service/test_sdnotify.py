"""sd_notify datagrams as systemd receives them (a real socket; no systemd needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from virt_reclaim.service.sdnotify import Notifier


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_messages_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000"})
        notifier.ready("up")
        notifier.status("up")  # unchanged: not sent
        notifier.status("busy")
        notifier.reloading()
        notifier.watchdog()
        notifier.stopping("bye")
        notifier.extend_timeout(60)
        messages = [receive(sock) for _ in range(6)]
    assert messages[0] == {"READY": "1", "STATUS": "up", "MAINPID": str(os.getpid())}
    assert messages[1] == {"STATUS": "busy"}
    assert messages[2]["RELOADING"] == "1" and int(messages[2]["MONOTONIC_USEC"]) > 0
    assert messages[3] == {"WATCHDOG": "1"}
    assert messages[4] == {"STOPPING": "1", "STATUS": "bye"}
    assert messages[5] == {"EXTEND_TIMEOUT_USEC": "60000000"}
    assert notifier.watchdog_s == 30.0


def test_abstract_socket_address() -> None:
    name = f"virt-reclaim-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert receive(sock) == {"WATCHDOG": "1"}


def test_without_systemd_nothing_happens_and_no_watchdog() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("up")
    assert notifier.watchdog_s is None


def test_watchdog_for_another_pid_is_not_ours() -> None:
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s is None
