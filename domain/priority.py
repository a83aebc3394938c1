"""Priority from the shared impact × urgency matrix, adjusted by customer tier, with its reason.

Manual overrides are the case processor's business; this is the standard decision only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loopservice.domain.events import Level, Priority, Tier

if TYPE_CHECKING:
    from loopservice.domain.policy import Policy

_ORDER: tuple[Priority, ...] = (Priority.P1, Priority.P2, Priority.P3, Priority.P4)
_STEPS = {1: "one step", 2: "two steps", 3: "three steps"}


@dataclass(frozen=True, slots=True)
class PriorityDecision:
    priority: Priority
    rule: str
    impact: Level
    urgency: Level
    tier: Tier | None
    policy_version: str


def decide_priority(
    impact: Level, urgency: Level, tier: Tier | None, policy: Policy
) -> PriorityDecision:
    """The policy's priority for a case, e.g. rule
    'matrix[high][medium] = P2; tier enterprise raises one step → P1'."""
    base = policy.priority.matrix[impact][urgency]
    rule = f"matrix[{impact.value}][{urgency.value}] = {base.value}"
    steps = policy.priority.tier_steps.get(tier, 0) if tier is not None else 0
    priority = base
    if steps and tier is not None:
        index = _ORDER.index(base) - steps
        priority = _ORDER[min(max(index, 0), len(_ORDER) - 1)]
        verb = "raises" if steps > 0 else "lowers"
        amount = _STEPS.get(abs(steps), f"{abs(steps)} steps")
        rule += f"; tier {tier.value} {verb} {amount} → {priority.value}"
        if index < 0:
            rule += " (P1 is the highest)"
        elif index >= len(_ORDER):
            rule += " (P4 is the lowest)"
    return PriorityDecision(priority, rule, impact, urgency, tier, policy.version)
