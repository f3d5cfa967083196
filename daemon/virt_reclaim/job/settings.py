"""How a job runs: the settings a policy (or ``run``'s options) gives it. No libvirt here."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from virt_reclaim.job.freespace.budget import Reserve
from virt_reclaim.units import MIB


class ModeName(enum.StrEnum):
    """A job's mode, as a policy's ``mode``, ``run --live`` and the journal name it."""

    OFFLINE = "offline"
    LIVE = "live"
    # Never asked for: an offline job that found a disk to convert takes it (modes.decide).
    CONVERT = "convert"


class FreeSpaceMethod(enum.StrEnum):
    """How to free the guest's unused blocks before the rewrite."""

    AUTO = "auto"  # trim where every disk has discard, else zero (when the agent allows it)
    TRIM = "trim"
    ZERO = "zero"
    NONE = "none"


class Compression(enum.StrEnum):
    """The qcow2 compression of the rewritten image."""

    ZSTD = "zstd"
    ZLIB = "zlib"
    NONE = "none"


class After(enum.StrEnum):
    """The guest's power state after a job that succeeded (a failed one restores the previous)."""

    PREVIOUS = "previous"
    START = "start"
    OFF = "off"


class OnShutdownTimeout(enum.StrEnum):
    """What to do when the guest is not off within the shutdown timeout."""

    ABORT = "abort"  # leave it running, change nothing
    FORCE = "force"  # power it off


@dataclass(frozen=True)
class JobHooks:
    """Commands a job runs around the guest's downtime (a policy's ``hooks``); () runs none."""

    before_shutdown: tuple[str, ...] = ()  # argv; a failure skips the guest
    after_job: tuple[str, ...] = ()  # argv; a failure is logged, the outcome stands
    timeout_s: float = 60.0  # each run; a hook still running then is killed


@dataclass(frozen=True)
class JobSettings:
    """How a job runs; the defaults are those of a policy that sets nothing."""

    mode: ModeName = ModeName.OFFLINE  # the one asked for; modes.decide settles the job's
    free_space: FreeSpaceMethod = FreeSpaceMethod.AUTO
    free_space_timeout_s: float = 600.0
    reserve: Reserve = field(default_factory=Reserve)  # what a zero-fill leaves free
    compression: Compression = Compression.ZSTD
    cluster_size: int | None = None  # None keeps each image's own
    preallocation: str = "off"  # or "metadata"; never with compression
    shutdown_timeout_s: float = 120.0
    on_shutdown_timeout: OnShutdownTimeout = OnShutdownTimeout.ABORT
    min_gain: int = 64 * MIB
    min_gain_percent: float = 0.0
    after: After = After.PREVIOUS
    keep_backup: float | None = None  # seconds the original is kept; None: not kept
    # Turn discard='unmap' and detect_zeroes='unmap' on in the definition while the guest is off.
    enable_discard: bool = False
    # Convert raw and VMDK file disks to qcow2 (the convert mode; offline only).
    convert: bool = False
    dry_run: bool = False
    agent_start_timeout_s: float = 120.0
    qemu_img: str = "qemu-img"
    rate_limit: int | None = None  # bytes per second the rewrite may read (qemu-img -r)
    hooks: JobHooks = field(default_factory=JobHooks)

    def record(self) -> dict[str, object]:
        """What the journal keeps of the settings (history, and the estimate's learning)."""
        return {
            "mode": str(self.mode),
            "free_space": str(self.free_space),
            "host_reserve": self.reserve.host_min_bytes,
            "host_reserve_percent": self.reserve.host_percent,
            "guest_reserve_percent": self.reserve.guest_percent,
            "compression": str(self.compression),
            "cluster_size": self.cluster_size,
            "shutdown_timeout_s": self.shutdown_timeout_s,
            "on_shutdown_timeout": str(self.on_shutdown_timeout),
            "min_gain": self.min_gain,
            "min_gain_percent": self.min_gain_percent,
            "after": str(self.after),
            "keep_backup": self.keep_backup,
            "enable_discard": self.enable_discard,
            "convert": self.convert,
            "dry_run": self.dry_run,
            "rate_limit": self.rate_limit,
        }
