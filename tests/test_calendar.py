"""Business calendar: examples across DST, split and overnight shifts, holidays, and properties
checked against a brute-force oracle that walks real UTC minutes."""

from __future__ import annotations

import random
import sys
import threading
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopservice.domain.calendar import BusinessCalendar

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
H = 3600

SPLIT = {"mon-fri": ["09:00-12:00", "13:00-17:00"]}


def berlin(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, fold: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=BERLIN, fold=fold)


def ny(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, fold: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=NEW_YORK, fold=fold)


# --- an independent oracle ------------------------------------------------------------------


class Oracle:
    """Open minutes by stepping real UTC minutes and reading the local wall clock.

    Written from the rule, not from the implementation: minute [t, t+60) is open when the
    local time at t lies in a span of its weekday (a span crossing midnight lends its tail to
    the next weekday) and the local date is no holiday.
    """

    def __init__(
        self,
        zone: str,
        spans: dict[int, list[tuple[time, time | None]]],
        country: str | None = None,
        subdiv: str | None = None,
        closed: frozenset[date] = frozenset(),
    ) -> None:
        self.tz = ZoneInfo(zone)
        self.spans = spans  # weekday -> [(start, end or None for midnight / crossing)]
        self.holidays = holidays.country_holidays(country, subdiv=subdiv) if country else None
        self.closed = closed

    def open_at(self, t: datetime) -> bool:
        local = t.astimezone(self.tz)
        day = local.date()
        if day in self.closed or (self.holidays is not None and day in self.holidays):
            return False
        clock = local.time().replace(tzinfo=None, fold=0)
        for start, end in self.spans.get(day.weekday(), []):
            if end is None or end <= start:  # open until midnight
                if clock >= start:
                    return True
            elif start <= clock < end:
                return True
        for start, end in self.spans.get((day.weekday() - 1) % 7, []):
            if end is not None and end <= start and clock < end:  # tail of yesterday's shift
                return True
        return False

    def elapsed(self, start: datetime, end: datetime) -> float:
        t, total = start, 0
        while t < end:
            if self.open_at(t):
                total += 60
            t += timedelta(minutes=1)
        return float(total)

    def add(self, start: datetime, seconds: int) -> datetime:
        assert seconds % 60 == 0
        t, left = start.astimezone(UTC), seconds
        if left == 0:
            return t
        while True:
            if self.open_at(t):
                left -= 60
                if left == 0:
                    return t + timedelta(minutes=1)
            t += timedelta(minutes=1)


def _t(text: str) -> time:
    return time.fromisoformat(text)


WEEKDAYS = range(5)
CASES: dict[str, tuple[BusinessCalendar, Oracle]] = {
    "berlin-split-BY": (
        BusinessCalendar.build("Europe/Berlin", SPLIT, "DE", "BY"),
        Oracle(
            "Europe/Berlin",
            {d: [(_t("09:00"), _t("12:00")), (_t("13:00"), _t("17:00"))] for d in WEEKDAYS},
            "DE",
            "BY",
        ),
    ),
    "ny-night-CA": (
        BusinessCalendar.build(
            "America/New_York",
            {"mon-fri": ["22:00-06:00"], "sat": ["10:00-12:00"]},
            "US",
            "CA",
            [date(2026, 3, 10)],
        ),
        Oracle(
            "America/New_York",
            {
                **{d: [(_t("22:00"), _t("06:00"))] for d in WEEKDAYS},
                5: [(_t("10:00"), _t("12:00"))],
            },
            "US",
            "CA",
            frozenset({date(2026, 3, 10)}),
        ),
    ),
    "berlin-dst-hours": (
        BusinessCalendar.build(
            "Europe/Berlin", {"sat-sun": ["01:30-03:30"], "wed": ["00:00-24:00"]}
        ),
        Oracle(
            "Europe/Berlin",
            {
                5: [(_t("01:30"), _t("03:30"))],
                6: [(_t("01:30"), _t("03:30"))],
                2: [(_t("00:00"), None)],
            },
        ),
    ),
}

# Around the 2026 DST changes: Europe 29 Mar / 25 Oct, US 8 Mar / 1 Nov.
WINDOWS = [datetime(2026, 3, 4, tzinfo=UTC), datetime(2026, 10, 21, tzinfo=UTC)]


@st.composite
def minute_instants(draw: st.DrawFn) -> datetime:
    base = draw(st.sampled_from(WINDOWS))
    return base + timedelta(minutes=draw(st.integers(0, 8 * 24 * 60)))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), start=minute_instants(), minutes=st.integers(0, 900))
