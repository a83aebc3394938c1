"""Account health and churn risk, and expansion openings: a decider over one account's events.

`AccountHealth` is the state, `evolve` folds one event into it, `observe` folds an SLA signal
the account suffered, `assess(state, at, rules)` scores it at an instant and `decide` turns a
level change into a signal. No I/O, no wall clock: every time is an event time or a due instant
the engine passes in, so a replay of the same log gives the same scores and signals.

The score is the sum of factor points, each factor capped at its weight in the policy's
`[health]` section, clamped to 0–100:

- usage_decline: the mean of the usage metric over the last `usage_recent_days` against the
  account's own baseline, the highest `usage_window_days` mean of the `usage_baseline_days`
  before (a peak, so a slow slide does not drag its own baseline down). Points grow from a
  drop of `usage_decline_from` to full at `usage_decline_full`; no usage at all in the recent
  window after a baseline counts as a full drop.
- usage_slide: usage sliding steadily rather than stepping down once. The daily values of the
  last `slide_window_days`, each divided by the account's own weekday profile (its mean on
  that weekday against its overall mean over the usage it keeps), are fitted twice: as a
  *step* (one level, then another) and as a *slide* (flat, then a straight decline to today).
  When the slide fits no worse than the step by more than `slide_step_tolerance` residual
  variances (a slow slide and a step in its middle fit about equally; a real step fits far
  better as a step), has lasted `slide_min_days` and has lost `slide_from` of its starting
  level, points grow to full at a loss of `slide_full`. A one-off drop (a team on holiday, a
  project paused) is a step and scores only in usage_decline; a customer drifting away is a
  slide, and that is what precedes most churn.
- case_volume: cases opened in the last `case_window_days` against the account's own rate
  before that (with a prior of `case_prior_per_window` so a young account has a baseline);
  points grow with the Poisson z-score from `case_z_from` to `case_z_full`.
- sla_breaches: SLA breaches the account suffered in `breach_window_days` (retracted ones
  removed), full at `breaches_full`.
- open_high_priority: open cases at a priority in `high_priorities`, full at `open_high_full`.
- nps: the latest NPS answer within `survey_window_days`; a detractor scores from half the
  weight (at `nps_detractor_max`) to the full weight (at 0).
- csat: CSAT answers ≤ `csat_low_max` within `survey_window_days`, full at `csat_low_full`.
- onboarding: milestones missed and not reached since, full at `milestones_full`.
- renewal: the renewal date within `renewal_window_days`, growing as it nears; alone it is
  never enough to raise the level (its weight sits below the medium threshold).
- owner_change: the account's owner changed within `owner_change_days`.

Levels: medium from `medium_at`, high from `high_at`; a level is left downwards only when the
score falls `hysteresis` points below the threshold that raised it, so a score that hovers at
a threshold does not flap. Every factor names the events that gave its points, and a risk
signal names the top `explain_top` factors and their events.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from itertools import accumulate
from operator import mul, truediv
from typing import Annotated, Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loopservice.domain.events import (
    AccountChurned,
    AccountRenewed,
    AccountUpdated,
    CaseClosed,
    CaseMerged,
    CaseOpened,
    CaseReopened,
    CaseResolved,
    Event,
    Level,
    MilestoneMissed,
    MilestoneReached,
    Priority,
    PriorityChanged,
    SurveyAnswered,
    SurveyKind,
    Tier,
    UsageRecorded,
)
from loopservice.domain.signals import (
    OpportunityDetected,
    RiskCleared,
    RiskFactor,
    RiskLevel,
    RiskRaised,
    Signal,
    SlaBreached,
    SlaBreachRetracted,
)

Points = Annotated[float, Field(ge=0, le=100)]
Days = Annotated[int, Field(ge=1)]
Ratio = Annotated[float, Field(ge=0, le=1)]

LEVELS: tuple[RiskLevel, ...] = ("low", "medium", "high")
SUFFERED_METRICS = frozenset({"first_response", "next_response", "resolution"})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HealthWeights(_Section):
    """The most points each factor can add to the 0–100 score."""

    usage_decline: Points = 20
    usage_slide: Points = 40
    case_volume: Points = 10
    sla_breaches: Points = 10
    open_high_priority: Points = 10
    nps: Points = 15
    csat: Points = 10
    onboarding: Points = 15
    renewal: Points = 5
    owner_change: Points = 5


_RETIRED = frozenset({"slide_step", "slide_stride_weeks", "slide_steps_full"})


class HealthRules(_Section):
    """The `[health]` policy section: weights, windows and thresholds of the health model."""

    weights: HealthWeights = Field(default_factory=HealthWeights)
    medium_at: Points = 45
    high_at: Points = 65
    hysteresis: Points = 10
    explain_top: Annotated[int, Field(ge=1)] = 3
    usage_metric: str = "active_users"
    usage_recent_days: Days = 7
    usage_window_days: Days = 28
    usage_baseline_days: Days = 84
    usage_min_baseline_days: Days = 14
    usage_decline_from: Ratio = 0.1
    usage_decline_full: Ratio = 0.4
    slide_window_days: Annotated[int, Field(ge=14, le=84)] = 63
    slide_min_days: Days = 14
    slide_from: Ratio = 0.08
    slide_full: Ratio = 0.12
    slide_step_tolerance: Annotated[float, Field(ge=0)] = 3.0
    case_window_days: Days = 30
    case_baseline_days: Days = 120
    case_prior_per_window: Annotated[float, Field(gt=0)] = 1.0
    case_z_from: float = 1.0
    case_z_full: float = 3.0
    breach_window_days: Days = 30
    breaches_full: Days = 3
    high_priorities: tuple[Priority, ...] = (Priority.P1, Priority.P2)
    open_high_full: Days = 2
    survey_window_days: Days = 90
    nps_detractor_max: Annotated[int, Field(ge=0, le=10)] = 6
    csat_low_max: Annotated[int, Field(ge=1, le=5)] = 2
    csat_low_full: Days = 2
    milestones_full: Days = 2
    renewal_window_days: Days = 60
    owner_change_days: Days = 60
    # expansion openings
    limit_near: Ratio = 0.85
    limit_rearm: Ratio = 0.75
    promoter_min: Annotated[int, Field(ge=0, le=10)] = 9

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data: Any) -> Any:
        """Policies published before the slide was refitted name its old knobs: ignore them,
        so that replaying such a log still parses the policy in force."""
        if isinstance(data, dict) and _RETIRED.intersection(data):
            return {k: v for k, v in data.items() if k not in _RETIRED}
        return data

    def level_for(self, score: float, current: RiskLevel) -> RiskLevel:
        """The level a score gives from `current`: up at a threshold, down only below it by
        the hysteresis band."""
        up: RiskLevel = (
            "high" if score >= self.high_at else "medium" if score >= self.medium_at else "low"
        )
        if LEVELS.index(up) >= LEVELS.index(current):
            return up
        if current == "high" and score >= self.high_at - self.hysteresis:
            return "high"
        if score >= self.medium_at - self.hysteresis:
            return "medium"
        return "low"


DEFAULT_HEALTH = HealthRules()


# --- state -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mark:
    """A dated piece of evidence."""

    at: datetime
    event_id: str


@dataclass(slots=True)
class OpenCase:
    priority: Priority
    causes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Survey:
    at: datetime
    score: int
    event_id: str


_NONE = -1.0  # a day without a record, in a row of days (recorded values are never negative)


@dataclass(slots=True)
class DailyValues:
    """A metric's values by day ordinal with the record of each: a map from day to value held
    as sorted parallel lists, so that a run of days reads as one slice."""

    days: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.days)

    def put(self, day: int, value: float, event_id: str) -> None:
        days = self.days
        i = len(days) if not days or days[-1] < day else bisect_left(days, day)
        if i < len(days) and days[i] == day:
            self.values[i], self.ids[i] = value, event_id
        else:
            days.insert(i, day)
            self.values.insert(i, value)
            self.ids.insert(i, event_id)

    def drop_before(self, day: int) -> None:
        i = bisect_left(self.days, day)
        del self.days[:i], self.values[:i], self.ids[:i]

    def row(self, first: int, last: int) -> tuple[list[float], bool]:
        """The value of each day from `first` to `last`, `_NONE` on a day without one; and
        whether there is such a day."""
        days = self.days
        lo, hi = bisect_left(days, first), bisect_right(days, last)
        if hi - lo == last - first + 1:  # every day has one
            return self.values[lo:hi], False
        out = [_NONE] * (last - first + 1)
        for d, v in zip(days[lo:hi], self.values[lo:hi], strict=True):
            out[d - first] = v
        return out, True

    def ids_between(self, first: int, last: int) -> list[str]:
        """The records of the days from `first` to `last`, in day order."""
        days = self.days
        return self.ids[bisect_left(days, first) : bisect_right(days, last)]

    def id_of(self, day: int) -> str:
        return self.ids[bisect_left(self.days, day)]

    def newest(self) -> tuple[int, str] | None:
        return (self.days[-1], self.ids[-1]) if self.days else None


@dataclass(slots=True)
class AccountHealth:
    tenant_id: str
    account_id: str
    tier: Tier | None = None
    seats: int | None = None
    seats_cause: str | None = None
    owner_id: str | None = None
    renewal: tuple[date, str] | None = None
    owner_changes: list[Mark] = field(default_factory=list)
    first_seen: datetime | None = None
    churned: bool = False
    usage: DailyValues = field(default_factory=DailyValues)
    cases_opened: list[Mark] = field(default_factory=list)
    open_cases: dict[str, OpenCase] = field(default_factory=dict)
    breaches: dict[str, tuple[datetime, tuple[str, ...]]] = field(default_factory=dict)
    nps: list[Survey] = field(default_factory=list)
    csat: list[Survey] = field(default_factory=list)
    missed: dict[str, Mark] = field(default_factory=dict)
    # the decision so far; an account that stays low may have been scored without its usage
    # slide (see `decide`), so these are exact for an account at medium or high
    level: RiskLevel = "low"
    score: float = 0.0
    factors: tuple[Factor, ...] = ()
    evaluated_at: datetime | None = None
    limit_armed: bool = True


class Factor(NamedTuple):
    """One reason behind a score: what a signal states as a `RiskFactor`."""

    factor: str
    points: float
    detail: str
    caused_by: tuple[str, ...]

    def stated(self) -> RiskFactor:
        return RiskFactor(
            factor=self.factor, points=self.points, detail=self.detail, caused_by=self.caused_by
        )


@dataclass(frozen=True, slots=True)
class Assessment:
    score: float
    factors: tuple[Factor, ...]  # every factor with points, most points first


PriorityOf = Callable[[Level, Level, Tier | None], Priority]


# --- evolve ------------------------------------------------------------------------------


def evolve(
    state: AccountHealth, event: Event, rules: HealthRules, priority_of: PriorityOf
) -> list[OpportunityDetected]:
    """Folds one event of the account; returns the expansion openings it shows at once."""
    at = event.occurred_at
    if state.first_seen is None or at < state.first_seen:
        state.first_seen = at
    match event:
        case UsageRecorded():  # first: most events are usage records
            if event.metric == rules.usage_metric:
                state.usage.put(event.period_end.toordinal(), event.value, event.event_id)
                _prune_usage(state, event.period_end, rules)
                return _near_limit(state, event, rules)
        case AccountUpdated():
            if event.tier is not None:
                state.tier = event.tier
            if event.seats is not None:
                state.seats, state.seats_cause = event.seats, event.event_id
            if event.renewal_date is not None:
                state.renewal = (event.renewal_date, event.event_id)
            if event.owner_id is not None:
                if state.owner_id is not None and event.owner_id != state.owner_id:
                    state.owner_changes.append(Mark(at, event.event_id))
                state.owner_id = event.owner_id
        case AccountRenewed():
            if event.next_renewal_date is not None:
                state.renewal = (event.next_renewal_date, event.event_id)
        case AccountChurned():
            state.churned = True
        case CaseOpened():
            assert event.case_id is not None
            if event.case_id not in state.open_cases:
                state.cases_opened.append(Mark(at, event.event_id))
                priority = priority_of(event.impact, event.urgency, state.tier)
                state.open_cases[event.case_id] = OpenCase(priority, (event.event_id,))
        case PriorityChanged():
            case = state.open_cases.get(event.case_id or "")
            if case is not None:
                case.priority = event.priority
                case.causes = (*case.causes[:1], event.event_id)
        case CaseResolved() | CaseClosed() | CaseMerged():
            state.open_cases.pop(event.case_id or "", None)
        case CaseReopened():
            assert event.case_id is not None
            if event.case_id not in state.open_cases:
                state.open_cases[event.case_id] = OpenCase(Priority.P3, (event.event_id,))
        case SurveyAnswered():
            survey = Survey(at, event.score, event.event_id)
            if event.kind is SurveyKind.NPS:
                state.nps.append(survey)
                if event.score >= rules.promoter_min and state.level == "low":
                    return [_promoter(state, event)]
            elif event.kind is SurveyKind.CSAT:
                state.csat.append(survey)
        case MilestoneMissed():
            state.missed[event.milestone] = Mark(at, event.event_id)
        case MilestoneReached():
            state.missed.pop(event.milestone, None)
    return []


def is_backfill(event: Event) -> bool:
    """A usage record for a period that ended days before it was recorded: history being
    filled in. It feeds the baseline, but its arrival is no moment to score the account."""
    return isinstance(event, UsageRecorded) and (
        event.occurred_at.date().toordinal() - event.period_end.toordinal() > 1
    )


def observe(state: AccountHealth, signal: Signal) -> None:
    """Folds an SLA signal about one of the account's cases: breaches it suffered count
    against its health until a late event retracts them."""
    if isinstance(signal, SlaBreached) and signal.metric in SUFFERED_METRICS:
        state.breaches[signal.signal_id] = (signal.due_at, signal.caused_by)
    elif isinstance(signal, SlaBreachRetracted):
        state.breaches.pop(signal.retracts, None)


def _prune_usage(state: AccountHealth, newest: date, rules: HealthRules) -> None:
    keep = rules.usage_recent_days + rules.usage_baseline_days + 1
    if len(state.usage) > keep + 7:
        oldest = newest.toordinal() - keep
        state.usage.drop_before(oldest)


# --- assess ------------------------------------------------------------------------------


def assess(state: AccountHealth, at: datetime, rules: HealthRules) -> Assessment:
    """The account's score at `at` with every contributing factor, most points first."""
    return _assess(state, at, rules, None)


