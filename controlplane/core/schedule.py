"""Warmup schedule windows: "keep this model loaded on weekdays 08:00-18:00" (pure).

A window is days of the week and a start and end time of day, in the node's local time. An end
before the start wraps past midnight (22:00-06:00); an end of 24:00 is the end of the day
(18:00-24:00), and 24:00 is only an end. Times are H:MM or HH:MM in ASCII digits, exactly as the
OpenAPI document's patterns say. Parsing errors name the key and value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_END: Final = 24 * 60
#: A time of day 00:00-23:59 (the hour and the minute may have one digit); ASCII digits only.
TIME_RE: Final = re.compile(r"([01]?[0-9]|2[0-3]):([0-5]?[0-9])")
#: The end of the day, as the end of a window.
END_OF_DAY_RE: Final = re.compile(r"24:0?0")


class ScheduleError(ValueError):
    """An invalid window; the message names the key."""


@dataclass(frozen=True)
class Window:
    """Days (0 = Monday) and minutes of the day [start, end)."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether a local time (weekday 0-6, minute of the day 0-1439) is inside."""
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Overnight: the part before midnight belongs to the listed day, the rest to the next.
        if minute >= self.start:
            return weekday in self.days
        return minute < self.end and (weekday - 1) % 7 in self.days

    def describe(self) -> str:
        names = ",".join(DAYS[d] for d in sorted(self.days))
        return f"{names} {_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _minutes(key: str, value: Any, *, end: bool = False) -> int:
    """Minutes of the day of ``HH:MM``; 24:00 (the end of the day) only where ``end``."""
    if isinstance(value, str):
        match = TIME_RE.fullmatch(value)
        if match:
            return int(match[1]) * 60 + int(match[2])
        if END_OF_DAY_RE.fullmatch(value):
            if end:
                return DAY_END
            raise ScheduleError(
                f"{key}: {value!r} is the end of the day, not a start (a window starts at "
                "00:00-23:59)"
            )
    limit = "24:00" if end else "23:59"
    raise ScheduleError(f"{key}: {value!r} is not a time of day HH:MM (00:00-{limit})")


def _days(key: str, value: Any) -> frozenset[int]:
    if isinstance(value, str):
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ScheduleError(f"{key}: {value!r} is not a list of days")
    days: set[int] = set()
    for item in items:
        token = str(item).strip().lower()
        if token in ("*", "daily", "all"):
            days.update(range(7))
        elif token in ("weekdays",):
            days.update(range(5))
        elif token in ("weekends",):
            days.update((5, 6))
        elif "-" in token:
            a, _, b = token.partition("-")
            if a not in DAYS or b not in DAYS:
                raise ScheduleError(f"{key}: {item!r} is not a range of days like mon-fri")
            i, j = DAYS.index(a), DAYS.index(b)
            days.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)])
        elif token in DAYS:
            days.add(DAYS.index(token))
        else:
            raise ScheduleError(f"{key}: {item!r} is not a day ({', '.join(DAYS)}, mon-fri, daily)")
    if not days:
        raise ScheduleError(f"{key}: no day given")
    return frozenset(days)


def parse_window(key: str, raw: Any) -> Window:
    """``{"days": "mon-fri", "start": "08:00", "end": "18:00"}`` (days default: daily)."""
    if not isinstance(raw, Mapping):
        raise ScheduleError(f"{key}: {raw!r} is not a mapping with days, start and end")
    unknown = sorted(set(raw) - {"days", "start", "end"})
    if unknown:
        raise ScheduleError(f"{key}.{unknown[0]}: unknown key (expected days, start, end)")
    for part in ("start", "end"):
        if part not in raw:
            raise ScheduleError(f"{key}.{part}: missing")
    start = _minutes(f"{key}.start", raw["start"])
    end = _minutes(f"{key}.end", raw["end"], end=True)
    if start == end:
        raise ScheduleError(f"{key}.end: {raw['end']!r} equals start: the window is empty")
    return Window(_days(f"{key}.days", raw.get("days", "daily")), start, end)


def active(windows: Iterable[Window], weekday: int, minute: int) -> bool:
    """Whether any window contains the given local time."""
    return any(w.contains(weekday, minute) for w in windows)
