"""The service policy: one versioned document that standardizes priority, SLA and handoffs.

A policy is parsed from TOML (`policy_from_toml`) or from the mapping a `policy.published`
event carries (`policy_from_mapping`); either way an invalid document raises `PolicyError`
whose message names every offending field path, e.g.
`sla.targets.P2.enterprise.first_response: Input should be greater than 0`.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Mapping
from datetime import date, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from loopservice.domain.calendar import BusinessCalendar, parse_hours
from loopservice.domain.events import CaseStatus, HandedOff, Level, Priority, Team, Tier
from loopservice.domain.health import HealthRules
from loopservice.domain.patterns import BreachClusterRules
from loopservice.domain.priority import PriorityDecision, decide_priority

Metric = Literal["first_response", "next_response", "resolution"]
METRICS: tuple[Metric, ...] = ("first_response", "next_response", "resolution")

Name = Annotated[str, Field(min_length=1, max_length=100)]
Minutes = Annotated[float, Field(gt=0)]


class PolicyError(ValueError):
    """An invalid policy document; `problems` holds (field path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "\n".join(f"{path}: {reason}" if path else reason for path, reason in problems)
        )


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


# --- priority ------------------------------------------------------------------------------


class PrioritySection(_Model):
    """`matrix[impact][urgency]` gives the base priority; `tier_steps[tier]` raises it that many
    steps (negative lowers), clamped to P1..P4."""

    matrix: dict[Level, dict[Level, Priority]]
    tier_steps: dict[Tier, int] = Field(default_factory=dict)

    @field_validator("matrix")
    @classmethod
    def _complete(
        cls, matrix: dict[Level, dict[Level, Priority]]
    ) -> dict[Level, dict[Level, Priority]]:
        missing = [
            f"[{i.value}][{u.value}]" for i in Level for u in Level if u not in matrix.get(i, {})
        ]
        if missing:
            raise ValueError(
                f"matrix must cover every impact × urgency; missing {', '.join(missing)}"
            )
        return matrix


# --- SLA -----------------------------------------------------------------------------------


class Targets(_Model):
    """Business minutes per metric; a metric left out of a tier falls back to `default`."""

    first_response: Minutes | None = None
    next_response: Minutes | None = None
    resolution: Minutes | None = None


TierKey = Literal["default", "starter", "growth", "enterprise"]


class SlaSection(_Model):
    """`targets[priority]["default" | tier]`: every priority needs a complete `default`."""

    targets: dict[Priority, dict[TierKey, Targets]]

    @field_validator("targets")
    @classmethod
    def _defaults(
        cls, targets: dict[Priority, dict[TierKey, Targets]]
    ) -> dict[Priority, dict[TierKey, Targets]]:
        problems = []
        for p in Priority:
            default = targets.get(p, {}).get("default")
            if default is None:
                problems.append(f"{p.value}.default is missing")
                continue
            for metric in METRICS:
                if getattr(default, metric) is None:
                    problems.append(f"{p.value}.default.{metric} is missing")
        if problems:
            raise ValueError("; ".join(problems))
        return targets


# --- calendars -----------------------------------------------------------------------------


class CalendarSpec(_Model):
    zone: Name
    hours: str | dict[str, list[str]]
    holiday_country: str | None = None
    holiday_subdivision: str | None = None
    closed_dates: list[date] = Field(default_factory=list)

    _calendar: BusinessCalendar | None = PrivateAttr(default=None)

    @field_validator("zone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {zone!r}") from None
        return zone

    @field_validator("hours")
    @classmethod
    def _hours(cls, hours: str | dict[str, list[str]]) -> str | dict[str, list[str]]:
        parse_hours(hours)
        return hours

    @model_validator(mode="after")
    def _build(self) -> CalendarSpec:
        self._calendar = BusinessCalendar.build(
            self.zone,
            self.hours,
            self.holiday_country,
            self.holiday_subdivision,
            self.closed_dates,
        )
        return self

    @property
    def calendar(self) -> BusinessCalendar:
        assert self._calendar is not None
        return self._calendar


class CalendarRoute(_Model):
    """Cases of these teams and tiers (empty = any) count on `calendar`; first match wins."""

    teams: list[Team] = Field(default_factory=list)
    tiers: list[Tier] = Field(default_factory=list)
    calendar: Name

    def matches(self, team: Team, tier: Tier | None) -> bool:
        return (not self.teams or team in self.teams) and (not self.tiers or tier in self.tiers)


