"""`virt-reclaim daemon` as a real subprocess: its configuration, log and sd_notify messages."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from testbed.guests import URI

WATCHDOG_USEC = 2_000_000


def daemon_toml(state_dir: Path, **extra: str) -> str:
    """A test daemon's virt-reclaim.toml: the test bed's libvirtd, JSON logs, a sample a second.

    A sample a second: idle.duration is judged on samples, and the default interval kept a
    guest "not yet idle" for a minute. ``extra`` adds or replaces keys (TOML values).
    """
    lines = {
        "uri": f'"{URI}"',
        "state_dir": f'"{state_dir}"',
        "stats_interval": '"1s"',
        "log_format": '"json"',
        **extra,
    }
    return "".join(f"{key} = {value}\n" for key, value in lines.items())


def write_config(folder: Path, daemon_file: str, policies: dict[str, str]) -> Path:
    """A configuration folder as the daemon wants it (root's, not writable by others)."""
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "virt-reclaim.toml").write_text(daemon_file)
    policy_dir = folder / "policies.d"
    policy_dir.mkdir(mode=0o700, exist_ok=True)
    for name, text in policies.items():
        (policy_dir / name).write_text(text)
    return folder


class NotifyListener:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def keys(self) -> list[str]:
        """Each message's first field, in order (READY, STATUS, WATCHDOG, ...)."""
        return [next(iter(fields)) for _at, fields in self.messages]

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 60, after: int = 0
    ) -> int:
        """Index of the first message from ``after`` on that has ``key`` (=``value``)."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(after, len(self.messages)):
                fields = self.messages[index][1]
                if key in fields and (value is None or fields[key] == value):
                    return index
            assert time.monotonic() < deadline, f"no {key} from the daemon: {self.messages}"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


class DaemonProcess:
    """The daemon, its JSON log lines as they come, and ways to wait on them."""

    def __init__(self, config_dir: Path, notify_socket: Path | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if notify_socket is not None:
            env |= {"NOTIFY_SOCKET": str(notify_socket), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virt_reclaim", "daemon", "--config-dir", str(config_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        self.log: list[dict[str, Any]] = []
        self.other_output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.log.append(json.loads(line))
            except ValueError:
                self.other_output.append(line)

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in list(self.log) if e.get("event") == name and _matches(e, match)]

    def wait_event(
        self,
        name: str,
        timeout: float = 120,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> dict[str, Any]:
        """The first log event ``name`` with these fields; fails if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(name, **match):
                if where is None or where(event):
                    return event
            assert self.proc.poll() is None or self._reader.is_alive(), self.tail()
            assert time.monotonic() < deadline, (
                f"no {name} {match} within {timeout} s\n{self.tail()}"
            )
            time.sleep(0.1)

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def tail(self, lines: int = 40) -> str:
        shown = [json.dumps(e) for e in self.log[-lines:]] + self.other_output[-lines:]
        return "\n".join(shown)

    def stop(self) -> None:
        """Make sure it is gone (after a failed test)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _matches(event: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(event.get(key) == value for key, value in match.items())
