"""The loop maturity scorecard: how far the operation has come on each of the four stages.

Every metric is a share or a duration measured on the log (see `projections.maturity` for the
counting and `projections.knowledge` for the Scale counts):

Standardize
  - policy_conformance: share of opened cases with no *unexplained* priority override. An
    override is a `case.priority_changed`; it is unexplained when its reason is a placeholder
    (`PLACEHOLDER_REASONS`) or has fewer than `MIN_REASON_LETTERS` letters. SLA targets follow
    from the priority, so a case whose priority follows the policy has its SLA follow it too.
  - handoff_compliance: share of handoffs without a `handoff.rule_violated` signal.
Contextualize (lower is better)
  - repeat_contact_share: share of opened cases that the same account opened on the same topic
    within `repeat_contact_days` of another of its cases (the repeat-contact detector's rule).
  - diagnosis_restart_share: share of resolved cases that restart a diagnosis already made: the
    account had another case on the same topic resolved with the same resolution code before
    this case opened, within `repeat_contact_days` of its opening. The cause was known, yet the
    case was worked up from zero to the same answer.
Anticipate
  - risk_preceded_share: share of churns (`account.churned`) and escalations (a priority change
    to a more urgent priority) preceded by a risk warning on the same account within the
    lookback (`LOOKBACK`: 90 days for a churn, 14 days for an escalation). A risk warning is a
    signal whose type starts with `risk.`, is not a retreat (`risk.cleared`, ...), and does not
    state a `level` of "low" or one below its `previous_level` (`is_risk_warning`).
  - risk_lead_time_hours: median time from the earliest such warning to the outcome.
Scale
  - knowledge_coverage: share of resolutions covered by a published article (`domain.knowledge`).
  - deflection_rate: share of settled self-service sessions that did not become a case.

Each metric is rated against `THRESHOLDS`: predictive when it meets the predictive bound,
coordinated when it meets the coordinated one, else reactive; a metric with fewer than
`min_sample` observations is not rated. A stage is as mature as its least mature rated metric;
a stage with no rated metric is reactive and says so (`measured: false`).
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loopservice.domain.events import Priority

Rating = Literal["reactive", "coordinated", "predictive"]
RATINGS: tuple[Rating, ...] = ("reactive", "coordinated", "predictive")
STAGES = ("standardize", "contextualize", "anticipate", "scale")

PLACEHOLDER_REASONS = frozenset(
    {"n/a", "na", "none", "other", "manual", "override", "overridden", "change", "changed",
     "update", "updated", "fix", "fixed", "misc", "test", "tbd", "todo", "see above", "per agent"}
)  # fmt: skip
MIN_REASON_LETTERS = 5
LOOKBACK = {"churn": timedelta(days=90), "escalation": timedelta(days=14)}
RISK_TIMES_KEPT = 500


class Threshold(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    coordinated: float
    predictive: float
    higher_is_better: bool = True

    def rate(self, value: float) -> Rating:
        def meets(bound: float) -> bool:
            return value >= bound if self.higher_is_better else value <= bound

        if meets(self.predictive):
            return "predictive"
        return "coordinated" if meets(self.coordinated) else "reactive"


def _t(coordinated: float, predictive: float, higher: bool = True) -> Threshold:
    return Threshold(coordinated=coordinated, predictive=predictive, higher_is_better=higher)


class MaturityThresholds(BaseModel):
    """The documented bounds of each metric (shares are 0–1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_sample: int = Field(default=5, ge=1)
    policy_conformance: Threshold = _t(0.90, 0.98)
    handoff_compliance: Threshold = _t(0.90, 0.98)
    repeat_contact_share: Threshold = _t(0.20, 0.10, higher=False)
    diagnosis_restart_share: Threshold = _t(0.10, 0.03, higher=False)
    risk_preceded_share: Threshold = _t(0.30, 0.70)
    risk_lead_time_hours: Threshold = _t(24, 72)
    knowledge_coverage: Threshold = _t(0.30, 0.60)
    deflection_rate: Threshold = _t(0.20, 0.40)


THRESHOLDS = MaturityThresholds()


# --- what counts -----------------------------------------------------------------------------


def unexplained(reason: str) -> bool:
    """Whether a priority override's reason explains nothing."""
    text = " ".join(reason.lower().split()).strip(" .!-")
    letters = sum(ch.isalpha() for ch in text)
    return text in PLACEHOLDER_REASONS or letters < MIN_REASON_LETTERS


def is_escalation(before: Priority | str | None, after: Priority | str) -> bool:
    """A change to a more urgent priority (P1 is the most urgent)."""
    return before is not None and str(after) < str(before)


_LEVELS = ("low", "medium", "high")
_RETREATS = (".cleared", ".lowered", ".retracted", ".resolved")


def is_risk_warning(signal_type: str, level: object = None, previous: object = None) -> bool:
    """A `risk.*` signal that warns: not a retreat (`risk.cleared`, ...), not a low level and
    not a fall from its previous level. Signals that state no level warn by their type."""
    if not signal_type.startswith("risk.") or signal_type.endswith(_RETREATS):
        return False
    if level == "low":
        return False
    if level in _LEVELS and previous in _LEVELS:
        return _LEVELS.index(str(level)) >= _LEVELS.index(str(previous))
    return True


def add_risk_time(times: list[str], at: datetime) -> None:
    """Keeps the latest `RISK_TIMES_KEPT` warning instants, sorted (the same set in any order)."""
    bisect.insort(times, at.isoformat())
    del times[:-RISK_TIMES_KEPT]


def lead_seconds(risk_times: Sequence[str], outcome_at: datetime, kind: str) -> float | None:
    """Seconds from the earliest warning in the lookback before the outcome, if any."""
    start = (outcome_at - LOOKBACK[kind]).isoformat()
    first = bisect.bisect_left(risk_times, start)
    if first >= len(risk_times) or risk_times[first] >= outcome_at.isoformat():
        return None
    return (outcome_at - datetime.fromisoformat(risk_times[first])).total_seconds()


def anticipation(
    risk_times: Sequence[str], outcomes: Sequence[Sequence[str]]
) -> dict[str, dict[str, Any]]:
    """Per outcome kind: how many, how many were preceded by a warning, and the lead times."""
    out: dict[str, dict[str, Any]] = {k: {"n": 0, "preceded": 0, "leads": []} for k in LOOKBACK}
    for at, kind in outcomes:
        part = out[kind]
        part["n"] += 1
        lead = lead_seconds(risk_times, datetime.fromisoformat(at), kind)
        if lead is not None:
            part["preceded"] += 1
            part["leads"].append(lead)
    return out


# --- scoring ---------------------------------------------------------------------------------


def _metric(
    name: str, value: float | None, n: int, threshold: Threshold, min_sample: int
) -> dict[str, Any]:
    rated = value is not None and n >= min_sample
    return {
        "metric": name,
        "value": None if value is None else round(value, 4),
        "n": n,
        "rating": threshold.rate(value) if rated and value is not None else None,
        "coordinated_at": threshold.coordinated,
        "predictive_at": threshold.predictive,
        "higher_is_better": threshold.higher_is_better,
    }


def _share(part: int, whole: int) -> float | None:
    return min(1.0, part / whole) if whole else None


def score(counts: Mapping[str, Any], thresholds: MaturityThresholds = THRESHOLDS) -> dict[str, Any]:
    """The scorecard from the counts the projections keep (missing counts are zero)."""

    def c(key: str) -> int:
        return int(counts.get(key, 0))

    leads: list[float] = list(counts.get("lead_seconds", ()))
    median_hours = statistics.median(leads) / 3600 if leads else None
    ms = thresholds.min_sample
    t = thresholds
    conformance = _share(c("cases") - c("unexplained_override_cases"), c("cases"))
    compliance = _share(c("handoffs") - c("violated_handoffs"), c("handoffs"))
    stages = {
        "standardize": [
            _metric("policy_conformance", conformance, c("cases"), t.policy_conformance, ms),
            _metric("handoff_compliance", compliance, c("handoffs"), t.handoff_compliance, ms),
        ],
        "contextualize": [
            _metric("repeat_contact_share", _share(c("repeat_contacts"), c("cases")), c("cases"),
                    t.repeat_contact_share, ms),
            _metric("diagnosis_restart_share", _share(c("diagnosis_restarts"), c("resolved_cases")),
                    c("resolved_cases"), t.diagnosis_restart_share, ms),
        ],
        "anticipate": [
            _metric("risk_preceded_share", _share(c("preceded_outcomes"), c("outcomes")),
                    c("outcomes"), t.risk_preceded_share, ms),
            _metric("risk_lead_time_hours", median_hours, len(leads), t.risk_lead_time_hours, ms),
        ],
        "scale": [
            _metric("knowledge_coverage", _share(c("covered_resolutions"), c("resolutions")),
                    c("resolutions"), t.knowledge_coverage, ms),
            _metric("deflection_rate", _share(c("deflected_sessions"), c("settled_sessions")),
                    c("settled_sessions"), t.deflection_rate, ms),
        ],
    }  # fmt: skip
    out = []
    for stage, found in stages.items():
        rated = [m["rating"] for m in found if m["rating"] is not None]
        rating = min(rated, key=RATINGS.index) if rated else "reactive"
        out.append({"stage": stage, "rating": rating, "measured": bool(rated), "metrics": found})
    return {"stages": out, "counts": {k: v for k, v in counts.items() if k != "lead_seconds"}}