class CalendarsSection(_Model):
    default: Name
    named: dict[Name, CalendarSpec]
    routes: list[CalendarRoute] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_names(self) -> CalendarsSection:
        for name in (self.default, *(r.calendar for r in self.routes)):
            if name not in self.named:
                raise ValueError(f"calendar {name!r} is not defined under calendars.named")
        return self


# --- pauses, warnings, handoffs, on-call ---------------------------------------------------


class PausesSection(_Model):
    """Which case statuses stop which clock."""

    first_response: list[CaseStatus] = Field(default_factory=list)
    next_response: list[CaseStatus] = Field(
        default_factory=lambda: [CaseStatus.WAITING_ON_CUSTOMER]
    )
    resolution: list[CaseStatus] = Field(
        default_factory=lambda: [CaseStatus.WAITING_ON_CUSTOMER, CaseStatus.ON_HOLD]
    )

    @field_validator("first_response", "next_response", "resolution")
    @classmethod
    def _not_open(cls, statuses: list[CaseStatus]) -> list[CaseStatus]:
        if CaseStatus.OPEN in statuses:
            raise ValueError("status 'open' cannot pause a clock")
        return statuses


class WarningsSection(_Model):
    percents: list[Annotated[int, Field(gt=0, lt=100)]] = Field(default_factory=lambda: [50, 80])

    @field_validator("percents")
    @classmethod
    def _increasing(cls, percents: list[int]) -> list[int]:
        if any(b <= a for a, b in itertools.pairwise(percents)):
            raise ValueError("percents must be strictly increasing")
        return percents


class HandoffRoute(_Model):
    from_team: Team
    to_teams: list[Team] = Field(min_length=1)


HandoffField = Literal["summary", "reason"]


class HandoffsSection(_Model):
    routes: list[HandoffRoute] = Field(default_factory=list)
    required_fields: tuple[HandoffField, ...] = ("summary",)
    max_per_case: Annotated[int, Field(ge=1)] = 3

    def allowed(self, from_team: Team, to_team: Team) -> bool:
        return any(r.from_team is from_team and to_team in r.to_teams for r in self.routes)

    def violations(self, handoff: HandedOff, handoffs_before: int) -> list[str]:
        """Why this handoff breaks the rules (empty when it does not); `handoffs_before`
        counts the case's earlier handoffs."""
        found = []
        if not self.allowed(handoff.from_team, handoff.to_team):
            route = f"{handoff.from_team.value} → {handoff.to_team.value}"
            found.append(f"handoff {route} is not an allowed route")
        for name in self.required_fields:
            if not getattr(handoff, name).strip():
                found.append(f"handoff {name} is required and empty")
        if handoffs_before + 1 > self.max_per_case:
            found.append(
                f"handoff {handoffs_before + 1} exceeds the maximum of {self.max_per_case} per case"
            )
        return found


class OncallRoute(_Model):
    """Signals of these types, teams and priorities (empty = any) go to `sink`."""

    name: Name
    teams: list[Team] = Field(default_factory=list)
    priorities: list[Priority] = Field(default_factory=list)
    signal_types: list[Name] = Field(default_factory=list)
    sink: Annotated[str, Field(pattern=r"^(console|https?://\S+)$")]
    escalate_after_minutes: Annotated[float, Field(gt=0)] | None = None
    escalate_to: Name | None = None

    @model_validator(mode="after")
    def _escalation(self) -> OncallRoute:
        if (self.escalate_after_minutes is None) != (self.escalate_to is None):
            raise ValueError("escalate_after_minutes and escalate_to go together")
        return self

    def matches(self, signal_type: str, team: Team | None, priority: Priority | None) -> bool:
        return (
            (not self.signal_types or signal_type in self.signal_types)
            and (not self.teams or team in self.teams)
            and (not self.priorities or priority in self.priorities)
        )


class OncallSection(_Model):
    routes: list[OncallRoute] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> OncallSection:
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError("route names must be unique")
        for r in self.routes:
            if r.escalate_to is not None and r.escalate_to not in names:
                raise ValueError(f"route {r.name!r} escalates to unknown route {r.escalate_to!r}")
        return self

    def route_for(
        self, signal_type: str, team: Team | None, priority: Priority | None
    ) -> OncallRoute | None:
        return next((r for r in self.routes if r.matches(signal_type, team, priority)), None)


# --- knowledge and the outer loop ---------------------------------------------------------


class KnowledgeSection(_Model):
    """A resolution (topic, code, normalised summary) seen `min_repeats` times within
    `window_days` becomes a knowledge candidate; a self-service session counts as deflected
    when its account opens no case on its topic within `deflection_window_hours`."""

    min_repeats: Annotated[int, Field(ge=2)] = 5
    window_days: Annotated[float, Field(gt=0)] = 28
    deflection_window_hours: Annotated[float, Field(gt=0)] = 72


