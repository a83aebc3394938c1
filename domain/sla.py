"""SLA clocks of one case: start, pause, resume, re-target and stop them in business time.

Rules (documented in the README, tested in tests/test_sla.py):

- first_response runs from the case's first customer contact (a customer-opened case, or the
  first customer message) to the first public agent reply.
- next_response runs from each customer message that finds no running response clock to the
  next public agent reply; each such wait is a new cycle.
- resolution runs from opening to resolution; a reopen starts a new resolution cycle with the
  full target.
- a status the policy names pauses a clock (by default waiting_on_customer and on_hold pause
  resolution, waiting_on_customer pauses next_response); leaving it resumes the clock.
- a priority change re-targets running and paused clocks: business time already elapsed is kept,
  the deadline moves; a handoff to a team on another calendar keeps elapsed time and counts on
  with the new calendar.
- resolving, closing or merging stops every clock.
- a stop whose event time lies before a deadline that has already fired as breached (the event
  arrived late) retracts that breach; the breach stays on the log.

Everything here is deterministic: time comes only from event times and the watermark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

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
    Level,
    Priority,
    PriorityChanged,
    StatusChanged,
    Team,
    Tier,
)
from loopservice.domain.signals import SlaBreached, SlaBreachRetracted, SlaWarning

Metric = Literal["first_response", "next_response", "resolution"]
SlaSignal = SlaWarning | SlaBreached | SlaBreachRetracted


class Calendar(Protocol):
    def add(self, start: datetime, seconds: float) -> datetime: ...

    def elapsed(self, start: datetime, end: datetime) -> float: ...

    def segments(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]: ...


class SlaRules(Protocol):
    """What the SLA clocks need from the service policy in force."""

    @property
    def version(self) -> str: ...

    def priority_for(self, impact: Level, urgency: Level, tier: Tier | None) -> Priority: ...

    def target_seconds(self, metric: Metric, priority: Priority, tier: Tier | None) -> float: ...

    def pauses(self, metric: Metric, status: CaseStatus) -> bool: ...

    def warning_percents(self) -> tuple[int, ...]: ...

    def calendar_for(self, team: Team, tier: Tier | None) -> Calendar: ...


@dataclass(slots=True)
class Clock:
    metric: Metric
    cycle: int
    target: float  # business seconds
    calendar: Calendar
    policy_version: str
    started_by: str
    consumed: float = 0.0  # business seconds counted before `running_since`
    running_since: datetime | None = None
    due_at: datetime | None = None
    fired: tuple[str, ...] = ()  # "warn50", "breach", … already signalled for `fired_due`
    fired_due: datetime | None = None  # kept through a pause: resuming to the same deadline
    # must not signal its warnings again
    breach_id: str | None = None
    breach_due: datetime | None = None
    scheduled_due: datetime | None = None  # the due_at whose timers are already queued
    # `next_timer`'s last answer and the warning percents it was asked with: every event on
    # the case asks again, and computing a warning instant means a calendar walk. Only
    # `start` and `pause` change what the answer depends on, and both forget it.
    pending: Timer | None = None
    pending_for: tuple[int, ...] = ()

    def start(self, at: datetime) -> None:
        """Runs the clock from `at` and sets its deadline (`instant_of(target)`, inlined: this
        is on the path of every case opening and customer message)."""
        self.running_since = at
        self.pending = None
        left = self.target - self.consumed
        due = self.calendar.add(at, left if left > 0.0 else 0.0)
        if due != self.fired_due:
            self.fired, self.fired_due = (), due
        self.due_at = due

    def pause(self, at: datetime) -> None:
        self.pending = None
        if self.running_since is None:
            return
        if at > self.running_since:
            self.consumed += self.calendar.elapsed(self.running_since, at)
        self.running_since = None
        self.due_at = None

    def retarget(self, at: datetime, target: float, calendar: Calendar, version: str) -> None:
        running = self.running_since is not None
        self.pause(at)
        self.target, self.calendar, self.policy_version = target, calendar, version
        if running:
            self.start(at)

    def instant_of(self, business_seconds: float) -> datetime | None:
        """When this running clock will have counted `business_seconds` in total."""
        if self.running_since is None:
            return None
        left = business_seconds - self.consumed
        return self.calendar.add(self.running_since, left if left > 0.0 else 0.0)


class Timer(NamedTuple):
    """A moment at which a clock may need to speak; checked against the clock when it fires.

    A named tuple rather than a frozen dataclass: one is made for nearly every event, and a
    tuple is built in one step instead of one `object.__setattr__` per field."""

    at: datetime
    case_key: tuple[str, str]
    metric: Metric
    cycle: int
    kind: str  # "breach" or "warn<percent>"
    due_at: datetime


@dataclass(slots=True)
class CaseClocks:
    tenant_id: str
    account_id: str
    case_id: str
    team: Team
    tier: Tier | None
    priority: Priority
    priority_source: str
    status: CaseStatus = CaseStatus.OPEN
    first_response_done: bool = False
    next_cycle: int = 0
    resolution_cycle: int = 0
    clocks: dict[Metric, Clock] = field(default_factory=dict)
    # Made once and shared by every timer of the case (and the processor's dict), rather than a
    # fresh tuple per timer: a million open clocks each hold one queued timer.
    key: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.tenant_id, self.case_id)


def open_case(event: CaseOpened, tier: Tier | None, rules: SlaRules) -> CaseClocks:
    assert event.case_id is not None
    case = CaseClocks(
        tenant_id=event.tenant_id,
        account_id=event.account_id,
        case_id=event.case_id,
        team=event.team,
        tier=tier,
        priority=rules.priority_for(event.impact, event.urgency, tier),
        priority_source="matrix",
    )
    _start(case, "resolution", 0, event, rules)
    if event.actor.kind is ActorKind.CUSTOMER:
        _start(case, "first_response", 0, event, rules)
    return case


def apply(case: CaseClocks, event: Event, rules: SlaRules) -> list[SlaSignal]:
    """Moves the case's clocks for `event`; returns the retractions the event causes."""
    at = event.occurred_at
    signals: list[SlaSignal] = []
    match event:
        case CustomerMessage():
            if not case.first_response_done:
                if "first_response" not in case.clocks:
                    _start(case, "first_response", 0, event, rules)
            elif "next_response" not in case.clocks:
                case.next_cycle += 1
                _start(case, "next_response", case.next_cycle, event, rules)
        case AgentReplied():
            if "first_response" in case.clocks:
                case.first_response_done = True
                signals += _stop(case, "first_response", event)
            elif "next_response" in case.clocks:
                signals += _stop(case, "next_response", event)
            else:
                case.first_response_done = True
        case StatusChanged():
            case.status = event.status
            for clock in case.clocks.values():
                if rules.pauses(clock.metric, event.status):
                    clock.pause(at)
                elif clock.running_since is None:
                    clock.start(at)
        case PriorityChanged():
            case.priority, case.priority_source = event.priority, "manual"
            _retarget_all(case, at, rules)
        case HandedOff():
            case.team = event.to_team
            _retarget_all(case, at, rules)
        case CaseResolved() | CaseClosed() | CaseMerged():
            for metric in list(case.clocks):
                signals += _stop(case, metric, event)
        case CaseReopened():
            case.status = CaseStatus.OPEN
            case.resolution_cycle += 1
            _start(case, "resolution", case.resolution_cycle, event, rules)
    return signals


