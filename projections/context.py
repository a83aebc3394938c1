"""The customer context: what support and success both see before they answer.

One document per account (kind `account`): profile (name, plan, tier, ARR, renewal date,
owner, seats), lifecycle stage, open cases with status, priority and team, the last closed
cases, latest surveys, and what the signal log said about it (latest risk, recent SLA and
pattern signals, counts). Beside it one timeline per account across channels: messages,
replies, handoffs, status changes, surveys, account changes and signals, each with its type,
time, channel, actor kind and a short summary. Message bodies, notes, survey comments and
resolution summaries never enter the view.

Every field of a document is owned by one log: `signals` by the signal log, the rest by the
interactions log. Interleaving the two logs differently (live vs rebuild, other batch sizes)
therefore yields the same documents, and timeline rows are keyed by (time, log, position).
The fold is deterministic: times come from the events, never from a clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from enum import Enum
from typing import Any

from loopservice.domain.events import (
    AccountChurned,
    AccountRenewed,
    AccountUpdated,
    AgentReplied,
    CaseAssigned,
    CaseClosed,
    CaseMerged,
    CaseOpened,
    CaseReopened,
    CaseResolved,
    CustomerMessage,
    Event,
    HandedOff,
    MilestoneMissed,
    MilestoneReached,
    NoteAdded,
    PolicyPublished,
    PriorityChanged,
    StatusChanged,
    SurveyAnswered,
    Tier,
)
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import (
    HandoffRuleViolated,
    OpportunityDetected,
    PatternDetected,
    RiskSignal,
    Signal,
    SlaBreached,
    SlaBreachRetracted,
    SlaSignal,
    SlaWarning,
)
from loopservice.projections.store import Doc, View
from loopservice.streams.rules import RulesBook

INTERACTIONS = "interactions"
SIGNALS = "signals"

# The interaction types a customer context folds; the rest of the log (usage, knowledge,
# self-service, clock ticks) is skipped by the runner without decoding.
CONTEXT_TOPICS: tuple[str, ...] = (
    "case.opened", "case.customer_message", "case.agent_replied", "case.note_added",
    "case.assigned", "case.handed_off", "case.status_changed", "case.priority_changed",
    "case.resolved", "case.reopened", "case.closed", "case.merged", "survey.answered",
    "account.updated", "account.renewed", "account.churned",
    "onboarding.milestone_reached", "onboarding.milestone_missed", "policy.published",
)  # fmt: skip

# Interaction types that change nothing in a context but the timeline and the last event time.
TIMELINE_ONLY = frozenset({"case.customer_message", "case.agent_replied", "case.note_added"})

# Milestones after which an onboarding account counts as active.
ONBOARDING_DONE = frozenset({"team_trained", "onboarding_complete", "go_live"})

RECENT_CLOSED = 10
RECENT_SIGNALS = 10
RECENT_SURVEYS = 5
SUMMARY_CHARS = 80

PROFILE_FIELDS = ("name", "plan", "tier", "arr", "renewal_date", "owner_id", "seats")


def short(text: str, limit: int = SUMMARY_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def event_summary(event: Event) -> str | None:
    """A short line for a timeline entry; None for types that have no place on a timeline."""
    match event:
        case CaseOpened():
            return f"opened: {event.topic} ({event.impact.value}/{event.urgency.value})"
        case CustomerMessage():
            return "customer message"
        case AgentReplied():
            return "agent reply"
        case NoteAdded():
            return "internal note"
        case CaseAssigned():
            return f"assigned to {event.assignee_id} ({event.team.value})"
        case HandedOff():
            why = f": {short(event.reason)}" if event.reason else ""
            return f"handoff {event.from_team.value} → {event.to_team.value}{why}"
        case StatusChanged():
            return f"status → {event.status.value}"
        case PriorityChanged():
            return f"priority → {event.priority.value}: {short(event.reason)}"
        case CaseResolved():
            return f"resolved: {event.resolution_code}"
        case CaseReopened():
            return f"reopened: {short(event.reason)}" if event.reason else "reopened"
        case CaseClosed():
            return "closed"
        case CaseMerged():
            return f"merged into {event.into_case_id}"
        case SurveyAnswered():
            return f"{event.kind.value.upper()} {event.score}"
        case AccountUpdated():
            changed = [f for f in PROFILE_FIELDS if getattr(event, f) is not None]
            return "account updated: " + ", ".join(changed)
        case AccountRenewed():
            return "renewed"
        case AccountChurned():
            return f"churned: {short(event.reason)}" if event.reason else "churned"
        case MilestoneReached():
            return f"milestone reached: {event.milestone}"
        case MilestoneMissed():
            return f"milestone missed: {event.milestone}"
    return None


def event_entry(event: Event, at: str, summary: str) -> Doc:
    return {
        "type": event.type,
        "at": at,
        "channel": event.source.channel.value,
        "actor": event.actor.kind.value,
        "case_id": event.case_id,
        "summary": summary,
    }


def signal_summary(signal: Signal) -> str:
    match signal:
        case SlaWarning():
            return f"{signal.metric} at {signal.threshold_pct}% ({signal.priority.value})"
        case SlaBreached():
            return f"{signal.metric} breached ({signal.priority.value})"
        case SlaBreachRetracted():
            return f"{signal.metric} breach retracted: {short(signal.reason)}"
        case HandoffRuleViolated():
            return f"handoff rule {signal.rule}: {short(signal.detail)}"
        case RiskSignal():
            top = ", ".join(f.factor for f in signal.factors)
            return f"risk {signal.previous_level} → {signal.level} ({signal.score:g}): {top}"
        case OpportunityDetected():
            return f"opportunity {signal.opportunity}"
        case PatternDetected():
            return f"pattern {signal.pattern}: {short(signal.key)}"
    return signal.type


def signal_entry(signal: Signal) -> Doc:
    return {
        "type": signal.type,
        "at": signal.detected_at.isoformat(),
        "channel": None,
        "actor": "system",
        "case_id": signal.case_id,
        "summary": signal_summary(signal),
    }


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, date):
        return value.isoformat()
    return value


def new_rules(default: Policy) -> RulesBook[Policy]:
    return RulesBook(default, policy_from_mapping)


def _new_account(tenant: str, account_id: str) -> Doc:
    return {
        "tenant_id": tenant,
        "account_id": account_id,
        "profile": {f: None for f in PROFILE_FIELDS},
        "lifecycle": {"stage": "active", "since": None},
        "open_cases": {},
        "recent_closed": [],
        "surveys": {"latest": {}, "recent": []},
        "counts": {"cases_opened": 0, "cases_resolved": 0, "reopens": 0, "handoffs": 0},
        "first_seen_at": None,
        "last_interaction_at": None,
        "signals": {"latest_risk": None, "recent": [], "counts": {}},
    }


class ContextFold:
    """Folds both logs into per-account customer context documents and timelines."""

    name = "context"
    interaction_topics = CONTEXT_TOPICS

    def __init__(self, default_policy: Policy) -> None:
        self.rules = new_rules(default_policy)

    def remember_policy(self, event: PolicyPublished) -> None:
        self.rules.publish(event)

    def account(self, view: View, tenant: str, account_id: str) -> Doc:
        return view.doc(
            "account", tenant, account_id, account_id, account_id,
            lambda: _new_account(tenant, account_id),
        )  # fmt: skip

    def apply_event(self, view: View, position: int, event: Event) -> None:
        if isinstance(event, PolicyPublished):
            self.rules.publish(event)
            return
        summary = event_summary(event)
        if summary is None:
            return
        doc = self.account(view, event.tenant_id, event.account_id)
        at = event.occurred_at.isoformat()
        doc["first_seen_at"] = doc["first_seen_at"] or at
        if doc["last_interaction_at"] is None or at > doc["last_interaction_at"]:
            doc["last_interaction_at"] = at
        self._evolve(doc, event, at)
        view.add(
            event.tenant_id, event.account_id, at, INTERACTIONS, position,
            event_entry(event, at, summary),
        )  # fmt: skip

    def _evolve(self, doc: Doc, event: Event, at: str) -> None:
        cases: dict[str, Doc] = doc["open_cases"]
        case = cases.get(event.case_id) if event.case_id is not None else None
        if event.type in TIMELINE_ONLY:
            # Most of a log: skip the class patterns below, each a costly isinstance miss.
            if case is not None:
                case["last_event_at"] = max(case["last_event_at"] or at, at)
            return
        match event:
            case CaseOpened():
                if event.case_id in cases:
                    return
                tier = Tier(doc["profile"]["tier"]) if doc["profile"]["tier"] else None
                decision = self.rules.in_force(event.occurred_at).decide_priority(
                    event.impact, event.urgency, tier
                )
                assert event.case_id is not None
                cases[event.case_id] = {
                    "subject": short(event.subject, 120),
                    "topic": event.topic,
                    "opened_at": at,
                    "status": "open",
                    "priority": decision.priority.value,
                    "team": event.team.value,
                    "assignee_id": None,
                    "channel": event.source.channel.value,
                    "last_event_at": at,
                }
                doc["counts"]["cases_opened"] += 1
            case CaseResolved() | CaseClosed() | CaseMerged():
                if case is None:
                    return
                assert event.case_id is not None
                del cases[event.case_id]
                ended = {"case_id": event.case_id, "topic": case["topic"], "ended_at": at,
                         "outcome": event.type.removeprefix("case."),
                         "priority": case["priority"]}  # fmt: skip
                doc["recent_closed"] = [ended, *doc["recent_closed"]][:RECENT_CLOSED]
                if isinstance(event, CaseResolved):
                    doc["counts"]["cases_resolved"] += 1
            case CaseReopened():
                doc["counts"]["reopens"] += 1
                if case is not None:
                    case["status"] = "open"
                    return
                earlier = next(
                    (c for c in doc["recent_closed"] if c["case_id"] == event.case_id), None
                )
                if earlier is None:
                    return
                doc["recent_closed"] = [c for c in doc["recent_closed"] if c is not earlier]
                assert event.case_id is not None
                cases[event.case_id] = {
                    "subject": None, "topic": earlier["topic"], "opened_at": None,
                    "status": "open", "priority": earlier["priority"], "team": None,
                    "assignee_id": None, "channel": event.source.channel.value,
                    "last_event_at": at,
                }  # fmt: skip
            case StatusChanged():
                if case is not None:
                    case["status"] = event.status.value
            case PriorityChanged():
                if case is not None:
                    case["priority"] = event.priority.value
            case CaseAssigned():
                if case is not None:
                    case["assignee_id"], case["team"] = event.assignee_id, event.team.value
            case HandedOff():
                doc["counts"]["handoffs"] += 1
                if case is not None:
                    case["team"] = event.to_team.value
            case SurveyAnswered():
                survey = {"kind": event.kind.value, "score": event.score, "at": at,
                          "case_id": event.case_id}  # fmt: skip
                doc["surveys"]["latest"][event.kind.value] = survey
                doc["surveys"]["recent"] = [survey, *doc["surveys"]["recent"]][:RECENT_SURVEYS]
            case AccountUpdated():
                profile = doc["profile"]
                for f in PROFILE_FIELDS:
                    value = getattr(event, f)
                    if value is not None:
                        profile[f] = _plain(value)
                if doc["lifecycle"]["since"] is None:
                    doc["lifecycle"]["since"] = at
            case AccountRenewed():
                doc["lifecycle"] = {"stage": "renewed", "since": at}
                if event.arr is not None:
                    doc["profile"]["arr"] = event.arr
                if event.next_renewal_date is not None:
                    doc["profile"]["renewal_date"] = event.next_renewal_date.isoformat()
            case AccountChurned():
                doc["lifecycle"] = {"stage": "churned", "since": at}
            case MilestoneReached() | MilestoneMissed():
                stage = doc["lifecycle"]["stage"]
                if isinstance(event, MilestoneReached) and event.milestone in ONBOARDING_DONE:
                    if stage == "onboarding":
                        doc["lifecycle"] = {"stage": "active", "since": at}
                elif stage == "active" and not doc.get("onboarded"):
                    doc["lifecycle"] = {"stage": "onboarding", "since": at}
                if isinstance(event, MilestoneReached) and event.milestone in ONBOARDING_DONE:
                    doc["onboarded"] = True
        if case is not None and event.case_id in cases:
            case["last_event_at"] = max(case["last_event_at"] or at, at)

    def apply_signal(self, view: View, position: int, signal: Signal) -> None:
        doc = self.account(view, signal.tenant_id, signal.account_id)
        entry = signal_entry(signal)
        own: dict[str, Any] = doc["signals"]
        counts: dict[str, int] = own["counts"]
        counts[signal.type] = counts.get(signal.type, 0) + 1
        if isinstance(signal, RiskSignal):
            own["latest_risk"] = {
                "score": signal.score, "level": signal.level,
                "previous_level": signal.previous_level, "at": entry["at"],
                "reasons": [
                    {"factor": f.factor, "points": f.points, "detail": f.detail,
                     "caused_by": list(f.caused_by)}
                    for f in signal.factors
                ],
            }  # fmt: skip
        brief = {k: entry[k] for k in ("type", "at", "case_id", "summary")}
        if isinstance(signal, SlaSignal):
            brief["metric"] = signal.metric
        own["recent"] = [brief, *own["recent"]][:RECENT_SIGNALS]
        view.add(signal.tenant_id, signal.account_id, entry["at"], SIGNALS, position, entry)


def render_context(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The document as the read side shows it: open cases as a list, newest first."""
    out = dict(doc)
    out.pop("onboarded", None)
    out["open_cases"] = sorted(
        ({"case_id": k, **v} for k, v in doc["open_cases"].items()),
        key=lambda c: (c["opened_at"] or "", c["case_id"]),
        reverse=True,
    )
    return out
