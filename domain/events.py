"""The one event vocabulary: every interaction is one of these immutable, validated records.

An event is an envelope (identity, time, tenant, account, case, source, actor) plus the fields
of its type. `Event` is the discriminated union over `type`; the API, the log, the simulator
and the engines all speak it. Older schema versions are upcast before validation
(see `domain.upcasting`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

CURRENT_SCHEMA_VERSION = 2

Id = Annotated[str, Field(min_length=1, max_length=200)]
Text = Annotated[str, Field(max_length=20_000)]


class Channel(StrEnum):
    EMAIL = "email"
    CHAT = "chat"
    PHONE = "phone"
    WEB = "web"
    SOCIAL = "social"
    IN_APP = "in-app"


class ActorKind(StrEnum):
    CUSTOMER = "customer"
    AGENT = "agent"
    BOT = "bot"
    SYSTEM = "system"


class Team(StrEnum):
    SUPPORT = "support"
    SUCCESS = "success"
    ONBOARDING = "onboarding"


class Level(StrEnum):
    """Impact and urgency share one four-step scale."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class Priority(StrEnum):
    P1 = "P1"
    P2 = "P2"
    P3 = "P3"
    P4 = "P4"


class CaseStatus(StrEnum):
    OPEN = "open"
    WAITING_ON_CUSTOMER = "waiting_on_customer"
    ON_HOLD = "on_hold"


class SurveyKind(StrEnum):
    NPS = "nps"
    CSAT = "csat"
    CES = "ces"


class Tier(StrEnum):
    STARTER = "starter"
    GROWTH = "growth"
    ENTERPRISE = "enterprise"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Frozen):
    platform: Id
    channel: Channel


class Actor(_Frozen):
    kind: ActorKind
    id: Id
    team: Team | None = None


def _in_utc(at: datetime) -> datetime:
    return at.astimezone(UTC)


# Event times are kept in UTC: one representation on the log, and fast arithmetic downstream.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]


class Envelope(_Frozen):
    event_id: Id
    schema_version: int = Field(default=CURRENT_SCHEMA_VERSION, ge=1, le=CURRENT_SCHEMA_VERSION)
    occurred_at: UtcDatetime
    tenant_id: Id
    account_id: Id
    case_id: Id | None = None
    source: Source
    actor: Actor


class _CaseEvent(Envelope):
    """An event about one case: `case_id` is required."""

    @model_validator(mode="after")
    def _needs_case(self) -> _CaseEvent:
        if self.case_id is None:
            raise ValueError(f"case_id is required for {getattr(self, 'type', 'a case event')}")
        return self


# --- cases -------------------------------------------------------------------------------


class CaseOpened(_CaseEvent):
    type: Literal["case.opened"] = "case.opened"
    subject: Text
    topic: Id
    impact: Level
    urgency: Level
    product_area: Id | None = None
    team: Team = Team.SUPPORT


class CustomerMessage(_CaseEvent):
    type: Literal["case.customer_message"] = "case.customer_message"
    body: Text = ""


class AgentReplied(_CaseEvent):
    """A public reply to the customer; internal notes are `NoteAdded`."""

    type: Literal["case.agent_replied"] = "case.agent_replied"
    body: Text = ""


class NoteAdded(_CaseEvent):
    type: Literal["case.note_added"] = "case.note_added"
    body: Text = ""


class CaseAssigned(_CaseEvent):
    type: Literal["case.assigned"] = "case.assigned"
    assignee_id: Id
    team: Team


class HandedOff(_CaseEvent):
    type: Literal["case.handed_off"] = "case.handed_off"
    from_team: Team
    to_team: Team
    reason: Text = ""
    summary: Text = ""


class StatusChanged(_CaseEvent):
    type: Literal["case.status_changed"] = "case.status_changed"
    status: CaseStatus


class PriorityChanged(_CaseEvent):
    type: Literal["case.priority_changed"] = "case.priority_changed"
    priority: Priority
    reason: Annotated[str, Field(min_length=1, max_length=2_000)]


class CaseResolved(_CaseEvent):
    type: Literal["case.resolved"] = "case.resolved"
    resolution_code: Id
    summary: Text = ""


class CaseReopened(_CaseEvent):
    type: Literal["case.reopened"] = "case.reopened"
    reason: Text = ""


class CaseClosed(_CaseEvent):
    type: Literal["case.closed"] = "case.closed"


class CaseMerged(_CaseEvent):
    type: Literal["case.merged"] = "case.merged"
    into_case_id: Id


# --- feedback ----------------------------------------------------------------------------


class SurveyAnswered(Envelope):
    type: Literal["survey.answered"] = "survey.answered"
    kind: SurveyKind
    score: Annotated[int, Field(ge=0, le=10)]
    comment: Text = ""

    @model_validator(mode="after")
    def _score_in_scale(self) -> SurveyAnswered:
        top = {SurveyKind.NPS: 10, SurveyKind.CSAT: 5, SurveyKind.CES: 7}[self.kind]
        low = 0 if self.kind is SurveyKind.NPS else 1
        if not low <= self.score <= top:
            raise ValueError(f"{self.kind.value} score must be between {low} and {top}")
        return self


