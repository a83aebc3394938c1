"""Business time: weekly open hours in an IANA zone, minus holidays, counted in real seconds.

Business time is real elapsed time while the local wall clock shows an open hour on a
non-holiday local date. The open instants of one local date are found by walking the zone's
UTC-offset runs around that date: an instant is open when its own local time (fold included)
lies inside a span. So across a DST change 24/7 stays 24 real hours a day, an open hour the
clock skips counts nothing, and an open hour the clock repeats counts twice.

A span whose end is not after its start crosses midnight ("22:00-06:00" on Monday is open
Monday 22:00-24:00 and Tuesday 00:00-06:00); each part belongs to the local date it falls on,
so a holiday on Tuesday closes Tuesday's part.

Instants are handled as integer microseconds since the epoch, so `add` and `elapsed` are exact
inverses down to the microsecond (`add_us` and `elapsed_us` take and give them as such). Open
intervals are cached per local date and per UTC day, and laid end to end with running totals
(`_Line`), so `add` and `elapsed` are a bisection or two whatever the span.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holidays_lib

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALWAYS = "24/7"

_DAY = 86_400
_US = 1_000_000
_DAY_US = _DAY * _US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_REACH = 27 * 3600  # further than any UTC offset, so a local date's instants lie within it
_MAX_CLOSED_DAYS = 3_700

Interval = tuple[int, int]
WeeklyHours = tuple[tuple[Interval, ...], ...]  # per weekday (Monday first): (start, end) seconds


def _clock_seconds(text: str, *, allow_24: bool) -> int:
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a time of day HH:MM or HH:MM:SS")
    h, m, s = (int(p) for p in (*parts, "00")[:3])
    if h == 24 and m == 0 and s == 0 and allow_24:
        return _DAY
    if h > 23 or m > 59 or s > 59:
        raise ValueError(f"{text!r} is not a time of day")
    return h * 3600 + m * 60 + s


def _weekday_keys(key: str) -> list[int]:
    name = key.strip().lower()
    if name in WEEKDAYS:
        return [WEEKDAYS.index(name)]
    first, sep, last = name.partition("-")
    if sep and first in WEEKDAYS and last in WEEKDAYS:
        a, b = WEEKDAYS.index(first), WEEKDAYS.index(last)
        return [(a + i) % 7 for i in range((b - a) % 7 + 1)]
    raise ValueError(f"{key!r} is not a weekday (mon..sun) or a range like mon-fri")


def _fmt(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}" + (f":{s:02d}" if s else "")


def parse_hours(hours: str | Mapping[str, Sequence[str]]) -> WeeklyHours:
    """Weekly hours from `"24/7"` or `{"mon-fri": ["09:00-12:00", "13:00-17:00"], ...}`.

    Weekdays left out are closed. A span ending at or before its start crosses midnight.
    Raises ValueError naming the weekday and spans on overlap or a malformed span.
    """
    if isinstance(hours, str):
        if hours.strip() != ALWAYS:
            raise ValueError(f"hours must be {ALWAYS!r} or a mapping of weekday to spans")
        return tuple(((0, _DAY),) for _ in WEEKDAYS)
    days: list[list[tuple[int, int, str]]] = [[] for _ in WEEKDAYS]
    for key, spans in hours.items():
        if isinstance(spans, str):
            raise ValueError(f"{key}: spans must be a list like ['09:00-17:00']")
        for wd in _weekday_keys(key):
            for text in spans:
                start_text, sep, end_text = str(text).partition("-")
                if not sep:
                    raise ValueError(f"{key}: {text!r} is not a span like '09:00-17:00'")
                start = _clock_seconds(start_text, allow_24=False)
                end = _clock_seconds(end_text, allow_24=True)
                if end > start:
                    days[wd].append((start, end, text))
                else:
                    days[wd].append((start, _DAY, text))
                    if end > 0:
                        days[(wd + 1) % 7].append((0, end, f"{text} (from {WEEKDAYS[wd]})"))
    weekly: list[tuple[Interval, ...]] = []
    for wd, spans_of_day in enumerate(days):
        spans_of_day.sort()
        for (_, prev_end, prev), (start, _, text) in itertools.pairwise(spans_of_day):
            if start < prev_end:
                raise ValueError(f"{WEEKDAYS[wd]}: span {text!r} overlaps span {prev!r}")
        weekly.append(tuple((s, e) for s, e, _ in spans_of_day))
    return tuple(weekly)


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def epoch_us(at: datetime) -> int:
    """An aware instant as integer microseconds since the epoch (`add_us`, `elapsed_us`)."""
    # Event times are UTC (see `domain.events`): skip asking their zone for its offset.
    if at.tzinfo is not UTC and (at.tzinfo is None or at.utcoffset() is None):
        raise ValueError(f"naive datetime {at.isoformat()}: business time needs aware instants")
    delta = at - _EPOCH
    return (delta.days * _DAY + delta.seconds) * _US + delta.microseconds


def from_epoch_us(us: int) -> datetime:
    """The UTC datetime of integer microseconds since the epoch."""
    # Positional: `timedelta(microseconds=us)` costs three times as much (keyword parsing and
    # float normalisation).
    return _EPOCH + timedelta(0, 0, us)


class _Line:
    """The open intervals of the consecutive UTC days [first, end) laid end to end, each with
    the open time counted before it and by its end: the open time up to an instant, and the
    instant by which some open time has passed, are one bisection each, so neither `add` nor
    `elapsed` walks days. Intervals that meet (at UTC midnight) are joined. Counts run from an
    arbitrary origin, so earlier days can be put in front without renumbering the rest.

    A line the calendar holds is never changed: a longer one is built from a `copy` and put in
    its place. Policies (and so calendars) are shared across threads — the embedded engine's
    fold and the explain endpoint use the same cached default policy — and a reader in the
    middle of a bisection must not see the lists grow, shift or be replaced under it.
    """

    __slots__ = ("after", "before", "closed_run", "end", "ends", "first", "hi", "lo", "origin",
                 "starts", "total")  # fmt: skip

    def __init__(self, day: int = 0) -> None:
        self.first = self.end = day
        self.lo = self.hi = day * _DAY_US  # the covered instants [lo, hi), epoch microseconds
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.before: list[int] = []  # open time counted by starts[i]
        self.after: list[int] = []  # open time counted by ends[i]
        self.origin = 0  # open time counted by the start of day `first`
        self.total = 0  # open time counted by the start of day `end`
        self.closed_run = 0  # closed days at the end, to give up on a calendar never open

    def copy(self) -> _Line:
        """A line with the same content, to extend before it replaces this one."""
        line = _Line.__new__(_Line)
        line.first, line.end, line.lo, line.hi = self.first, self.end, self.lo, self.hi
        line.starts, line.ends = self.starts.copy(), self.ends.copy()
        line.before, line.after = self.before.copy(), self.after.copy()
        line.origin, line.total, line.closed_run = self.origin, self.total, self.closed_run
        return line

    def count(self, t: int) -> int:
        """The open time counted by instant `t` (epoch microseconds within the covered days)."""
        i = bisect.bisect_right(self.starts, t) - 1
        if i < 0:
            return self.origin
        if t >= self.ends[i]:
            return self.after[i]
        return self.before[i] + t - self.starts[i]

    def append(self, intervals: tuple[Interval, ...]) -> None:
        """Puts the open intervals of day `end` at the end (of a line not yet published)."""
        total = _lay(intervals, self.starts, self.ends, self.before, self.after, self.total)
        self.closed_run = 0 if total > self.total else self.closed_run + 1
        self.total = total
        self.end += 1
        self.hi += _DAY_US

    def prepend(self, days: list[tuple[Interval, ...]]) -> None:
        """Puts the open intervals of the days just before `first` in front, earliest first
        (of a line not yet published)."""
        flat = [interval for intervals in days for interval in intervals]
        origin = self.origin - sum(b - a for a, b in flat)
        starts: list[int] = []
        ends: list[int] = []
        before: list[int] = []
        after: list[int] = []
        _lay(
            [*flat, *zip(self.starts[:1], self.ends[:1], strict=True)],
            starts,
            ends,
            before,
            after,
            origin,
        )
        # The old first interval went through the loop too (joined or not): replace it.
        self.starts[:1], self.ends[:1] = starts, ends
        self.before[:1], self.after[:1] = before, after
        self.origin = origin
        self.first -= len(days)
        self.lo = self.first * _DAY_US


def _lay(
    intervals: Iterable[Interval],
    starts: list[int],
    ends: list[int],
    before: list[int],
    after: list[int],
    counted: int,
) -> int:
    """Puts intervals after the last of a line's lists, joining one that meets it (at UTC
    midnight); returns the open time counted by the end of the last."""
    for a, b in intervals:
        if ends and ends[-1] == a:
            ends[-1] = b
            after[-1] += b - a
        else:
            starts.append(a)
            ends.append(b)
            before.append(counted)
            after.append(counted + b - a)
        counted += b - a
    return counted


@dataclass(frozen=True)
class BusinessCalendar:
    """Open hours of a team: `weekly` spans in `zone`, closed on holidays and `closed_dates`."""

    zone: str
    weekly: WeeklyHours
    holiday_country: str | None = None
    holiday_subdivision: str | None = None
    closed_dates: frozenset[date] = frozenset()
    _tz: ZoneInfo = field(init=False, repr=False, compare=False)
    _holidays: Any = field(init=False, repr=False, compare=False)  # the country checked
    _holiday_years: dict[int, frozenset[date]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _local: dict[int, tuple[Interval, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _days: dict[int, tuple[Interval, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _line: _Line = field(init=False, repr=False, compare=False, default_factory=_Line)
    # Business seconds asked for -> microseconds: the same few targets and warning fractions
    # come back for clock after clock, and `round` costs more than the lookup.
    _needs: dict[float, int] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        try:
            tz = ZoneInfo(self.zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {self.zone!r}") from exc
        object.__setattr__(self, "_tz", tz)
        if len(self.weekly) != 7:
            raise ValueError("weekly hours need exactly 7 weekdays")
        for wd, spans in enumerate(self.weekly):
            for (_, prev_end), (start, _) in itertools.pairwise(spans):
                if start < prev_end:
                    raise ValueError(f"{WEEKDAYS[wd]}: spans overlap or are unsorted")
            if any(not 0 <= s < e <= _DAY for s, e in spans):
                raise ValueError(f"{WEEKDAYS[wd]}: spans must lie within the day")
        if not any(self.weekly):
            raise ValueError("the calendar is never open")
        calendar_holidays = None
        if self.holiday_country is not None:
            try:
                calendar_holidays = holidays_lib.country_holidays(
                    self.holiday_country, subdiv=self.holiday_subdivision
                )
            except NotImplementedError as exc:
                where = self.holiday_country
                if self.holiday_subdivision:
                    where += f"/{self.holiday_subdivision}"
                raise ValueError(f"unknown holiday country or subdivision {where!r}") from exc
        elif self.holiday_subdivision is not None:
            raise ValueError("a holiday subdivision needs a holiday country")
        object.__setattr__(self, "_holidays", calendar_holidays)

    @classmethod
    def build(
        cls,
        zone: str,
        hours: str | Mapping[str, Sequence[str]],
        holiday_country: str | None = None,
        holiday_subdivision: str | None = None,
        closed_dates: Iterable[date] = (),
    ) -> BusinessCalendar:
        return cls(
            zone=zone,
            weekly=parse_hours(hours),
            holiday_country=holiday_country,
            holiday_subdivision=holiday_subdivision,
            closed_dates=frozenset(closed_dates),
        )

    # --- public API ----------------------------------------------------------------------

    def add(self, start: datetime, seconds: float) -> datetime:
        """The first instant by which `seconds` of business time have passed since `start`.

        Counting starts at `start`, or at the next opening when `start` is closed; for
        `seconds > 0` the instant just before the result is open. Result in UTC.
        """
        return from_epoch_us(self.add_us(epoch_us(start), seconds))

    def add_us(self, start: int, seconds: float) -> int:
        """`add` on instants given as integer microseconds since the epoch (what the SLA
        clocks keep: making a datetime costs more than this arithmetic)."""
        need = self._needs.get(seconds)
        if need is None:
            if not 0 <= seconds < math.inf:  # also rejects NaN
                raise ValueError(f"business seconds must be finite and >= 0, not {seconds}")
            need = round(seconds * _US)
            if len(self._needs) >= 1024:  # paused clocks ask for arbitrary remainders
                self._needs.clear()
            self._needs[seconds] = need
        if need == 0:
            return start
        line = self._line  # one line throughout: another thread may put a longer one in place
        if not line.lo <= start < line.hi:
            line = self._cover(start // _DAY_US, start // _DAY_US)
        starts = line.starts
        i = bisect.bisect_right(starts, start) - 1  # `line.count(start)`, inlined
        if i < 0:
            goal = line.origin + need
        elif start >= line.ends[i]:
            goal = line.after[i] + need
        else:
            goal = line.before[i] + start - starts[i] + need
        if line.total < goal:
            line = self._grow(line, goal, start)
            starts = line.starts
        i = bisect.bisect_left(line.after, goal)  # the first interval by whose end it is reached
        return starts[i] + goal - line.before[i]

    def _grow(self, line: _Line, goal: int, start: int) -> _Line:
        """The line extended by whole days until it counts `goal`, now the calendar's; gives
        up after years of closed days."""
        line = line.copy()
        while line.total < goal:
            intervals = self._days.get(line.end)
            if intervals is None:
                intervals = self._utc_day(line.end)
            line.append(intervals)
            if line.closed_run > _MAX_CLOSED_DAYS:
                raise ValueError(
                    f"calendar {self.zone} has no open time after {from_epoch_us(start)}"
                )
        object.__setattr__(self, "_line", line)
        return line

    def _cover(self, first: int, last: int) -> _Line:
        """A line over (at least) the UTC days [first, last], now the calendar's: the current
        one extended, or a fresh one starting at `first` rather than fill in a far stretch
        nobody asks about (replay moves forward in time, so this is rare)."""
        line = self._line
        if line.first == line.end or not line.first - 366 <= first <= line.end + 366:
            line = _Line(first)
        else:
            line = line.copy()
        if first < line.first:
            line.prepend([self._days.get(d) or self._utc_day(d) for d in range(first, line.first)])
        while line.end <= last:
            intervals = self._days.get(line.end)
            if intervals is None:
                intervals = self._utc_day(line.end)
            line.append(intervals)
        object.__setattr__(self, "_line", line)
        return line

    def elapsed(self, start: datetime, end: datetime) -> float:
        """Business seconds between two instants; 0 when `end <= start`."""
        return self.elapsed_us(epoch_us(start), epoch_us(end))

    def elapsed_us(self, t0: int, t1: int) -> float:
        """`elapsed` between instants given as integer microseconds since the epoch."""
        if t1 <= t0:
            return 0.0
        line = self._line  # one line throughout, as in `add_us`
        if not line.lo <= t0 < t1 <= line.hi:
            line = self._cover(t0 // _DAY_US, (t1 - 1) // _DAY_US)
        return (line.count(t1) - line.count(t0)) / _US

    def segments(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The open intervals counted between two instants, in UTC, adjacent ones merged."""
        t0, t1 = epoch_us(start), epoch_us(end)
        parts: list[Interval] = []
        for day in range(t0 // _DAY_US, (t1 - 1) // _DAY_US + 1) if t1 > t0 else ():
            for a, b in self._days.get(day) or self._utc_day(day):
                lo, hi = max(a, t0), min(b, t1)
                if hi > lo:
                    parts.append((lo, hi))
        return [(from_epoch_us(a), from_epoch_us(b)) for a, b in _merge(parts)]

    def is_open(self, at: datetime) -> bool:
        t = epoch_us(at)
        intervals = self._days.get(t // _DAY_US)
        if intervals is None:
            intervals = self._utc_day(t // _DAY_US)
        return any(a <= t < b for a, b in intervals)

    def is_holiday(self, day: date) -> bool:
        if day in self.closed_dates:
            return True
        if self.holiday_country is None:
            return False
        found = self._holiday_years.get(day.year)
        if found is None:
            found = self._holidays_dated(self.holiday_country, day.year)
        return day in found

    def _holidays_dated(self, country: str, year: int) -> frozenset[date]:
        """The holidays dated in `year`, from a table of their own rather than `_holidays`:
        a `holidays` table fills in a year on its first lookup, and a thread that looks up
        while another fills it in may miss a holiday (calendars are shared across threads;
        see `_Line`). The years around it too, for an observed day moved across New Year."""
        table = holidays_lib.country_holidays(
            country, subdiv=self.holiday_subdivision, years=(year - 1, year, year + 1)
        )
        found = frozenset(day for day in table if day.year == year)
        self._holiday_years[year] = found
        return found

    def describe(self) -> str:
        """One line for humans, e.g. 'Europe/Berlin mon-fri 09:00-17:00, holidays DE/BY'."""
        if all(spans == ((0, _DAY),) for spans in self.weekly):
            text = f"{self.zone} 24/7"
        else:
            days = [
                f"{WEEKDAYS[wd]} " + ",".join(f"{_fmt(s)}-{_fmt(e)}" for s, e in spans)
                for wd, spans in enumerate(self.weekly)
                if spans
            ]
            text = f"{self.zone} " + "; ".join(days)
        if self.holiday_country:
            sub = f"/{self.holiday_subdivision}" if self.holiday_subdivision else ""
            text += f", holidays {self.holiday_country}{sub}"
        if self.closed_dates:
            text += f", {len(self.closed_dates)} closed dates"
        return text

    # --- open intervals ------------------------------------------------------------------

    def _offset(self, t: int) -> int:
        offset = datetime.fromtimestamp(t, self._tz).utcoffset()
        assert offset is not None
        return offset.days * _DAY + offset.seconds

    def _offset_runs(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(from, to, offset) runs of constant UTC offset covering [start, end), epoch seconds."""
        runs: list[tuple[int, int, int]] = []
        run_start, run_offset = start, self._offset(start)
        prev = start
        for probe in (*range(start + 3600, end, 3600), end):
            if self._offset(probe) != run_offset:
                lo, hi = prev, probe  # offset(lo) == run_offset != offset(hi)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self._offset(mid) == run_offset:
                        lo = mid
                    else:
                        hi = mid
                runs.append((run_start, hi, run_offset))
                run_start, run_offset = hi, self._offset(hi)
            prev = probe
        runs.append((run_start, end, run_offset))
        return runs

    def _local_date(self, ordinal: int) -> tuple[Interval, ...]:
        """Open instants (epoch seconds) whose local time falls on the local date `ordinal`."""
        cached = self._local.get(ordinal)
        if cached is not None:
            return cached
        day = date.fromordinal(ordinal)
        spans = self.weekly[day.weekday()]
        found: list[Interval] = []
        if spans and not self.is_holiday(day):
            midnight = (ordinal - _EPOCH_ORDINAL) * _DAY  # local midnight read as if UTC
            for a, b, offset in self._offset_runs(midnight - _REACH, midnight + _DAY + _REACH):
                for s, e in spans:
                    lo, hi = max(a, midnight + s - offset), min(b, midnight + e - offset)
                    if lo < hi:
                        found.append((lo, hi))
        result = tuple(_merge(found))
        self._local[ordinal] = result
        return result

    def _utc_day(self, day: int) -> tuple[Interval, ...]:
        """Open intervals (epoch microseconds) within UTC day `day`, sorted and disjoint."""
        u0, u1 = day * _DAY, (day + 1) * _DAY
        ordinal = day + _EPOCH_ORDINAL
        parts: list[Interval] = []
        for local in range(ordinal - 2, ordinal + 3):
            for a, b in self._local_date(local):
                lo, hi = max(a, u0), min(b, u1)
                if lo < hi:
                    parts.append((lo, hi))
        result = tuple((a * _US, b * _US) for a, b in _merge(parts))
        self._days[day] = result
        return result
