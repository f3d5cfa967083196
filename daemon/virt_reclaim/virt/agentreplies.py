"""Pure readers of the guest agent's replies, which are untrusted input: validated and bounded.

Imports nothing of libvirt; ``virt.Domain`` feeds them what the agent said.
"""

from __future__ import annotations

import base64
from typing import Any

from virt_reclaim.errors import AgentUnavailable
from virt_reclaim.model import AgentInfo, GuestFilesystem, TrimmedPath
from virt_reclaim.units import KIB

# Bounds on what a guest may make us read (its replies are untrusted input).
MAX_EXEC_OUTPUT = 64 * KIB
MAX_FILESYSTEMS = 256
MAX_AGENT_COMMANDS = 512


def parse_guest_filesystems(info: dict[str, Any]) -> list[GuestFilesystem]:
    """Turn libvirt's typed-parameter ``fs.N.*`` keys into filesystems, dropping malformed ones."""
    count = min(int_or_none(info.get("fs.count")) or 0, MAX_FILESYSTEMS)
    result = []
    for i in range(count):
        mountpoint = info.get(f"fs.{i}.mountpoint")
        if not isinstance(mountpoint, str) or not mountpoint.startswith("/") or "\0" in mountpoint:
            continue
        disks = min(int_or_none(info.get(f"fs.{i}.disk.count")) or 0, 64)
        targets = tuple(
            str(alias)
            for j in range(disks)
            if isinstance(alias := info.get(f"fs.{i}.disk.{j}.alias"), str)
        )
        result.append(
            GuestFilesystem(
                mountpoint=mountpoint[:4096],
                fstype=str(info.get(f"fs.{i}.fstype", ""))[:64],
                used_bytes=int_or_none(info.get(f"fs.{i}.used-bytes")),
                total_bytes=int_or_none(info.get(f"fs.{i}.total-bytes")),
                disk_targets=targets,
            )
        )
    return result


def parse_agent_info(info: object, osinfo: object) -> AgentInfo:
    """Turn ``guest-info`` and ``guest-get-osinfo`` replies into AgentInfo, bounded and validated.

    Raises:
        AgentUnavailable: ``guest-info`` is not an object with a command list.
    """
    if not isinstance(info, dict) or not isinstance(info.get("supported_commands"), list):
        raise AgentUnavailable("guest-info: the reply lists no commands")
    enabled = frozenset(
        str(c["name"])[:64]
        for c in info["supported_commands"][:MAX_AGENT_COMMANDS]
        if isinstance(c, dict) and isinstance(c.get("name"), str) and c.get("enabled") is True
    )
    os_id = os_name = None
    if isinstance(osinfo, dict):
        os_id = _short_text(osinfo.get("id"))
        os_name = _short_text(osinfo.get("pretty-name") or osinfo.get("name"))
    return AgentInfo(str(info.get("version", ""))[:32], enabled, os_id, os_name)


def parse_fstrim(reply: object) -> list[TrimmedPath]:
    """Read a ``guest-fstrim`` reply as Linux and Windows agents write it.

    Linux reports ``trimmed`` and ``minimum`` per mount point; Windows agents report
    each volume by its drive path, often without ``trimmed``, and an ``error`` text for a
    volume that could not be retrimmed.
    """
    paths = reply.get("paths") if isinstance(reply, dict) else None
    if not isinstance(paths, list):
        raise AgentUnavailable("guest-fstrim: the reply has no paths")
    result = []
    for entry in paths[:MAX_FILESYSTEMS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        error = entry.get("error")
        result.append(
            TrimmedPath(
                path=entry["path"][:4096],
                trimmed=int_or_none(entry.get("trimmed")),
                error=str(error)[:200] if error is not None else None,
            )
        )
    return result


def _short_text(value: object) -> str | None:
    return value[:64] if isinstance(value, str) and value.isprintable() else None


def int_or_none(value: object) -> int | None:
    """``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_b64(value: object) -> str:
    """Decode base64 output of guest-exec as UTF-8, bounded to MAX_EXEC_OUTPUT; "" if unusable."""
    if not isinstance(value, str):
        return ""
    try:
        raw = base64.b64decode(value[: MAX_EXEC_OUTPUT * 2], validate=False)
    except ValueError:
        return ""
    return raw[:MAX_EXEC_OUTPUT].decode("utf-8", errors="replace")