# --- accounts ----------------------------------------------------------------------------


class AccountUpdated(Envelope):
    type: Literal["account.updated"] = "account.updated"
    name: Id | None = None
    plan: Id | None = None
    tier: Tier | None = None
    arr: Annotated[float, Field(ge=0)] | None = None
    renewal_date: date | None = None
    owner_id: Id | None = None
    seats: Annotated[int, Field(ge=0)] | None = None


class UsageRecorded(Envelope):
    type: Literal["usage.recorded"] = "usage.recorded"
    metric: Id
    value: Annotated[float, Field(ge=0)]
    period_start: date
    period_end: date


class MilestoneReached(Envelope):
    type: Literal["onboarding.milestone_reached"] = "onboarding.milestone_reached"
    milestone: Id
    due_date: date | None = None


class MilestoneMissed(Envelope):
    type: Literal["onboarding.milestone_missed"] = "onboarding.milestone_missed"
    milestone: Id
    due_date: date


class AccountRenewed(Envelope):
    type: Literal["account.renewed"] = "account.renewed"
    arr: Annotated[float, Field(ge=0)] | None = None
    next_renewal_date: date | None = None


class AccountChurned(Envelope):
    type: Literal["account.churned"] = "account.churned"
    reason: Text = ""


# --- knowledge and self-service ------------------------------------------------------------


class ArticlePublished(Envelope):
    type: Literal["knowledge.article_published"] = "knowledge.article_published"
    article_id: Id
    title: Text
    topic: Id
    resolution_code: Id | None = None


class ArticleViewed(Envelope):
    type: Literal["knowledge.article_viewed"] = "knowledge.article_viewed"
    article_id: Id


class SelfServiceSession(Envelope):
    type: Literal["selfservice.session"] = "selfservice.session"
    topic: Id
    article_ids: tuple[Id, ...] = ()
    resolved: bool


# --- outer loop ------------------------------------------------------------------------------


class ImprovementRecorded(Envelope):
    """A change made to remove a cause (a fix, an article, a process change), effective from
    `effective_date` (UTC) for a topic and/or a product area; the trends view measures the same
    metrics before and after it. `account_id` names who recorded it (e.g. `_operations`)."""

    type: Literal["improvement.recorded"] = "improvement.recorded"
    improvement_id: Id
    description: Annotated[str, Field(min_length=1, max_length=2_000)]
    effective_date: date
    topic: Id | None = None
    product_area: Id | None = None

    @model_validator(mode="after")
    def _has_scope(self) -> ImprovementRecorded:
        if self.topic is None and self.product_area is None:
            raise ValueError("an improvement needs a topic or a product_area")
        return self


# --- operations: records the system itself appends to the log ------------------------------


class PolicyPublished(Envelope):
    """A service policy takes effect at `occurred_at`; replay applies the one then in force."""

    type: Literal["policy.published"] = "policy.published"
    version: Id
    policy: dict[str, object]


class AlertAcknowledged(Envelope):
    type: Literal["alert.acknowledged"] = "alert.acknowledged"
    alert_id: Id
    note: Text = ""


class ClockTick(Envelope):
    """Appended by an engine once it has caught up: the watermark may advance to `occurred_at`.

    Ticks make every timer firing a consequence of a record on the log, so replay
    reproduces live output exactly.
    """

    type: Literal["clock.tick"] = "clock.tick"
    partition: Annotated[int, Field(ge=0)] = 0


Event = Annotated[
    CaseOpened
    | CustomerMessage
    | AgentReplied
    | NoteAdded
    | CaseAssigned
    | HandedOff
    | StatusChanged
    | PriorityChanged
    | CaseResolved
    | CaseReopened
    | CaseClosed
    | CaseMerged
    | SurveyAnswered
    | AccountUpdated
    | UsageRecorded
    | MilestoneReached
    | MilestoneMissed
    | AccountRenewed
    | AccountChurned
    | ArticlePublished
    | ArticleViewed
    | SelfServiceSession
    | ImprovementRecorded
    | PolicyPublished
    | AlertAcknowledged
    | ClockTick,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

EVENT_MODELS: dict[str, type[Envelope]] = {
    cls.model_fields["type"].default: cls
    for cls in (*_CaseEvent.__subclasses__(), *Envelope.__subclasses__())
    if "type" in cls.model_fields
}
EVENT_TYPES: tuple[str, ...] = tuple(sorted(EVENT_MODELS))
CASE_EVENT_TYPES: frozenset[str] = frozenset(
    cls.model_fields["type"].default for cls in _CaseEvent.__subclasses__()
)

SYSTEM_TENANT = "_system"


def clock_tick(at: datetime, partition: int = 0) -> ClockTick:
    """The tick an engine appends; its id names the instant so a repeated tick is a duplicate."""
    return ClockTick(
        event_id=f"tick:{partition}:{at.isoformat()}",
        occurred_at=at,
        tenant_id=SYSTEM_TENANT,
        account_id=f"_partition-{partition}",
        source=Source(platform="loopservice", channel=Channel.WEB),
        actor=Actor(kind=ActorKind.SYSTEM, id="engine"),
        partition=partition,
    )
