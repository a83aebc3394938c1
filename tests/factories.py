"""Small builders of valid events for tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from loopservice.domain.events import EVENT_ADAPTER, Event

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


def raw_event(
    type_: str, n: int, *, at: datetime | None = None, case: str | None = "c1", **fields: Any
) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "event_id": f"ev-{n}",
        "type": type_,
        "occurred_at": (at or T0 + timedelta(minutes=n)).isoformat(),
        "tenant_id": fields.pop("tenant_id", "acme"),
        "account_id": fields.pop("account_id", "acct-1"),
        "source": {"platform": "zendesk", "channel": "email"},
        "actor": fields.pop("actor", {"kind": "customer", "id": "u-1"}),
    }
    if case is not None:
        raw["case_id"] = case
    raw.update(fields)
    return raw


def event(type_: str, n: int, **kw: Any) -> Event:
    return EVENT_ADAPTER.validate_python(raw_event(type_, n, **kw))


def opened(n: int = 1, **kw: Any) -> Event:
    kw.setdefault("subject", "Cannot log in")
    kw.setdefault("topic", "login")
    kw.setdefault("impact", "high")
    kw.setdefault("urgency", "medium")
    return event("case.opened", n, **kw)


def message(n: int, **kw: Any) -> Event:
    return event("case.customer_message", n, body="still broken", **kw)