def _assess(
    state: AccountHealth, at: datetime, rules: HealthRules, level: RiskLevel | None
) -> Assessment:
    """`assess`, but given the account's current `level` the usage slide is fitted only when
    it could change the level the score gives: an account at low whose other factors stay
    below the medium mark even with the slide's full weight stays low whatever the slide."""
    w = rules.weights
    today = at.date()
    row, gaps = _usage_row(state, today.toordinal(), rules)
    found = [
        _usage(state, row, gaps, today, rules, w.usage_decline),
        _case_volume(state, at, rules, w.case_volume),
        _breaches(state, at, rules, w.sla_breaches),
        _open_high(state, rules, w.open_high_priority),
        _nps(state, at, rules, w.nps),
        _csat(state, at, rules, w.csat),
        _onboarding(state, rules, w.onboarding),
        _renewal(state, at, rules, w.renewal),
        _owner(state, at, rules, w.owner_change),
    ]
    if level != "low" or not _slide_is_moot(found, rules):
        found.append(_slide(state, row, gaps, today, rules, w.usage_slide))
    factors = sorted(
        (f for f in found if f is not None and f.points > 0),
        key=lambda f: (-f.points, f.factor),
    )
    score = round(min(100.0, sum(f.points for f in factors)), 1)
    return Assessment(score, tuple(factors))


