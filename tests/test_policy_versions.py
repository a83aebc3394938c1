"""A published policy governs decisions from its effective time on, in live runs and replays."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from factories import T0, opened
from loopservice.bootstrap import build_system
from loopservice.domain.events import Actor, ActorKind, Channel, PolicyPublished, Source, clock_tick
from loopservice.domain.policy import policy_from_toml
from loopservice.domain.signals import SlaBreached
from loopservice.infra.settings import Settings
from loopservice.policy_cli import default_policy_text
from loopservice.streams.clock import FixedClock


def publish(version: str, text: str, at_minutes: int) -> PolicyPublished:
    policy = policy_from_toml(text.replace('version = "2026.1"', f'version = "{version}"'))
    return PolicyPublished(
        event_id=f"policy:{version}",
        occurred_at=T0 + timedelta(minutes=at_minutes),
        tenant_id="acme",
        account_id="_policy",
        source=Source(platform="loopservice", channel=Channel.WEB),
        actor=Actor(kind=ActorKind.SYSTEM, id="test"),
        version=version,
        policy=policy.model_dump(mode="json", by_alias=True),
    )


def test_cases_use_the_policy_in_force_when_the_event_occurred(tmp_path: Path) -> None:
    text = default_policy_text()
    assert 'version = "2026.1"' in text
    stricter = text.replace(
        "default = { first_response = 240, next_response = 480, resolution = 1440 }",
        "default = { first_response = 30, next_response = 480, resolution = 1440 }",
    )
    assert stricter != text
    system = build_system(
        Settings(data_dir=tmp_path, log_url=f"sqlite:///{tmp_path / 'loop.db'}"),
        FixedClock(T0),
    )
    # Monday 09:00 UTC; impact high x urgency high is P2 in the default matrix
    before = opened(1, case="before", impact="high", urgency="high")
    after = opened(120, case="after", impact="high", urgency="high")
    system.log.append([before, publish("2026.2", stricter, 60), after])
    system.log.append([clock_tick(T0 + timedelta(days=7))])
    system.engine.catch_up()
    breaches = {
        s.value.case_id: s.value
        for s in system.signals.read(1, 1000)
        if isinstance(s.value, SlaBreached) and s.value.metric == "first_response"
    }
    assert breaches["before"].policy_version == "2026.1"
    assert breaches["after"].policy_version == "2026.2"
    first_target = breaches["before"].due_at - before.occurred_at
    second_target = breaches["after"].due_at - after.occurred_at
    assert second_target < first_target
