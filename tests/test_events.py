from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from factories import opened, raw_event
from loopservice.domain.events import (
    CURRENT_SCHEMA_VERSION,
    EVENT_ADAPTER,
    EVENT_TYPES,
    CaseOpened,
    Channel,
    Level,
)
from loopservice.domain.upcasting import upcast


def test_discriminated_union_picks_the_type() -> None:
    e = opened()
    assert isinstance(e, CaseOpened)
    assert e.impact is Level.HIGH


def test_events_are_frozen() -> None:
    e = opened()
    with pytest.raises(ValidationError):
        e.topic = "billing"  # type: ignore[misc]


def test_case_event_needs_case_id() -> None:
    raw = raw_event(
        "case.opened", 1, case=None, subject="x", topic="t", impact="low", urgency="low"
    )
    with pytest.raises(ValidationError, match="case_id is required"):
        EVENT_ADAPTER.validate_python(raw)


def test_naive_timestamps_are_rejected() -> None:
    raw = raw_event("case.customer_message", 1)
    raw["occurred_at"] = "2026-03-02T09:00:00"
    with pytest.raises(ValidationError) as info:
        EVENT_ADAPTER.validate_python(raw)
    assert info.value.errors()[0]["loc"][-1] == "occurred_at"


def test_unknown_type_is_rejected_with_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        EVENT_ADAPTER.validate_python(raw_event("case.exploded", 1))
    assert "type" in str(info.value.errors()[0]["loc"]) or "case.exploded" in str(info.value)


def test_survey_score_must_fit_its_scale() -> None:
    raw = raw_event("survey.answered", 1, kind="csat", score=9)
    with pytest.raises(ValidationError, match="csat score must be between 1 and 5"):
        EVENT_ADAPTER.validate_python(raw)
    ok = EVENT_ADAPTER.validate_python(raw_event("survey.answered", 2, kind="nps", score=9))
    assert ok.type == "survey.answered"


def test_vocabulary_covers_the_issue_list() -> None:
    for needed in [
        "case.opened",
        "case.customer_message",
        "case.agent_replied",
        "case.note_added",
        "case.assigned",
        "case.handed_off",
        "case.status_changed",
        "case.priority_changed",
        "case.resolved",
        "case.reopened",
        "case.closed",
        "case.merged",
        "survey.answered",
        "account.updated",
        "usage.recorded",
        "onboarding.milestone_reached",
        "onboarding.milestone_missed",
        "knowledge.article_published",
        "knowledge.article_viewed",
        "selfservice.session",
        "account.renewed",
        "account.churned",
    ]:
        assert needed in EVENT_TYPES


def test_v1_event_is_upcast_to_the_current_version() -> None:
    v1 = {
        "event_id": "old-1",
        "type": "case.opened",
        "schema_version": 1,
        "occurred_at": "2024-05-01T10:00:00+00:00",
        "tenant_id": "acme",
        "account_id": "a1",
        "case_id": "c1",
        "channel": "chat",
        "actor": {"kind": "customer", "id": "u1"},
        "subject": "Export fails",
        "topic": "export",
        "severity": 2,
    }
    e = EVENT_ADAPTER.validate_python(upcast(v1))
    assert isinstance(e, CaseOpened)
    assert e.schema_version == CURRENT_SCHEMA_VERSION
    assert e.source.channel is Channel.CHAT and e.source.platform == "unknown"
    assert e.impact is Level.HIGH and e.urgency is Level.HIGH
    assert e.occurred_at == datetime(2024, 5, 1, 10, tzinfo=UTC)
    # without the upcaster the v1 shape is invalid
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(v1)
