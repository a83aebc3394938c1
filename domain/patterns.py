"""Pattern detectors: repeat contact, reopen loops, handoff ping-pong, stale waiting, surges.

Each detector is a decider: a state, a fold of one event into it that returns the signals the
event causes at once, and (for the timer-based ones) the instant at which something may follow
and what follows then. No I/O, no wall clock: time is the events' `occurred_at` and the
watermark the engine passes in.

A signal is identified by what it found (`pattern/<name>/<tenant>/<subject>`), never by when it
was noticed, and names as evidence the events that show it.

- repeat_contact: an account opens a case on a topic within `repeat_contact_days` of its
  previous case on that topic. One signal per repeat case.
- reopen_loop: a case reopened `reopen_loop_min` times. Once per case.
- handoff_pingpong: a handoff back to a team the case was handed away from (A→B→A), or the
  case's `handoff_pingpong_max`-th handoff. Once per case.
- stale_waiting: a case sits in waiting_on_customer while the latest message on it is the
  customer's, for `stale_waiting_grace_hours` of event time. Once per such episode (identity
  names the instant the episode began).
- topic_surge: per tenant and topic, the cases opened in the sliding `surge_window_minutes`
  (or in the shorter `surge_short_window_minutes` alongside it) number at least
  `surge_min_count`, exceed mean + `surge_k`·s, and are that many with Poisson probability at
  most `surge_alpha` at the expected count. Mean and std are those of the same window's count
  over the previous `surge_baseline_days` (bucketed counts this detector owns) with the
  busiest day left out (an earlier surge does not raise the bar), s = max(std, √mean); the
  expected count is the mean (floored at half a case over the baseline) times the tenant's
  time-of-day factor: how much busier all its topics usually are in that window of the day
  (same kind of day, weekday or weekend) than on average, never below 1. So a rare topic
  surges on three cases in an hour, a busy one needs many more, and a busy hour is not a
  surge. Once per episode: the detector re-arms only when the window count has fallen back to
  mean + `surge_rearm_k`·std.
- breach_cluster: per tenant and team, SLA breaches (by their due instant) number at least
  `min_breaches` within the sliding `window_minutes` (both in the policy's `[breach_cluster]`
  section). Once per episode: the detector re-arms when a breach finds fewer than half of
  `min_breaches` in its window. Retracted breaches leave the window; a cluster already
  signalled stays on the log. Identity names the team and the first breach in the window.
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loopservice.domain.events import (
    ActorKind,
    AgentReplied,
    CaseClosed,
    CaseMerged,
    CaseOpened,
    CaseReopened,
    CaseResolved,
    CaseStatus,
    CustomerMessage,
    Event,
    HandedOff,
    StatusChanged,
    Team,
)
from loopservice.domain.signals import PatternDetected, SlaBreached

TENANT_WIDE = "*"  # account_id of a signal about a whole tenant (a surge spans accounts)


class PatternRules(BaseModel):
    """Thresholds of the detectors and of the inner loop (a candidate `[patterns]` policy
    section; until then these defaults apply)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = "patterns.1"
    repeat_contact_days: float = Field(default=7, gt=0)
    reopen_loop_min: int = Field(default=2, ge=1)
    handoff_pingpong_max: int = Field(default=3, ge=2)
    stale_waiting_grace_hours: float = Field(default=4, gt=0)
    surge_window_minutes: int = Field(default=120, gt=0)
    surge_bucket_minutes: int = Field(default=15, gt=0)
    surge_baseline_days: int = Field(default=14, ge=1)
    surge_season: Literal["none", "day", "week"] = "none"
    surge_tenant_profile: bool = True  # scale the baseline up at the tenant's busy times of day
    surge_short_window_minutes: int = Field(default=60, ge=0)  # 0: the long window only
    surge_k: float = Field(default=3.0, ge=0)
    surge_alpha: float = Field(default=1e-6, gt=0, le=1)
    surge_rearm_k: float = Field(default=1.0, ge=0)
    surge_min_count: int = Field(default=3, ge=1)
    surge_min_history_hours: float = Field(default=24, ge=0)
    surge_evidence_max: int = Field(default=10, ge=1)
    # inner loop (domain/followups.py)
    nps_detractor_max: int = Field(default=6, ge=0, le=10)
    csat_detractor_max: int = Field(default=2, ge=1, le=5)
    followup_due_hours: float = Field(default=48, gt=0)
    followup_closed_by_recovery: bool = True


