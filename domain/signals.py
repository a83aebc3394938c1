"""Derived signals: what the processors conclude from the log.

A signal is identified by what it is (`signal_id` is built from case, metric, cycle, due
instant and policy version), never by when it was noticed, so re-deriving it after a restart
or in a replay yields the same record and delivery can deduplicate on it. `detected_at` is
the logical (event-time) instant at which the processor derived it, so replay reproduces it
exactly. Every signal names the events that caused it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from loopservice.domain.events import Id, Priority, Team


class SignalBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    signal_id: Id
    tenant_id: Id
    account_id: Id
    case_id: Id | None = None
    detected_at: AwareDatetime
    caused_by: Annotated[tuple[str, ...], Field(min_length=1)]
    policy_version: str | None = None


class SlaSignal(SignalBase):
    metric: Literal["first_response", "next_response", "resolution", "followup"]
    cycle: int = Field(ge=0)
    due_at: AwareDatetime
    priority: Priority
    team: Team | None = None


class SlaWarning(SlaSignal):
    type: Literal["sla.warning"] = "sla.warning"
    threshold_pct: int = Field(gt=0, lt=100)


class SlaBreached(SlaSignal):
    type: Literal["sla.breached"] = "sla.breached"


class SlaBreachRetracted(SlaSignal):
    """A late event showed the breach did not happen; the breach signal stays on the log."""

    type: Literal["sla.breach_retracted"] = "sla.breach_retracted"
    retracts: Id
    reason: str


class HandoffRuleViolated(SignalBase):
    type: Literal["handoff.rule_violated"] = "handoff.rule_violated"
    rule: str
    from_team: Team
    to_team: Team
    detail: str


RiskLevel = Literal["low", "medium", "high"]


class RiskFactor(BaseModel):
    """One reason behind a health score: its points and the events that gave them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    factor: str
    points: float = Field(ge=0, le=100)
    detail: str
    caused_by: tuple[str, ...]


class RiskSignal(SignalBase):
    """An account's churn-risk level changed; `factors` are the top reasons, most points first.

    Owned by the account's customer-success owner, so it routes to the success team."""

    score: float = Field(ge=0, le=100)
    level: RiskLevel
    previous_level: RiskLevel
    factors: tuple[RiskFactor, ...]
    owner_id: str | None = None
    team: Team = Team.SUCCESS


class RiskRaised(RiskSignal):
    type: Literal["risk.raised"] = "risk.raised"


class RiskCleared(RiskSignal):
    """The level fell (to medium or low) below the raise threshold minus the hysteresis band."""

    type: Literal["risk.cleared"] = "risk.cleared"


class OpportunityDetected(SignalBase):
    """An expansion or advocacy opening: usage close to the plan's seats, a promoter."""

    type: Literal["opportunity.detected"] = "opportunity.detected"
    opportunity: str
    key: str
    evidence: tuple[str, ...] = ()
    detail: str = ""
    owner_id: str | None = None
    team: Team = Team.SUCCESS


class PatternDetected(SignalBase):
    type: Literal["pattern.detected"] = "pattern.detected"
    pattern: str
    key: str
    evidence: tuple[str, ...] = ()
    detail: str = ""


Signal = Annotated[
    SlaWarning
    | SlaBreached
    | SlaBreachRetracted
    | HandoffRuleViolated
    | RiskRaised
    | RiskCleared
    | PatternDetected
    | OpportunityDetected,
    Field(discriminator="type"),
]

SIGNAL_ADAPTER: TypeAdapter[Signal] = TypeAdapter(Signal)


def signal_models() -> tuple[type[SignalBase], ...]:
    return (SlaWarning, SlaBreached, SlaBreachRetracted, HandoffRuleViolated, RiskRaised,
            RiskCleared, PatternDetected, OpportunityDetected)  # fmt: skip