def _slide_is_moot(others: list[Factor | None], rules: HealthRules) -> bool:
    """True when the other factors and the slide's full weight stay clearly (by more than the
    rounding of points and score) below the marks that lift an account from low."""
    rest = sum(f.points for f in others if f is not None and f.points > 0)
    return rest + rules.weights.usage_slide + 0.5 < min(rules.medium_at, rules.high_at)


def _factor(name: str, points: float, detail: str, causes: tuple[str, ...]) -> Factor:
    return Factor(name, round(min(100.0, points), 1), detail, causes)


def _ramp(value: float, start: float, full: float) -> float:
    if full <= start:
        return 1.0 if value >= full else 0.0
    return min(1.0, max(0.0, (value - start) / (full - start)))


# --- usage ---------------------------------------------------------------------------------
#
# Every usage quantity is computed afresh from the account's daily values (`state.usage`) each
# time it is needed: nothing is carried from one assessment to the next, so an account folded
# from its history, or restored from a snapshot, explains itself to the digit. Sums run over the
# days in date order, one running total each, as plainly written; a day without a record
# stands as `_NONE` in a row of days and adds nothing (0.0) where it is summed.

_MIN_STEP = 5  # values on each side of a step, and at least on a slide


@dataclass(frozen=True, slots=True)
class Slide:
    """A slide fitted to recent usage: flat, then a straight decline from `since` to today."""

    since: date
    days: int
    fall: float  # the fitted loss from the level at `since` to today, as a fraction of it
    versus_step: float  # the best step's squared error minus the slide's, in residual variances
    causes: tuple[str, ...]  # the records from `since` on