DEFAULT_RULES = PatternRules()


def signal(
    pattern: str,
    subject: str,
    *,
    tenant_id: str,
    account_id: str,
    case_id: str | None,
    key: str,
    at: datetime,
    evidence: tuple[str, ...],
    detail: str,
    rules: PatternRules,
) -> PatternDetected:
    return PatternDetected(
        signal_id=f"pattern/{pattern}/{tenant_id}/{subject}",
        tenant_id=tenant_id,
        account_id=account_id,
        case_id=case_id,
        detected_at=at,
        caused_by=evidence,
        policy_version=rules.version,
        pattern=pattern,
        key=key,
        evidence=evidence,
        detail=detail,
    )


def span(seconds: float) -> str:
    """A duration for people: `2d 3h 4m`."""
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 1440)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    parts.append(f"{minutes}m")
    return " ".join(parts)


# --- repeat contact ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LastOpen:
    at: datetime
    case_id: str
    event_id: str


def repeat_contact(
    last: LastOpen | None, event: CaseOpened, rules: PatternRules
) -> tuple[LastOpen, list[PatternDetected]]:
    """The account/topic's latest case after `event`, and the repeat it shows, if any."""
    assert event.case_id is not None
    this = LastOpen(event.occurred_at, event.case_id, event.event_id)
    if last is None:
        return this, []
    newest = this if this.at >= last.at else last
    earlier, later = (last, this) if this is newest else (this, last)
    gap = (later.at - earlier.at).total_seconds()
    if gap > rules.repeat_contact_days * 86_400:
        return newest, []
    key = f"{event.account_id}/{event.topic}"
    return newest, [
        signal(
            "repeat_contact",
            f"{key}/{later.case_id}",
            tenant_id=event.tenant_id,
            account_id=event.account_id,
            case_id=later.case_id,
            key=key,
            at=event.occurred_at,
            evidence=(earlier.event_id, later.event_id),
            detail=(
                f"case {later.case_id} on {event.topic} opened {span(gap)} after case "
                f"{earlier.case_id}"
            ),
            rules=rules,
        )
    ]


# --- one case: reopen loop, handoff ping-pong, stale waiting ------------------------------


@dataclass(slots=True)
class CaseWatch:
    tenant_id: str
    account_id: str
    case_id: str
    team: Team
    active: bool = True  # not resolved, closed or merged
    status: CaseStatus = CaseStatus.OPEN
    reopens: tuple[str, ...] = ()
    handoffs: tuple[str, ...] = ()
    left_teams: frozenset[Team] = frozenset()  # teams the case was handed away from
    reopen_flagged: bool = False
    pingpong_flagged: bool = False
    customer_spoke_last: bool = False
    last_message: tuple[datetime, str] | None = None  # the latest customer message
    waiting: tuple[datetime, str] | None = None  # the change to waiting_on_customer
    stale_since: datetime | None = None
    stale_cause: tuple[str, ...] = ()
    stale_fired: datetime | None = None
    scheduled: datetime | None = None  # the stale_since whose timer is already queued

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant_id, self.case_id)


def watch_case(event: CaseOpened) -> CaseWatch:
    assert event.case_id is not None
    case = CaseWatch(event.tenant_id, event.account_id, event.case_id, event.team)
    if event.actor.kind is ActorKind.CUSTOMER:
        case.customer_spoke_last = True
        case.last_message = (event.occurred_at, event.event_id)
    return case


