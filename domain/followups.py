"""The inner loop: a detractor's answer opens a follow-up owed by the account owner.

Rules (thresholds in `PatternRules`):

- a `survey.answered` is a detractor when NPS ≤ `nps_detractor_max` (6) or CSAT ≤
  `csat_detractor_max` (2); CES answers open nothing. Each detractor answer opens its own
  follow-up, identified by the survey event id, owed by the account's owner at that moment
  (the latest `owner_id` from `account.updated`; none known → any agent may close it), due
  `followup_due_hours` (48 h) of event time later.
- the loop closes when the owner (at opening, or the current one) adds a note or a public reply
  on any case of the account — contact made; or, with `followup_closed_by_recovery`, when the
  account answers a later survey of the same kind as a non-detractor. Either closes every
  follow-up open on the account. A closing event that occurred before the survey is ignored.
- a follow-up still open when the watermark passes its due instant is signalled overdue once;
  it stays open and can still close (the closed signal then says it was late).

Signals are `PatternDetected` with pattern `followup.opened`, `followup.closed`,
`followup.overdue`; each identity is `pattern/<that>/<tenant>/<survey event id>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from loopservice.domain.events import (
    AccountUpdated,
    ActorKind,
    AgentReplied,
    Event,
    NoteAdded,
    SurveyAnswered,
    SurveyKind,
)
from loopservice.domain.patterns import PatternRules, signal, span
from loopservice.domain.signals import PatternDetected


@dataclass(slots=True)
class Followup:
    survey_event_id: str
    kind: SurveyKind
    score: int
    owner_id: str | None
    opened_at: datetime
    due_at: datetime
    overdue: bool = False


@dataclass(slots=True)
class AccountLoop:
    tenant_id: str
    account_id: str
    owner_id: str | None = None
    open: dict[str, Followup] = field(default_factory=dict)


def is_detractor(event: SurveyAnswered, rules: PatternRules) -> bool:
    if event.kind is SurveyKind.NPS:
        return event.score <= rules.nps_detractor_max
    if event.kind is SurveyKind.CSAT:
        return event.score <= rules.csat_detractor_max
    return False


def evolve(loop: AccountLoop, event: Event, rules: PatternRules) -> list[PatternDetected]:
    """Folds one event of the account; returns the follow-ups it opens or closes."""
    match event:
        case AccountUpdated():
            if event.owner_id is not None:
                loop.owner_id = event.owner_id
            return []
        case SurveyAnswered():
            if is_detractor(event, rules):
                return [_open(loop, event, rules)]
            if not rules.followup_closed_by_recovery:
                return []
            closing = [f for f in loop.open.values() if f.kind is event.kind]
            why = f"{event.kind.value} answered {event.score} (no longer a detractor)"
            return _close(loop, closing, event, why, rules)
        case NoteAdded() | AgentReplied():
            if event.actor.kind is not ActorKind.AGENT:
                return []
            who = event.actor.id
            closing = [
                f
                for f in loop.open.values()
                if f.owner_id is None or who in (f.owner_id, loop.owner_id)
            ]
            verb = "note" if isinstance(event, NoteAdded) else "reply"
            return _close(loop, closing, event, f"{verb} by {who} on case {event.case_id}", rules)
    return []


def _open(loop: AccountLoop, event: SurveyAnswered, rules: PatternRules) -> PatternDetected:
    due = event.occurred_at + timedelta(hours=rules.followup_due_hours)
    followup = Followup(
        event.event_id, event.kind, event.score, loop.owner_id, event.occurred_at, due
    )
    loop.open[event.event_id] = followup
    owner = loop.owner_id or "no known owner"
    return _signal(
        "followup.opened",
        loop,
        followup,
        event.occurred_at,
        (event.event_id,),
        f"{event.kind.value} {event.score}: follow-up owed by {owner}, due {due.isoformat()}",
        rules,
    )


def _close(
    loop: AccountLoop,
    closing: list[Followup],
    event: Event,
    why: str,
    rules: PatternRules,
) -> list[PatternDetected]:
    out: list[PatternDetected] = []
    for followup in closing:
        if event.occurred_at < followup.opened_at:
            continue
        del loop.open[followup.survey_event_id]
        took = (event.occurred_at - followup.opened_at).total_seconds()
        late = "late" if event.occurred_at > followup.due_at else "in time"
        out.append(
            _signal(
                "followup.closed",
                loop,
                followup,
                event.occurred_at,
                (followup.survey_event_id, event.event_id),
                f"closed {late} after {span(took)} (time_to_close_s={int(took)}): {why}",
                rules,
            )
        )
    return out


def overdue_at(followup: Followup) -> datetime | None:
    return None if followup.overdue else followup.due_at


def fire_overdue(
    loop: AccountLoop, survey_event_id: str, at: datetime, rules: PatternRules
) -> PatternDetected | None:
    """The overdue signal of a queued due instant, or None when the loop closed first."""
    followup = loop.open.get(survey_event_id)
    if followup is None or followup.overdue or at < followup.due_at:
        return None
    followup.overdue = True
    owner = followup.owner_id or "no known owner"
    return _signal(
        "followup.overdue",
        loop,
        followup,
        followup.due_at,
        (survey_event_id,),
        f"no contact by {owner} within {span(rules.followup_due_hours * 3600)}",
        rules,
    )


def _signal(
    pattern: str,
    loop: AccountLoop,
    followup: Followup,
    at: datetime,
    evidence: tuple[str, ...],
    detail: str,
    rules: PatternRules,
) -> PatternDetected:
    return signal(
        pattern,
        followup.survey_event_id,
        tenant_id=loop.tenant_id,
        account_id=loop.account_id,
        case_id=None,
        key=loop.account_id,
        at=at,
        evidence=evidence,
        detail=detail,
        rules=rules,
    )