def _usage_row(state: AccountHealth, last: int, rules: HealthRules) -> tuple[list[float], bool]:
    """The metric on each day up to the day ordinal `last`, as far back as the baseline and
    the slide look, `_NONE` on a day without a record; and whether there is such a day."""
    length = max(rules.usage_recent_days + rules.usage_baseline_days, rules.slide_window_days)
    return state.usage.row(last - length + 1, last)


def _recorded(values: list[float]) -> list[float]:
    return [v for v in values if v != _NONE] if _NONE in values else values


def _usage_levels(
    row: list[float], gaps: bool, rules: HealthRules
) -> tuple[float | None, float | None]:
    """The mean of the last `usage_recent_days` of `row`, and the baseline before them: the
    highest `usage_window_days` mean, windows ending a week apart."""
    r, n = rules.usage_recent_days, rules.usage_baseline_days
    recent = _recorded(row[-r:]) if gaps else row[-r:]
    values = row[len(row) - r - n : len(row) - r]
    # a day without a record adds 0.0 to a window's running sum, that is nothing
    summed = [0.0 if v == _NONE else v for v in values] if gaps else None
    width, least = rules.usage_window_days, rules.usage_min_baseline_days
    best: float | None = None
    for end in range(n, least - 1, -7):  # windows end at the baseline's end, a week apart
        start = end - width if end > width else 0
        if summed is None:
            count = end - start
            if count < least:
                continue
            mean = sum(values[start:end]) / count
        else:
            count = end - start - values[start:end].count(_NONE)
            if count < least:
                continue
            mean = sum(summed[start:end]) / count
        if best is None or mean > best:
            best = mean
    return (sum(recent) / len(recent) if recent else None), best