def evolve_case(case: CaseWatch, event: Event, rules: PatternRules) -> list[PatternDetected]:
    """Folds one event of the case; returns the reopen loop or ping-pong it shows."""
    out: list[PatternDetected] = []
    match event:
        case CustomerMessage():
            case.customer_spoke_last = True
            case.last_message = (event.occurred_at, event.event_id)
        case AgentReplied():
            case.customer_spoke_last = False
        case StatusChanged():
            case.status = event.status
            if event.status is CaseStatus.WAITING_ON_CUSTOMER:
                case.waiting = (event.occurred_at, event.event_id)
        case CaseResolved() | CaseClosed() | CaseMerged():
            case.active = False
        case CaseReopened():
            case.active, case.status = True, CaseStatus.OPEN
            case.reopens = (*case.reopens, event.event_id)
            if not case.reopen_flagged and len(case.reopens) >= rules.reopen_loop_min:
                case.reopen_flagged = True
                why = f"reopened {len(case.reopens)} times"
                out.append(_case_signal("reopen_loop", case, event, case.reopens, why, rules))
        case HandedOff():
            back = event.to_team in case.left_teams
            case.handoffs = (*case.handoffs, event.event_id)
            case.left_teams = case.left_teams | {event.from_team}
            case.team = event.to_team
            many = len(case.handoffs) >= rules.handoff_pingpong_max
            if not case.pingpong_flagged and (back or many):
                case.pingpong_flagged = True
                why = (
                    f"handed back to {event.to_team.value}, which it had left"
                    if back
                    else f"{len(case.handoffs)} handoffs"
                )
                out.append(_case_signal("handoff_pingpong", case, event, case.handoffs, why, rules))
    _restale(case)
    return out


def _case_signal(
    pattern: str,
    case: CaseWatch,
    event: Event,
    evidence: tuple[str, ...],
    detail: str,
    rules: PatternRules,
) -> PatternDetected:
    return signal(
        pattern,
        case.case_id,
        tenant_id=case.tenant_id,
        account_id=case.account_id,
        case_id=case.case_id,
        key=case.case_id,
        at=event.occurred_at,
        evidence=evidence,
        detail=detail,
        rules=rules,
    )


def _restale(case: CaseWatch) -> None:
    stale = (
        case.active
        and case.status is CaseStatus.WAITING_ON_CUSTOMER
        and case.customer_spoke_last
        and case.waiting is not None
        and case.last_message is not None
    )
    if not stale:
        case.stale_since, case.stale_cause = None, ()
        return
    if case.stale_since is None:
        assert case.waiting is not None and case.last_message is not None
        case.stale_since = max(case.waiting[0], case.last_message[0])
        case.stale_cause = (case.waiting[1], case.last_message[1])


def stale_due(case: CaseWatch, rules: PatternRules) -> datetime | None:
    """When the case's current stale episode is due to be signalled, if it has one."""
    if case.stale_since is None or case.stale_fired == case.stale_since:
        return None
    return case.stale_since + timedelta(hours=rules.stale_waiting_grace_hours)


def fire_stale(
    case: CaseWatch, since: datetime, at: datetime, rules: PatternRules
) -> PatternDetected | None:
    """The stale_waiting signal of a timer queued for episode `since`, or None if it ended."""
    if case.stale_since != since or case.stale_fired == since:
        return None
    case.stale_fired = since
    return signal(
        "stale_waiting",
        f"{case.case_id}/{since.isoformat()}",
        tenant_id=case.tenant_id,
        account_id=case.account_id,
        case_id=case.case_id,
        key=case.case_id,
        at=at,
        evidence=case.stale_cause,
        detail=(
            f"waiting on customer since the customer replied, for "
            f"{span((at - since).total_seconds())}"
        ),
        rules=rules,
    )


# --- topic surge -------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class TopicRate:
    """Cases opened on one tenant's topic: exact instants over the current window, bucketed
    counts over the baseline."""

    buckets: dict[int, int] = field(default_factory=dict)
    recent: list[tuple[datetime, str, str]] = field(default_factory=list)  # at, event, case
    armed: bool = True
    newest: datetime | None = None


@dataclass(frozen=True, slots=True)
class Baseline:
    mean: float
    std: float
    samples: int


