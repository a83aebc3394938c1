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

from loopservice.domain.calendar import epoch_us, from_epoch_us
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

    def add_us(self, start: int, seconds: float) -> int:
        """`add` on instants given as integer microseconds since the epoch."""
        ...

    def elapsed_us(self, start: int, end: int) -> float:
        """`elapsed` (business seconds) between instants given as epoch microseconds."""
        ...

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
    """One SLA clock. Instants are kept as integer microseconds since the epoch (`since`,
    `due`): the calendar computes in them, and a `datetime` costs more to make than the
    arithmetic; `running_since` and `due_at` give them as datetimes."""

    metric: Metric
    cycle: int
    target: float  # business seconds
    calendar: Calendar
    policy_version: str
    started_by: str
    consumed: float = 0.0  # business seconds counted before `since`
    since: int | None = None  # running since (epoch µs); None while paused
    due: int | None = None  # the deadline (epoch µs) while running
    fired: tuple[str, ...] = ()  # "warn50", "breach", … already signalled for `fired_due`
    fired_due: int | None = None  # kept through a pause: resuming to the same deadline
    # must not signal its warnings again
    signalled: Deadline | None = None  # the deadline the latest signal named, for the next
    breach: tuple[str, Deadline] | None = None  # the breach signalled: its id and deadline
    scheduled_due: int | None = None  # the due whose timers are already queued
    # `next_timer`'s last answer and the warning percents it was asked with: every event on
    # the case asks again, and computing a warning instant means a calendar walk. Only
    # `start` and `pause` change what the answer depends on, and both forget it.
    pending: Timer | None = None
    pending_for: tuple[int, ...] = ()

    @property
    def running_since(self) -> datetime | None:
        return None if self.since is None else from_epoch_us(self.since)

    @property
    def due_at(self) -> datetime | None:
        return None if self.due is None else from_epoch_us(self.due)

    def start(self, at: int) -> None:
        """Runs the clock from `at` (epoch µs) and sets its deadline (`instant_of(target)`,
        inlined: this is on the path of every case opening and customer message)."""
        self.since = at
        self.pending = None
        left = self.target - self.consumed
        due = self.calendar.add_us(at, left if left > 0.0 else 0.0)
        if due != self.fired_due:
            self.fired, self.fired_due = (), due
        self.due = due

    def pause(self, at: int) -> None:
        self.pending = None
        if self.since is None:
            return
        if at > self.since:
            self.consumed += self.calendar.elapsed_us(self.since, at)
        self.since = None
        self.due = None

    def retarget(self, at: int, target: float, calendar: Calendar, version: str) -> None:
        running = self.since is not None
        self.pause(at)
        self.target, self.calendar, self.policy_version = target, calendar, version
        if running:
            self.start(at)

    def instant_of(self, business_seconds: float) -> int | None:
        """When (epoch µs) this running clock will have counted `business_seconds` in total."""
        if self.since is None:
            return None
        left = business_seconds - self.consumed
        return self.calendar.add_us(self.since, left if left > 0.0 else 0.0)


class Deadline(NamedTuple):
    """A deadline as signals name it: made once for the warnings and the breach of one
    deadline (and a retraction), rather than once per signal."""

    us: int
    at: datetime
    text: str  # `at.isoformat()`


Timer = tuple[int, tuple[str, str], Metric, int, str, int]
"""A moment at which a clock may need to speak, checked against the clock when it fires:
(at, case key, metric, cycle, kind, due) — epoch µs, the case's key, the clock's metric and
cycle, "breach" or "warn<percent>", and the deadline (epoch µs) it was computed for.

A plain tuple, not a named tuple or a dataclass: one is made for nearly every event, and the
cyclic collector stops tracking a plain tuple of untracked values (it tracks a named tuple for
good), so the queue's timers, about one per open clock, add nothing to a full collection."""


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
    case = CaseClocks(  # positional: one is made per case opened
        event.tenant_id,
        event.account_id,
        event.case_id,
        event.team,
        tier,
        rules.priority_for(event.impact, event.urgency, tier),
        "matrix",
    )
    at = epoch_us(event.occurred_at)
    _start(case, "resolution", 0, event, at, rules)
    if event.actor.kind is ActorKind.CUSTOMER:
        _start(case, "first_response", 0, event, at, rules)
    return case


