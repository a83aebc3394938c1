"""Priority from the matrix and tier steps, with the rule that produced it."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopservice.domain.events import Level, Priority, Tier
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.priority import decide_priority
from loopservice.policy_cli import default_policy, default_policy_text

ORDER = [Priority.P1, Priority.P2, Priority.P3, Priority.P4]


def with_steps(**steps: int) -> Policy:
    data: dict[str, Any] = tomllib.loads(default_policy_text())
    data["priority"]["tier_steps"] = steps
    return policy_from_mapping(data)


def test_matrix_cell_and_rule_text() -> None:
    d = decide_priority(Level.HIGH, Level.MEDIUM, Tier.GROWTH, default_policy())
    assert d.priority is Priority.P2
    assert d.rule == "matrix[high][medium] = P2"
    assert (d.impact, d.urgency, d.tier, d.policy_version) == (
        Level.HIGH,
        Level.MEDIUM,
        Tier.GROWTH,
        "2026.1",
    )


def test_enterprise_raises_one_step() -> None:
    d = decide_priority(Level.HIGH, Level.MEDIUM, Tier.ENTERPRISE, default_policy())
    assert d.priority is Priority.P1
    assert d.rule == "matrix[high][medium] = P2; tier enterprise raises one step → P1"


def test_floor_is_p1() -> None:
    d = decide_priority(Level.CRITICAL, Level.CRITICAL, Tier.ENTERPRISE, default_policy())
    assert d.priority is Priority.P1
    assert d.rule.endswith("→ P1 (P1 is the highest)")


def test_negative_steps_lower_and_clamp_at_p4() -> None:
    p = with_steps(starter=-2)
    d = decide_priority(Level.MEDIUM, Level.MEDIUM, Tier.STARTER, p)
    assert d.priority is Priority.P4
    assert (
        d.rule
        == "matrix[medium][medium] = P3; tier starter lowers two steps → P4 (P4 is the lowest)"
    )


def test_unknown_tier_uses_the_matrix_only() -> None:
    d = decide_priority(Level.LOW, Level.CRITICAL, None, default_policy())
    assert d.priority is Priority.P3
    assert d.rule == "matrix[low][critical] = P3"


@given(
    impact=st.sampled_from(list(Level)),
    urgency=st.sampled_from(list(Level)),
    tier=st.sampled_from([None, *Tier]),
    steps=st.integers(-4, 4),
)
def test_steps_move_within_bounds(
    impact: Level, urgency: Level, tier: Tier | None, steps: int
) -> None:
    policy = with_steps(growth=steps)
    base = policy.priority.matrix[impact][urgency]
    got = decide_priority(impact, urgency, tier, policy)
    expected = base
    if tier is Tier.GROWTH:
        expected = ORDER[min(3, max(0, ORDER.index(base) - steps))]
    assert got.priority is expected
    assert policy.priority_for(impact, urgency, tier) is expected
    assert got.rule.startswith(f"matrix[{impact.value}][{urgency.value}] = {base.value}")


@pytest.mark.parametrize("impact", list(Level))
def test_default_matrix_is_monotone(impact: Level) -> None:
    """More urgent never lowers priority in the shipped matrix."""
    row = default_policy().priority.matrix[impact]
    ranks = [ORDER.index(row[u]) for u in (Level.LOW, Level.MEDIUM, Level.HIGH, Level.CRITICAL)]
    assert ranks == sorted(ranks, reverse=True)
