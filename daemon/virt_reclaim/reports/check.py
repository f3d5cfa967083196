"""What ``check`` finds: every error and warning of every file, each policy's next window.

Pure over what it is given (the loaded configuration, the domains libvirt listed or
None, the time), so that tests need neither files' owners nor libvirt nor a clock.
Warnings are valid settings that surprise (a window longer than the time between two
starts, a default that changes how often a domain is reclaimed); they never change
the exit status.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virt_reclaim.config import crontab, selection
from virt_reclaim.config.loading import ConfigError, LoadedConfig
from virt_reclaim.config.policy import Mode, Policy
from virt_reclaim.reports import advice
from virt_reclaim.units import format_duration

ERROR = "error"
WARNING = "warning"
# Firings looked at to find the shortest time between two starts: a year of a daily cron.
_FIRINGS = 400


@dataclass(frozen=True)
class Finding:
    """One error or warning: where (file, line, policy, field) and why."""

    level: str  # ERROR or WARNING
    file: str | None
    policy: str | None
    field: str | None
    message: str
    value: Any = None
    line: int | None = None

    def __str__(self) -> str:
        parts = [] if self.file is None else [_file_line(self.file, self.line)]
        if self.policy:
            parts.append(f"policy {self.policy!r}")
        if self.field:
            parts.append(self.field)
        value = "" if self.value is None else f" (value: {self.value!r})"
        return ": ".join([*parts, self.message]) + value

    def to_json(self) -> dict[str, Any]:
        """The finding as a JSON object of ``check --json``."""
        return {
            "file": self.file,
            "line": self.line,
            "policy": self.policy,
            "field": self.field,
            "value": None if self.value is None else str(self.value),
            "reason": self.message,
        }

    @classmethod
    def of(cls, error: ConfigError) -> Finding:
        """The finding of a loading error."""
        return cls(
            ERROR, error.file, error.policy, error.field, error.message, error.value, error.line
        )


def _file_line(file: str, line: int | None) -> str:
    return file if line is None else f"{file}:{line}"


@dataclass(frozen=True)
class NextWindow:
    """A policy's next window, in its time zone."""

    start: dt.datetime
    end: dt.datetime
    open_now: bool

    def __str__(self) -> str:
        start, end = self.start, self.end
        shown_end = end.strftime("%H:%M" if end.date() == start.date() else "%a %Y-%m-%d %H:%M")
        zone = start.tzname() or ""
        state = "open now until" if self.open_now else "next window"
        if self.open_now:
            return f"{state} {end.strftime('%a %Y-%m-%d %H:%M')} {zone}"
        return f"{state} {start.strftime('%a %Y-%m-%d %H:%M')} to {shown_end} {zone}"

    def to_json(self) -> dict[str, Any]:
        """The window as ISO 8601 times with the policy zone's offset."""
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "open_now": self.open_now,
        }