def apply(
    case: CaseClocks, event: Event, rules: SlaRules, at: int | None = None
) -> list[SlaSignal]:
    """Moves the case's clocks for `event`; returns the retractions the event causes.

    `at` is the event's time as epoch microseconds, when the caller has it already.
    Dispatches on the event's exact class (the event types are a closed union of final
    classes): `isinstance` on a pydantic model goes through `ABCMeta`, a cost on every event.
    """
    if at is None:
        at = epoch_us(event.occurred_at)
    kind = type(event)
    retracted: SlaSignal | None
    if kind is CustomerMessage:
        if not case.first_response_done:
            if "first_response" not in case.clocks:
                _start(case, "first_response", 0, event, at, rules)
        elif "next_response" not in case.clocks:
            case.next_cycle += 1
            _start(case, "next_response", case.next_cycle, event, at, rules)
    elif kind is AgentReplied:
        if "first_response" in case.clocks:
            case.first_response_done = True
            retracted = _stop(case, "first_response", event)
            return [retracted] if retracted is not None else []
        if "next_response" in case.clocks:
            retracted = _stop(case, "next_response", event)
            return [retracted] if retracted is not None else []
        case.first_response_done = True
    elif kind is CaseResolved or kind is CaseClosed or kind is CaseMerged:
        signals: list[SlaSignal] = []
        for metric in list(case.clocks):
            if (retracted := _stop(case, metric, event)) is not None:
                signals.append(retracted)
        return signals
    elif type(event) is StatusChanged:
        case.status = event.status
        for clock in case.clocks.values():
            if rules.pauses(clock.metric, event.status):
                clock.pause(at)
            elif clock.since is None:
                clock.start(at)
    elif type(event) is PriorityChanged:
        case.priority, case.priority_source = event.priority, "manual"
        _retarget_all(case, at, rules)
    elif type(event) is HandedOff:
        case.team = event.to_team
        _retarget_all(case, at, rules)
    elif kind is CaseReopened:
        case.status = CaseStatus.OPEN
        case.resolution_cycle += 1
        _start(case, "resolution", case.resolution_cycle, event, at, rules)
    return []


def new_timers(case: CaseClocks, rules: SlaRules) -> list[Timer]:
    """The next timer of each running clock whose deadline moved since it was last asked.

    Only a clock's next warning or breach is queued; firing it queues the one after, so the
    queue holds about one entry per running clock.
    """
    out: list[Timer] = []
    for clock in case.clocks.values():
        if clock.due is None or clock.due == clock.scheduled_due:
            continue
        clock.scheduled_due = clock.due
        timer = next_timer(case, clock, rules)
        if timer is not None:
            out.append(timer)
    return out


def next_timer(case: CaseClocks, clock: Clock, rules: SlaRules) -> Timer | None:
    """The clock's earliest warning or breach not yet signalled for its current deadline."""
    due = clock.due
    if due is None:
        return None
    warnings = rules.warning_percents()
    pending = clock.pending
    # The fired kinds only grow while the deadline stands, so an earlier answer not yet fired
    # is still the earliest unfired timer.
    if pending is not None and pending[4] not in clock.fired and clock.pending_for == warnings:
        return pending
    timer: Timer | None = None
    for pct in warnings:
        kind = _WARN_KINDS.get(pct) or f"warn{pct}"
        if kind in clock.fired:
            continue
        at = clock.instant_of(clock.target * pct / 100)
        if at is not None and at < due:
            timer = (at, case.key, clock.metric, clock.cycle, kind, due)
            break
    else:
        if "breach" not in clock.fired:
            timer = (due, case.key, clock.metric, clock.cycle, "breach", due)
    clock.pending, clock.pending_for = timer, warnings
    return timer


_WARN_KINDS = {pct: f"warn{pct}" for pct in range(1, 100)}


def fire_due_before(case: CaseClocks, before: int, rules: SlaRules) -> list[SlaSignal]:
    """Signals of the case's own timers due strictly before `before` (epoch µs), earliest
    first.

    A processor calls this before it applies an event to the case, so a case's events and
    timers are taken in event-time order whatever the engine's watermark: a reply that occurs
    after the deadline finds the breach already signalled. That makes a case's signals
    independent of how far the watermark had got, which differs between the embedded engine
    (one watermark) and Kafka (one per partition). Queued timers it fires are dropped later.
    """
    out: list[SlaSignal] = []
    warnings = rules.warning_percents()
    for clock in case.clocks.values():  # firing changes clocks, never the case's set of them
        pending = clock.pending
        if (
            pending is not None
            and pending[0] >= before
            and clock.pending_for is warnings
            and pending[4] not in clock.fired
        ):
            continue  # what `next_timer` would answer (the usual case), and not due yet
        while (timer := next_timer(case, clock, rules)) is not None and timer[0] < before:
            signal = fire(case, timer)
            if signal is None:
                break
            out.append(signal)
    if len(out) > 1:
        out.sort(key=lambda s: (s.detected_at, s.signal_id))
    return out


