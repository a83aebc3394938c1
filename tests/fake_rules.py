"""A 24/7 rule set for unit tests of the SLA clocks (the real policy has its own tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from loopservice.domain.events import CaseStatus, Level, Priority, Team, Tier
from loopservice.domain.sla import Calendar, Metric


class AlwaysOpen:
    def add(self, start: datetime, seconds: float) -> datetime:
        return start + timedelta(seconds=seconds)

    def elapsed(self, start: datetime, end: datetime) -> float:
        return max(0.0, (end - start).total_seconds())

    def segments(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        return [(start, end)] if end > start else []

    def add_us(self, start: int, seconds: float) -> int:
        return start + round(seconds * 1_000_000)

    def elapsed_us(self, start: int, end: int) -> float:
        return max(0, end - start) / 1_000_000


@dataclass
class FakeRules:
    version: str = "test-1"
    minutes: dict[tuple[str, Priority], float] = field(
        default_factory=lambda: {
            ("first_response", Priority.P1): 30,
            ("first_response", Priority.P2): 60,
            ("first_response", Priority.P3): 240,
            ("first_response", Priority.P4): 480,
            ("next_response", Priority.P1): 60,
            ("next_response", Priority.P2): 120,
            ("next_response", Priority.P3): 480,
            ("next_response", Priority.P4): 960,
            ("resolution", Priority.P1): 240,
            ("resolution", Priority.P2): 480,
            ("resolution", Priority.P3): 1440,
            ("resolution", Priority.P4): 2880,
        }
    )

    def priority_for(self, impact: Level, urgency: Level, tier: Tier | None) -> Priority:
        rank = ["low", "medium", "high", "critical"]
        score = rank.index(impact.value) + rank.index(urgency.value)
        return [Priority.P4, Priority.P4, Priority.P3, Priority.P2, Priority.P2, Priority.P1,
                Priority.P1][score]  # fmt: skip

    def target_seconds(self, metric: Metric, priority: Priority, tier: Tier | None) -> float:
        return self.minutes[(metric, priority)] * 60

    def pauses(self, metric: Metric, status: CaseStatus) -> bool:
        if status is CaseStatus.WAITING_ON_CUSTOMER:
            return metric in ("resolution", "next_response")
        return status is CaseStatus.ON_HOLD and metric == "resolution"

    def warning_percents(self) -> tuple[int, ...]:
        return (50, 80)

    def calendar_for(self, team: Team, tier: Tier | None) -> Calendar:
        return AlwaysOpen()
