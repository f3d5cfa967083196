"""Standard 5-field crontab expressions as APScheduler 3 cron triggers.

APScheduler 3's ``CronTrigger.from_crontab`` counts numeric weekdays from
Monday = 0, so "0 2 * * 0" would run on Mondays instead of Sundays
(agronholm/apscheduler#286; fixed only in 4.0, which is not released). Here
numeric weekdays follow crontab(5): 0 and 7 are Sunday; they are handed to
APScheduler as names, which it reads correctly.
"""

from __future__ import annotations

import datetime as dt

from apscheduler.triggers.cron import CronTrigger

_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def trigger(expression: str, timezone: str, jitter_s: float = 0) -> CronTrigger:
    """The trigger of a crontab ``expression`` (minute hour day month weekday) in ``timezone``.

    Raises:
        ValueError: The expression is not a valid 5-field crontab line.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"Wrong number of fields; got {len(fields)}, expected 5")
    minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=weekday_names(weekday),
            timezone=timezone,
            jitter=int(jitter_s) or None,
        )
    except ValueError as exc:
        raise ValueError(bad_field(fields) or str(exc)) from None


# crontab(5)'s fields: the name an operator knows, the keyword of CronTrigger, what is allowed.
_FIELDS = (
    ("minute", "minute", "0-59"),
    ("hour", "hour", "0-23"),
    ("day of month", "day", "1-31"),
    ("month", "month", "1-12 or jan-dec"),
    ("day of week", "day_of_week", "0-7 (0 and 7 are Sunday) or sun-sat"),
)


def bad_field(fields: list[str]) -> str | None:
    """Name the first of the five ``fields`` that APScheduler refuses, with its allowed values.

    CronTrigger's own messages do not say which field they mean ("the last value (25) is
    higher than the maximum value (23)"), so each field is tried alone.
    """
    for (name, keyword, allowed), text in zip(_FIELDS, fields, strict=True):
        try:
            value = weekday_names(text) if keyword == "day_of_week" else text
            CronTrigger(**{keyword: value}, timezone="UTC")
        except ValueError as exc:
            reason = str(exc).removeprefix(f"Error validating expression {text!r}: ")
            return f"{name} field {text!r}: {reason} (allowed: {allowed})"
    return None


def weekday_names(field: str) -> str:
    """Rewrite a crontab weekday field with numbers (0-7, ranges, steps) into day names."""
    parts = []
    for part in field.lower().split(","):
        if not any(c.isdigit() for c in part.split("/")[0]) and "/" not in part:
            parts.append(part)  # "*", a name or a name range: APScheduler reads these right
            continue
        parts.extend(_NAMES[day % 7] for day in _expand(part))
    # Keep the order of first appearance and drop repeats (0 and 7 are both Sunday).
    return ",".join(dict.fromkeys(parts))


def _expand(part: str) -> list[int]:
    span, _, step_text = part.partition("/")
    step = int(step_text) if step_text else 1
    if step < 1:
        raise ValueError(f"weekday step must be at least 1: {part!r}")
    if span == "*":
        first, last = 0, 6
    elif "-" in span:
        first_text, last_text = span.split("-", 1)
        first, last = _day(first_text), _day(last_text)
    else:
        first = _day(span)
        last = 6 if step_text else first
    if first > last:
        raise ValueError(f"weekday range runs backwards: {part!r}")
    return list(range(first, last + 1, step))


def _day(text: str) -> int:
    if text in _NAMES:
        return _NAMES.index(text)
    if not text.isdigit() or int(text) > 7:
        raise ValueError(f"weekday must be 0-7 or a name: {text!r}")
    return int(text)


def next_fire(expression: str, timezone: str, after: dt.datetime) -> dt.datetime | None:
    """The first time the expression fires after ``after`` (without jitter)."""
    fire: dt.datetime | None = trigger(expression, timezone).get_next_fire_time(None, after)
    return fire


def last_fire(
    expression: str, timezone: str, now: dt.datetime, within: dt.timedelta
) -> dt.datetime | None:
    """The latest time in (``now`` - ``within``, ``now``] the expression fired at, or None.

    Without jitter: the time the crontab line names. A daemon that starts or reloads
    inside a window asks this to learn that the window is open and since when.
    """
    cron = trigger(expression, timezone)
    latest = None
    fire: dt.datetime | None = cron.get_next_fire_time(None, now - within + _SECOND)
    while fire is not None and fire <= now:
        latest = fire
        fire = cron.get_next_fire_time(fire, fire + _SECOND)
    return latest


_SECOND = dt.timedelta(seconds=1)
