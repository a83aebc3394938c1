"""The service policy in force at any event time, from the policy events on the log."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from loopservice.domain.events import PolicyPublished
from loopservice.domain.sla import SlaRules

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RulesBook:
    """Policy versions by the instant they take effect; replay applies the one then in force."""

    def __init__(self, default: SlaRules, parse: Callable[[dict[str, Any]], SlaRules]) -> None:
        self._parse = parse
        self._starts: list[datetime] = [_EPOCH]
        self._rules: list[SlaRules] = [default]

    def publish(self, event: PolicyPublished) -> None:
        rules = self._parse({**event.policy, "version": event.version})
        i = bisect.bisect_right(self._starts, event.occurred_at)
        self._starts.insert(i, event.occurred_at)
        self._rules.insert(i, rules)

    def in_force(self, at: datetime) -> SlaRules:
        return self._rules[bisect.bisect_right(self._starts, at) - 1]

    @property
    def latest(self) -> SlaRules:
        return self._rules[-1]
