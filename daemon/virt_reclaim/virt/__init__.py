"""The only package that imports libvirt; everything else uses the small interface here.

``connection`` holds the Hypervisor (the connection to libvirtd), ``domain`` one Domain,
``blockjobs`` the snapshots and block jobs of the live mode, ``events`` libvirt's event loop
thread and ``common`` what they share (importing any of them silences libvirt's own error
printing, once). What reads the agent's untrusted replies (``agentreplies``) and the XML of
block jobs (``blockxml``) is pure and lives outside, as do the data types (``model``) and
the errors (``errors``); the names are re-exported here for the code that imports them from
``virt_reclaim.virt``.
"""

from __future__ import annotations

from virt_reclaim.domxml.blockjob import copy_destination_xml, mirror_ready, snapshot_xml
from virt_reclaim.errors import (
    AgentUnavailable,
    BlockJobFailed,
    GuestExecCancelled,
    NoBlockJob,
    VirtError,
)
from virt_reclaim.model import BlockJob
from virt_reclaim.virt.agentreplies import (
    MAX_AGENT_COMMANDS,
    MAX_EXEC_OUTPUT,
    MAX_FILESYSTEMS,
    parse_agent_info,
    parse_fstrim,
    parse_guest_filesystems,
)
from virt_reclaim.virt.blockjobs import BLOCK_JOB_END_TIMEOUT_S, BLOCK_JOB_POLL_S, BlockJobs
from virt_reclaim.virt.connection import RECONNECT_TIMEOUT_S, Hypervisor, LifecycleCallback
from virt_reclaim.virt.domain import GUEST_PROCESS_END_S, Domain
from virt_reclaim.virt.events import event_loop_alive, start_event_loop

__all__ = [
    "BLOCK_JOB_END_TIMEOUT_S",
    "BLOCK_JOB_POLL_S",
    "GUEST_PROCESS_END_S",
    "MAX_AGENT_COMMANDS",
    "MAX_EXEC_OUTPUT",
    "MAX_FILESYSTEMS",
    "RECONNECT_TIMEOUT_S",
    "AgentUnavailable",
    "BlockJob",
    "BlockJobFailed",
    "BlockJobs",
    "Domain",
    "GuestExecCancelled",
    "Hypervisor",
    "LifecycleCallback",
    "NoBlockJob",
    "VirtError",
    "copy_destination_xml",
    "event_loop_alive",
    "mirror_ready",
    "parse_agent_info",
    "parse_fstrim",
    "parse_guest_filesystems",
    "snapshot_xml",
    "start_event_loop",
]