def fire(case: CaseClocks, timer: Timer) -> SlaSignal | None:
    """The signal a timer gives, or None when the clock has moved on since it was queued."""
    at, _, metric, cycle, kind, due_us = timer
    clock = case.clocks.get(metric)
    if clock is None or clock.cycle != cycle or clock.due != due_us or kind in clock.fired:
        return None
    clock.fired = (*clock.fired, kind)
    due = clock.signalled
    if due is None or due.us != due_us:
        due_at = from_epoch_us(due_us)
        due = clock.signalled = Deadline(due_us, due_at, due_at.isoformat())
    due_at = due.at
    pct = 0 if kind == "breach" else int(kind.removeprefix("warn"))
    fields: dict[str, Any] = {
        "signal_id": _identity(f"sla.warning{pct}" if pct else "sla.breached", case, clock, due),
        "tenant_id": case.tenant_id,
        "account_id": case.account_id,
        "case_id": case.case_id,
        "detected_at": due_at if at == due_us else from_epoch_us(at),
        "caused_by": (clock.started_by,),
        "policy_version": clock.policy_version,
        "metric": clock.metric,
        "cycle": clock.cycle,
        "due_at": due_at,
        "priority": case.priority,
        "team": case.team,
    }
    if pct:
        fields["threshold_pct"] = pct
        warning: SlaWarning = _validate_warning(fields)
        return warning
    breach: SlaBreached = _validate_breach(fields)
    clock.breach = (breach.signal_id, due)
    return breach


# What `Model.model_validate(fields)` calls, without its keyword handling: a signal is made
# for about every other event of a busy stream, and the wrapper costs a third as much again.
_validate_breach = SlaBreached.__pydantic_validator__.validate_python
_validate_warning = SlaWarning.__pydantic_validator__.validate_python
_validate_retraction = SlaBreachRetracted.__pydantic_validator__.validate_python


def _identity(kind: str, case: CaseClocks, clock: Clock, due: Deadline) -> str:
    return (
        f"{kind}/{case.tenant_id}/{case.case_id}/{clock.metric}/{clock.cycle}/{due.text}/"
        f"{clock.policy_version}"
    )


def _start(
    case: CaseClocks, metric: Metric, cycle: int, event: Event, at: int, rules: SlaRules
) -> None:
    clock = Clock(  # positional: one is made per clock started
        metric,
        cycle,
        rules.target_seconds(metric, case.priority, case.tier),
        rules.calendar_for(case.team, case.tier),
        rules.version,
        event.event_id,
    )
    case.clocks[metric] = clock
    if not rules.pauses(metric, case.status):
        clock.start(at)


def _retarget_all(case: CaseClocks, at: int, rules: SlaRules) -> None:
    for clock in case.clocks.values():
        clock.retarget(
            at,
            rules.target_seconds(clock.metric, case.priority, case.tier),
            rules.calendar_for(case.team, case.tier),
            rules.version,
        )


def _stop(case: CaseClocks, metric: Metric, event: Event) -> SlaBreachRetracted | None:
    clock = case.clocks.pop(metric, None)
    if clock is None or clock.breach is None:
        return None
    breach_id, due = clock.breach
    if event.occurred_at >= due.at:
        return None
    retraction: SlaBreachRetracted = _validate_retraction(
        {
            "signal_id": f"retract/{breach_id}",
            "tenant_id": case.tenant_id,
            "account_id": case.account_id,
            "case_id": case.case_id,
            "detected_at": event.occurred_at,
            "caused_by": (clock.started_by, event.event_id),
            "policy_version": clock.policy_version,
            "metric": clock.metric,
            "cycle": clock.cycle,
            "due_at": due.at,
            "priority": case.priority,
            "team": case.team,
            "retracts": breach_id,
            "reason": (
                f"{event.type} {event.event_id} occurred at {event.occurred_at.isoformat()}, "
                f"before the deadline {due.text}, but arrived after the breach fired"
            ),
        }
    )
    return retraction