def _recent_ids(state: AccountHealth, last: int, rules: HealthRules) -> tuple[str, ...]:
    return tuple(state.usage.ids_between(last - rules.usage_recent_days + 1, last))


def _usage(
    state: AccountHealth,
    row: list[float],
    gaps: bool,
    today: date,
    rules: HealthRules,
    weight: float,
) -> Factor | None:
    recent, base = _usage_levels(row, gaps, rules)
    if base is None or base <= 0:
        return None
    if recent is None:
        newest = state.usage.newest()
        cause = (newest[1],) if newest is not None else ()
        return _factor("usage_decline", weight, f"no {rules.usage_metric} recorded lately", cause)
    drop = 1 - recent / base
    points = weight * _ramp(drop, rules.usage_decline_from, rules.usage_decline_full)
    if round(min(100.0, points), 1) <= 0:
        return None
    detail = (
        f"{rules.usage_metric} {rules.usage_recent_days}-day mean {recent:.1f} is "
        f"{drop:.0%} below its baseline {base:.1f}"
    )
    causes = _recent_ids(state, today.toordinal(), rules)
    return _factor("usage_decline", points, detail, causes)


def _slide(
    state: AccountHealth,
    row: list[float],
    gaps: bool,
    today: date,
    rules: HealthRules,
    weight: float,
) -> Factor | None:
    """Usage sliding steadily for `slide_min_days` or more (see the module docstring)."""
    slide = _fit_slide(row, gaps, today.toordinal(), rules, state.usage)
    if slide is None or slide.versus_step < -rules.slide_step_tolerance:
        return None
    points = weight * _ramp(slide.fall, rules.slide_from, rules.slide_full)
    per_week = slide.fall / slide.days * 7
    return _factor(
        "usage_slide",
        points,
        f"{rules.usage_metric} sliding steadily since {slide.since.isoformat()}: "
        f"{slide.fall:.0%} down over {slide.days} days (about {per_week:.0%} a week), "
        f"not a one-off drop",
        slide.causes,
    )


