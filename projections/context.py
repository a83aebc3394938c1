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
The fold is deterministic: times come from the events, never from a clock. It reads events as
their stored JSON objects (`projections.records`), signals as models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from loopservice.domain.events import Level, PolicyPublished, Tier
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
from loopservice.projections.records import Record, event_json, event_time, utc
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


def _why(prefix: str, reason: str | None) -> str:
    return f"{prefix}: {short(reason)}" if reason else prefix


# A timeline line per event type (events are JSON records, see `projections.records`): a
# fixed text, or a function of the record.
_FIXED_SUMMARIES: dict[str, str] = {
    "case.customer_message": "customer message",
    "case.agent_replied": "agent reply",
    "case.note_added": "internal note",
    "case.closed": "closed",
    "account.renewed": "renewed",
}
_SUMMARIES: dict[str, Callable[[Record], str]] = {
    "case.opened": lambda e: f"opened: {e['topic']} ({e['impact']}/{e['urgency']})",
    "case.assigned": lambda e: f"assigned to {e['assignee_id']} ({e['team']})",
    "case.handed_off": lambda e: _why(f"handoff {e['from_team']} → {e['to_team']}", e["reason"]),
    "case.status_changed": lambda e: f"status → {e['status']}",
    "case.priority_changed": lambda e: f"priority → {e['priority']}: {short(e['reason'])}",
    "case.resolved": lambda e: f"resolved: {e['resolution_code']}",
    "case.reopened": lambda e: _why("reopened", e["reason"]),
    "case.merged": lambda e: f"merged into {e['into_case_id']}",
    "survey.answered": lambda e: f"{e['kind'].upper()} {e['score']}",
    "account.updated": lambda e: (
        "account updated: " + ", ".join(f for f in PROFILE_FIELDS if e.get(f) is not None)
    ),
    "account.churned": lambda e: _why("churned", e["reason"]),
    "onboarding.milestone_reached": lambda e: f"milestone reached: {e['milestone']}",
    "onboarding.milestone_missed": lambda e: f"milestone missed: {e['milestone']}",
}


def event_summary(event: Record) -> str | None:
    """A short line for a timeline entry; None for types that have no place on a timeline."""
    kind = event["type"]
    fixed = _FIXED_SUMMARIES.get(kind)
    if fixed is not None:
        return fixed
    summarise = _SUMMARIES.get(kind)
    return None if summarise is None else summarise(event)


def event_entry(event: Record, at: str, summary: str) -> Doc:
    return {
        "type": event["type"],
        "at": at,
        "channel": event["source"]["channel"],
        "actor": event["actor"]["kind"],
        "case_id": event["case_id"],
        "summary": summary,
    }


