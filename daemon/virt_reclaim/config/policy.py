"""Policies: which domains to reclaim, when and how. pydantic v2 models, frozen, no unknown keys.

A policy file holds one or more ``[[policy]]`` tables. Every field has a
description (it becomes the JSON Schema that ``virt-reclaim schema`` prints).
"""

from __future__ import annotations

import enum
import re
import zoneinfo
from datetime import timedelta
from typing import Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from virt_reclaim.config import crontab
from virt_reclaim.config.fields import ClusterSize, Duration, Model, Size
from virt_reclaim.config.hooks import Hooks
from virt_reclaim.job.freespace.budget import Reserve
from virt_reclaim.job.settings import (
    After,
    Compression,
    FreeSpaceMethod,
    JobSettings,
    ModeName,
    OnShutdownTimeout,
)
from virt_reclaim.units import KIB, MIB

# The defaults of `virt-reclaim run` are those of a policy that sets nothing.
_JOB_DEFAULTS = JobSettings()


class MetadataMatch(Model):
    """Match on an element in the domain's libvirt <metadata>."""

    namespace: str = Field(description="XML namespace URI of the element")
    element: str = Field(description="local name of the element")
    value: str | None = Field(default=None, description="required text; any text when unset")


class Match(Model):
    """Which domains a policy selects."""

    names: tuple[str, ...] = Field(
        default=(),
        description="domain names or shell-style globs (fnmatch)",
        examples=[["web-*", "build-??"]],
    )
    uuids: tuple[str, ...] = Field(
        default=(),
        description="domain UUIDs",
        examples=[["4dc0e6c8-12c3-4b2e-9e55-8f0c8b1f4a10"]],
    )
    exclude: tuple[str, ...] = Field(
        default=(),
        description="names or globs that are never selected, even if matched above",
        examples=[["web-db*"]],
    )
    metadata: MetadataMatch | None = Field(
        default=None, description="an element the domain's <metadata> must hold"
    )

    @field_validator("uuids")
    @classmethod
    def _uuids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        pattern = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
        bad = [u for u in value if not pattern.match(u)]
        if bad:
            raise ValueError(f"not UUIDs: {', '.join(bad)}")
        return tuple(u.lower() for u in value)

    @model_validator(mode="after")
    def _selects_something(self) -> Match:
        if not (self.names or self.uuids or self.metadata):
            raise ValueError("selects nothing: give names, uuids or metadata")
        return self