def new_timers(case: CaseClocks, rules: SlaRules) -> list[Timer]:
    """The next timer of each running clock whose deadline moved since it was last asked.

    Only a clock's next warning or breach is queued; firing it queues the one after, so the
    queue holds about one entry per running clock.
    """
    out: list[Timer] = []
    for clock in case.clocks.values():
        if clock.due_at is None or clock.due_at == clock.scheduled_due:
            continue
        clock.scheduled_due = clock.due_at
        timer = next_timer(case, clock, rules)
        if timer is not None:
            out.append(timer)
    return out


def next_timer(case: CaseClocks, clock: Clock, rules: SlaRules) -> Timer | None:
    """The clock's earliest warning or breach not yet signalled for its current deadline."""
    due = clock.due_at
    if due is None:
        return None
    warnings = rules.warning_percents()
    pending = clock.pending
    # The fired kinds only grow while the deadline stands, so an earlier answer not yet fired
    # is still the earliest unfired timer.
    if pending is not None and pending.kind not in clock.fired and clock.pending_for == warnings:
        return pending
    timer: Timer | None = None
    for pct in warnings:
        kind = _WARN_KINDS.get(pct) or f"warn{pct}"
        if kind in clock.fired:
            continue
        at = clock.instant_of(clock.target * pct / 100)
        if at is not None and at < due:
            timer = Timer(at, case.key, clock.metric, clock.cycle, kind, due)
            break
    else:
        if "breach" not in clock.fired:
            timer = Timer(due, case.key, clock.metric, clock.cycle, "breach", due)
    clock.pending, clock.pending_for = timer, warnings
    return timer