def test_add_matches_the_oracle(name: str, start: datetime, minutes: int) -> None:
    cal, oracle = CASES[name]
    assert cal.add(start, minutes * 60) == oracle.add(start, minutes * 60)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), start=minute_instants(), minutes=st.integers(0, 3000))
def test_elapsed_matches_the_oracle(name: str, start: datetime, minutes: int) -> None:
    cal, oracle = CASES[name]
    end = start + timedelta(minutes=minutes)
    assert cal.elapsed(start, end) == oracle.elapsed(start, end)


# --- properties -----------------------------------------------------------------------------

instants = st.datetimes(
    min_value=datetime(2025, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)
durations = st.floats(0, 30 * 24 * H, allow_nan=False).map(lambda s: round(s, 3))
calendars = st.sampled_from(
    [c for c, _ in CASES.values()] + [BusinessCalendar.build("Europe/Berlin", "24/7")]
)


@settings(max_examples=150, deadline=None)
@given(cal=calendars, start=instants, a=durations, b=durations)
def test_add_composes(cal: BusinessCalendar, start: datetime, a: float, b: float) -> None:
    assert cal.add(cal.add(start, a), b) == cal.add(start, a + b)


@settings(max_examples=150, deadline=None)
@given(cal=calendars, start=instants, d=durations)
def test_add_and_elapsed_are_inverse(cal: BusinessCalendar, start: datetime, d: float) -> None:
    end = cal.add(start, d)
    assert end >= start
    assert abs(cal.elapsed(start, end) - d) <= 1e-6
    if d > 0:
        assert cal.is_open(end - timedelta(microseconds=1))
        assert sum((b - a).total_seconds() for a, b in cal.segments(start, end)) == pytest.approx(
            d, abs=1e-6
        )


@settings(max_examples=40, deadline=None)
@given(queries=st.lists(st.tuples(instants, durations), min_size=2, max_size=10))
def test_answers_do_not_depend_on_what_was_asked_before(
    queries: list[tuple[datetime, float]],
) -> None:
    """The running totals are extended forwards, put in front or started afresh as queries
    jump about (years apart, or back a day): none of that may show in an answer."""
    shared = BusinessCalendar.build("Europe/Berlin", SPLIT, closed_dates=[date(2026, 3, 3)])
    for start, d in queries:
        fresh = BusinessCalendar.build("Europe/Berlin", SPLIT, closed_dates=[date(2026, 3, 3)])
        end = start + timedelta(seconds=d)
        assert shared.add(start, d) == fresh.add(start, d)
        assert shared.elapsed(start, end) == fresh.elapsed(start, end)
        assert shared.elapsed(start - timedelta(days=1), start) == fresh.elapsed(
            start - timedelta(days=1), start
        )


def test_threads_sharing_a_calendar_get_the_answers_of_one_alone() -> None:
    """Calendars are shared across threads (the embedded engine's fold and the explain
    endpoint use the same cached default policy), and their caches fill in as they are asked:
    the running totals and the holidays of a year. Threads asking at once, switched as often
    as the interpreter allows, must each get what a calendar of their own answers."""
    rng = random.Random(7)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    queries = [
        (base + timedelta(seconds=rng.randrange(900 * 86_400)), rng.choice((H, 8 * H, 200 * H)))
        for _ in range(600)
    ]

    def calendar() -> BusinessCalendar:
        return BusinessCalendar.build("Europe/Berlin", SPLIT, holiday_country="DE")

    alone = calendar()
    expected = {q: (alone.add(*q), alone.elapsed(q[0], q[0] + timedelta(days=3))) for q in queries}
    shared = calendar()
    got: list[tuple[tuple[datetime, float], tuple[datetime, float]]] = []
    failures: list[BaseException] = []

    def ask(order: list[tuple[datetime, float]]) -> None:
        try:
            for q in order:
                got.append((q, (shared.add(*q), shared.elapsed(q[0], q[0] + timedelta(days=3)))))
        except BaseException as exc:  # reported below: an exception in a thread is lost
            failures.append(exc)

    threads = [
        threading.Thread(target=ask, args=(rng.sample(queries, len(queries)),)) for _ in range(4)
    ]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures
    assert len(got) == 4 * len(queries)
    assert [q for q, answer in got if answer != expected[q]] == []


@settings(max_examples=100, deadline=None)
@given(cal=calendars, a=instants, b=instants, c=instants)
def test_elapsed_is_additive(cal: BusinessCalendar, a: datetime, b: datetime, c: datetime) -> None:
    a, b, c = sorted((a, b, c))
    assert cal.elapsed(a, c) == pytest.approx(cal.elapsed(a, b) + cal.elapsed(b, c), abs=1e-6)
    assert cal.elapsed(c, a) == 0


# --- examples -------------------------------------------------------------------------------


def test_split_shift_skips_lunch_and_the_weekend() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", SPLIT)
    assert cal.add(berlin(2026, 3, 2, 11, 0), 2 * H) == berlin(2026, 3, 2, 14, 0)
    friday = berlin(2026, 3, 6, 16, 0)
    assert cal.add(friday, 2 * H) == berlin(2026, 3, 9, 10, 0)
    assert cal.elapsed(friday, berlin(2026, 3, 9, 10, 0)) == 2 * H


def test_start_in_closed_time_counts_from_the_next_opening() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", SPLIT)
    assert cal.add(berlin(2026, 3, 2, 6, 0), 60) == berlin(2026, 3, 2, 9, 1)
    assert cal.add(berlin(2026, 3, 2, 12, 30), 60) == berlin(2026, 3, 2, 13, 1)
    assert cal.add(berlin(2026, 3, 2, 12, 30), 0) == berlin(2026, 3, 2, 12, 30)


def test_result_at_closing_is_the_closing_instant() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", SPLIT)
    assert cal.add(berlin(2026, 3, 2, 9, 0), 3 * H) == berlin(2026, 3, 2, 12, 0)


def test_twenty_four_seven_counts_real_hours_across_dst() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", "24/7")
    spring = berlin(2026, 3, 28, 12, 0)
    assert cal.add(spring, 24 * H) == berlin(2026, 3, 29, 13, 0)  # wall clock +25h
    autumn = berlin(2026, 10, 24, 12, 0)
    assert cal.add(autumn, 24 * H) == berlin(2026, 10, 25, 11, 0)  # wall clock +23h
    assert cal.elapsed(berlin(2026, 10, 25, 0, 0), berlin(2026, 10, 26, 0, 0)) == 25 * H


def test_skipped_hour_counts_nothing_and_repeated_hour_counts_twice_berlin() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", {"sun": ["02:00-03:00"]})
    assert cal.elapsed(berlin(2026, 3, 28), berlin(2026, 3, 30)) == 0
    assert cal.segments(berlin(2026, 3, 28), berlin(2026, 3, 30)) == []
    assert cal.elapsed(berlin(2026, 10, 24), berlin(2026, 10, 26)) == 2 * H
    first = berlin(2026, 10, 25, 2, 0)
    # (PEP 495: an ambiguous local time never compares equal across zones; compare in UTC)
    assert cal.add(first, 90 * 60) == berlin(2026, 10, 25, 2, 30, fold=1).astimezone(UTC)
    assert cal.is_open(berlin(2026, 10, 25, 2, 15, fold=1))


def test_dst_in_new_york_with_a_span_around_the_change() -> None:
    cal = BusinessCalendar.build("America/New_York", {"sun": ["00:00-04:00"]})
    assert cal.elapsed(ny(2026, 3, 8), ny(2026, 3, 9)) == 3 * H  # 02:00-03:00 never happens
    assert cal.elapsed(ny(2026, 11, 1), ny(2026, 11, 2)) == 5 * H  # 01:00-02:00 happens twice
    assert cal.add(ny(2026, 3, 8, 1, 30), H) == ny(2026, 3, 8, 3, 30)


def test_overnight_shift_crosses_midnight() -> None:
    cal = BusinessCalendar.build("America/New_York", {"mon-fri": ["22:00-06:00"]})
    monday_night = ny(2026, 3, 2, 21, 0)
    assert cal.add(monday_night, 3 * H) == ny(2026, 3, 3, 1, 0)
    assert cal.elapsed(ny(2026, 3, 2), ny(2026, 3, 3, 12, 0)) == 8 * H
    # Friday's shift runs into Saturday morning; Saturday evening has none.
    assert cal.elapsed(ny(2026, 3, 7, 0, 0), ny(2026, 3, 8, 12, 0)) == 6 * H
    # and Monday 00:00-06:00 is Sunday's tail: Sunday has no shift.
    assert cal.elapsed(ny(2026, 3, 9, 0, 0), ny(2026, 3, 9, 12, 0)) == 0


def test_overnight_as_two_spans_equals_one_crossing_span() -> None:
    crossing = BusinessCalendar.build("Europe/Berlin", {"mon-sun": ["22:00-06:00"]})
    split = BusinessCalendar.build("Europe/Berlin", {"mon-sun": ["00:00-06:00", "22:00-24:00"]})
    start = berlin(2026, 3, 27, 23, 0)
    for hours in (1, 5, 7, 20, 60):
        assert crossing.add(start, hours * H) == split.add(start, hours * H)


def test_holidays_by_region() -> None:
    bavaria = BusinessCalendar.build("Europe/Berlin", SPLIT, "DE", "BY")
    berlin_state = BusinessCalendar.build("Europe/Berlin", SPLIT, "DE", "BE")
    # 6 January (Epiphany, a Tuesday in 2026) is a holiday in Bavaria, not in Berlin.
    day = (berlin(2026, 1, 6), berlin(2026, 1, 7))
    assert bavaria.elapsed(*day) == 0
    assert berlin_state.elapsed(*day) == 7 * H
    assert bavaria.add(berlin(2026, 1, 5, 17, 0), 60) == berlin(2026, 1, 7, 9, 1)
    california = BusinessCalendar.build(
        "America/Los_Angeles", {"mon-fri": ["09:00-17:00"]}, "US", "CA"
    )
    # 31 March 2026 is Cesar Chavez Day, a California state holiday.
    la = ZoneInfo("America/Los_Angeles")
    assert (
        california.elapsed(datetime(2026, 3, 31, tzinfo=la), datetime(2026, 4, 1, tzinfo=la)) == 0
    )
    assert california.is_holiday(date(2026, 7, 3))  # 4 July is a Saturday: observed Friday


def test_explicit_closed_dates() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", SPLIT, closed_dates=[date(2026, 3, 3)])
    assert cal.add(berlin(2026, 3, 2, 17, 0), 60) == berlin(2026, 3, 4, 9, 1)


def test_two_calendars_in_different_zones() -> None:
    b = BusinessCalendar.build("Europe/Berlin", {"mon-fri": ["09:00-17:00"]})
    n = BusinessCalendar.build("America/New_York", {"mon-fri": ["09:00-17:00"]})
    start = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # 13:00 Berlin, 07:00 New York
    assert b.add(start, 4 * H) == berlin(2026, 3, 2, 17, 0)
    assert n.add(start, 4 * H) == ny(2026, 3, 2, 13, 0)
    # between 8 and 29 March the offsets differ by 5 hours, not 6
    assert b.elapsed(ny(2026, 3, 10, 9), ny(2026, 3, 10, 17)) == 3 * H
    assert n.elapsed(ny(2026, 3, 10, 9), ny(2026, 3, 10, 17)) == 8 * H


def test_segments_explain_what_was_counted() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", SPLIT)
    segs = cal.segments(berlin(2026, 3, 2, 11, 0), berlin(2026, 3, 2, 14, 0))
    assert segs == [
        (berlin(2026, 3, 2, 11, 0), berlin(2026, 3, 2, 12, 0)),
        (berlin(2026, 3, 2, 13, 0), berlin(2026, 3, 2, 14, 0)),
    ]
    assert all(a.tzinfo is UTC for a, _ in segs)


def test_exact_to_the_microsecond_and_utc_out() -> None:
    cal = BusinessCalendar.build("Europe/Berlin", SPLIT)
    start = berlin(2026, 3, 2, 11, 59, 59) + timedelta(microseconds=250_000)
    out = cal.add(start, 1.5)
    assert out == berlin(2026, 3, 2, 13, 0, 0) + timedelta(microseconds=750_000)
    assert out.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("hours", "message"),
    [
        ({"mon": ["09:00-12:00", "11:00-13:00"]}, "overlaps"),
        ({"sun": ["22:00-02:00"], "mon": ["01:00-03:00"]}, "overlaps"),
        ({"mon": ["9-17"]}, "not a time of day"),
        ({"funday": ["09:00-17:00"]}, "not a weekday"),
        ("always", "24/7"),
        ({}, "never open"),
    ],
)
def test_invalid_hours(hours: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BusinessCalendar.build("Europe/Berlin", hours)  # type: ignore[arg-type]


def test_invalid_zone_and_holidays() -> None:
    with pytest.raises(ValueError, match="time zone"):
        BusinessCalendar.build("Mars/Olympus", "24/7")
    with pytest.raises(ValueError, match="holiday country"):
        BusinessCalendar.build("UTC", "24/7", "XX")
    with pytest.raises(ValueError, match="holiday country"):
        BusinessCalendar.build("UTC", "24/7", "DE", "ZZ")


def test_naive_and_negative_inputs_are_rejected() -> None:
    cal = BusinessCalendar.build("UTC", "24/7")
    with pytest.raises(ValueError, match="naive"):
        cal.add(datetime(2026, 1, 1), 1)
    with pytest.raises(ValueError, match=">= 0"):
        cal.add(datetime(2026, 1, 1, tzinfo=UTC), -1)
