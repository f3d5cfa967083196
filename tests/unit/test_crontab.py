"""Crontab expressions mean what crontab(5) says, not what APScheduler 3 reads into numbers."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virt_reclaim import crontab

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
