"""Why a case has its priority and deadlines, re-derived from the log.

The explanation runs the same domain functions as the engine over the case's events, so it
cannot disagree with the signals: the priority rule and its inputs, each manual change with its
reason, and each SLA clock step by step with the policy version, target, pauses and the
business-calendar segments counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from loopservice.domain import sla
from loopservice.domain.events import (
    CASE_EVENT_TYPES,
    AccountUpdated,
    CaseOpened,
    Event,
    PolicyPublished,
    PriorityChanged,
    Tier,
)
from loopservice.domain.policy import Policy
from loopservice.streams.rules import RulesBook

# the event types an explanation reads: the case's own, account tiers and policies
EXPLAIN_TOPICS: tuple[str, ...] = (
    *sorted(CASE_EVENT_TYPES),
    "account.updated",
    "policy.published",
)


@dataclass
class Explanation:
    case_id: str
    tenant_id: str
    priority: str = ""
    priority_rule: str = ""
    policy_version: str = ""
    manual_changes: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    clocks: list[dict[str, Any]] = field(default_factory=list)


def explain_case(
    events: Iterable[Event], tenant_id: str, case_id: str, rules: RulesBook[Policy]
) -> Explanation | None:
    """Replays one case's events (with its account's tier and the policies) step by step.

    `rules` must be a fresh book holding only the default policy: the policy events in
    `events` are published into it as they come.
    """
    tiers: dict[str, Tier] = {}
    case: sla.CaseClocks | None = None
    out = Explanation(case_id, tenant_id)
    for event in events:
        if isinstance(event, PolicyPublished):
            rules.publish(event)
            continue
        if isinstance(event, AccountUpdated) and event.tier is not None:
            tiers[event.account_id] = event.tier
            continue
        if event.tenant_id != tenant_id or event.case_id != case_id:
            continue
        policy = rules.in_force(event.occurred_at)
        if isinstance(event, CaseOpened):
            if case is not None:
                continue
            tier = tiers.get(event.account_id)
            decision = policy.decide_priority(event.impact, event.urgency, tier)
            out.priority, out.priority_rule = decision.priority.value, decision.rule
            out.policy_version = policy.version
            case = sla.open_case(event, tier, policy)
        elif case is None:
            continue
        else:
            sla.apply(case, event, policy)
        if isinstance(event, PriorityChanged):
            out.manual_changes.append(
                {
                    "at": event.occurred_at.isoformat(),
                    "priority": event.priority.value,
                    "reason": event.reason,
                    "by": event.actor.id,
                }
            )
        out.steps.append(
            {
                "at": event.occurred_at.isoformat(),
                "event": event.type,
                "event_id": event.event_id,
                "clocks": {m: _clock_state(c, event.occurred_at) for m, c in case.clocks.items()},
            }
        )
    if case is None:
        return None
    out.priority = case.priority.value
    for clock in case.clocks.values():
        state = _clock_state(clock, None)
        if clock.running_since is not None and clock.due_at is not None:
            state["segments"] = [
                [a.isoformat(), b.isoformat()]
                for a, b in clock.calendar.segments(clock.running_since, clock.due_at)
            ]
        out.clocks.append(state)
    return out


def _clock_state(clock: sla.Clock, at: datetime | None) -> dict[str, Any]:
    counted = clock.consumed
    if at is not None and clock.running_since is not None and at > clock.running_since:
        counted += clock.calendar.elapsed(clock.running_since, at)
    return {
        "metric": clock.metric,
        "cycle": clock.cycle,
        "target_business_minutes": round(clock.target / 60, 2),
        "counted_business_minutes": round(counted / 60, 2),
        "state": "running" if clock.running_since is not None else "paused",
        "due_at": clock.due_at.isoformat() if clock.due_at else None,
        "policy_version": clock.policy_version,
        "breached": "breach" in clock.fired,
    }
