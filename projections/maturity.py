"""The counts behind the loop maturity scorecard (definitions in `domain.maturity`).

Documents per tenant:

- `summary` (key tenant): cases, cases with an unexplained priority override, handoffs and
  handoffs that broke a rule, repeat contacts, resolved cases and diagnosis restarts, and per
  outcome kind (churn, escalation) how many, how many a risk warning preceded, and the lead
  times;
- `account` (key account id): tier, recent openings and diagnoses per topic, risk warning
  instants, outcomes, and the account's current share of the anticipation counts;
- `case` (key case id): topic, opening, current priority, whether it has an unexplained
  override, the handoffs of it that broke a rule.

Anticipation joins the two logs: an account's share is recomputed from its warnings and
outcomes whenever either changes and the tenant's counts move by the difference, so the counts
equal the sum over accounts of their final shares in any interleaving. The Scale counts come
from the knowledge view.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from loopservice.domain import maturity as mt
from loopservice.domain.events import (
    AccountChurned,
    AccountUpdated,
    CaseOpened,
    CaseResolved,
    Event,
    HandedOff,
    PolicyPublished,
    PriorityChanged,
    Tier,
)
from loopservice.domain.patterns import DEFAULT_RULES as PATTERN_RULES
from loopservice.domain.policy import Policy
from loopservice.domain.signals import HandoffRuleViolated, Signal
from loopservice.infra.sqlite_log import decode_interaction
from loopservice.projections.context import new_rules
from loopservice.projections.store import Doc, View

MATURITY_TOPICS: tuple[str, ...] = (
    "case.opened", "case.priority_changed", "case.handed_off", "case.resolved",
    "account.churned", "account.updated", "policy.published",
)  # fmt: skip
RECENT_PER_TOPIC = 10
SUMMARY_COUNTS = ("cases", "unexplained_override_cases", "overrides", "unexplained_overrides",
                  "handoffs", "violated_handoffs", "repeat_contacts", "resolved_cases",
                  "diagnosis_restarts")  # fmt: skip


def _summary(tenant: str) -> Doc:
    return {"tenant_id": tenant, **dict.fromkeys(SUMMARY_COUNTS, 0),
            "anticipation": mt.anticipation([], [])}  # fmt: skip


def _account() -> Doc:
    return {"tier": None, "topics": {}, "risk_times": [], "outcomes": [],
            "share": mt.anticipation([], [])}  # fmt: skip


def _case(account_id: str) -> Doc:
    return {"account_id": account_id, "topic": None, "opened_at": None, "priority": None,
            "unexplained": False, "resolved": False, "violated": []}  # fmt: skip


class MaturityFold:
    name = "maturity"
    interaction_topics = MATURITY_TOPICS
    decode = staticmethod(decode_interaction)

    def __init__(self, default_policy: Policy) -> None:
        self.rules = new_rules(default_policy)
        self.window = timedelta(days=PATTERN_RULES.repeat_contact_days)

    def remember_policy(self, event: PolicyPublished) -> None:
        self.rules.publish(event)

    def _summary(self, view: View, tenant: str) -> Doc:
        return view.doc("summary", tenant, tenant, "", "", lambda: _summary(tenant))

    def _account(self, view: View, tenant: str, account_id: str) -> Doc:
        return view.doc("account", tenant, account_id, account_id, "", _account)

    def _case(self, view: View, tenant: str, case_id: str, account_id: str) -> Doc:
        return view.doc("case", tenant, case_id, account_id, "", lambda: _case(account_id))

    def apply_event(self, view: View, position: int, event: Event) -> None:
        tenant = event.tenant_id
        match event:
            case PolicyPublished():
                self.rules.publish(event)
            case AccountUpdated():
                if event.tier is not None:
                    self._account(view, tenant, event.account_id)["tier"] = event.tier.value
            case AccountChurned():
                self._outcome(view, tenant, event.account_id, event.occurred_at, "churn")
            case CaseOpened():
                self._opened(view, event)
            case PriorityChanged() | HandedOff() | CaseResolved():
                assert event.case_id is not None
                found = view.find("case", tenant, event.case_id)
                if found is None or found["opened_at"] is None:
                    return  # a case never opened stays out of the counts
                case = self._case(view, tenant, event.case_id, event.account_id)
                if isinstance(event, PriorityChanged):
                    self._priority(view, event, case)
                elif isinstance(event, HandedOff):
                    self._summary(view, tenant)["handoffs"] += 1
                else:
                    self._resolved(view, event, case)

    def _opened(self, view: View, event: CaseOpened) -> None:
        assert event.case_id is not None
        tenant = event.tenant_id
        case = self._case(view, tenant, event.case_id, event.account_id)
        if case["opened_at"] is not None:
            return
        account = self._account(view, tenant, event.account_id)
        tier = Tier(account["tier"]) if account["tier"] else None
        policy = self.rules.in_force(event.occurred_at)
        at = event.occurred_at
        priority = policy.priority_for(event.impact, event.urgency, tier)
        case.update(topic=event.topic, opened_at=at.isoformat(), priority=priority.value)
        summary = self._summary(view, tenant)
        summary["cases"] += 1
        topic = account["topics"].setdefault(event.topic, {"opens": [], "diagnoses": []})
        if any(abs(at - datetime.fromisoformat(t)) <= self.window for t, _ in topic["opens"]):
            summary["repeat_contacts"] += 1
        topic["opens"] = [*topic["opens"], [at.isoformat(), event.case_id]][-RECENT_PER_TOPIC:]

    def _priority(self, view: View, event: PriorityChanged, case: Doc) -> None:
        summary = self._summary(view, event.tenant_id)
        summary["overrides"] += 1
        if mt.unexplained(event.reason):
            summary["unexplained_overrides"] += 1
            if not case["unexplained"]:
                case["unexplained"] = True
                summary["unexplained_override_cases"] += 1
        if mt.is_escalation(case["priority"], event.priority.value):
            self._outcome(view, event.tenant_id, event.account_id, event.occurred_at,
                          "escalation")  # fmt: skip
        case["priority"] = event.priority.value

    def _resolved(self, view: View, event: CaseResolved, case: Doc) -> None:
        if case["resolved"]:
            return  # a case's first resolution is its diagnosis
        case["resolved"] = True
        summary = self._summary(view, event.tenant_id)
        summary["resolved_cases"] += 1
        account = self._account(view, event.tenant_id, event.account_id)
        topic = account["topics"].setdefault(case["topic"], {"opens": [], "diagnoses": []})
        opened = datetime.fromisoformat(case["opened_at"])
        if any(
            code == event.resolution_code and other != event.case_id
            and datetime.fromisoformat(at) <= opened <= datetime.fromisoformat(at) + self.window
            for at, code, other in topic["diagnoses"]
        ):  # fmt: skip
            summary["diagnosis_restarts"] += 1
        diagnosis = [event.occurred_at.isoformat(), event.resolution_code, event.case_id]
        topic["diagnoses"] = [*topic["diagnoses"], diagnosis][-RECENT_PER_TOPIC:]

    def _outcome(self, view: View, tenant: str, account_id: str, at: datetime, kind: str) -> None:
        account = self._account(view, tenant, account_id)
        account["outcomes"].append([at.isoformat(), kind])
        self._reshare(view, tenant, account)

    def _reshare(self, view: View, tenant: str, account: Doc) -> None:
        """Moves the tenant's anticipation counts by the change in this account's share."""
        old, new = account["share"], mt.anticipation(account["risk_times"], account["outcomes"])
        totals: dict[str, Any] = self._summary(view, tenant)["anticipation"]
        for kind, part in new.items():
            total = totals[kind]
            total["n"] += part["n"] - old[kind]["n"]
            total["preceded"] += part["preceded"] - old[kind]["preceded"]
            for lead in old[kind]["leads"]:
                total["leads"].remove(lead)
            total["leads"] = sorted(total["leads"] + part["leads"])
        account["share"] = new

    def apply_signal(self, view: View, position: int, signal: Signal) -> None:
        tenant = signal.tenant_id
        if isinstance(signal, HandoffRuleViolated):
            if signal.case_id is None:
                return
            case = self._case(view, tenant, signal.case_id, signal.account_id)
            handoff = signal.caused_by[0]
            if handoff not in case["violated"]:
                case["violated"].append(handoff)
                self._summary(view, tenant)["violated_handoffs"] += 1
        elif mt.is_risk_warning(
            signal.type, getattr(signal, "level", None), getattr(signal, "previous_level", None)
        ):
            account = self._account(view, tenant, signal.account_id)
            mt.add_risk_time(account["risk_times"], signal.detected_at)
            self._reshare(view, tenant, account)


def maturity_counts(summary: Doc | None, knowledge: Doc | None) -> dict[str, Any]:
    """The flat counts `domain.maturity.score` rates, from the two views' tenant documents."""
    counts: dict[str, Any] = {k: 0 for k in SUMMARY_COUNTS}
    leads: list[float] = []
    outcomes = preceded = 0
    if summary is not None:
        counts.update({k: summary[k] for k in SUMMARY_COUNTS})
        for part in summary["anticipation"].values():
            outcomes += part["n"]
            preceded += part["preceded"]
            leads += part["leads"]
        counts["churns"] = summary["anticipation"]["churn"]["n"]
        counts["escalations"] = summary["anticipation"]["escalation"]["n"]
    counts.update(outcomes=outcomes, preceded_outcomes=preceded, lead_seconds=sorted(leads))
    sessions = (knowledge or {}).get("sessions", {})
    counts.update(
        resolutions=(knowledge or {}).get("resolutions", 0),
        covered_resolutions=(knowledge or {}).get("covered_resolutions", 0),
        settled_sessions=sessions.get("settled", 0),
        deflected_sessions=sessions.get("deflected", 0),
    )
    return counts