class OuterLoopSection(_Model):
    """Weekly trends: `product_areas[topic]` names the area of a case opened without one;
    rising topics compare a week with the mean of the `baseline_weeks` before it; an
    improvement's effect compares `effect_weeks` full weeks before and after it."""

    product_areas: dict[Name, Name] = Field(default_factory=dict)
    baseline_weeks: Annotated[int, Field(ge=1)] = 4
    effect_weeks: Annotated[int, Field(ge=1)] = 4


# --- the policy ----------------------------------------------------------------------------


class Policy(_Model):
    version: Name
    priority: PrioritySection
    sla: SlaSection
    calendars: CalendarsSection
    pause_rules: PausesSection = Field(default_factory=PausesSection, alias="pauses")
    warnings: WarningsSection = Field(default_factory=WarningsSection)
    handoffs: HandoffsSection = Field(default_factory=HandoffsSection)
    oncall: OncallSection = Field(default_factory=OncallSection)
    health: HealthRules = Field(default_factory=HealthRules)
    breach_cluster: BreachClusterRules = Field(default_factory=BreachClusterRules)
    knowledge: KnowledgeSection = Field(default_factory=KnowledgeSection)
    outer_loop: OuterLoopSection = Field(default_factory=OuterLoopSection)
    allowed_lateness_seconds: Annotated[float, Field(ge=0)] = 1.0
    clock_skew_tolerance_seconds: Annotated[float, Field(ge=0)] = 300.0

    _calendars: dict[str, BusinessCalendar] = PrivateAttr(default_factory=dict)
    _routes: dict[tuple[Team, Tier | None], BusinessCalendar] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _build_calendars(self) -> Policy:
        self._calendars = {name: spec.calendar for name, spec in self.calendars.named.items()}
        return self

    def __eq__(self, other: object) -> bool:
        """Equal documents are equal policies, whatever their caches hold."""
        if not isinstance(other, Policy):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def decide_priority(self, impact: Level, urgency: Level, tier: Tier | None) -> PriorityDecision:
        return decide_priority(impact, urgency, tier, self)

    def priority_for(self, impact: Level, urgency: Level, tier: Tier | None) -> Priority:
        return decide_priority(impact, urgency, tier, self).priority

    def target_seconds(self, metric: Metric, priority: Priority, tier: Tier | None) -> float:
        """The SLA target in business seconds; a tier's missing metric falls back to default."""
        by_tier = self.sla.targets[priority]
        specific = by_tier.get(tier.value) if tier is not None else None
        minutes = getattr(specific, metric) if specific is not None else None
        if minutes is None:
            minutes = getattr(by_tier["default"], metric)
        return float(minutes) * 60.0

    def target(self, metric: Metric, priority: Priority, tier: Tier | None) -> timedelta:
        return timedelta(seconds=self.target_seconds(metric, priority, tier))

    def pauses(self, metric: Metric, status: CaseStatus) -> bool:
        statuses: list[CaseStatus] = getattr(self.pause_rules, metric)
        return status in statuses

    def warning_percents(self) -> tuple[int, ...]:
        return tuple(self.warnings.percents)

    def calendar(self, name: str) -> BusinessCalendar:
        return self._calendars[name]

    def calendar_name_for(self, team: Team, tier: Tier | None) -> str:
        route = next((r for r in self.calendars.routes if r.matches(team, tier)), None)
        return route.calendar if route is not None else self.calendars.default

    def calendar_for(self, team: Team, tier: Tier | None) -> BusinessCalendar:
        key = (team, tier)
        found = self._routes.get(key)
        if found is None:
            found = self._calendars[self.calendar_name_for(team, tier)]
            self._routes[key] = found
        return found


# --- parsing -------------------------------------------------------------------------------


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        # drop pydantic's union-branch and function tags: "function-after[...]", "str", ...
        loc = tuple(
            p
            for p in err["loc"]
            if not (isinstance(p, str) and ("[" in p or p in ("str", "dict[str,list[str]]")))
        )
        reason = err["msg"].removeprefix("Value error, ")
        if (_path(loc), reason) not in problems:
            problems.append((_path(loc), reason))
    return problems


def policy_from_mapping(data: Mapping[str, Any]) -> Policy:
    """A policy from its document form (parsed TOML or a `policy.published` payload)."""
    try:
        return Policy.model_validate(dict(data))
    except ValidationError as exc:
        raise PolicyError(_problems(exc)) from None


def policy_from_toml(text: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([("", f"not valid TOML: {exc}")]) from None
    return policy_from_mapping(data)
