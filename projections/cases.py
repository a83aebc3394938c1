"""The case view: one document per case and its timeline.

A case document (kind `case`) holds what the case is (subject, topic, impact, urgency,
channel, opened at), where it stands (lifecycle, status, priority, team, assignee), its
priority history with the reason for every change (the policy rule for the first one), its
handoffs, counts, links to the earlier cases of the same customer and topic, and (owned by the
signal log) the SLA and rule signals raised for it. A small per-account document (kind
`account`) keeps the tier and the cases per topic, so links and priorities are decided in the
fold, in log order. The timeline per case uses the same entries as the customer context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loopservice.domain.events import Level, PolicyPublished, Tier
from loopservice.domain.policy import Policy
from loopservice.domain.signals import (
    HandoffRuleViolated,
    Signal,
    SlaBreachRetracted,
    SlaSignal,
    SlaWarning,
)
from loopservice.projections.context import (
    INTERACTIONS,
    SIGNALS,
    event_summary,
    new_rules,
    publish_policy,
    short,
    signal_entry,
)
from loopservice.projections.records import Record, event_json, event_time, utc
from loopservice.projections.store import Doc, View

CASE_TOPICS: tuple[str, ...] = (
    "case.opened", "case.customer_message", "case.agent_replied", "case.note_added",
    "case.assigned", "case.handed_off", "case.status_changed", "case.priority_changed",
    "case.resolved", "case.reopened", "case.closed", "case.merged", "survey.answered",
    "account.updated", "policy.published",
)  # fmt: skip

EARLIER_LINKS = 20


def _new_case(tenant: str, account_id: str, case_id: str) -> Doc:
    return {
        "tenant_id": tenant,
        "account_id": account_id,
        "case_id": case_id,
        "subject": None,
        "topic": None,
        "impact": None,
        "urgency": None,
        "channel": None,
        "opened_at": None,
        "lifecycle": None,
        "status": None,
        "priority": None,
        "team": None,
        "assignee_id": None,
        "priority_history": [],
        "handoffs": [],
        "counts": {"customer_messages": 0, "agent_replies": 0, "notes": 0, "reopens": 0},
        "resolution_code": None,
        "resolved_at": None,
        "last_event_at": None,
        "earlier_cases": [],
        "surveys": [],
        "sla": {"signals": [], "breached": 0, "retracted": 0, "rule_violations": []},
    }


class CasesFold:
    """Folds both logs into case documents and per-case timelines."""

    name = "cases"
    interaction_topics = CASE_TOPICS
    decode = staticmethod(event_json)

    def __init__(self, default_policy: Policy) -> None:
        self.rules = new_rules(default_policy)

    def remember_policy(self, event: PolicyPublished) -> None:
        self.rules.publish(event)

    def apply_event(self, view: View, position: int, event: Record) -> None:
        kind = event["type"]
        if kind == "policy.published":
            publish_policy(self.rules, event)
            return
        if kind == "account.updated":
            if event["tier"] is not None:
                self._account(view, event["tenant_id"], event["account_id"])["tier"] = event["tier"]
            return
        case_id = event["case_id"]
        if case_id is None:
            return
        summary = event_summary(event)
        if summary is None:
            return
        tenant = event["tenant_id"]
        at = event_time(event["occurred_at"])
        if kind == "case.opened":
            existing = view.find("case", tenant, case_id)
            if existing is not None and existing["opened_at"] is not None:
                return  # a second "opened" is ignored, as in the case state machine
            account_id = event["account_id"]
            doc = view.doc("case", tenant, case_id, account_id, at,
                           lambda: _new_case(tenant, account_id, case_id))  # fmt: skip
            view.resort("case", tenant, case_id, at)
            self._open(view, doc, event, at)
        else:
            found = view.find("case", tenant, case_id)
            if found is None or found["opened_at"] is None:
                return  # events of a case never opened stay out of the view
            doc = found
            view.mark("case", tenant, case_id)
            self._evolve(doc, event, kind, at)
        if doc["last_event_at"] is None or at > doc["last_event_at"]:
            doc["last_event_at"] = at
        view.add(
            tenant, case_id, at, INTERACTIONS, position,
            {"actor": event["actor"]["kind"], "at": at, "case_id": case_id,
             "channel": event["source"]["channel"], "summary": summary, "type": kind},
        )  # fmt: skip

    def _account(self, view: View, tenant: str, account_id: str) -> Doc:
        return view.doc("account", tenant, account_id, account_id, account_id,
                        lambda: {"tier": None, "topics": {}})  # fmt: skip

    def _open(self, view: View, doc: Doc, event: Record, at: str) -> None:
        account = self._account(view, event["tenant_id"], event["account_id"])
        tier = Tier(account["tier"]) if account["tier"] else None
        decision = self.rules.in_force(utc(event["occurred_at"])).decide_priority(
            Level(event["impact"]), Level(event["urgency"]), tier
        )
        earlier: list[str] = account["topics"].setdefault(event["topic"], [])
        doc.update(
            subject=short(event["subject"], 120),
            topic=event["topic"],
            impact=event["impact"],
            urgency=event["urgency"],
            channel=event["source"]["channel"],
            opened_at=at,
            lifecycle="open",
            status="open",
            priority=decision.priority.value,
            team=event["team"],
            earlier_cases=list(reversed(earlier[-EARLIER_LINKS:])),
        )
        doc["priority_history"].append(
            {"priority": decision.priority.value, "at": at, "reason": decision.rule,
             "policy_version": decision.policy_version, "by": event["actor"]["kind"]}
        )  # fmt: skip
        earlier.append(event["case_id"])

    def _evolve(self, doc: Doc, event: Record, kind: str, at: str) -> None:
        counts = doc["counts"]
        if kind == "case.customer_message":
            counts["customer_messages"] += 1
        elif kind == "case.agent_replied":
            counts["agent_replies"] += 1
        elif kind == "case.note_added":
            counts["notes"] += 1
        elif kind == "case.assigned":
            doc["assignee_id"], doc["team"] = event["assignee_id"], event["team"]
        elif kind == "case.handed_off":
            doc["team"] = event["to_team"]
            doc["handoffs"].append(
                {"at": at, "from_team": event["from_team"], "to_team": event["to_team"],
                 "reason": short(event["reason"])}
            )  # fmt: skip
        elif kind == "case.status_changed":
            doc["status"] = event["status"]
        elif kind == "case.priority_changed":
            doc["priority"] = event["priority"]
            doc["priority_history"].append(
                {"priority": event["priority"], "at": at, "reason": short(event["reason"], 200),
                 "policy_version": None, "by": event["actor"]["kind"]}
            )  # fmt: skip
        elif kind == "case.resolved":
            doc["lifecycle"], doc["resolved_at"] = "resolved", at
            doc["resolution_code"] = event["resolution_code"]
        elif kind == "case.reopened":
            doc["lifecycle"], doc["status"] = "open", "open"
            counts["reopens"] += 1
        elif kind == "case.closed":
            doc["lifecycle"] = "closed"
        elif kind == "case.merged":
            doc["lifecycle"] = "merged"
            doc["merged_into"] = event["into_case_id"]
        elif kind == "survey.answered":
            doc["surveys"].append({"kind": event["kind"], "score": event["score"], "at": at})

    def apply_signal(self, view: View, position: int, signal: Signal) -> None:
        if signal.case_id is None:
            return
        tenant, case_id = signal.tenant_id, signal.case_id
        doc = view.doc("case", tenant, case_id, signal.account_id, "",
                       lambda: _new_case(tenant, signal.account_id, case_id))  # fmt: skip
        entry = signal_entry(signal)
        sla = doc["sla"]
        if isinstance(signal, SlaSignal):
            item: dict[str, Any] = {
                "type": signal.type, "metric": signal.metric, "cycle": signal.cycle,
                "due_at": signal.due_at.isoformat(), "at": entry["at"],
                "priority": signal.priority.value, "signal_id": signal.signal_id,
            }  # fmt: skip
            if isinstance(signal, SlaWarning):
                item["threshold_pct"] = signal.threshold_pct
            if isinstance(signal, SlaBreachRetracted):
                item["retracts"] = signal.retracts
                sla["retracted"] += 1
            elif signal.type == "sla.breached":
                sla["breached"] += 1
            sla["signals"].append(item)
        elif isinstance(signal, HandoffRuleViolated):
            sla["rule_violations"].append(
                {"rule": signal.rule, "at": entry["at"], "detail": short(signal.detail)}
            )
        view.add(tenant, case_id, entry["at"], SIGNALS, position, entry)


def render_case(doc: Mapping[str, Any]) -> dict[str, Any]:
    return dict(doc)
