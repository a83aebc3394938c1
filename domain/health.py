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
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, MutableSequence, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from itertools import accumulate, compress
from operator import mul, sub, truediv
from typing import Annotated, Any, NamedTuple, cast

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
_RANK = {level: rank for rank, level in enumerate(LEVELS)}
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
        return _knobs(self).level_for(score, current)


DEFAULT_HEALTH = HealthRules()


class _Knobs:
    """A `[health]` section as plain attributes, with the spans and windows it implies. Every
    assessment reads some forty of them; from the pydantic model (its attribute hook, a
    `timedelta` built each time) that cost more than the arithmetic they feed."""

    __slots__ = (
        "baseline_days",
        "baseline_first",
        "baseline_windows",
        "breach_window",
        "breach_window_days",
        "breaches_full",
        "case_baseline",
        "case_prior",
        "case_window",
        "case_window_days",
        "case_z_from",
        "case_z_full",
        "csat_low_full",
        "csat_low_max",
        "decline_from",
        "decline_full",
        "explain_top",
        "high_at",
        "high_names",
        "high_priorities",
        "hysteresis",
        "keep_days",
        "least_baseline",
        "lift_at",
        "limit_near",
        "limit_rearm",
        "medium_at",
        "metric",
        "milestones_full",
        "min_fitted",
        "nps_detractor_max",
        "open_high_full",
        "owner_change_days",
        "owner_window",
        "promoter_min",
        "recent_days",
        "renewal_window_days",
        "row_days",
        "slide_from",
        "slide_full",
        "slide_min_days",
        "slide_tolerance",
        "slide_window",
        "span_counts",
        "steady_share",
        "steady_windows",
        "survey_window",
        "survey_window_days",
        "w_case_volume",
        "w_csat",
        "w_nps",
        "w_onboarding",
        "w_open_high",
        "w_owner_change",
        "w_renewal",
        "w_sla_breaches",
        "w_usage_decline",
        "w_usage_slide",
        "window_shift",
        "window_weeks",
    )

    def __init__(self, r: HealthRules) -> None:
        w = r.weights
        self.w_usage_decline, self.w_usage_slide = w.usage_decline, w.usage_slide
        self.w_case_volume, self.w_sla_breaches = w.case_volume, w.sla_breaches
        self.w_open_high, self.w_nps, self.w_csat = w.open_high_priority, w.nps, w.csat
        self.w_onboarding, self.w_renewal = w.onboarding, w.renewal
        self.w_owner_change = w.owner_change
        self.medium_at, self.high_at, self.hysteresis = r.medium_at, r.high_at, r.hysteresis
        self.lift_at = min(r.medium_at, r.high_at)  # the score that lifts a low account
        self.explain_top, self.metric = r.explain_top, r.usage_metric
        recent, baseline = r.usage_recent_days, r.usage_baseline_days
        self.recent_days, self.baseline_days = recent, baseline
        self.keep_days = recent + baseline + 1  # the days of usage an account keeps
        # a row of days as far back as the baseline and the slide look
        self.row_days = max(recent + baseline, r.slide_window_days)
        self.baseline_windows = _baseline_windows(self.row_days, recent, baseline, r)
        self.least_baseline = r.usage_min_baseline_days
        self.decline_from, self.decline_full = r.usage_decline_from, r.usage_decline_full
        # `_steady`: the windows with days enough, as slices of the baseline alone; the share
        # of the baseline recent usage must keep to be down by less than both decline marks
        self.baseline_first = first = self.row_days - recent - baseline
        self.steady_windows = tuple(
            (lo - first, hi - first, hi - lo)
            for lo, hi in self.baseline_windows
            if hi - lo >= r.usage_min_baseline_days
        )
        self.steady_share = 1 - min(r.usage_decline_from, r.usage_decline_full)
        self.slide_window, self.slide_min_days = r.slide_window_days, r.slide_min_days
        self.slide_from, self.slide_full = r.slide_from, r.slide_full
        self.slide_tolerance = r.slide_step_tolerance
        span = recent + baseline
        # the days of each weekday in the weekday profile's span, by offset modulo 7
        self.span_counts = [(span - k + 6) // 7 for k in range(7)]
        self.min_fitted = max(3 * _MIN_STEP, r.slide_window_days * 2 // 3)
        # the offset modulo 7 of the slide window's first day in the profile's span
        self.window_shift = (span - r.slide_window_days) % 7
        self.window_weeks = r.slide_window_days // 7 + 1
        self.case_window_days = r.case_window_days
        self.case_window = timedelta(days=r.case_window_days)
        self.case_baseline = timedelta(days=r.case_baseline_days)
        self.case_prior = r.case_prior_per_window
        self.case_z_from, self.case_z_full = r.case_z_from, r.case_z_full
        self.breach_window_days = r.breach_window_days
        self.breach_window = timedelta(days=r.breach_window_days)
        self.breaches_full = r.breaches_full
        self.high_priorities = r.high_priorities
        self.high_names = "/".join(p.value for p in r.high_priorities)
        self.open_high_full = r.open_high_full
        self.survey_window_days = r.survey_window_days
        self.survey_window = timedelta(days=r.survey_window_days)
        self.nps_detractor_max, self.csat_low_max = r.nps_detractor_max, r.csat_low_max
        self.csat_low_full, self.milestones_full = r.csat_low_full, r.milestones_full
        self.renewal_window_days = r.renewal_window_days
        self.owner_change_days = r.owner_change_days
        self.owner_window = timedelta(days=r.owner_change_days)
        self.limit_near, self.limit_rearm = r.limit_near, r.limit_rearm
        self.promoter_min = r.promoter_min

    def level_for(self, score: float, current: RiskLevel) -> RiskLevel:
        up: RiskLevel = (
            "high" if score >= self.high_at else "medium" if score >= self.medium_at else "low"
        )
        if _RANK[up] >= _RANK[current]:
            return up
        if current == "high" and score >= self.high_at - self.hysteresis:
            return "high"
        if score >= self.medium_at - self.hysteresis:
            return "medium"
        return "low"


_KNOBS: dict[int, tuple[HealthRules, _Knobs]] = {}


def _knobs(rules: HealthRules) -> _Knobs:
    """The knobs of `rules`, made once per rules object (policies are immutable and few)."""
    known = _KNOBS.get(id(rules))
    if known is not None and known[0] is rules:
        return known[1]
    if len(_KNOBS) > 64:  # rules objects come and go in tests, not in a replay
        _KNOBS.clear()
    made = _Knobs(rules)
    _KNOBS[id(rules)] = (rules, made)
    return made


def _baseline_windows(
    length: int, recent: int, baseline: int, r: HealthRules
) -> tuple[tuple[int, int], ...]:
    """The baseline's windows as slices of a row of `length` days that ends with the `recent`
    days: `usage_window_days` each (or as many as there are) ending at the baseline's end,
    then a week apart back to its start, from the row's end back."""
    first = length - recent - baseline  # the baseline's first day in the row
    width = r.usage_window_days
    return tuple(
        (first + (end - width if end > width else 0), first + end) for end in range(baseline, 0, -7)
    )


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


# The values of a run of days, `_NONE` on a day without a record, and where the records are:
# (values, start, end, count), the `count` records lying from offset `start` to `end`
# (exclusive). Every day has one when `count` is the run's length; those from `start` to `end`
# do when it is their number (the run starts late or ends early, no gap within). A plain
# tuple: one is made for every assessment.
Row = tuple[list[float], int, int, int]


def _as_list(values: MutableSequence[float]) -> list[float]:
    """Daily values as a list: arrays, or lists in a state pickled before they were arrays."""
    return values.tolist() if isinstance(values, array) else cast(list[float], values)


@dataclass(slots=True)
class DailyValues:
    """A metric's values by day ordinal with the record of each: a map from day to value held
    as sorted parallel sequences, so that a run of days reads as one slice. Days and values
    are arrays (contiguous: an assessment reads a hundred of them, which as float objects
    lie all over the heap); a state pickled before restores them as lists, read alike."""

    days: MutableSequence[int] = field(default_factory=lambda: array("q"))
    values: MutableSequence[float] = field(default_factory=lambda: array("d"))
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

    def row(self, first: int, last: int) -> Row:
        """The value of each day from `first` to `last`, `_NONE` on a day without one."""
        days = self.days
        lo, hi = bisect_left(days, first), bisect_right(days, last)
        length, count = last - first + 1, hi - lo
        values = _as_list(self.values[lo:hi])
        if count == length:  # every day has one
            return values, 0, length, count
        out = [_NONE] * length
        if not count:
            return out, 0, 0, 0
        start, end = days[lo] - first, days[hi - 1] - first + 1
        if end - start == count:  # one run of records
            out[start:end] = values
        else:
            for d, v in zip(days[lo:hi], values, strict=True):
                out[d - first] = v
        return out, start, end, count

    def latest(self, last: int, n: int) -> list[float] | None:
        """The values of the `n` days up to `last` when those are the newest days and every
        one has a record (the common case, read without a search); else None."""
        days = self.days
        if len(days) < n or days[-1] != last or days[-n] != last - n + 1:
            return None  # days are distinct and sorted: n of them span n days exactly
        return _as_list(self.values[-n:])

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


class Assessment(NamedTuple):
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
    if type(event) is UsageRecorded:  # most events; a class pattern costs pydantic's isinstance
        return _fold_usage(state, event, rules)
    match event:
        case UsageRecorded():
            return _fold_usage(state, event, rules)
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


def _fold_usage(
    state: AccountHealth, event: UsageRecorded, rules: HealthRules
) -> list[OpportunityDetected]:
    k = _knobs(rules)
    if event.metric != k.metric:
        return []
    day = event.period_end.toordinal()
    state.usage.put(day, event.value, event.event_id)
    _prune_usage(state, day, k)
    return _near_limit(state, event, day, k) if state.seats else []


def is_backfill(event: Event) -> bool:
    """A usage record for a period that ended days before it was recorded: history being
    filled in. It feeds the baseline, but its arrival is no moment to score the account."""
    if event.type != "usage.recorded":  # by name first: see `evolve`
        return False
    return (type(event) is UsageRecorded or isinstance(event, UsageRecorded)) and (
        event.occurred_at.date().toordinal() - event.period_end.toordinal() > 1
    )


def observe(state: AccountHealth, signal: Signal) -> None:
    """Folds an SLA signal about one of the account's cases: breaches it suffered count
    against its health until a late event retracts them."""
    if isinstance(signal, SlaBreached) and signal.metric in SUFFERED_METRICS:
        state.breaches[signal.signal_id] = (signal.due_at, signal.caused_by)
    elif isinstance(signal, SlaBreachRetracted):
        state.breaches.pop(signal.retracts, None)


def _prune_usage(state: AccountHealth, newest: int, k: _Knobs) -> None:
    keep = k.keep_days
    if len(state.usage) > keep + 7:
        state.usage.drop_before(newest - keep)


# --- assess ------------------------------------------------------------------------------


def assess(state: AccountHealth, at: datetime, rules: HealthRules) -> Assessment:
    """The account's score at `at` with every contributing factor, most points first."""
    return Assessment(*_assess(state, at, _knobs(rules), None))


def _assess(
    state: AccountHealth, at: datetime, k: _Knobs, level: RiskLevel | None
) -> tuple[float, tuple[Factor, ...]]:
    """`assess`, but given the account's current `level` the usage slide is fitted only when
    it could change the level the score gives: an account at low whose other factors, with
    what the slide could bring, stay below the marks stays low whatever the slide (see
    `_slide_points_needed` and `_fit_slide`)."""
    last = at.date().toordinal()
    row = _usage_row(state, last, k)
    found: list[Factor | None] = [_usage(state, row, last, k)]
    # a factor whose evidence the state does not hold is not called at all
    if state.cases_opened:
        found.append(_case_volume(state, at, k))
    if state.breaches:
        found.append(_breaches(state, at, k))
    if state.open_cases:
        found.append(_open_high(state, k))
    if state.nps:
        found.append(_nps(state, at, k))
    if state.csat:
        found.append(_csat(state, at, k))
    if state.missed:
        found.append(_onboarding(state, k))
    if state.renewal is not None:
        found.append(_renewal(state, at, last, k))
    if state.owner_changes:
        found.append(_owner(state, at, k))
    factors = [f for f in found if f is not None and f.points > 0]
    weight = k.w_usage_slide
    if level != "low":
        slide = _slide(state, row, last, k, weight, 0.0)
    elif (need := _slide_points_needed(factors, k)) <= weight:
        slide = _slide(state, row, last, k, weight, need)
    else:
        slide = None
    if slide is not None and slide.points > 0:
        factors.append(slide)
    if len(factors) > 1:
        factors.sort(key=_most_points_first)
    total = sum([f.points for f in factors])
    score = round(total if total < 100.0 else 100.0, 1)  # min(100.0, total), as written before
    return score, tuple(factors)


def _most_points_first(f: Factor) -> tuple[float, str]:
    return -f.points, f.factor


def _slide_points_needed(others: list[Factor], k: _Knobs) -> float:
    """The points the usage slide must bring, with the other factors (those with points, in
    the order found), to lift an account from low: short of them (by more than the rounding
    of points and score) the score stays clearly below the marks, whatever the slide. More
    than the slide's weight: it cannot."""
    return k.lift_at - 0.5 - sum([f.points for f in others])


def _factor(name: str, points: float, detail: str, causes: tuple[str, ...]) -> Factor:
    return Factor(name, round(points if points < 100.0 else 100.0, 1), detail, causes)


def _scores(points: float) -> bool:
    """Whether `_factor` gives `points` more than 0, as `round(min(100.0, points), 1) > 0`
    (NaN too, through the min): the double nearest 0.05 lies above 0.05, so below it is
    exactly what rounds to 0.0."""
    return not points < 0.05


def _ramp(value: float, start: float, full: float) -> float:
    if full <= start:
        return 1.0 if value >= full else 0.0
    share = (value - start) / (full - start)
    share = share if share > 0.0 else 0.0  # min(1.0, max(0.0, share)), NaN to 0.0 as well
    return share if share < 1.0 else 1.0


# --- usage ---------------------------------------------------------------------------------
#
# Every usage quantity is computed afresh from the account's daily values (`state.usage`) each
# time it is needed: nothing is carried from one assessment to the next, so an account folded
# from its history, or restored from a snapshot, explains itself to the digit. Sums run over the
# days in date order, one running total each, as plainly written; a day without a record
# stands as `_NONE` in a row of days and adds nothing (0.0) where it is summed.

_MIN_STEP = 5  # values on each side of a step, and at least on a slide
# for a run starting at offset s: the slices of the offsets r, r + 7, … for r = 0 … 6
_WEEKDAY_SLICES = tuple(tuple(slice((r - s) % 7, None, 7) for r in range(7)) for s in range(7))


@dataclass(frozen=True, slots=True)
class Slide:
    """A slide fitted to recent usage: flat, then a straight decline from `since` to today."""

    since: date
    days: int
    fall: float  # the fitted loss from the level at `since` to today, as a fraction of it
    versus_step: float  # the best step's squared error minus the slide's, in residual variances
    causes: tuple[str, ...]  # the records from `since` on


def _usage_row(state: AccountHealth, last: int, k: _Knobs) -> Row:
    """The metric on each day up to the day ordinal `last`, as far back as the baseline and
    the slide look."""
    n = k.row_days
    values = state.usage.latest(last, n)
    return state.usage.row(last - n + 1, last) if values is None else (values, 0, n, n)


def _recorded(values: list[float]) -> list[float]:
    return [v for v in values if v != _NONE] if _NONE in values else values


def _usage_levels(row: Row, k: _Knobs) -> tuple[float | None, float | None]:
    """The mean of the last `usage_recent_days` of `row`, and the baseline before them: the
    highest `usage_window_days` mean, windows ending a week apart.

    A sum over days some of which have no record is the sum of the records alone: adding
    0.0 leaves every running total as it was (none is −0.0: each starts from +0)."""
    values, start, end, count = row
    r, least = k.recent_days, k.least_baseline
    if count == len(values):
        means = [
            sum(values[lo:hi]) / (hi - lo) for lo, hi in k.baseline_windows if hi - lo >= least
        ]
        return sum(values[-r:]) / r, (max(means) if means else None)
    best: float | None = None
    if count == end - start:  # one run of records: each window's share of it
        since = len(values) - r
        since = start if start > since else since
        recent = sum(values[since:end]) / (end - since) if end > since else None
        for lo, hi in k.baseline_windows:
            lo, hi = start if start > lo else lo, end if end < hi else hi
            if hi - lo < least:
                continue
            mean = sum(values[lo:hi]) / (hi - lo)
            if best is None or mean > best:
                best = mean
        return recent, best
    recorded = _recorded(values[-r:])
    summed = [0.0 if v == _NONE else v for v in values]
    for lo, hi in k.baseline_windows:
        n = hi - lo - values[lo:hi].count(_NONE)
        if n < least:
            continue
        mean = sum(summed[lo:hi]) / n
        if best is None or mean > best:
            best = mean
    return (sum(recorded) / len(recorded) if recorded else None), best


def _steady(row: Row, k: _Knobs) -> bool:
    """True when usage is certainly not down on its baseline by the decline marks, so that
    `_usage` gives nothing, for a row whose baseline has every day and whose recent days
    some: the recent mean against an upper bound of the best window mean, from running
    totals of the baseline (one pass where `_usage_levels` sums each window). The totals
    round differently from those sums, by less than 3e-14 of the baseline's total each; the
    bound is raised by 1e-12 of it, and the share by 1e-9."""
    values, start, end, count = row
    share, first = k.steady_share, k.baseline_first
    since = len(values) - k.recent_days
    if count != end - start or start > first or end <= since:
        return False
    if not k.steady_windows or share < 1e-6:
        return False
    recent = sum(values[since:end]) / (end - since)
    totals = list(accumulate(values[first:since], initial=0.0))
    best = max([(totals[hi] - totals[lo]) / n for lo, hi, n in k.steady_windows])
    bound = (best + totals[-1] * 1e-12 / k.least_baseline) * (1 + 1e-12)
    return recent >= bound * share * (1 + 1e-9)


def _recent_ids(state: AccountHealth, last: int, k: _Knobs) -> tuple[str, ...]:
    return tuple(state.usage.ids_between(last - k.recent_days + 1, last))


def _usage(state: AccountHealth, row: Row, last: int, k: _Knobs) -> Factor | None:
    if _steady(row, k):
        return None
    recent, base = _usage_levels(row, k)
    if base is None or base <= 0:
        return None
    if recent is None:
        newest = state.usage.newest()
        cause = (newest[1],) if newest is not None else ()
        return _factor("usage_decline", k.w_usage_decline, f"no {k.metric} recorded lately", cause)
    drop = 1 - recent / base
    points = k.w_usage_decline * _ramp(drop, k.decline_from, k.decline_full)
    if not _scores(points):
        return None
    detail = (
        f"{k.metric} {k.recent_days}-day mean {recent:.1f} is "
        f"{drop:.0%} below its baseline {base:.1f}"
    )
    return _factor("usage_decline", points, detail, _recent_ids(state, last, k))


def _slide(
    state: AccountHealth, row: Row, last: int, k: _Knobs, weight: float, need: float
) -> Factor | None:
    """Usage sliding steadily for `slide_min_days` or more (see the module docstring); None,
    too, when the slide could not bring `need` points (left out of a low account's score)."""
    slide = _fit_slide(row, last, k, state.usage, _least_fall(need, weight, k))
    if slide is None or slide.versus_step < -k.slide_tolerance:
        return None
    points = weight * _ramp(slide.fall, k.slide_from, k.slide_full)
    per_week = slide.fall / slide.days * 7
    return _factor(
        "usage_slide",
        points,
        f"{k.metric} sliding steadily since {slide.since.isoformat()}: "
        f"{slide.fall:.0%} down over {slide.days} days (about {per_week:.0%} a week), "
        f"not a one-off drop",
        slide.causes,
    )


def _least_fall(need: float, weight: float, k: _Knobs) -> float:
    """The fall short of which a slide brings fewer than `need` points (rounded points, so
    0.1 in hand): `slide_from`, below which none counts, when `need` is that small."""
    start, full = k.slide_from, k.slide_full
    if need <= 0.1 or weight <= 0:
        return start
    if full <= start:  # all or nothing from `full` on
        return max(start, full)
    return start + (full - start) * (need - 0.1) / weight


def _fit_slide(row: Row, last: int, k: _Knobs, usage: DailyValues, least: float) -> Slide | None:
    """Fits a slide (flat, then linear down to `last`) to the weekday-adjusted daily values of
    the last `slide_window_days` of `row`, and a step to compare it with when the slide has
    lasted `slide_min_days` and lost `slide_from`; None when there is too little to fit or
    the slide is too short or too shallow to count, and without fitting when no line from a
    hinge point far enough back could fall by `least` (≥ `slide_from`, see `_may_fall`).

    Days without a record add nothing to the profile's sums (see `_usage_levels`) and are
    left out of the fit; a row with one run of records is read as that run."""
    values, start, end, count = row
    size, span, width = len(values), k.keep_days - 1, k.slide_window
    kept_from, window_from = size - span, size - width  # offsets in `values`
    run = count == end - start  # records on every day from `start` to `end`
    if count < size and (end - max(start, window_from) if run else count) < k.min_fitted:
        return None  # too few records in the window to fit, fewer still after exclusions
    # the weekday profile, by a day's offset in the span it is taken over modulo 7 (each
    # offset one weekday): the days' sums, how many have records, against the overall mean
    if count == size:
        kept = values[kept_from:] if kept_from else values
        counts, lo = k.span_counts, 0
    elif run:
        lo, hi = max(start - kept_from, 0), end - kept_from  # the records in the span
        kept = values[kept_from + lo : kept_from + hi]
        counts = [(hi - r + 6) // 7 - (lo - r + 6) // 7 for r in range(7)]
    else:
        kept = values[kept_from:]
        present = [v != _NONE for v in kept]
        kept, lo = [0.0 if v == _NONE else v for v in kept], 0
        counts = [sum(present[r::7]) for r in range(7)]
    if min(counts) < 2:
        return None
    overall = sum(kept) / sum(counts)
    if overall <= 0:
        return None
    # `kept` starts at the offset `lo`: the offsets r, r + 7, … start at its (r − lo) % 7
    sums = map(sum, map(kept.__getitem__, _WEEKDAY_SLICES[lo % 7]))
    profile = [total / n / overall for total, n in zip(sums, counts, strict=True)]
    first = last - width + 1
    window = values[window_from:]
    shift = k.window_shift
    scale = (profile[shift:] + profile[:shift]) * k.window_weeks  # past the window: unused
    xs: Sequence[float]
    if count == size and min(profile) > 0:
        xs = _first_days(width)
        ys = list(map(truediv, window, scale))
    elif run and min(profile) > 0:  # every record in the window, none excluded
        lo, hi = max(start - window_from, 0), end - window_from
        xs = _first_days(width)[lo:hi]
        ys = list(map(truediv, window[lo:hi], scale[lo:hi]))
    else:
        offsets = [j for j, v in enumerate(window) if v != _NONE and scale[j] > 0]
        xs = [float(j) for j in offsets]
        ys = [window[j] / scale[j] for j in offsets]
    n = len(ys)
    if n < k.min_fitted:
        return None
    # the terms depend on the days' spacing only: a window filled from some day on has
    # those of a whole window of its length
    whole = xs[-1] - xs[0] == n - 1
    if least > k.slide_from and not _may_fall(xs, ys, whole, k.slide_min_days, least):
        return None
    sy = _suffix_sums(ys)
    sxy = _suffix_sums(list(map(mul, xs, ys)))
    squares = list(map(mul, ys, ys))
    total_sq = sum(reversed(squares))  # as a suffix sum's first: from the last value back
    terms = _whole_window_terms(n) if whole else _gappy_terms(tuple(xs))
    best = _best_hinge(xs, sy, total_sq, sxy, terms)
    if best is None or best[3] <= 0:
        return None
    sse, h, b, a = best
    length = xs[-1] - xs[h]
    fall = -b * length / a
    if int(length) < k.slide_min_days or fall < k.slide_from:
        return None
    step = _best_step(sy, _suffix_sums(squares))
    variance = max(sse, 1e-12) / (n - 3)
    since = first + int(xs[h])
    causes = usage.ids_between(since, last)
    if len(causes) != n - h:  # some days were left out of the fit: the fitted ones
        causes = [usage.id_of(first + int(x)) for x in xs[h:]]
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


@lru_cache(maxsize=1024)
def _gappy_terms(xs: tuple[float, ...]) -> HingeTerms:
    """`_hinge_terms` of days with gaps in them: a function of the days alone, and the same few
    patterns recur (one missing day, moving through the window day by day)."""
    return _hinge_terms(xs)


FallBounds = tuple[tuple[float, ...], tuple[float, ...]]


def _hinge_fall_bounds(xs: Sequence[float], terms: HingeTerms, min_days: int) -> FallBounds:
    """For each hinge point k at least `min_days` before the last day: Σu·L/det and n·L/det,
    L = x_last − x_k, so that −b·L = Σy·(Σu·L/det) − Σuy·(n·L/det) (see `_may_fall`)."""
    su, _, dets = terms
    n, last = len(xs), xs[-1]
    alpha: list[float] = []
    beta: list[float] = []
    for k, (u, det) in enumerate(zip(su, dets, strict=True)):
        length = last - xs[k]
        if length < min_days:
            break
        evaluated = det > 1e-9  # as `_best_hinge` skips it
        alpha.append(u * length / det if evaluated else 0.0)
        beta.append(n * length / det if evaluated else 0.0)
    return tuple(alpha), tuple(beta)


@lru_cache(maxsize=128)
def _fall_bounds(n: int, min_days: int) -> FallBounds:
    return _hinge_fall_bounds(_first_days(n), _whole_window_terms(n), min_days)


@lru_cache(maxsize=1024)
def _gappy_bounds(xs: tuple[float, ...], min_days: int) -> FallBounds:
    return _hinge_fall_bounds(xs, _gappy_terms(xs), min_days)


def _may_fall(
    xs: Sequence[float], ys: list[float], whole: bool, min_days: int, least: float
) -> bool:
    """Whether a line fitted to (xs, ys) from some hinge point `min_days` or more before the
    last could fall by `least`. Its fall −b·L/a is at most −b·L/ȳ, since a = ȳ − b·Σu/n ≥ ȳ
    when b < 0 (and b ≥ 0 is no slide); −b·L = Σy·(Σu·L/det) − Σuy·(n·L/det). The sums are
    taken with roundings of their own (not the fit's), which move the bound by ~1e-12 of ȳ:
    it is held to `least` less 1e-7."""
    n = len(ys)
    total = sum(ys)
    if not total > 0:
        return True  # nothing to bound by: the fit decides
    suy: Iterable[float]
    if whole:
        alpha, beta = _fall_bounds(n, min_days)
        # Σuy at hinge point k is Σ_{j>k} Σ_{i≥j} y_i: running totals of running totals,
        # from the last value back; the one for k = 0 comes last but one
        totals = list(accumulate(accumulate(reversed(ys))))
        del totals[-1]
        suy = reversed(totals)
    else:  # Σxy − c·Σy at each hinge point c
        alpha, beta = _gappy_bounds(tuple(xs), min_days)
        sy = _suffix_sums(ys)
        suy = map(sub, _suffix_sums(list(map(mul, xs, ys))), map(mul, xs, sy))
    if not alpha:
        return False  # no hinge point far enough back: no slide lasts long enough
    steepest = max([total * a - s * b for a, b, s in zip(alpha, beta, suy, strict=False)])
    return steepest >= (least - 1e-7) * total / n


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
        floor = max(ranks) - 1e-8 * n * total_sq
        if floor > 0:
            hinges = compress(range(len(ranks)), map(floor.__le__, ranks))
        else:
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


# --- the other factors: each given a state that holds some of its evidence ------------------


def _case_volume(state: AccountHealth, at: datetime, k: _Knobs) -> Factor | None:
    horizon = at - k.case_baseline
    if state.cases_opened[0].at < horizon:
        state.cases_opened = [m for m in state.cases_opened if m.at >= horizon]
    since = at - k.case_window
    recent = [m for m in state.cases_opened if since < m.at <= at]
    if not recent:
        return None
    first = state.first_seen or at
    first = horizon if horizon > first else first
    history_days = (since - first).total_seconds() / 86_400
    history_days = history_days if history_days > 0.0 else 0.0
    before = sum([1 for m in state.cases_opened if m.at <= since])
    prior_days = float(k.case_window_days)
    expected = (before + k.case_prior) / (history_days + prior_days)
    expected *= k.case_window_days
    z = (len(recent) - expected) / math.sqrt(1.0 if 1.0 > expected else expected)
    points = k.w_case_volume * _ramp(z, k.case_z_from, k.case_z_full)
    if not _scores(points):
        return None  # no points: left out of the score, as a factor without points is
    detail = (
        f"{len(recent)} cases in {k.case_window_days} days against {expected:.1f} expected "
        f"from its own history"
    )
    return _factor("case_volume", points, detail, tuple(m.event_id for m in recent))


def _breaches(state: AccountHealth, at: datetime, k: _Knobs) -> Factor | None:
    since = at - k.breach_window
    recent = [(due, causes) for due, causes in state.breaches.values() if since < due <= at]
    if not recent:
        return None
    recent.sort()
    causes = tuple(dict.fromkeys(c for _, cs in recent for c in cs))
    points = k.w_sla_breaches * min(1.0, len(recent) / k.breaches_full)
    return _factor(
        "sla_breaches", points, f"{len(recent)} SLA breaches in {k.breach_window_days} days", causes
    )


def _open_high(state: AccountHealth, k: _Knobs) -> Factor | None:
    high = [c for c in state.open_cases.values() if c.priority in k.high_priorities]
    if not high:
        return None
    causes = tuple(dict.fromkeys(e for c in high for e in c.causes))
    points = k.w_open_high * min(1.0, len(high) / k.open_high_full)
    return _factor("open_high_priority", points, f"{len(high)} open {k.high_names} cases", causes)


def _nps(state: AccountHealth, at: datetime, k: _Knobs) -> Factor | None:
    since = at - k.survey_window
    for latest in reversed(state.nps):
        if since < latest.at <= at:
            break
    else:
        return None
    if latest.score > k.nps_detractor_max:
        return None
    depth = (k.nps_detractor_max - latest.score) / max(1, k.nps_detractor_max)
    points = k.w_nps * (0.5 + 0.5 * depth)
    return _factor("nps", points, f"latest NPS {latest.score} (detractor)", (latest.event_id,))


def _csat(state: AccountHealth, at: datetime, k: _Knobs) -> Factor | None:
    since = at - k.survey_window
    low = [s for s in state.csat if since < s.at <= at and s.score <= k.csat_low_max]
    if not low:
        return None
    points = k.w_csat * min(1.0, len(low) / k.csat_low_full)
    return _factor(
        "csat",
        points,
        f"{len(low)} CSAT answers of {k.csat_low_max} or less in {k.survey_window_days} days",
        tuple(s.event_id for s in low),
    )


def _onboarding(state: AccountHealth, k: _Knobs) -> Factor | None:
    names = sorted(state.missed)
    points = k.w_onboarding * min(1.0, len(names) / k.milestones_full)
    return _factor(
        "onboarding",
        points,
        "onboarding milestones missed: " + ", ".join(names),
        tuple(state.missed[n].event_id for n in names),
    )


def _renewal(state: AccountHealth, at: datetime, last: int, k: _Knobs) -> Factor | None:
    """`last` is the ordinal of `at`'s date: the date of a renewal more than two days past
    or more than two days beyond the window is out of it, whatever the time and the offset."""
    assert state.renewal is not None
    renews, cause = state.renewal
    ahead = renews.toordinal() - last
    if ahead < -2 or ahead > k.renewal_window_days + 2:
        return None
    days = (datetime.combine(renews, time(), UTC) - at).total_seconds() / 86_400
    if not 0 <= days <= k.renewal_window_days:
        return None
    points = k.w_renewal * (1 - days / k.renewal_window_days)
    return _factor(
        "renewal", points, f"renewal on {renews.isoformat()} in {days:.0f} days", (cause,)
    )


def _owner(state: AccountHealth, at: datetime, k: _Knobs) -> Factor | None:
    since = at - k.owner_window
    recent = [m for m in state.owner_changes if since < m.at <= at]
    if not recent:
        return None
    return _factor(
        "owner_change",
        k.w_owner_change,
        f"owner changed {len(recent)} time(s) in {k.owner_change_days} days",
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

    The usage slide is left out when it could not lift an account from low (`_assess`: not
    with the other factors as they are, nor with a fall any line in its window could have,
    `_fit_slide`): the level is the same with or without it, and the factors a later
    decision takes from this one (those a cleared signal names) are only taken when this one
    left the account at medium or high, where the slide is always fitted."""
    if state.churned:
        return []
    now = state.evaluated_at
    now = at if now is None or not now > at else now  # max(at, evaluated_at)
    k = _knobs(rules)
    previous = state.level
    score, factors = _assess(state, now, k, previous)
    level = k.level_for(score, previous)
    before = state.factors
    state.score, state.factors, state.evaluated_at = score, factors, now
    if level == previous:
        return []
    state.level = level
    top = factors[: k.explain_top]
    causes = tuple(dict.fromkeys(c for f in top for c in f.caused_by))
    if not causes:
        causes = tuple(dict.fromkeys(c for f in before[: k.explain_top] for c in f.caused_by))
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
            score=score,
            level=level,
            previous_level=previous,
            factors=tuple(f.stated() for f in top),
            owner_id=state.owner_id,
        )
    ]


# --- expansion openings ------------------------------------------------------------------


def _near_limit(
    state: AccountHealth, event: UsageRecorded, last: int, k: _Knobs
) -> list[OpportunityDetected]:
    """Usage close to the seats bought (the day ordinal `last` just recorded), and not
    declining: once per episode, re-armed when usage falls back below `limit_rearm` of the
    seats."""
    if not state.seats:
        return []
    today = event.period_end
    r = k.recent_days
    days = state.usage.latest(last, r)
    if days is None:
        days, _, _, count = state.usage.row(last - r + 1, last)
        if count < r:  # fewer records than days
            return []
    if state.limit_armed and max(days) < k.limit_near * state.seats * (1 - 1e-9):
        return []  # no day near the seats, so not the busy days' mean (nor after rounding)
    values = sorted(days, reverse=True)
    busy = values[: max(1, len(values) * 5 // 7)]  # working days: weekends do not fill seats
    ratio = sum(busy) / len(busy) / state.seats
    if ratio < k.limit_rearm:
        state.limit_armed = True
    if not state.limit_armed or ratio < k.limit_near:
        return []
    recent, base = _usage_levels(_usage_row(state, last, k), k)
    if recent is None or base is None or recent < base * (1 - k.decline_from):
        return []
    state.limit_armed = False
    causes = _recent_ids(state, last, k)
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
                f"{k.metric} on working days at {ratio:.0%} of {state.seats} seats, "
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
