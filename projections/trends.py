"""The outer-loop view: weekly buckets per topic, product area and channel, and improvements.

Documents per tenant (definitions in `domain.trends`):

- `week` (key `dimension|value|week`, sort = week): cases opened, resolved, reopened,
  breached, CSAT sum and count, and the signals raised about those cases by label (the signal
  type, `pattern.<name>` for patterns; SLA warnings and retractions are left out);
- `improvement` (key improvement id): what changed, where, effective when, and the number of
  weeks to measure on each side (the policy's, in force when it was recorded);
- `case` (key case id): the case's buckets and week, whether it counted as resolved, reopened,
  breached, its breach and retraction signal ids, and signals that arrived before the case
  was opened (attributed once it is).

Every counter is a sum over cases of something the case's final state decides, and a signal
seen before its case's opening waits in the case document, so interleaving the two logs
differently (live, rebuild) gives the same documents. A topic surge (no case) counts in the
topic's bucket of the week it was detected.
"""

from __future__ import annotations

from loopservice.domain import trends as tr
from loopservice.domain.events import (
    CaseOpened,
    CaseReopened,
    CaseResolved,
    Event,
    ImprovementRecorded,
    PolicyPublished,
    SurveyAnswered,
    SurveyKind,
)
from loopservice.domain.policy import Policy
from loopservice.domain.signals import PatternDetected, Signal, SlaBreachRetracted
from loopservice.infra.sqlite_log import decode_interaction
from loopservice.projections.context import new_rules
from loopservice.projections.store import Doc, View

TRENDS_TOPICS: tuple[str, ...] = (
    "case.opened", "case.resolved", "case.reopened", "survey.answered", "improvement.recorded",
    "policy.published",
)  # fmt: skip
QUIET_SIGNALS = frozenset({"sla.warning", "sla.breach_retracted"})


def signal_label(signal: Signal) -> str:
    if isinstance(signal, PatternDetected):
        return f"pattern.{signal.pattern}"
    return signal.type


def _new_case() -> Doc:
    return {"dims": None, "week": None, "resolved": False, "reopened": False, "breached": False,
            "breaches": [], "retracted": [], "waiting": []}  # fmt: skip


class TrendsFold:
    name = "trends"
    interaction_topics = TRENDS_TOPICS
    decode = staticmethod(decode_interaction)

    def __init__(self, default_policy: Policy) -> None:
        self.rules = new_rules(default_policy)

    def remember_policy(self, event: PolicyPublished) -> None:
        self.rules.publish(event)

    def _bump(self, view: View, tenant: str, case: Doc, field: str, by: float = 1) -> None:
        for dimension, value in case["dims"]:
            self._add(view, tenant, dimension, value, case["week"], field, by)

    @staticmethod
    def _add(
        view: View, tenant: str, dimension: str, value: str, week: str, field: str, by: float
    ) -> None:
        bucket = view.doc("week", tenant, f"{dimension}|{value}|{week}", "", week,
                          lambda: tr.new_bucket(dimension, value, week))  # fmt: skip
        if field.startswith("signal:"):
            label = field.removeprefix("signal:")
            bucket["signals"][label] = bucket["signals"].get(label, 0) + by
        else:
            bucket[field] += by

    def apply_event(self, view: View, position: int, event: Event) -> None:
        tenant = event.tenant_id
        match event:
            case PolicyPublished():
                self.rules.publish(event)
                return
            case ImprovementRecorded():
                weeks = self.rules.in_force(event.occurred_at).outer_loop.effect_weeks
                view.doc("improvement", tenant, event.improvement_id, event.account_id,
                         event.effective_date.isoformat(), dict).update(
                    improvement_id=event.improvement_id, description=event.description,
                    effective_date=event.effective_date.isoformat(), topic=event.topic,
                    product_area=event.product_area, recorded_at=event.occurred_at.isoformat(),
                    effect_weeks=weeks,
                )  # fmt: skip
                return
        if event.case_id is None:
            return
        if isinstance(event, CaseOpened):
            self._opened(view, event)
            return
        doc = view.find("case", tenant, event.case_id)
        if doc is None or doc["dims"] is None:
            return
        match event:
            case CaseResolved() if not doc["resolved"]:
                self._case(view, event)["resolved"] = True
                self._bump(view, tenant, doc, "resolved")
            case CaseReopened() if not doc["reopened"]:
                self._case(view, event)["reopened"] = True
                self._bump(view, tenant, doc, "reopened")
            case SurveyAnswered() if event.kind is SurveyKind.CSAT:
                self._bump(view, tenant, doc, "csat_sum", event.score)
                self._bump(view, tenant, doc, "csat_n")

    @staticmethod
    def _case(view: View, event: Event) -> Doc:
        assert event.case_id is not None
        return view.doc("case", event.tenant_id, event.case_id, event.account_id, "", _new_case)

    def _opened(self, view: View, event: CaseOpened) -> None:
        case = self._case(view, event)
        if case["dims"] is not None:
            return  # a second "opened" is ignored
        areas = self.rules.in_force(event.occurred_at).outer_loop.product_areas
        area = tr.product_area(event.topic, event.product_area, areas)
        case["dims"] = [["topic", event.topic], ["area", area],
                        ["channel", event.source.channel.value]]  # fmt: skip
        case["week"] = tr.week_of(event.occurred_at)
        tenant = event.tenant_id
        self._bump(view, tenant, case, "opened")
        if case["breached"]:
            self._bump(view, tenant, case, "breached")
        for label in case["waiting"]:
            self._bump(view, tenant, case, f"signal:{label}")
        case["waiting"] = []

    def apply_signal(self, view: View, position: int, signal: Signal) -> None:
        tenant = signal.tenant_id
        if signal.case_id is None:
            if isinstance(signal, PatternDetected) and signal.pattern == "topic_surge":
                topic = signal.key.removeprefix(f"{tenant}/")
                self._add(view, tenant, "topic", topic, tr.week_of(signal.detected_at),
                          f"signal:{signal_label(signal)}", 1)  # fmt: skip
            return
        case = view.doc("case", tenant, signal.case_id, signal.account_id, "", _new_case)
        if signal.type == "sla.breached":
            case["breaches"].append(signal.signal_id)
        elif isinstance(signal, SlaBreachRetracted):
            case["retracted"].append(signal.retracts)
        breached = bool(set(case["breaches"]) - set(case["retracted"]))
        if breached != case["breached"]:
            case["breached"] = breached
            if case["dims"] is not None:
                self._bump(view, tenant, case, "breached", 1 if breached else -1)
        if signal.type in QUIET_SIGNALS:
            return
        if case["dims"] is None:
            case["waiting"].append(signal_label(signal))
        else:
            self._bump(view, tenant, case, f"signal:{signal_label(signal)}")