def _fit_slide(
    row: list[float], gaps: bool, last: int, rules: HealthRules, usage: DailyValues
) -> Slide | None:
    """Fits a slide (flat, then linear down to `last`) to the weekday-adjusted daily values of
    the last `slide_window_days` of `row`, and a step to compare it with when the slide has
    lasted `slide_min_days` and lost `slide_from`; None when there is too little to fit or
    the slide is too short or too shallow to count."""
    span = rules.usage_recent_days + rules.usage_baseline_days
    kept = row[-span:]
    start = last - span + 1
    counts, sums = [0] * 7, [0.0] * 7
    if gaps:
        present = [v != _NONE for v in kept]
        kept = [0.0 if v == _NONE else v for v in kept]
    for r in range(7):  # row offset r holds the weekday (start + r) % 7
        counts[(start + r) % 7] = sum(present[r::7]) if gaps else (span - r + 6) // 7
        sums[(start + r) % 7] = sum(kept[r::7])
    if min(counts) < 2:
        return None
    overall = sum(kept) / sum(counts)
    if overall <= 0:
        return None
    profile = [total / count / overall for total, count in zip(sums, counts, strict=True)]
    width = rules.slide_window_days
    first = last - width + 1
    window = row[-width:]
    shift = first % 7
    scale = ((profile[shift:] + profile[:shift]) * (width // 7 + 1))[:width]
    xs: Sequence[float]
    if not gaps and all(p > 0 for p in profile):
        xs = _first_days(width)
        ys = list(map(truediv, window, scale))
    else:
        offsets = [j for j, v in enumerate(window) if v != _NONE and scale[j] > 0]
        xs = [float(j) for j in offsets]
        ys = [window[j] / scale[j] for j in offsets]
    n = len(ys)
    if n < max(3 * _MIN_STEP, width * 2 // 3):
        return None
    sy = _suffix_sums(ys)
    sxy = _suffix_sums(list(map(mul, xs, ys)))
    squares = list(map(mul, ys, ys))
    total_sq = sum(reversed(squares))  # as a suffix sum's first: from the last value back
    # the terms depend on the days' spacing only: a window filled from some day on has
    # those of a whole window of its length
    terms = _whole_window_terms(n) if xs[-1] - xs[0] == n - 1 else _hinge_terms(xs)
    best = _best_hinge(xs, sy, total_sq, sxy, terms)
    if best is None or best[3] <= 0:
        return None
    sse, k, b, a = best
    length = xs[-1] - xs[k]
    fall = -b * length / a
    if int(length) < rules.slide_min_days or fall < rules.slide_from:
        return None
    step = _best_step(sy, _suffix_sums(squares))
    variance = max(sse, 1e-12) / (n - 3)
    since = first + int(xs[k])
    causes = usage.ids_between(since, last)
    if len(causes) != n - k:  # some days were left out of the fit: the fitted ones
        causes = [usage.id_of(first + int(x)) for x in xs[k:]]
    return Slide(date.fromordinal(since), int(length), fall, (step - sse) / variance, tuple(causes))


def _suffix_sums(values: Sequence[float]) -> list[float]:
    """S[k] = the sum of values[k:], accumulated from the last value back; S[n] = 0.0."""
    out = list(accumulate(reversed(values), initial=0.0))
    out.reverse()
    return out


HingeTerms = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]


def _hinge_terms(xs: Sequence[float]) -> HingeTerms:
    """For each hinge point k with `_MIN_STEP` points or more from it on: Σu, Σu² and
    n·Σu² − (Σu)² over those points, u = x − x_k. They depend on the days only, and are whole
    numbers (the days are), computed exactly."""
    n = len(xs)
    sx = _suffix_sums(xs)
    sxx = _suffix_sums(list(map(mul, xs, xs)))
    su: list[float] = []
    suu: list[float] = []
    det: list[float] = []
    for k in range(n - _MIN_STEP + 1):
        c, m = xs[k], float(n - k)
        u = sx[k] - c * m
        uu = sxx[k] - 2 * c * sx[k] + c * c * m
        su.append(u)
        suu.append(uu)
        det.append(n * uu - u * u)
    return tuple(su), tuple(suu), tuple(det)


@lru_cache(maxsize=8)
def _first_days(n: int) -> tuple[float, ...]:
    return tuple(map(float, range(n)))


@lru_cache(maxsize=128)
def _whole_window_terms(n: int) -> HingeTerms:
    """`_hinge_terms` of `n` consecutive days: a constant of `n`."""
    return _hinge_terms(_first_days(n))


def _best_hinge(
    xs: Sequence[float], sy: list[float], total_sq: float, sxy: list[float], terms: HingeTerms
) -> tuple[float, int, float, float] | None:
    """The least-squares y = a + b·max(0, x − x_k) with b < 0 of least squared error over the
    hinge points k: (squared error, k, b, a), the first k on a tie; None if no b < 0.

    Each candidate's error is the same expression, evaluated the same way, whichever k it is
    evaluated at. To evaluate it at few: the hinges are first ranked by the variance they
    explain, num²/det with num = n·Σuy − Σu·Σy (the error is Σy²_centred − num²/(n·det)), and
    only those within 1e-8·Σy² of the best error are evaluated (rounding moves an error by
    ~1e-13·Σy²); all of them when Σy² is too large or too small for that bound to hold.
    Every det is positive: the days are distinct whole numbers."""
    su, suu, dets = terms
    n = len(xs)
    total = sy[0]
    hinges: Iterable[int] = range(len(dets))
    if 1e-200 < total_sq < 1e200:
        ranks = [
            num * num / det if num < 0 else -1.0
            # zip stops at the last hinge point
            for c, u, det, xy, y in zip(xs, su, dets, sxy, sy, strict=False)
            for num in (n * (xy - c * y) - u * total,)
        ]
        top = max(ranks)
        floor = top - 1e-8 * n * total_sq
        hinges = [k for k, rank in enumerate(ranks) if rank >= floor and rank >= 0]
    best: tuple[float, int, float, float] | None = None
    for k in hinges:
        det = dets[k]
        if det <= 1e-9:
            continue
        c, u, uu = xs[k], su[k], suu[k]
        suy = sxy[k] - c * sy[k]
        b = (n * suy - u * total) / det
        if b >= 0:
            continue
        a = (total - b * u) / n
        sse = total_sq - 2 * a * total - 2 * b * suy + n * a * a + 2 * a * b * u + b * b * uu
        if best is None or sse < best[0]:
            best = (sse, k, b, a)
    return best


def _best_step(sy: list[float], syy: list[float]) -> float:
    """The least squared error of a step (one level, then another) with `_MIN_STEP` points or
    more on each side: around each side's mean, the points before k and from k on."""
    n = len(sy) - 1
    total, total_sq, whole = sy[0], syy[0], float(n)
    counts = list(map(float, range(n, -1, -1)))  # the points from k on
    lo, hi = _MIN_STEP, n - _MIN_STEP + 1
    return min(
        [
            total_sq - qq - (total - q) * (total - q) / (whole - m) + (qq - q * q / m)
            for q, qq, m in zip(sy[lo:hi], syy[lo:hi], counts[lo:hi], strict=True)
        ]
    )


def _case_volume(
    state: AccountHealth, at: datetime, rules: HealthRules, weight: float
) -> Factor | None:
    if not state.cases_opened:
        return None
    window = timedelta(days=rules.case_window_days)
    horizon = at - timedelta(days=rules.case_baseline_days)
    if state.cases_opened and state.cases_opened[0].at < horizon:
        state.cases_opened = [m for m in state.cases_opened if m.at >= horizon]
    since = at - window
    recent = [m for m in state.cases_opened if since < m.at <= at]
    if not recent:
        return None
    first = max(state.first_seen or at, horizon)
    history_days = max(0.0, (at - window - first).total_seconds() / 86_400)
    before = sum(1 for m in state.cases_opened if m.at <= at - window)
    prior_days = float(rules.case_window_days)
    expected = (before + rules.case_prior_per_window) / (history_days + prior_days)
    expected *= rules.case_window_days
    z = (len(recent) - expected) / math.sqrt(max(expected, 1.0))
    points = weight * _ramp(z, rules.case_z_from, rules.case_z_full)
    detail = (
        f"{len(recent)} cases in {rules.case_window_days} days against {expected:.1f} expected "
        f"from its own history"
    )
    return _factor("case_volume", points, detail, tuple(m.event_id for m in recent))


def _breaches(
    state: AccountHealth, at: datetime, rules: HealthRules, weight: float
) -> Factor | None:
    if not state.breaches:
        return None
    since = at - timedelta(days=rules.breach_window_days)
    recent = [(due, causes) for due, causes in state.breaches.values() if since < due <= at]
    if not recent:
        return None
    recent.sort()
    causes = tuple(dict.fromkeys(c for _, cs in recent for c in cs))
    points = weight * min(1.0, len(recent) / rules.breaches_full)
    return _factor(
        "sla_breaches",
        points,
        f"{len(recent)} SLA breaches in {rules.breach_window_days} days",
        causes,
    )


def _open_high(state: AccountHealth, rules: HealthRules, weight: float) -> Factor | None:
    if not state.open_cases:
        return None
    high = [c for c in state.open_cases.values() if c.priority in rules.high_priorities]
    if not high:
        return None
    causes = tuple(dict.fromkeys(e for c in high for e in c.causes))
    points = weight * min(1.0, len(high) / rules.open_high_full)
    names = "/".join(p.value for p in rules.high_priorities)
    return _factor("open_high_priority", points, f"{len(high)} open {names} cases", causes)


def _nps(state: AccountHealth, at: datetime, rules: HealthRules, weight: float) -> Factor | None:
    if not state.nps:
        return None
    since = at - timedelta(days=rules.survey_window_days)
    latest = next((s for s in reversed(state.nps) if since < s.at <= at), None)
    if latest is None or latest.score > rules.nps_detractor_max:
        return None
    depth = (rules.nps_detractor_max - latest.score) / max(1, rules.nps_detractor_max)
    points = weight * (0.5 + 0.5 * depth)
    return _factor("nps", points, f"latest NPS {latest.score} (detractor)", (latest.event_id,))


def _csat(state: AccountHealth, at: datetime, rules: HealthRules, weight: float) -> Factor | None:
    if not state.csat:
        return None
    since = at - timedelta(days=rules.survey_window_days)
    low = [s for s in state.csat if since < s.at <= at and s.score <= rules.csat_low_max]
    if not low:
        return None
    points = weight * min(1.0, len(low) / rules.csat_low_full)
    return _factor(
        "csat",
        points,
        f"{len(low)} CSAT answers of {rules.csat_low_max} or less in "
        f"{rules.survey_window_days} days",
        tuple(s.event_id for s in low),
    )


def _onboarding(state: AccountHealth, rules: HealthRules, weight: float) -> Factor | None:
    if not state.missed:
        return None
    names = sorted(state.missed)
    points = weight * min(1.0, len(names) / rules.milestones_full)
    return _factor(
        "onboarding",
        points,
        "onboarding milestones missed: " + ", ".join(names),
        tuple(state.missed[n].event_id for n in names),
    )


def _renewal(
    state: AccountHealth, at: datetime, rules: HealthRules, weight: float
) -> Factor | None:
    if state.renewal is None:
        return None
    renews, cause = state.renewal
    days = (datetime.combine(renews, time(), UTC) - at).total_seconds() / 86_400
    if not 0 <= days <= rules.renewal_window_days:
        return None
    points = weight * (1 - days / rules.renewal_window_days)
    return _factor(
        "renewal", points, f"renewal on {renews.isoformat()} in {days:.0f} days", (cause,)
    )


def _owner(state: AccountHealth, at: datetime, rules: HealthRules, weight: float) -> Factor | None:
    if not state.owner_changes:
        return None
    since = at - timedelta(days=rules.owner_change_days)
    recent = [m for m in state.owner_changes if since < m.at <= at]
    if not recent:
        return None
    return _factor(
        "owner_change",
        weight,
        f"owner changed {len(recent)} time(s) in {rules.owner_change_days} days",
        tuple(m.event_id for m in recent),
    )


# --- decide ------------------------------------------------------------------------------


def decide(
    state: AccountHealth,
    at: datetime,
    rules: HealthRules,
    policy_version: str,
    trigger: str | None = None,
) -> list[RiskRaised | RiskCleared]:
    """Scores the account at `at`; returns the risk raised or cleared if its level changed.

    `trigger` is the event that prompted the assessment (None for a scheduled one); a cleared
    signal whose factors have all gone names the factors it clears instead.

    The usage slide is left out when it could not lift an account from low (`_assess`): the
    level is the same with or without it, and the factors a later decision takes from this
    one (those a cleared signal names) are only taken when this one left the account at
    medium or high, where the slide is always fitted."""
    if state.churned:
        return []
    now = at if state.evaluated_at is None else max(at, state.evaluated_at)
    found = _assess(state, now, rules, state.level)
    previous = state.level
    level = rules.level_for(found.score, previous)
    before = state.factors
    state.score, state.factors, state.evaluated_at = found.score, found.factors, now
    if level == previous:
        return []
    state.level = level
    top = found.factors[: rules.explain_top]
    causes = tuple(dict.fromkeys(c for f in top for c in f.caused_by))
    if not causes:
        causes = tuple(dict.fromkeys(c for f in before[: rules.explain_top] for c in f.caused_by))
    if not causes and trigger is not None:
        causes = (trigger,)
    if not causes:
        return []  # nothing on the log explains it: cannot happen while factors name events
    raised = LEVELS.index(level) > LEVELS.index(previous)
    kind = RiskRaised if raised else RiskCleared
    name = "risk.raised" if raised else "risk.cleared"
    return [
        kind(
            signal_id=f"{name}/{state.tenant_id}/{state.account_id}/{level}/{now.isoformat()}",
            tenant_id=state.tenant_id,
            account_id=state.account_id,
            detected_at=now,
            caused_by=causes,
            policy_version=policy_version,
            score=found.score,
            level=level,
            previous_level=previous,
            factors=tuple(f.stated() for f in top),
            owner_id=state.owner_id,
        )
    ]


# --- expansion openings ------------------------------------------------------------------


def _near_limit(
    state: AccountHealth, event: UsageRecorded, rules: HealthRules
) -> list[OpportunityDetected]:
    """Usage close to the seats bought, and not declining: once per episode, re-armed when
    usage falls back below `limit_rearm` of the seats."""
    if not state.seats:
        return []
    today = event.period_end
    last = today.toordinal()
    days = range(last - rules.usage_recent_days + 1, last + 1)
    values = sorted(_recorded(state.usage.row(days.start, days.stop - 1)[0]), reverse=True)
    if len(values) < rules.usage_recent_days:
        return []
    busy = values[: max(1, len(values) * 5 // 7)]  # working days: weekends do not fill seats
    ratio = sum(busy) / len(busy) / state.seats
    if ratio < rules.limit_rearm:
        state.limit_armed = True
    if not state.limit_armed or ratio < rules.limit_near:
        return []
    recent, base = _usage_levels(*_usage_row(state, last, rules), rules)
    if recent is None or base is None or recent < base * (1 - rules.usage_decline_from):
        return []
    state.limit_armed = False
    causes = _recent_ids(state, last, rules)
    evidence = (*causes, state.seats_cause) if state.seats_cause else causes
    return [
        OpportunityDetected(
            signal_id=(
                f"opportunity/usage_near_limit/{state.tenant_id}/{state.account_id}/"
                f"{today.isoformat()}"
            ),
            tenant_id=state.tenant_id,
            account_id=state.account_id,
            detected_at=event.occurred_at,
            caused_by=evidence,
            opportunity="usage_near_limit",
            key=state.account_id,
            evidence=evidence,
            detail=(
                f"{rules.usage_metric} on working days at {ratio:.0%} of {state.seats} seats, "
                f"steady or growing against its baseline: an expansion conversation"
            ),
            owner_id=state.owner_id,
        )
    ]


def _promoter(state: AccountHealth, event: SurveyAnswered) -> OpportunityDetected:
    return OpportunityDetected(
        signal_id=f"opportunity/promoter/{state.tenant_id}/{event.event_id}",
        tenant_id=state.tenant_id,
        account_id=state.account_id,
        detected_at=event.occurred_at,
        caused_by=(event.event_id,),
        opportunity="promoter",
        key=state.account_id,
        evidence=(event.event_id,),
        detail=f"NPS {event.score} from a low-risk account: reference, review or upsell",
        owner_id=state.owner_id,
    )
