"""The policy document: parsing, field-path errors, lookups, the shipped default, the CLI."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from factories import event
from loopservice.domain.events import CaseStatus, HandedOff, Level, Priority, Team, Tier
from loopservice.domain.policy import Policy, PolicyError, policy_from_mapping, policy_from_toml
from loopservice.policy_cli import default_policy, default_policy_text, policy

DEFAULT = default_policy_text()


def doc() -> dict[str, Any]:
    return tomllib.loads(DEFAULT)


def errors_of(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as info:
        policy_from_mapping(data)
    return info.value.problems


def test_default_policy_is_valid_and_versioned() -> None:
    p = default_policy()
    assert p.version == "2026.1"
    assert p.allowed_lateness_seconds == 1
    assert p.clock_skew_tolerance_seconds == 300
    assert p.warning_percents() == (50, 80)


def test_targets_in_business_seconds_with_tier_fallback() -> None:
    data = doc()
    data["sla"]["targets"]["P3"] = {
        "default": {"first_response": 100, "next_response": 200, "resolution": 300},
        "enterprise": {"first_response": 7},
    }
    p = policy_from_mapping(data)
    assert p.target_seconds("first_response", Priority.P3, Tier.ENTERPRISE) == 7 * 60
    assert p.target_seconds("resolution", Priority.P3, Tier.ENTERPRISE) == 300 * 60
    assert p.target_seconds("first_response", Priority.P3, Tier.GROWTH) == 100 * 60
    assert p.target_seconds("next_response", Priority.P3, None) == 200 * 60
    assert p.target("resolution", Priority.P3, None) == timedelta(minutes=300)


def test_pauses() -> None:
    p = default_policy()
    assert p.pauses("resolution", CaseStatus.WAITING_ON_CUSTOMER)
    assert p.pauses("resolution", CaseStatus.ON_HOLD)
    assert p.pauses("next_response", CaseStatus.WAITING_ON_CUSTOMER)
    assert not p.pauses("next_response", CaseStatus.ON_HOLD)
    assert not p.pauses("first_response", CaseStatus.WAITING_ON_CUSTOMER)
    assert not p.pauses("resolution", CaseStatus.OPEN)
    data = doc()
    data["pauses"] = {"first_response": ["on_hold"]}
    changed = policy_from_mapping(data)
    assert changed.pauses("first_response", CaseStatus.ON_HOLD)
    assert changed.pauses("resolution", CaseStatus.ON_HOLD)  # unnamed metrics keep defaults


def test_calendar_routes_first_match_and_default() -> None:
    p = default_policy()
    enterprise = p.calendar_for(Team.SUPPORT, Tier.ENTERPRISE)
    assert enterprise is p.calendar("always")
    assert p.calendar_for(Team.ONBOARDING, Tier.GROWTH) is p.calendar("emea")
    assert p.calendar_for(Team.SUPPORT, None) is p.calendar("americas")
    assert p.calendar_for(Team.SUPPORT, None) is p.calendar_for(Team.SUPPORT, None)
    monday = datetime(2026, 3, 2, 12, tzinfo=UTC)
    assert enterprise.add(monday, 3600) == monday + timedelta(hours=1)


def test_policy_round_trips_through_its_published_form() -> None:
    p = default_policy()
    dumped = p.model_dump(mode="json")
    assert "pauses" in dumped
    again = policy_from_mapping(dumped)
    assert again == p
    assert again.calendar_for(Team.ONBOARDING, None) == p.calendar_for(Team.ONBOARDING, None)


def test_satisfies_the_sla_rules_protocol() -> None:
    from loopservice.domain.sla import SlaRules

    rules: SlaRules = default_policy()
    assert rules.priority_for(Level.HIGH, Level.MEDIUM, Tier.ENTERPRISE) == Priority.P1


@pytest.mark.parametrize(
    ("edit", "path", "reason"),
    [
        (
            lambda d: d["sla"]["targets"]["P2"]["enterprise"].update(first_response=0),
            "sla.targets.P2.enterprise.first_response",
            "Input should be greater than 0",
        ),
        (
            lambda d: d["sla"]["targets"]["P4"]["default"].pop("resolution"),
            "sla.targets",
            "P4.default.resolution is missing",
        ),
        (
            lambda d: d["sla"]["targets"]["P2"].update(platinum={"first_response": 1}),
            "sla.targets.P2.platinum",
            "Input should be 'default', 'starter', 'growth' or 'enterprise'",
        ),
        (
            lambda d: d["priority"]["matrix"]["high"].pop("low"),
            "priority.matrix",
            "missing [high][low]",
        ),
        (
            lambda d: d["priority"]["matrix"]["low"].update(low="P5"),
            "priority.matrix.low.low",
            "Input should be 'P1', 'P2', 'P3' or 'P4'",
        ),
        (
            lambda d: d["calendars"]["named"]["emea"].update(zone="Europe/Atlantis"),
            "calendars.named.emea.zone",
            "unknown IANA time zone 'Europe/Atlantis'",
        ),
        (
            lambda d: d["calendars"]["named"]["americas"].update(holiday_country="XX"),
            "calendars.named.americas",
            "unknown holiday country or subdivision 'XX'",
        ),
        (
            lambda d: d["calendars"]["named"]["americas"].update(
                hours={"mon": ["09:00-12:00", "11:30-13:00"]}
            ),
            "calendars.named.americas.hours",
            "mon: span '11:30-13:00' overlaps span '09:00-12:00'",
        ),
        (
            lambda d: d["calendars"].update(default="nowhere"),
            "calendars",
            "calendar 'nowhere' is not defined under calendars.named",
        ),
        (
            lambda d: d["pauses"].update(resolution=["open"]),
            "pauses.resolution",
            "status 'open' cannot pause a clock",
        ),
        (
            lambda d: d["warnings"].update(percents=[80, 50]),
            "warnings.percents",
            "percents must be strictly increasing",
        ),
        (
            lambda d: d["oncall"]["routes"][0].update(escalate_to="nobody"),
            "oncall",
            "route 'p1-breaches' escalates to unknown route 'nobody'",
        ),
        (
            lambda d: d["oncall"]["routes"][1].update(sink="ftp://x"),
            "oncall.routes[1].sink",
            "String should match pattern",
        ),
        (lambda d: d.pop("version"), "version", "Field required"),
        (lambda d: d.update(surprise=1), "surprise", "Extra inputs are not permitted"),
    ],
)
def test_errors_name_the_field_path(edit: Any, path: str, reason: str) -> None:
    data = doc()
    edit(data)
    problems = errors_of(data)
    assert any(p == path and reason in r for p, r in problems), problems


def test_error_message_reads_path_colon_reason() -> None:
    text = DEFAULT.replace(
        "enterprise = { first_response = 60, next_response = 120, resolution = 960 }",
        "enterprise = { first_response = -5, next_response = 120, resolution = 960 }",
    )
    assert text != DEFAULT
    with pytest.raises(PolicyError) as info:
        policy_from_toml(text)
    assert str(info.value) == (
        "sla.targets.P2.enterprise.first_response: Input should be greater than 0"
    )


def test_invalid_toml_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="not valid TOML"):
        policy_from_toml("version = ")


def handoff(n: int, from_team: str, to_team: str, summary: str = "context") -> HandedOff:
    e = event(
        "case.handed_off", n, from_team=from_team, to_team=to_team, summary=summary, reason=""
    )
    assert isinstance(e, HandedOff)
    return e


def test_handoff_rules() -> None:
    rules = default_policy().handoffs
    assert rules.violations(handoff(1, "support", "success"), 0) == []
    assert rules.allowed(Team.SUPPORT, Team.ONBOARDING)
    data = doc()
    data["handoffs"]["routes"] = [{"from_team": "support", "to_teams": ["success"]}]
    strict = policy_from_mapping(data).handoffs
    assert not strict.allowed(Team.SUCCESS, Team.SUPPORT)
    found = strict.violations(handoff(2, "success", "support", summary="  "), 3)
    assert found == [
        "handoff success → support is not an allowed route",
        "handoff summary is required and empty",
        "handoff 4 exceeds the maximum of 3 per case",
    ]


def test_oncall_route_for_first_match() -> None:
    oncall = default_policy().oncall
    p1 = oncall.route_for("sla.breached", Team.SUPPORT, Priority.P1)
    assert p1 is not None and p1.name == "p1-breaches" and p1.escalate_to == "support-leads"
    p3 = oncall.route_for("sla.breached", Team.SUPPORT, Priority.P3)
    assert p3 is not None and p3.name == "support-leads"
    assert oncall.route_for("sla.warning", Team.SUPPORT, Priority.P3) is None


def test_policy_is_frozen() -> None:
    p = default_policy()
    with pytest.raises(Exception, match="frozen"):
        p.version = "x"  # type: ignore[misc]
    assert isinstance(p, Policy)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_check_valid(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(DEFAULT.replace('version = "2026.1"', 'version = "2026.7-test"'))
    result = CliRunner().invoke(policy, ["check", str(f)])
    assert result.exit_code == 0, result.output
    assert "2026.7-test" in result.output
    assert "americas" in result.output


def test_cli_check_invalid_prints_path_without_traceback(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(DEFAULT.replace('zone = "Europe/Berlin"', 'zone = "Europe/Nowhere"'))
    result = CliRunner().invoke(policy, ["check", str(f)])
    assert result.exit_code == 1
    assert "calendars.named.emea.zone" in result.output
    assert "Traceback" not in result.output


def test_cli_check_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(policy, ["check", str(tmp_path / "absent.toml")])
    assert result.exit_code == 2
    assert "absent.toml" in result.output


def test_registered_on_main() -> None:
    from loopservice.cli import main

    assert "policy" in main.commands