_WARN_KINDS = {pct: f"warn{pct}" for pct in range(1, 100)}


def fire_due_before(case: CaseClocks, before: datetime, rules: SlaRules) -> list[SlaSignal]:
    """Signals of the case's own timers due strictly before `before`, earliest first.

    A processor calls this before it applies an event to the case, so a case's events and
    timers are taken in event-time order whatever the engine's watermark: a reply that occurs
    after the deadline finds the breach already signalled. That makes a case's signals
    independent of how far the watermark had got, which differs between the embedded engine
    (one watermark) and Kafka (one per partition). Queued timers it fires are dropped later.
    """
    out: list[SlaSignal] = []
    for clock in list(case.clocks.values()):
        while (timer := next_timer(case, clock, rules)) is not None and timer.at < before:
            signal = fire(case, timer)
            if signal is None:
                break
            out.append(signal)
    if len(out) > 1:
        out.sort(key=lambda s: (s.detected_at, s.signal_id))
    return out


def fire(case: CaseClocks, timer: Timer) -> SlaSignal | None:
    """The signal a timer gives, or None when the clock has moved on since it was queued."""
    clock = case.clocks.get(timer.metric)
    if clock is None or clock.cycle != timer.cycle or clock.due_at != timer.due_at:
        return None
    if timer.kind in clock.fired:
        return None
    clock.fired = (*clock.fired, timer.kind)
    common: dict[str, Any] = {
        "tenant_id": case.tenant_id,
        "account_id": case.account_id,
        "case_id": case.case_id,
        "detected_at": timer.at,
        "caused_by": (clock.started_by,),
        "policy_version": clock.policy_version,
        "metric": clock.metric,
        "cycle": clock.cycle,
        "due_at": clock.due_at,
        "priority": case.priority,
        "team": case.team,
    }
    if timer.kind == "breach":
        breach = SlaBreached(signal_id=_identity("sla.breached", case, clock), **common)
        clock.breach_id, clock.breach_due = breach.signal_id, clock.due_at
        return breach
    pct = int(timer.kind.removeprefix("warn"))
    return SlaWarning(
        signal_id=_identity(f"sla.warning{pct}", case, clock), threshold_pct=pct, **common
    )


def _identity(kind: str, case: CaseClocks, clock: Clock) -> str:
    due = clock.due_at.isoformat() if clock.due_at else "-"
    return "/".join(
        (kind, case.tenant_id, case.case_id, clock.metric, str(clock.cycle), due,
         clock.policy_version)
    )  # fmt: skip


def _start(case: CaseClocks, metric: Metric, cycle: int, event: Event, rules: SlaRules) -> None:
    clock = Clock(
        metric=metric,
        cycle=cycle,
        target=rules.target_seconds(metric, case.priority, case.tier),
        calendar=rules.calendar_for(case.team, case.tier),
        policy_version=rules.version,
        started_by=event.event_id,
    )
    case.clocks[metric] = clock
    if rules.pauses(metric, case.status):
        clock.running_since = None
    else:
        clock.start(event.occurred_at)


def _retarget_all(case: CaseClocks, at: datetime, rules: SlaRules) -> None:
    for clock in case.clocks.values():
        clock.retarget(
            at,
            rules.target_seconds(clock.metric, case.priority, case.tier),
            rules.calendar_for(case.team, case.tier),
            rules.version,
        )


def _stop(case: CaseClocks, metric: Metric, event: Event) -> list[SlaSignal]:
    clock = case.clocks.pop(metric, None)
    if clock is None or clock.breach_id is None or clock.breach_due is None:
        return []
    if event.occurred_at >= clock.breach_due:
        return []
    return [
        SlaBreachRetracted(
            signal_id=f"retract/{clock.breach_id}",
            tenant_id=case.tenant_id,
            account_id=case.account_id,
            case_id=case.case_id,
            detected_at=event.occurred_at,
            caused_by=(clock.started_by, event.event_id),
            policy_version=clock.policy_version,
            metric=clock.metric,
            cycle=clock.cycle,
            due_at=clock.breach_due,
            priority=case.priority,
            team=case.team,
            retracts=clock.breach_id,
            reason=(
                f"{event.type} {event.event_id} occurred at {event.occurred_at.isoformat()}, "
                f"before the deadline {clock.breach_due.isoformat()}, but arrived after the "
                "breach fired"
            ),
        )
    ]
