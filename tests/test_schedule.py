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


def test_schedule_window_ending_24_00_runs_to_the_end_of_the_day() -> None:
    """24:00 is the end of the day as an end (the OpenAPI document allows it); a pure parse."""
    w = parse_window("w", {"days": "mon", "start": "18:00", "end": "24:00"})
    assert (w.start, w.end) == (at(18), 24 * 60)
    assert w.contains(MON, at(23, 59)) and not w.contains(MON, at(17, 59))
    assert not w.contains(1, at(0))  # Tuesday 00:00: the window ended with Monday
    assert w.describe() == "mon 18:00-24:00"
    assert parse_window("w", {"start": "22:00", "end": "24:0"}).end == 24 * 60
    assert parse_window("w", {"start": "0:00", "end": "24:00"}).contains(SUN, at(23, 59))


def test_schedule_times_are_read_as_the_openapi_pattern_reads_them() -> None:
    """The server accepts a time exactly when the document's pattern does; a pure parse."""
    import re

    from tests.test_openapi import load_document

    window = load_document()["components"]["schemas"]["ScheduleWindow"]["properties"]
    samples = [
        "0:0",
        "8:5",
        "08:00",
        "23:59",
        "24:00",
        "24:0",
        "24:01",
        "25:00",
        "008:00",
        "\u0668:00",
        "08:00\n",
        " 08:00",
        "8",
        "",
        "-1:00",
        "12:60",
    ]
    for part, other in (("start", "12:30"), ("end", "12:30")):
        pattern = window[part]["pattern"]
        for text in samples:
            raw = (
                {"start": text, "end": other} if part == "start" else {"start": other, "end": text}
            )
            # ECMA-262's `$` (the document's dialect) is the end of the input; Python's also
            # matches before a final newline.
            documented = re.search(pattern.replace("$", r"\Z"), text) is not None
            try:
                parse_window("w", raw)
                accepted = True
            except ScheduleError as exc:
                accepted = "equals start" in str(exc)
            assert accepted == documented, (
                f"{part} {text!r}: server {accepted}, document {documented}"
            )


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
        ({"start": "24:00", "end": "08:00"}, "w.start: '24:00' is the end of the day, not a start"),
        ({"start": "008:00", "end": "09:00"}, "w.start: '008:00' is not a time of day"),
        ({"start": "08:00", "end": "09:60"}, "w.end: '09:60' is not a time of day"),
        ({"start": "\u0668:00", "end": "09:00"}, "w.start: '\u0668:00' is not a time of day"),
        ({"start": 8, "end": "09:00"}, "w.start: 8 is not a time of day"),
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