class Schedule(Model):
    """When a policy runs."""

    cron: str = Field(
        description="5-field crontab(5) expression of the window's start (minute hour "
        "day-of-month month day-of-week; 0 and 7 are Sunday)",
        examples=["0 2 * * sun", "30 1 * * *"],
    )
    timezone: str = Field(
        default="UTC",
        description="IANA time zone the cron expression is read in",
        examples=["Europe/Berlin"],
    )
    window: Duration = Field(
        default=timedelta(hours=4),
        description="how long after each cron start jobs may begin (a job that began may run "
        "past the end)",
    )
    jitter: Duration = Field(
        default=timedelta(0), description="random delay added to each start (spreads hosts)"
    )
    min_interval: Duration = Field(
        default=timedelta(days=7), description="least time between two reclaims of a domain"
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        # Checked with the scheduler's own parser; the syntax does not depend on the zone.
        try:
            crontab.trigger(value, timezone="UTC")
        except ValueError as exc:
            raise ValueError(f"cron {value!r}: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (e.g. UTC, Europe/Berlin)") from None
        return value


class Idle(Model):
    """When a guest counts as idle: every threshold held for ``duration``."""

    cpu_percent: float = Field(
        default=5.0,
        ge=0,
        le=100,
        description="CPU use, in percent of the guest's vCPUs, stays below this",
    )
    disk_bytes_per_s: Size = Field(
        default=ByteSize(MIB),
        description="disk reads plus writes per second stay below this",
    )
    net_bytes_per_s: Size = Field(
        default=ByteSize(100 * KIB),
        description="network bytes received plus sent per second stay below this",
    )
    duration: Duration = Field(
        default=timedelta(minutes=15),
        description="the thresholds hold for at least this long",
        examples=["15m", "1h"],
    )
    no_logged_in_users: bool = Field(
        default=False, description="also require no logged-in users (guest agent)"
    )
    required: bool = Field(
        default=True,
        description="only idle guests are reclaimed; false (live mode only) reclaims busy "
        "ones too, throttled by rewrite.rate_limit",
    )


class FreeSpace(Model):
    """Freeing the guest's unused blocks before the rewrite."""

    method: FreeSpaceMethod = Field(
        default=_JOB_DEFAULTS.free_space,
        description="auto (trim where every disk has discard, else zero), trim (guest-fstrim), "
        "zero (fill free space with zeros through guest-exec) or none",
    )
    timeout: Duration = Field(
        default=timedelta(seconds=_JOB_DEFAULTS.free_space_timeout_s),
        description="a trim or zero-fill that takes longer is stopped (the job goes on without it)",
    )
    host_reserve: Size = Field(
        default=ByteSize(_JOB_DEFAULTS.reserve.host_min_bytes),
        description="each host filesystem keeps at least this free (or host_reserve_percent, "
        "whichever is larger) through the job's writes: a rewrite that would go below it "
        "is skipped before the guest is shut down, and a zero-fill leaves it free beyond "
        "what the rewrite needs",
    )
    host_reserve_percent: float = Field(
        default=_JOB_DEFAULTS.reserve.host_percent, ge=0, le=90,
        description="each host filesystem keeps at least this share free through the "
        "job's writes (see host_reserve)",
    )  # fmt: skip
    guest_reserve_percent: float = Field(
        default=_JOB_DEFAULTS.reserve.guest_percent, ge=0, le=90,
        description="a zero-fill leaves this share of each guest filesystem free for the "
        "guest's own services",
    )  # fmt: skip


class Shutdown(Model):
    """Shutting the guest down."""

    timeout: Duration = Field(
        default=timedelta(seconds=_JOB_DEFAULTS.shutdown_timeout_s),
        description="how long to wait for the guest to be off after the ACPI shutdown request",
        examples=["2m", "5m"],
    )
    on_timeout: OnShutdownTimeout = Field(
        default=_JOB_DEFAULTS.on_shutdown_timeout,
        description="when the guest is not off in time: abort (leave it running, change nothing) "
        "or force (power it off)",
    )


class Rewrite(Model):
    """The new image."""

    compression: Compression = Field(
        default=_JOB_DEFAULTS.compression,
        description="qcow2 compression of the new image: zstd (needs QEMU >= 5.1 to read), zlib "
        "or none",
    )
    cluster_size: ClusterSize | None = Field(
        default=None,
        description="cluster size of the new image, a power of two from 512 to 2MiB (64KiB, not "
        "64K = 64000); unset keeps each image's own",
        examples=["64KiB"],
    )
    preallocation: Literal["off", "metadata"] = Field(
        default="off", description="qcow2 preallocation of the new image"
    )
    min_gain: Size = Field(
        default=ByteSize(_JOB_DEFAULTS.min_gain),
        description="skip a domain whose estimated gain is below this",
    )
    min_gain_percent: float = Field(
        default=_JOB_DEFAULTS.min_gain_percent, ge=0, le=100,
        description="skip below this estimated gain in percent of the allocated bytes",
    )  # fmt: skip
    rate_limit: Size | None = Field(
        default=None,
        description="bytes per second the rewrite may read (qemu-img convert -r), e.g. "
        "50MiB: the guest (live) and its neighbours keep their disk bandwidth",
        examples=["50MiB"],
    )
    keep_backup: Duration | None = Field(
        default=None,
        description="keep the original this long beside the new image (e.g. 2d), then "
        "delete it: its space comes back only then. Not set: no backup",
        examples=["2d"],
    )
    convert: bool = Field(
        default=False,
        description="convert raw and VMDK (monolithicSparse, monolithicFlat, streamOptimized) "
        "file disks to qcow2 beside the original (disk.raw -> disk.qcow2) while the guest is "
        "off, verify, and point the definition at it; the original is removed once the guest "
        "runs again (kept with keep_backup). Offline jobs only",
    )

    @field_validator("cluster_size")
    @classmethod
    def _cluster_size(cls, value: ByteSize | None) -> ByteSize | None:
        if value is not None and (value < 512 or value > 2 * MIB or value & (value - 1)):
            raise ValueError(
                f"{int(value)} bytes: a power of two from 512 to 2MiB (64KiB, not 64K = 64000)"
            )
        return value

    @model_validator(mode="after")
    def _compression_without_preallocation(self) -> Rewrite:
        if self.compression is not Compression.NONE and self.preallocation != "off":
            raise ValueError("compression and preallocation exclude each other")
        return self


class Guest(Model):
    """What the job may change in the guest's definition."""

    enable_discard: bool = Field(
        default=False,
        description="while the guest is off in an offline job, set discard='unmap' and "
        "detect_zeroes='unmap' on its reclaimed disks in the persistent definition: from the "
        "next start a trim frees host space, and later reclaims trim instead of zero-filling",
    )


class Mode(enum.StrEnum):
    """How a policy reclaims."""

    OFFLINE = "offline"
    LIVE = "live"


class Policy(Model):
    """One policy: a name, the domains it selects, its schedule, and how to reclaim."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="unique name: letters, digits, . _ -",
        examples=["weekly-web"],
    )
    enabled: bool = Field(default=True, description="a disabled policy selects nothing")
    priority: int = Field(
        default=0, description="when two policies match a domain, the higher one wins"
    )
    mode: Mode = Field(
        default=Mode.OFFLINE,
        description="offline (shut down, rewrite, start) or live (no downtime: snapshot, "
        "rewrite the base, block copy and commit with pivots; a shut-off guest is done offline)",
    )
    match: Match = Field(description="which domains this policy selects")
    schedule: Schedule = Field(description="when its windows open, and for how long")
    idle: Idle = Field(default_factory=Idle, description="when a guest counts as idle")
    free_space: FreeSpace = Field(
        default_factory=FreeSpace, description="freeing space inside the guest first"
    )
    shutdown: Shutdown = Field(default_factory=Shutdown, description="shutting the guest down")
    rewrite: Rewrite = Field(default_factory=Rewrite, description="the new image")
    guest: Guest = Field(default_factory=Guest, description="changes to the guest's definition")
    hooks: Hooks = Field(
        default_factory=Hooks,
        description="commands run before a guest is shut down and after the job ends",
    )
    after: After = Field(
        default=After.PREVIOUS,
        description="the guest's state after a job that succeeded: previous (as it was), start "
        "or off (a failed job always restores the previous)",
    )

    @model_validator(mode="after")
    def _busy_guests_only_live(self) -> Policy:
        if not self.idle.required and self.mode is not Mode.LIVE:
            raise ValueError(
                'idle.required = false needs mode = "live": offline would shut a busy guest down'
            )
        return self

    @model_validator(mode="after")
    def _window_fits_a_shutdown(self) -> Policy:
        if self.schedule.window < self.shutdown.timeout:
            raise ValueError(
                f"schedule.window ({self.schedule.window}) is shorter than shutdown.timeout "
                f"({self.shutdown.timeout}): no job could ever fit"
            )
        return self


class PolicyFile(Model):
    """A policy file: ``[[policy]]`` tables."""

    policy: tuple[Policy, ...] = Field(description="the policies of this file")

    @model_validator(mode="after")
    def _not_empty(self) -> PolicyFile:
        if not self.policy:
            raise ValueError("the file defines no [[policy]]")
        return self


def job_settings(policy: Policy, **overrides: Any) -> JobSettings:  # noqa: ANN401
    """The job settings a policy gives; ``overrides`` (explicit run options) win."""
    rewrite, shutdown, free_space = policy.rewrite, policy.shutdown, policy.free_space
    values: dict[str, Any] = {
        "free_space": free_space.method,
        "free_space_timeout_s": free_space.timeout.total_seconds(),
        "reserve": Reserve(
            host_percent=free_space.host_reserve_percent,
            host_min_bytes=int(free_space.host_reserve),
            guest_percent=free_space.guest_reserve_percent,
        ),
        "compression": rewrite.compression,
        "cluster_size": None if rewrite.cluster_size is None else int(rewrite.cluster_size),
        "preallocation": rewrite.preallocation,
        "shutdown_timeout_s": shutdown.timeout.total_seconds(),
        "on_shutdown_timeout": shutdown.on_timeout,
        "min_gain": int(rewrite.min_gain),
        "min_gain_percent": rewrite.min_gain_percent,
        "keep_backup": None if rewrite.keep_backup is None else rewrite.keep_backup.total_seconds(),
        "convert": rewrite.convert,
        "enable_discard": policy.guest.enable_discard,
        "rate_limit": None if rewrite.rate_limit is None else int(rewrite.rate_limit),
        "after": policy.after,
        "mode": ModeName(policy.mode),
        "hooks": policy.hooks.job_hooks(),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return JobSettings(**values)
