"""The state of one case, folded from its events (the decider's `evolve`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from loopservice.domain.events import (
    AgentReplied,
    CaseAssigned,
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
)

OPEN, RESOLVED, CLOSED, MERGED = "open", "resolved", "closed", "merged"


@dataclass(frozen=True, slots=True)
class CaseState:
    tenant_id: str
    account_id: str
    case_id: str
    opened_at: datetime
    topic: str
    impact: Level
    urgency: Level
    team: Team
    lifecycle: str = OPEN  # open | resolved | closed | merged
    status: CaseStatus = CaseStatus.OPEN
    priority_override: Priority | None = None
    assignee_id: str | None = None
    handoffs: tuple[tuple[Team, Team], ...] = ()
    customer_messages: int = 0
    agent_replies: int = 0
    reopens: int = 0
    resolution_code: str | None = None
    last_event_at: datetime | None = field(default=None)


def evolve(state: CaseState | None, event: Event) -> CaseState | None:
    """The case after `event`; None while the case has not been opened."""
    if isinstance(event, CaseOpened):
        if state is not None:
            return state  # a second "opened" for the same case is ignored, not a reset
        assert event.case_id is not None
        return CaseState(
            tenant_id=event.tenant_id,
            account_id=event.account_id,
            case_id=event.case_id,
            opened_at=event.occurred_at,
            topic=event.topic,
            impact=event.impact,
            urgency=event.urgency,
            team=event.team,
            last_event_at=event.occurred_at,
        )
    if state is None:
        return None
    at = max(state.last_event_at or event.occurred_at, event.occurred_at)
    match event:
        case CustomerMessage():
            return replace(state, customer_messages=state.customer_messages + 1, last_event_at=at)
        case AgentReplied():
            return replace(state, agent_replies=state.agent_replies + 1, last_event_at=at)
        case StatusChanged():
            return replace(state, status=event.status, last_event_at=at)
        case PriorityChanged():
            return replace(state, priority_override=event.priority, last_event_at=at)
        case CaseAssigned():
            return replace(state, assignee_id=event.assignee_id, team=event.team, last_event_at=at)
        case HandedOff():
            return replace(
                state,
                team=event.to_team,
                handoffs=(*state.handoffs, (event.from_team, event.to_team)),
                last_event_at=at,
            )
        case CaseResolved():
            return replace(
                state, lifecycle=RESOLVED, resolution_code=event.resolution_code, last_event_at=at
            )
        case CaseReopened():
            return replace(
                state,
                lifecycle=OPEN,
                status=CaseStatus.OPEN,
                reopens=state.reopens + 1,
                last_event_at=at,
            )
        case CaseClosed():
            return replace(state, lifecycle=CLOSED, last_event_at=at)
        case CaseMerged():
            return replace(state, lifecycle=MERGED, last_event_at=at)
    return state