def baseline(
    rate: TopicRate,
    at: datetime,
    history_from: datetime,
    rules: PatternRules,
    window_minutes: int | None = None,
) -> Baseline:
    """Mean and std of a window's count (`surge_window_minutes` unless given) over the previous
    `surge_baseline_days`, sampled every window length (season "none"), or at the same time of
    day/week (season). The busiest (UTC) day of those is left out, when there are two or more:
    one earlier surge on the topic does not raise the bar for the next."""
    bucket_s = rules.surge_bucket_minutes * 60
    minutes = rules.surge_window_minutes if window_minutes is None else window_minutes
    width = max(1, minutes // rules.surge_bucket_minutes)
    stride = {"none": width, "day": 86_400 // bucket_s, "week": 7 * 86_400 // bucket_s}[
        rules.surge_season
    ]
    now = _bucket(at, bucket_s)
    first = _bucket(history_from, bucket_s)
    n = rules.surge_baseline_days * 86_400 // bucket_s // stride
    per_day = 86_400 // bucket_s
    since = max(first, now - rules.surge_baseline_days * per_day)
    # Sample j (1..last) is the window of `width` buckets ending `j` strides before now; the
    # samples stop at the first whose window would begin before the history does.
    last = max(0, min(n, (now - width + 1 - first) // stride))
    if stride < width:  # overlapping samples (a window longer than the season's stride)
        counts = {j: _window_sum(rate.buckets, now - j * stride, width) for j in range(1, last + 1)}
        days = _day_totals(rate.buckets, since, now, per_day)
    else:
        counts, days = _sample_and_day_totals(
            rate.buckets, now, since, per_day, stride, width, last
        )
    busiest = max(days, key=lambda d: (days[d], d)) if len(days) >= 2 else None
    total = square = samples = 0
    skipped: list[int] = []
    if busiest is not None:  # the samples whose window ends on the busiest day
        lo = -((busiest * per_day + per_day - 1 - now) // stride)  # ceil division
        skipped = list(range(max(1, lo), min(last, (now - busiest * per_day) // stride) + 1))
    samples = last - len(skipped)
    for j in skipped:
        counts.pop(j, None)
    for count in counts.values():
        # integers: the sums are exact in any order, as the float sums of the samples were
        total += count
        square += count * count
    if samples == 0:
        return Baseline(0.0, 0.0, 0)
    mean = float(total) / samples
    return Baseline(mean, math.sqrt(max(0.0, float(square) / samples - mean * mean)), samples)


def _window_sum(buckets: dict[int, int], end: int, width: int) -> int:
    return sum(buckets.get(b, 0) for b in range(end - width + 1, end + 1))


def _day_totals(buckets: dict[int, int], since: int, now: int, per_day: int) -> dict[int, int]:
    days: dict[int, int] = {}
    for b, c in buckets.items():
        if since <= b < now:
            days[b // per_day] = days.get(b // per_day, 0) + c
    return days


def _sample_and_day_totals(
    buckets: dict[int, int], now: int, since: int, per_day: int, stride: int, width: int, last: int
) -> tuple[dict[int, int], dict[int, int]]:
    """One pass over the (sparse) buckets: the count of each sample j in 1..`last` that has
    any (the window of `width` buckets ending `j` strides before now; `stride >= width`, so a
    bucket lies in one sample at most), and each UTC day's count since `since`."""
    counts: dict[int, int] = {}
    days: dict[int, int] = {}
    reach = last * stride + width  # ages (buckets before now) of the samples' buckets: < reach
    for b, c in buckets.items():
        age = now - b
        if age <= 0:
            continue
        if b >= since:
            day = b // per_day
            days[day] = days.get(day, 0) + c
        if age < reach:
            j = age // stride
            if j and age - j * stride < width:
                counts[j] = counts.get(j, 0) + c
    return counts, days


_NO_BASELINE = Baseline(0.0, 0.0, 0)


def poisson_tail(count: int, mean: float) -> float:
    """P(X ≥ count) for X ~ Poisson(mean), summed upwards from `count` (no cancellation, so
    it stays accurate far out in the tail)."""
    if count <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    term = math.exp(-mean + count * math.log(mean) - math.lgamma(count + 1))
    total = 0.0
    i = count
    while term > total * 1e-16 and i < count + 10_000:
        total += term
        i += 1
        term *= mean / i
    return min(1.0, total)


@dataclass(frozen=True, slots=True)
class SurgeTest:
    """One window's verdict: its count against its baseline."""

    minutes: int
    count: int
    base: Baseline
    expected: float  # the Poisson mean tested against: the baseline mean, floored
    threshold: float  # the count must exceed mean + surge_k·max(std, √mean)
    p_value: float

    def fires(self, rules: PatternRules) -> bool:
        return (
            self.count >= rules.surge_min_count
            and self.count > self.threshold
            and self.p_value <= rules.surge_alpha
        )


def time_of_day_factor(
    tenant: TopicRate, at: datetime, history_from: datetime, rules: PatternRules, minutes: int
) -> float:
    """How much busier the tenant (all topics together) usually is in the window of `minutes`
    ending at this time of day than in an average window: its mean count in that window on the
    previous `surge_baseline_days` days of the same kind (weekday or weekend, UTC; of any kind
    while there is none of the same) over its mean count in any window. Never below 1: a quiet
    hour does not lower the bar."""
    bucket_s = rules.surge_bucket_minutes * 60
    width = max(1, minutes // rules.surge_bucket_minutes)
    per_day = 86_400 // bucket_s
    now = _bucket(at, bucket_s)
    first = _bucket(history_from, bucket_s)
    weekend = at.weekday() >= 5
    buckets = tenant.buckets
    same = days = 0
    for any_kind in (False, True):
        for j in range(1, rules.surge_baseline_days + 1):
            end = now - j * per_day
            if end - width + 1 < first:
                break
            if not any_kind and ((at - timedelta(days=j)).weekday() >= 5) != weekend:
                continue
            same += sum(buckets.get(b, 0) for b in range(end - width + 1, end + 1))
            days += 1
        if days:
            break
    start = max(first, now - rules.surge_baseline_days * per_day)
    spanned = now - start  # whole buckets of history before this one
    total = sum(c for b, c in buckets.items() if start <= b < now)
    if days == 0 or spanned < width or total == 0:
        return 1.0
    return max(1.0, (same / days) / (total * width / spanned))


def surge_test(
    rate: TopicRate,
    at: datetime,
    history_from: datetime,
    rules: PatternRules,
    minutes: int,
    tenant: TopicRate | None = None,
) -> SurgeTest:
    """The count of the window of `minutes` ending at `at` against that window's baseline.

    Two tests, both must pass: the count exceeds mean + `surge_k`·s (s = max(std, √mean): an
    over-dispersed topic needs its own spread), and a count that high has Poisson probability
    at most `surge_alpha` at the expected count: the baseline mean, floored at half a case over
    the baseline's windows (no history is not proof of a zero rate), times the tenant's
    time-of-day factor (`tenant`: its cases on all topics) when `surge_tenant_profile` is on."""
    count = _in_window(rate.recent, at, timedelta(minutes=minutes))
    base = baseline(rate, at, history_from, rules, minutes)
    return _tested(rate, at, history_from, rules, minutes, tenant, count, base)


def _threshold(base: Baseline, rules: PatternRules) -> float:
    spread = max(base.std, math.sqrt(base.mean))  # counts vary at least as Poisson counts do
    return base.mean + rules.surge_k * spread


def _tested(
    rate: TopicRate,
    at: datetime,
    history_from: datetime,
    rules: PatternRules,
    minutes: int,
    tenant: TopicRate | None,
    count: int,
    base: Baseline,
) -> SurgeTest:
    """`surge_test` once the window's count and baseline are known."""
    expected = max(base.mean, 0.5 / max(1, base.samples))
    if tenant is not None and rules.surge_tenant_profile:
        expected *= time_of_day_factor(tenant, at, history_from, rules, minutes)
    return SurgeTest(
        minutes=minutes,
        count=count,
        base=base,
        expected=expected,
        threshold=_threshold(base, rules),
        p_value=poisson_tail(count, expected),
    )


def tally(rate: TopicRate, at: datetime, rules: PatternRules) -> None:
    """Counts one opening into a rate's baseline buckets."""
    bucket_s = rules.surge_bucket_minutes * 60
    b = _bucket(at, bucket_s)
    rate.buckets[b] = rate.buckets.get(b, 0) + 1
    rate.newest = at if rate.newest is None or at > rate.newest else rate.newest
    _prune(rate, rate.newest, timedelta(minutes=rules.surge_window_minutes), bucket_s, rules)


def surge(
    rate: TopicRate,
    event: CaseOpened,
    history_from: datetime,
    rules: PatternRules,
    tenant: TopicRate | None = None,
) -> list[PatternDetected]:
    """Folds one opened case into its topic's rate (and `tenant`, the tenant's openings on
    all topics, whose shape of the day scales the topic's baseline); returns the surge it
    starts, if any."""
    assert event.case_id is not None
    at = event.occurred_at
    window = timedelta(minutes=rules.surge_window_minutes)
    recent = rate.recent
    before = _in_window(recent, at, window)
    insort(recent, (at, event.event_id, event.case_id))
    tally(rate, at, rules)
    if tenant is not None:
        tally(tenant, at, rules)
    long_base: Baseline | None = None  # the long window's, needed twice at most
    if not rate.armed:
        # mean, std and surge_rearm_k are never negative: an empty window re-arms at once
        base = _NO_BASELINE
        if before > 0:
            base = long_base = baseline(rate, at, history_from, rules)
        if before <= base.mean + rules.surge_rearm_k * base.std:
            rate.armed = True
        else:
            return []
    if (at - history_from).total_seconds() < rules.surge_min_history_hours * 3600:
        return []
    windows = [rules.surge_window_minutes]
    if 0 < rules.surge_short_window_minutes < rules.surge_window_minutes:
        windows.append(rules.surge_short_window_minutes)
    tests: list[SurgeTest] = []
    for minutes in windows:
        # A test fires only with at least `surge_min_count` cases above its threshold, so a
        # window short of either needs neither its baseline nor its time-of-day factor.
        count = _in_window(recent, at, timedelta(minutes=minutes))
        if count < rules.surge_min_count:
            continue
        if minutes == rules.surge_window_minutes and long_base is not None:
            base = long_base
        else:
            base = baseline(rate, at, history_from, rules, minutes)
        if count <= _threshold(base, rules):
            continue
        tests.append(_tested(rate, at, history_from, rules, minutes, tenant, count, base))
    fired = [t for t in tests if t.fires(rules)]
    if not fired:
        return []
    rate.armed = False
    test = min(fired, key=lambda t: (t.p_value, -t.minutes))
    inside = [r for r in recent if at - timedelta(minutes=test.minutes) < r[0] <= at]
    onset = inside[0][0]
    sample = inside[: rules.surge_evidence_max - 1] + [r for r in inside[-1:]]
    evidence = tuple(dict.fromkeys(r[1] for r in sample))
    key = f"{event.tenant_id}/{event.topic}"
    base = test.base
    return [
        signal(
            "topic_surge",
            f"{event.topic}/{onset.isoformat()}",
            tenant_id=event.tenant_id,
            account_id=TENANT_WIDE,
            case_id=None,
            key=key,
            at=at,
            evidence=evidence,
            detail=(
                f"{test.count} cases on {event.topic} in {test.minutes} min "
                f"(baseline mean {base.mean:.2f}, std {base.std:.2f} over {base.samples} windows; "
                f"above {test.threshold:.2f}, at least {rules.surge_min_count}; "
                f"Poisson p {test.p_value:.1e} at mean {test.expected:.2f}); cases "
                + ", ".join(r[2] for r in inside[: rules.surge_evidence_max])
            ),
            rules=rules,
        )
    ]


def _bucket(at: datetime, bucket_s: int) -> int:
    return int((at - _EPOCH).total_seconds()) // bucket_s


def _in_window(recent: list[tuple[datetime, str, str]], at: datetime, window: timedelta) -> int:
    hi = bisect_right(recent, at, key=lambda r: r[0])
    lo = bisect_right(recent, at - window, key=lambda r: r[0])
    return hi - lo


def _prune(
    rate: TopicRate, newest: datetime, window: timedelta, bucket_s: int, rules: PatternRules
) -> None:
    horizon = newest - 2 * window
    cut = bisect_right(rate.recent, horizon, key=lambda r: r[0])
    if cut:
        del rate.recent[:cut]
    keep = (rules.surge_baseline_days * 86_400 + 2 * rules.surge_window_minutes * 60) // bucket_s
    if len(rate.buckets) > keep:
        oldest = _bucket(newest, bucket_s) - keep
        for b in [b for b in rate.buckets if b < oldest]:
            del rate.buckets[b]


# --- breach cluster ----------------------------------------------------------------------


class BreachClusterRules(BaseModel):
    """The `[breach_cluster]` policy section: how many SLA breaches of one team within how
    long make a cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_breaches: int = Field(default=5, ge=2)
    window_minutes: int = Field(default=240, gt=0)
    evidence_max: int = Field(default=20, ge=1)


@dataclass(frozen=True, slots=True)
class CountedBreach:
    due_at: datetime
    signal_id: str
    case_id: str
    caused_by: tuple[str, ...]


@dataclass(slots=True)
class TeamBreaches:
    """One tenant's team: the breaches counted over the current window, oldest first."""

    recent: list[CountedBreach] = field(default_factory=list)
    armed: bool = True


def breach_cluster(
    team: TeamBreaches, breach: SlaBreached, rules: BreachClusterRules, policy_version: str
) -> list[PatternDetected]:
    """Counts one breach (in due-instant order); returns the cluster it completes, if any."""
    assert breach.team is not None and breach.case_id is not None
    at = breach.due_at
    window = timedelta(minutes=rules.window_minutes)
    if any(b.signal_id == breach.signal_id for b in team.recent):
        return []  # the same breach handed over again
    counted = CountedBreach(at, breach.signal_id, breach.case_id, breach.caused_by)
    insort(team.recent, counted, key=lambda b: (b.due_at, b.signal_id))
    newest = team.recent[-1].due_at
    cut = bisect_right(team.recent, newest - window, key=lambda b: b.due_at)
    if cut:
        del team.recent[:cut]
    inside = [b for b in team.recent if at - window < b.due_at <= at]
    if not team.armed:
        if len(inside) - 1 < (rules.min_breaches + 1) // 2:
            team.armed = True
        else:
            return []
    if len(inside) < rules.min_breaches:
        return []
    team.armed = False
    onset = inside[0].due_at
    shown = inside[: rules.evidence_max]
    evidence = tuple(b.signal_id for b in shown)
    causes = tuple(dict.fromkeys(c for b in shown for c in b.caused_by))
    cases = list(dict.fromkeys(b.case_id for b in inside))
    name = breach.team.value
    return [
        PatternDetected(
            signal_id=f"pattern/breach_cluster/{breach.tenant_id}/{name}/{onset.isoformat()}",
            tenant_id=breach.tenant_id,
            account_id=TENANT_WIDE,
            case_id=None,
            detected_at=at,
            caused_by=causes,
            policy_version=policy_version,
            pattern="breach_cluster",
            key=f"{breach.tenant_id}/{name}",
            evidence=evidence,
            detail=(
                f"{len(inside)} SLA breaches in team {name} within {span(window.total_seconds())}"
                f" (from {onset.isoformat()}, at least {rules.min_breaches}); cases "
                + ", ".join(cases[: rules.evidence_max])
            ),
        )
    ]


def unbreach(team: TeamBreaches, signal_id: str) -> None:
    """A retracted breach leaves the window (a cluster it completed stays signalled)."""
    team.recent = [b for b in team.recent if b.signal_id != signal_id]
