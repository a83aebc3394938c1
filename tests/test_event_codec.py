"""The log's fast event codec must give exactly what pydantic gives: same bytes, same objects."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from factories import event, opened
from loopservice.domain.events import EVENT_ADAPTER, EVENT_TYPES, Event, PolicyPublished
from loopservice.infra.event_codec import (
    decode_event,
    decode_event_json,
    decode_events_json,
    encode_event,
    encode_events,
    validate_event,
    validate_event_json,
)
from loopservice.simulator import SimulationConfig, generate

AGENT = {"kind": "agent", "id": "ag-1", "team": "support"}
SYSTEM = {"kind": "system", "id": "ops"}
# One event of every type, with optional fields set, microseconds and a non-UTC offset.
ODD_TIME = datetime(2026, 3, 29, 3, 30, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
SAMPLES: dict[str, dict[str, Any]] = {
    "case.opened": {"subject": "s", "topic": "t", "impact": "high", "urgency": "low",
                    "product_area": "exports", "team": "onboarding"},
    "case.customer_message": {"body": "hi"},
    "case.agent_replied": {"actor": AGENT},
    "case.note_added": {"actor": AGENT, "body": "note"},
    "case.assigned": {"actor": AGENT, "assignee_id": "ag-2", "team": "success"},
    "case.handed_off": {"actor": AGENT, "from_team": "support", "to_team": "success",
                        "reason": "r", "summary": "s"},
    "case.status_changed": {"actor": AGENT, "status": "on_hold"},
    "case.priority_changed": {"actor": AGENT, "priority": "P1", "reason": "vip"},
    "case.resolved": {"actor": AGENT, "resolution_code": "fix", "summary": "done"},
    "case.reopened": {"reason": "again"},
    "case.closed": {"actor": AGENT},
    "case.merged": {"actor": AGENT, "into_case_id": "c2"},
    "survey.answered": {"kind": "nps", "score": 3, "comment": "meh", "case": None},
    "account.updated": {"actor": SYSTEM, "name": "Acme", "plan": "pro", "tier": "enterprise",
                        "arr": 12000.0, "renewal_date": "2026-12-31", "owner_id": "csm-1",
                        "seats": 40, "case": None},
    "usage.recorded": {"actor": SYSTEM, "metric": "logins", "value": 3.5,
                       "period_start": "2026-03-01", "period_end": "2026-03-02", "case": None},
    "onboarding.milestone_reached": {"actor": SYSTEM, "milestone": "sso", "case": None},
    "onboarding.milestone_missed": {"actor": SYSTEM, "milestone": "sso",
                                    "due_date": "2026-03-01", "case": None},
    "account.renewed": {"actor": SYSTEM, "arr": 1e20, "next_renewal_date": "2027-03-01",
                        "case": None},
    "account.churned": {"actor": SYSTEM, "reason": "price", "case": None},
    "knowledge.article_published": {"actor": AGENT, "article_id": "kb-1", "title": "T",
                                    "topic": "t", "resolution_code": "fix", "case": None},
    "knowledge.article_viewed": {"article_id": "kb-1", "case": None},
    "selfservice.session": {"topic": "t", "article_ids": ["kb-1", "kb-2"], "resolved": True,
                            "case": None},
    "improvement.recorded": {"actor": AGENT, "improvement_id": "i-1", "description": "d",
                             "effective_date": "2026-03-01", "topic": "t", "case": None},
    "policy.published": {"actor": SYSTEM, "version": "v2", "case": None,
                         "policy": {"a": [1, 2.5, None, True], "b": {"c": "d"}}},
    "alert.acknowledged": {"actor": AGENT, "alert_id": "al-1", "note": "on it", "case": None},
    "clock.tick": {"actor": SYSTEM, "partition": 3, "case": None},
}  # fmt: skip


def _sample(type_: str, n: int) -> Event:
    fields = dict(SAMPLES[type_])
    return event(type_, n, at=ODD_TIME + timedelta(minutes=n), **fields)


def _same(a: Event, b: Event, *, fields_set: bool = True) -> None:
    assert type(a) is type(b)
    assert a == b
    if not isinstance(a, PolicyPublished):  # its policy document is a dict: unhashable
        assert hash(a) == hash(b)
    if fields_set:  # an event read back has every field set, whatever its writer left out
        assert a.model_fields_set == b.model_fields_set
    assert a.model_dump_json() == b.model_dump_json()
    for name, value in a.__dict__.items():
        other = b.__dict__[name]
        assert type(value) is type(other), name
        if isinstance(value, datetime):
            assert value.tzinfo is other.tzinfo, name


def test_every_event_type_has_a_sample() -> None:
    assert sorted(SAMPLES) == sorted(EVENT_TYPES)


@pytest.mark.parametrize("type_", sorted(SAMPLES))
def test_encode_and_decode_match_pydantic(type_: str) -> None:
    e = _sample(type_, 1)
    body = encode_event(e)
    assert body == e.model_dump_json().encode()
    assert encode_events([e, e]) == [body, body]
    _same(decode_event(type_, body), validate_event(type_, body))
    _same(decode_event_json(body), validate_event(type_, body))
    _same(decode_event(type_, body), e, fields_set=False)


def test_simulated_traffic_decodes_as_pydantic_validates_it() -> None:
    """Every event of a simulated run (21 of the types; the samples above hold the rest),
    twice over so the second pass meets the shared nested models the first one built."""
    raw = list(generate(SimulationConfig(accounts=40, days=60, seed=7)))
    events = [EVENT_ADAPTER.validate_python(r) for r in raw]
    assert len({e.type for e in events}) >= 20
    bodies = [encode_event(e) for e in events]
    assert bodies == [e.model_dump_json().encode() for e in events]
    assert encode_events(events) == bodies
    for _ in range(2):
        for e, body in zip(events, bodies, strict=True):
            expected = validate_event(e.type, body)
            _same(decode_event_json(body), expected)
            _same(decode_event(e.type, body), expected)
            _same(decode_event_json(body), e, fields_set=False)


V1_OPENED = {
    "event_id": "old-1",
    "type": "case.opened",
    "schema_version": 1,
    "occurred_at": "2025-01-01T10:00:00+00:00",
    "tenant_id": "acme",
    "account_id": "a",
    "case_id": "c",
    "channel": "email",
    "actor": {"kind": "customer", "id": "u"},
    "subject": "s",
    "topic": "t",
    "severity": 1,
}


def test_decoding_bodies_together_gives_what_pydantic_gives_for_each() -> None:
    """Every event type and a simulated run, with an older record and one the log would not
    write among them, decoded in parts of several sizes (as `read` hands them over)."""
    raw = list(generate(SimulationConfig(accounts=40, days=60, seed=7)))
    events = [EVENT_ADAPTER.validate_python(r) for r in raw]
    bodies = [encode_event(_sample(t, n)) for n, t in enumerate(sorted(SAMPLES))]
    bodies += [encode_event(e) for e in events]
    reordered = orjson.loads(encode_event(_sample("case.opened", 1)))
    _reorder(reordered)
    bodies[30:30] = [orjson.dumps(V1_OPENED), orjson.dumps(reordered)]
    expected = [validate_event_json(body) for body in bodies]
    assert expected[30].schema_version == 2  # upcast
    for size in (1, 7, 50, len(bodies)):
        decoded = []
        for i in range(0, len(bodies), size):
            decoded += decode_events_json(bodies[i : i + size])
        assert len(decoded) == len(expected)
        for got, want in zip(decoded, expected, strict=True):
            _same(got, want)


def test_a_body_that_is_not_one_json_document_is_not_read_with_its_neighbour() -> None:
    """Two halves of a record, cut inside a string: joined into one array they must not
    parse as one record (nor as two), but fail as each fails alone."""
    whole = encode_event(_sample("case.customer_message", 1))
    cut = whole.index(b"ev-1") + 2
    halves = [encode_event(_sample("case.note_added", 2)) + b"," + whole[:cut], whole[cut:]]
    for half in halves:
        with pytest.raises(ValidationError):
            validate_event_json(half)
    with pytest.raises(ValidationError):
        decode_events_json(halves)
    good = encode_event(_sample("case.closed", 3))
    assert [e.type for e in decode_events_json([good, good])] == ["case.closed"] * 2


def _agree(body: bytes) -> None:
    """The fast decoders give what pydantic gives for the same bytes, or fail as it fails."""
    try:
        expected = validate_event_json(body)
    except ValidationError:
        with pytest.raises(ValidationError):
            decode_event_json(body)
        return
    _same(decode_event_json(body), expected)
    _same(decode_event(expected.type, body), expected)
    _same(validate_event(expected.type, body), expected)


def _reorder(raw: dict[str, Any]) -> None:
    items = list(raw.items())[::-1]
    raw.clear()
    raw.update(items)


def _nested_reordered(raw: dict[str, Any]) -> None:
    raw["source"] = dict(reversed(list(raw["source"].items())))


# Records the log would not write itself (reordered, older, from other writers, broken): each
# must come out as pydantic has it, whichever path the decoder takes.
ODD: dict[str, tuple[str, Callable[[dict[str, Any]], object]]] = {
    "fields reordered": ("case.opened", _reorder),
    "nested fields reordered": ("case.opened", _nested_reordered),
    "nested extra field": ("case.opened", lambda r: r["source"].update(extra="x")),
    "nested default left out": ("case.opened", lambda r: r["actor"].pop("team")),
    "nested not an object": ("case.opened", lambda r: r.update(source="zendesk")),
    "extra field": ("case.opened", lambda r: r.update(extra="x")),
    "schema_version as a float": ("case.opened", lambda r: r.update(schema_version=2.0)),
    "schema_version missing": ("case.opened", lambda r: r.pop("schema_version")),
    "int field as a float": ("survey.answered", lambda r: r.update(score=3.0)),
    "int field as a string": ("clock.tick", lambda r: r.update(partition="3")),
    "bool field as an int": ("selfservice.session", lambda r: r.update(resolved=1)),
    "tuple field as a string": ("selfservice.session", lambda r: r.update(article_ids="kb")),
    "float field as an int": ("usage.recorded", lambda r: r.update(value=3)),
    "float field as a bool": ("usage.recorded", lambda r: r.update(value=True)),
    "naive time": ("case.opened", lambda r: r.update(occurred_at="2026-03-01T10:00:00")),
    "time not in UTC": ("case.opened", lambda r: r.update(occurred_at="2026-03-29T03:30+02:00")),
    "time as a unix timestamp": ("case.opened", lambda r: r.update(occurred_at=1_772_000_000)),
    "time not a time": ("case.opened", lambda r: r.update(occurred_at="soon")),
    "date as a datetime": ("usage.recorded", lambda r: r.update(period_end="2026-03-02T00:00:00")),
    "unknown enum value": ("case.opened", lambda r: r.update(impact="huge")),
    "unknown type": ("case.opened", lambda r: r.update(type="case.exploded")),
    "type not a string": ("case.opened", lambda r: r.update(type=["case.opened"])),
    "not an object": ("case.opened", lambda r: r.clear()),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ODD))
def test_records_the_log_did_not_write_decode_as_pydantic_has_them(name: str) -> None:
    type_, change = ODD[name]
    raw = orjson.loads(encode_event(_sample(type_, 1)))
    change(raw)
    _agree(orjson.dumps(raw))
    _agree(orjson.dumps(raw))  # again, now that the shared nested models are there


def test_json_that_is_not_an_object_fails_as_pydantic_does() -> None:
    for body in (b"[]", b"3", b"not json", b'"case.opened"'):
        _agree(body)


def test_decoded_events_share_nothing_mutable_that_pydantic_would_change() -> None:
    a = decode_event("case.opened", encode_event(opened(1)))
    b = decode_event("case.opened", encode_event(opened(2)))
    assert a.source is b.source  # interned: frozen, so sharing is safe
    copy = a.model_copy(update={"topic": "billing"})
    assert copy.topic == "billing" and a.topic == "login"


def test_an_older_record_takes_the_upcasting_path() -> None:
    decoded = decode_event("case.opened", orjson.dumps(V1_OPENED))
    assert decoded.schema_version == 2
    assert decoded.source.channel == "email"
    assert decoded.occurred_at == datetime(2025, 1, 1, 10, tzinfo=UTC)


def test_a_record_missing_a_defaulted_field_is_validated() -> None:
    raw = orjson.loads(encode_event(opened(1)))
    del raw["product_area"]
    body = orjson.dumps(raw)
    _same(decode_event("case.opened", body), validate_event("case.opened", body))


def test_a_batch_orjson_cannot_encode_is_encoded_as_pydantic_does() -> None:
    """A policy document with a key that is no string: orjson refuses it, pydantic writes it
    as a string; in a batch, the others are encoded as before."""
    odd = _sample("policy.published", 1).model_copy(update={"policy": {"limits": {1: "x"}}})
    others = [_sample("case.opened", 2), _sample("case.closed", 3)]
    batch = [others[0], odd, others[1]]
    assert encode_events(batch) == [e.model_dump_json().encode() for e in batch]
    assert b'"1":"x"' in encode_event(odd)


def test_nested_values_taking_turns_decode_as_pydantic_has_them() -> None:
    """The decoder compares a nested actor (and source) with the last one it met before it
    looks it up: three that take turns in every order, in one part and one at a time, each
    as pydantic validates it."""
    actors = [
        {"kind": "customer", "id": "u-1"},
        AGENT,
        {"kind": "agent", "id": "ag-2", "team": "success"},
    ]
    channels = ["email", "chat", "phone"]
    order = [0, 1, 0, 1, 2, 1, 2, 0, 0, 2, 2, 1, 0, 2, 1, 1, 0]
    events = [
        event(
            "case.customer_message",
            n,
            at=ODD_TIME + timedelta(minutes=n),
            actor=actors[k],
            source={"platform": "web", "channel": channels[order[-1 - n]]},
        )
        for n, k in enumerate(order)
    ]
    bodies = encode_events(events)
    expected = [validate_event_json(body) for body in bodies]
    assert len({e.actor for e in expected}) == 3 and len({e.source for e in expected}) == 3
    for decoded in (decode_events_json(bodies), [decode_event_json(b) for b in bodies]):
        for got, want in zip(decoded, expected, strict=True):
            _same(got, want)
