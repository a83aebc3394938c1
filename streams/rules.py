"""The service policy in force at any event time, from the policy events on the log."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from loopservice.domain.events import PolicyPublished

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
R_co = TypeVar("R_co", covariant=True)


class RulesBook(Generic[R_co]):
    """Policy versions by the instant they take effect; replay applies the one then in force.

    Until a `policy.published` event is on the log, the shipped default applies.
    """

    def __init__(self, default: R_co, parse: Callable[[Mapping[str, Any]], R_co]) -> None:
        self._parse = parse
        self._starts: list[datetime] = [_EPOCH]
        self._rules: list[Any] = [default]
        self._published: set[str] = set()

    def publish(self, event: PolicyPublished) -> None:
        if event.event_id in self._published:
            return  # several processors share the book; the first one to see it publishes
        self._published.add(event.event_id)
        rules = self._parse({**event.policy, "version": event.version})
        i = bisect.bisect_right(self._starts, event.occurred_at)
        self._starts.insert(i, event.occurred_at)
        self._rules.insert(i, rules)

    def versions(self) -> list[R_co]:
        """Every policy in the book, the default first, by the instant it takes effect."""
        return list(self._rules)

    def in_force(self, at: datetime) -> R_co:
        rules: R_co = self._rules[bisect.bisect_right(self._starts, at) - 1]
        return rules
