"""Crontab expressions mean what crontab(5) says, not what APScheduler 3 reads into numbers."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virt_reclaim.config import crontab

# Tuesday, 24 November 2026, midnight UTC
TUESDAY = dt.datetime(2026, 11, 24, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("weekday", "expected"),
    [
        ("0", "Sun"), ("7", "Sun"), ("1", "Mon"), ("6", "Sat"), ("sun", "Sun"),
        ("mon-fri", "Tue"), ("5-7", "Fri"), ("0,6", "Sat"),
    ],
)  # fmt: skip
def test_numeric_weekdays_follow_crontab(weekday: str, expected: str) -> None:
    fire = crontab.next_fire(f"0 2 * * {weekday}", "UTC", TUESDAY)
    assert fire is not None
    # Within the next week, on the first matching day.
    assert fire.strftime("%a") == expected
    assert fire - TUESDAY < dt.timedelta(days=7)


def test_steps_count_from_sunday() -> None:
    assert crontab.weekday_names("*/2") == "sun,tue,thu,sat"
    assert crontab.weekday_names("1-5/2") == "mon,wed,fri"


def test_time_zone_is_honoured() -> None:
    fire = crontab.next_fire("0 2 * * *", "Europe/Berlin", TUESDAY)
    assert fire is not None
    assert fire.astimezone(dt.UTC).hour == 1  # 02:00 CET is 01:00 UTC in November


@pytest.mark.parametrize("bad", ["0 2 * *", "0 2 * * 8", "0 2 * * 5-1", "0 2 * * */0", "x 2 * * *"])
def test_invalid_expressions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        crontab.trigger(bad, "UTC")


@given(st.sets(st.integers(min_value=0, max_value=7), min_size=1))
def test_any_list_of_day_numbers_fires_on_exactly_those_days(days: set[int]) -> None:
    expression = "0 2 * * " + ",".join(map(str, sorted(days)))
    trigger = crontab.trigger(expression, "UTC")
    fired = set()
    moment = TUESDAY
    for _ in range(14):
        fire = trigger.get_next_fire_time(None, moment)
        assert fire is not None
        fired.add(int(fire.strftime("%w")))  # %w: 0 is Sunday, as in crontab
        moment = fire + dt.timedelta(minutes=1)
    assert fired == {d % 7 for d in days}


def at(hour: int, minute: int, second: int = 0) -> dt.datetime:
    """That time on TUESDAY (UTC)."""
    return TUESDAY.replace(hour=hour, minute=minute, second=second)


@pytest.mark.parametrize(
    ("expression", "now", "within", "expected"),
    [
        # A nightly 02:00 window of 4 h, asked at 02:35: open since 02:00.
        ("0 2 * * *", at(2, 35), dt.timedelta(hours=4),
         at(2, 0)),
        # Asked at 06:00 sharp: the window (02:00 + 4 h) has just closed.
        ("0 2 * * *", at(6, 0), dt.timedelta(hours=4), None),
        # At its cron time itself: open since now.
        ("0 2 * * *", at(2, 0), dt.timedelta(hours=4),
         at(2, 0)),
        # Every minute with a 10 min window: the latest minute, not the first.
        ("* * * * *", at(2, 35, 20), dt.timedelta(minutes=10),
         at(2, 35)),
        # Sundays only (crontab's 0), asked on the Tuesday after: long closed.
        ("0 2 * * 0", at(2, 30), dt.timedelta(hours=4), None),
    ],
)  # fmt: skip
def test_last_fire_finds_the_window_open_now(
    expression: str, now: dt.datetime, within: dt.timedelta, expected: dt.datetime | None
) -> None:
    assert crontab.last_fire(expression, "UTC", now, within) == expected


def test_last_fire_in_the_policys_time_zone() -> None:
    # 02:00 in Berlin is 01:00 UTC in November: at 04:30 UTC a 4 h window is still open.
    now = dt.datetime(2026, 11, 24, 4, 30, tzinfo=dt.UTC)
    fired = crontab.last_fire("0 2 * * *", "Europe/Berlin", now, dt.timedelta(hours=4))
    assert fired is not None
    assert fired.astimezone(dt.UTC) == dt.datetime(2026, 11, 24, 1, 0, tzinfo=dt.UTC)