@dataclass(frozen=True)
class PolicyReport:
    """One policy as ``check`` shows it."""

    file: str
    policy: Policy
    window: NextWindow | None  # None: disabled, or a cron that never fires again
    domains: tuple[str, ...] | None  # None: libvirt did not answer
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The policy's entry of ``check --json``."""
        return {
            "name": self.policy.name,
            "file": self.file,
            "enabled": self.policy.enabled,
            "priority": self.policy.priority,
            "mode": str(self.policy.mode),
            "timezone": self.policy.schedule.timezone,
            "next_window": None if self.window is None else self.window.to_json(),
            "domains": None if self.domains is None else list(self.domains),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class CheckReport:
    """Everything ``check`` found."""

    errors: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    policies: tuple[PolicyReport, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """``check --json``: valid, errors, warnings and policies."""
        return {
            "valid": not self.errors,
            "errors": [f.to_json() for f in self.errors],
            "warnings": [f.to_json() for f in self.warnings],
            "policies": [p.to_json() for p in self.policies],
        }


@dataclass(frozen=True)
class DomainToCheck:
    """What ``check`` needs of a libvirt domain."""

    name: str
    uuid: str
    xml: str


def check_config(
    loaded: LoadedConfig,
    domains: Sequence[DomainToCheck] | None,
    now: dt.datetime,
    *,
    policy_dir: str,
    policy_files: int | None,
) -> CheckReport:
    """Every error and warning of ``loaded``, and each policy's window and domains.

    ``domains`` is None when libvirt did not answer; ``policy_files`` is how many
    ``*.toml`` files ``policy_dir`` holds (None: no such folder, already an error).
    """
    errors = [Finding.of(e) for e in loaded.errors]
    warnings: list[Finding] = []
    if policy_files == 0:
        warnings.append(
            Finding(WARNING, policy_dir, None, None,
                    "no policy files (*.toml): the daemon runs but reclaims nothing")
        )  # fmt: skip
    policies = [policy for _file, policy in loaded.policies]
    selected: dict[str, list[str]] = {p.name: [] for p in policies}
    notes: dict[str, list[str]] = {p.name: [] for p in policies}
    for domain in domains or ():
        choice = selection.select(policies, domain.name, domain.uuid, domain.xml)
        if choice.conflict:
            errors.append(
                Finding(ERROR, None, None, None,
                        f"domain {domain.name}: policies {', '.join(choice.conflict)} all match "
                        "with the same priority; give one a higher priority or exclude the domain")
            )  # fmt: skip
        elif choice.policy is not None:
            selected[choice.policy.name].append(domain.name)
            notes[choice.policy.name] += [
                f"{domain.name} {note}" for note in advice.disk_notes(choice.policy, domain.xml)
            ]
    reports = []
    for file, policy in loaded.policies:
        warnings += [
            Finding(WARNING, file, policy.name, None, text)
            for text in [*advice.costly_settings(policy), *surprising_settings(policy, now)]
        ]
        reports.append(
            PolicyReport(
                file, policy,
                next_window(policy, now) if policy.enabled else None,
                None if domains is None else tuple(selected[policy.name]),
                tuple(notes[policy.name]),
            )
        )  # fmt: skip
    return CheckReport(tuple(errors), tuple(warnings), tuple(reports))


def surprising_settings(policy: Policy, now: dt.datetime) -> list[str]:
    """Settings of ``policy`` that are valid but likely not what was meant."""
    schedule, warnings = policy.schedule, []
    gap = shortest_gap(schedule.cron, now)
    if gap is not None and schedule.window > gap:
        warnings.append(
            f"schedule.window ({format_duration(schedule.window)}) is longer than the "
            f"{format_duration(gap)} between two starts of {schedule.cron!r}: a window opens "
            "before the last one closed"
        )
    unset = "min_interval" not in schedule.model_fields_set
    if unset and gap is not None and gap < schedule.min_interval:
        warnings.append(
            f"schedule.min_interval is not set: the default "
            f"{format_duration(schedule.min_interval)} applies, so a domain is reclaimed at "
            f"most once in {format_duration(schedule.min_interval)} although {schedule.cron!r} "
            f'starts every {format_duration(gap)}; set it (e.g. "{format_duration(gap)}") '
            "to follow the cron"
        )
    if "timezone" not in schedule.model_fields_set:
        warnings.append(
            f"schedule.timezone is not set: {schedule.cron!r} is read in UTC, not in the host's "
            'local time; set it (e.g. "Europe/Berlin", or "UTC" to keep it)'
        )
    if policy.mode is Mode.LIVE:
        if not policy.idle.required and policy.rewrite.rate_limit is None:
            warnings.append(
                "idle.required = false without rewrite.rate_limit: the rewrite of a busy guest's "
                'disk reads at full speed beside it; set e.g. rewrite.rate_limit = "50MiB"'
            )
        for name, value in (("rewrite.convert", policy.rewrite.convert),
                            ("guest.enable_discard", policy.guest.enable_discard)):  # fmt: skip
            if value:
                warnings.append(
                    f"{name} needs the guest off: a live policy applies it only to guests that "
                    "are already shut off when their job starts"
                )
    return warnings


def shortest_gap(cron: str, now: dt.datetime) -> dt.timedelta | None:
    """The shortest time between two starts of ``cron`` over its next firings (None: fewer than 2).

    Measured, not derived from the fields: "0 2 * * 1-5" has 24 h gaps and one of 72 h.
    Read in UTC, the cron's own clock: a daylight saving change moves one start by an hour,
    which is no reason to warn (APScheduler 3 even gives a nonexistent 02:00 twice).
    """
    trigger = crontab.trigger(cron, "UTC")
    shortest = None
    previous = trigger.get_next_fire_time(None, now)
    for _ in range(_FIRINGS):
        if previous is None:
            break
        fire = trigger.get_next_fire_time(previous, previous + dt.timedelta(seconds=1))
        if fire is None:
            break
        gap = fire - previous
        shortest = gap if shortest is None else min(shortest, gap)
        previous = fire
    return shortest


def next_window(policy: Policy, now: dt.datetime) -> NextWindow | None:
    """The window open at ``now``, else the next one, in the policy's time zone (no jitter)."""
    schedule = policy.schedule
    zone = zoneinfo.ZoneInfo(schedule.timezone)
    start = crontab.last_fire(schedule.cron, schedule.timezone, now, schedule.window)
    open_now = start is not None
    if start is None:
        start = crontab.next_fire(schedule.cron, schedule.timezone, now)
    if start is None:
        return None
    start = start.astimezone(zone)
    # Added in UTC: a 4 h window across a daylight saving change still lasts 4 h.
    end = (start.astimezone(dt.UTC) + schedule.window).astimezone(zone)
    return NextWindow(start, end, open_now)