def publish_policy(rules: RulesBook[Policy], event: Record) -> None:
    """Adds a `policy.published` record to the book."""
    rules.publish(PolicyPublished.model_validate(event))


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
    decode = staticmethod(event_json)

    def __init__(self, default_policy: Policy) -> None:
        self.rules = new_rules(default_policy)

    def remember_policy(self, event: PolicyPublished) -> None:
        self.rules.publish(event)

    def account(self, view: View, tenant: str, account_id: str) -> Doc:
        return view.doc(
            "account", tenant, account_id, account_id, account_id,
            lambda: _new_account(tenant, account_id),
        )  # fmt: skip

    def apply_event(self, view: View, position: int, event: Record) -> None:
        kind = event["type"]
        summary = _FIXED_SUMMARIES.get(kind)
        if summary is None:
            if kind == "policy.published":
                publish_policy(self.rules, event)
                return
            summary = event_summary(event)
            if summary is None:
                return
        tenant, account_id = event["tenant_id"], event["account_id"]
        doc = view.doc("account", tenant, account_id, account_id, account_id,
                       lambda: _new_account(tenant, account_id))  # fmt: skip
        at = event_time(event["occurred_at"])
        if doc["first_seen_at"] is None:
            doc["first_seen_at"] = at
        last = doc["last_interaction_at"]
        if last is None or at > last:
            doc["last_interaction_at"] = at
        case_id = event["case_id"]
        if kind in TIMELINE_ONLY:
            # Most of a log: nothing but the case's last event time changes.
            case = doc["open_cases"].get(case_id) if case_id is not None else None
            if case is not None and (case["last_event_at"] is None or at > case["last_event_at"]):
                case["last_event_at"] = at
        else:
            self._evolve(doc, event, kind, case_id, at)
        view.add(
            tenant, account_id, at, INTERACTIONS, position,
            {"actor": event["actor"]["kind"], "at": at, "case_id": case_id,
             "channel": event["source"]["channel"], "summary": summary, "type": kind},
        )  # fmt: skip

    def _evolve(self, doc: Doc, event: Record, kind: str, case_id: str | None, at: str) -> None:
        cases: dict[str, Doc] = doc["open_cases"]
        case = cases.get(case_id) if case_id is not None else None
        if kind == "case.opened":
            if case_id in cases:
                return
            tier = Tier(doc["profile"]["tier"]) if doc["profile"]["tier"] else None
            decision = self.rules.in_force(utc(event["occurred_at"])).decide_priority(
                Level(event["impact"]), Level(event["urgency"]), tier
            )
            assert case_id is not None
            cases[case_id] = {
                "subject": short(event["subject"], 120),
                "topic": event["topic"],
                "opened_at": at,
                "status": "open",
                "priority": decision.priority.value,
                "team": event["team"],
                "assignee_id": None,
                "channel": event["source"]["channel"],
                "last_event_at": at,
            }
            doc["counts"]["cases_opened"] += 1
        elif kind in ("case.resolved", "case.closed", "case.merged"):
            if case is None:
                return
            assert case_id is not None
            del cases[case_id]
            ended = {"case_id": case_id, "topic": case["topic"], "ended_at": at,
                     "outcome": kind.removeprefix("case."),
                     "priority": case["priority"]}  # fmt: skip
            doc["recent_closed"] = [ended, *doc["recent_closed"]][:RECENT_CLOSED]
            if kind == "case.resolved":
                doc["counts"]["cases_resolved"] += 1
        elif kind == "case.reopened":
            doc["counts"]["reopens"] += 1
            if case is not None:
                case["status"] = "open"
                return
            earlier = next((c for c in doc["recent_closed"] if c["case_id"] == case_id), None)
            if earlier is None:
                return
            doc["recent_closed"] = [c for c in doc["recent_closed"] if c is not earlier]
            assert case_id is not None
            cases[case_id] = {
                "subject": None, "topic": earlier["topic"], "opened_at": None,
                "status": "open", "priority": earlier["priority"], "team": None,
                "assignee_id": None, "channel": event["source"]["channel"],
                "last_event_at": at,
            }  # fmt: skip
        elif kind == "case.status_changed":
            if case is not None:
                case["status"] = event["status"]
        elif kind == "case.priority_changed":
            if case is not None:
                case["priority"] = event["priority"]
        elif kind == "case.assigned":
            if case is not None:
                case["assignee_id"], case["team"] = event["assignee_id"], event["team"]
        elif kind == "case.handed_off":
            doc["counts"]["handoffs"] += 1
            if case is not None:
                case["team"] = event["to_team"]
        elif kind == "survey.answered":
            survey = {"kind": event["kind"], "score": event["score"], "at": at,
                      "case_id": case_id}  # fmt: skip
            doc["surveys"]["latest"][event["kind"]] = survey
            doc["surveys"]["recent"] = [survey, *doc["surveys"]["recent"]][:RECENT_SURVEYS]
        elif kind == "account.updated":
            profile = doc["profile"]
            for f in PROFILE_FIELDS:
                value = event.get(f)
                if value is not None:
                    profile[f] = value
            if doc["lifecycle"]["since"] is None:
                doc["lifecycle"]["since"] = at
        elif kind == "account.renewed":
            doc["lifecycle"] = {"stage": "renewed", "since": at}
            if event["arr"] is not None:
                doc["profile"]["arr"] = event["arr"]
            if event["next_renewal_date"] is not None:
                doc["profile"]["renewal_date"] = event["next_renewal_date"]
        elif kind == "account.churned":
            doc["lifecycle"] = {"stage": "churned", "since": at}
        elif kind in ("onboarding.milestone_reached", "onboarding.milestone_missed"):
            done = kind == "onboarding.milestone_reached" and event["milestone"] in ONBOARDING_DONE
            stage = doc["lifecycle"]["stage"]
            if done:
                if stage == "onboarding":
                    doc["lifecycle"] = {"stage": "active", "since": at}
                doc["onboarded"] = True
            elif stage == "active" and not doc.get("onboarded"):
                doc["lifecycle"] = {"stage": "onboarding", "since": at}
        if case is not None and case_id in cases:
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
