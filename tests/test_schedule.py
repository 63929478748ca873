from __future__ import annotations

import pytest

from controlplane.core.schedule import ScheduleError, active, parse_window
from controlplane.core.states import State
from controlplane.settings import ConfigError, ModelEntry, parse_entry
from tests.test_pool import hot, make

MON, FRI, SAT, SUN = 0, 4, 5, 6


def at(h: int, m: int = 0) -> int:
    return h * 60 + m


def test_weekday_office_hours() -> None:
    w = parse_window("w", {"days": "mon-fri", "start": "08:00", "end": "18:00"})
    assert w.contains(MON, at(8)) and w.contains(FRI, at(17, 59))
    assert not w.contains(MON, at(18)) and not w.contains(MON, at(7, 59))
    assert not w.contains(SAT, at(12))
    assert w.describe() == "mon,tue,wed,thu,fri 08:00-18:00"


def test_overnight_window_belongs_to_the_day_it_starts() -> None:
    w = parse_window("w", {"days": ["fri"], "start": "22:00", "end": "06:00"})
    assert w.contains(FRI, at(23)) and w.contains(SAT, at(5, 59))
    assert not w.contains(SAT, at(23)) and not w.contains(FRI, at(5))


def test_day_forms() -> None:
    assert parse_window("w", {"start": "00:00", "end": "24:00"}).days == frozenset(range(7))
    assert parse_window("w", {"days": "weekends", "start": "1:00", "end": "2:00"}).days == {5, 6}
    assert parse_window("w", {"days": "sat-mon", "start": "1:00", "end": "2:00"}).days == {5, 6, 0}
    assert active(
        [parse_window("w", {"days": "sun", "start": "10:00", "end": "11:00"})], SUN, at(10)
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"days": "funday", "start": "08:00", "end": "09:00"}, "w.days: 'funday' is not a day"),
        ({"start": "8am", "end": "09:00"}, "w.start: '8am' is not a time of day"),
        ({"start": "08:00"}, "w.end: missing"),
        ({"start": "08:00", "end": "08:00"}, "the window is empty"),
        ({"start": "08:00", "end": "25:00"}, "w.end: '25:00' is not a time of day"),
        ({"start": "08:00", "end": "09:00", "tz": "UTC"}, "w.tz: unknown key"),
        ("mon-fri", "w: 'mon-fri' is not a mapping"),
    ],
)
def test_bad_windows_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_window("w", raw)
    assert message in str(info.value)


def test_registry_entries_carry_windows() -> None:
    e = parse_entry(
        {"model_id": "m", "schedule": [{"days": "mon-fri", "start": "08:00", "end": "18:00"}]}
    )
    assert e.windows()[0].start == at(8)
    with pytest.raises(ConfigError, match=r"model\.schedule\[0\]\.start"):
        parse_entry({"model_id": "m", "schedule": [{"start": "x", "end": "18:00"}]})


def test_a_model_is_kept_loaded_inside_its_window_and_follows_its_ttl_after() -> None:
    window = [{"days": "mon-fri", "start": "08:00", "end": "18:00"}]
    pool, fake, clock = make([ModelEntry("m", ttl_minutes=1, schedule=tuple(window))])
    assert pool.refresh_schedules(MON, at(9)) == {"m"}
    hot(pool, fake, "m")
    assert pool.record("m").deadline is None
    clock.now += 10**5
    pool.expire(clock.now)
    assert pool.record("m").state is State.HOT  # kept while the window is open
    assert pool.refresh_schedules(MON, at(18)) == set()
    assert pool.record("m").deadline == pytest.approx(clock.now + 60)
    view = pool.describe(pool.record("m"))
    assert view["schedule"] == ["mon,tue,wed,thu,fri 08:00-18:00"] and not view["scheduled_now"]
    clock.now += 61
    pool.expire(clock.now)
    assert pool.record("m").state is State.COOLING
