"""The health processor: per-account churn risk and expansion openings, for both engines.

State is per account (partition-local under Kafka's `account_id` key). An account is scored
when one of its events changes an input, when an SLA breach it suffered is observed, and at
each UTC midnight after a whole day without a score (renewals draw near and windows age while
an account is silent). Those daily timers wait in a heap, lazily invalidated; an account's own
event first takes any of its timers that came due before the event occurred, so what an
account gets does not depend on how far the engine's watermark had got.

SLA breaches: processors see events, not signals, and recomputing the SLA clocks here would
duplicate the SLA processor. The topology therefore taps the SLA processor (`SignalTap`): the
signals it returns for a record are handed to `observe` before the engine moves on, on the
same partition (cases key by account too). A breach counts from the account's next score.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from itertools import count

from loopservice.domain import health
from loopservice.domain.events import Event, PolicyPublished
from loopservice.domain.policy import Policy
from loopservice.domain.signals import Signal
from loopservice.streams.processor import Processor
from loopservice.streams.rules import RulesBook

_ACCOUNT_TYPES = frozenset(
    {
        "account.updated",
        "account.renewed",
        "account.churned",
        "usage.recorded",
        "survey.answered",
        "onboarding.milestone_missed",
        "onboarding.milestone_reached",
    }
)
# case events that change a health input; messages, replies and notes do not
_SCORED_CASE_TYPES = frozenset(
    {
        "case.opened",
        "case.priority_changed",
        "case.resolved",
        "case.closed",
        "case.merged",
        "case.reopened",
    }
)
_SCORED_TYPES = _ACCOUNT_TYPES | _SCORED_CASE_TYPES
# the SLA signals the health model counts; by type name, which names one class each (pydantic's
# metaclass makes an isinstance check cost more than the rest of a look at a signal)
_SUFFERED_TYPES = frozenset({"sla.breached", "sla.breach_retracted"})
Key = tuple[str, str]


_DAY = timedelta(days=1)
_MIDNIGHT = time()


def _next_midnight_after(at: datetime) -> datetime:
    """The first UTC midnight at least a whole day after `at`."""
    midnight = datetime.combine(at.astimezone(UTC).date() + _DAY, _MIDNIGHT, UTC)
    return midnight if midnight - at >= _DAY else midnight + _DAY


class HealthProcessor:
    """Churn risk (risk.raised / risk.cleared) and expansion openings per account."""

    name = "health"

    def __init__(self, rules: RulesBook[Policy]) -> None:
        self.rules = rules
        self.accounts: dict[Key, health.AccountHealth] = {}
        self._due: dict[Key, datetime] = {}
        self._queue: list[tuple[datetime, int, Key]] = []
        self._seq = count()

    # -- the processor contract ------------------------------------------------------------

    def handle(self, event: Event) -> list[Signal]:
        if event.type not in _SCORED_TYPES:
            if event.type == "policy.published":  # by name: see _SUFFERED_TYPES
                assert isinstance(event, PolicyPublished)
                self.rules.publish(event)
            return []
        key = (event.tenant_id, event.account_id)
        state = self.accounts.get(key)
        if state is None:
            state = self.accounts[key] = health.AccountHealth(event.tenant_id, event.account_id)
        at = event.occurred_at
        due = self._due.get(key)
        out: list[Signal] = [] if due is None or due >= at else self._due_before(key, state, at)
        policy = self.rules.in_force(at)
        out += health.evolve(state, event, policy.health, policy.priority_for)
        if health.is_backfill(event):
            return out
        out += health.decide(state, at, policy.health, policy.version, event.event_id)
        self._schedule(key, state)
        return out

    def advance(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        queue = self._queue
        while queue and queue[0][0] <= watermark:
            due, _, key = heapq.heappop(queue)
            if self._due.get(key) != due:
                continue  # the account was scored since: a newer timer stands
            out += self._score(key, due)
        return out

    def next_due(self) -> datetime | None:
        while self._queue and self._due.get(self._queue[0][2]) != self._queue[0][0]:
            heapq.heappop(self._queue)
        return self._queue[0][0] if self._queue else None

    # -- SLA signals ---------------------------------------------------------------------

    def observe(self, signals: list[Signal]) -> None:
        for signal in signals:
            if signal.type not in _SUFFERED_TYPES:
                continue
            state = self.accounts.get((signal.tenant_id, signal.account_id))
            if state is not None:
                health.observe(state, signal)

    # -- reading -------------------------------------------------------------------------

    def latest(self, tenant_id: str, account_id: str) -> health.AccountHealth | None:
        return self.accounts.get((tenant_id, account_id))

    # -- timers --------------------------------------------------------------------------

    def _due_before(self, key: Key, state: health.AccountHealth, before: datetime) -> list[Signal]:
        out: list[Signal] = []
        while (due := self._due.get(key)) is not None and due < before:
            out += self._score(key, due)
        return out

    def _score(self, key: Key, at: datetime) -> list[Signal]:
        state = self.accounts[key]
        policy = self.rules.in_force(at)
        out: list[Signal] = list(health.decide(state, at, policy.health, policy.version))
        self._schedule(key, state)
        return out

    def _schedule(self, key: Key, state: health.AccountHealth) -> None:
        if state.churned or state.evaluated_at is None:
            self._due.pop(key, None)
            return
        due = _next_midnight_after(state.evaluated_at)
        if self._due.get(key) != due:
            self._due[key] = due
            heapq.heappush(self._queue, (due, next(self._seq), key))


class SignalTap:
    """Runs `inner` unchanged and hands every batch of signals it returns to `listener`."""

    def __init__(self, inner: Processor, listener: Callable[[list[Signal]], None]) -> None:
        self.inner = inner
        self.listener = listener
        self.name = inner.name

    def handle(self, event: Event) -> list[Signal]:
        out = self.inner.handle(event)
        if out:
            self.listener(out)
        return out

    def advance(self, watermark: datetime) -> list[Signal]:
        out = self.inner.advance(watermark)
        if out:
            self.listener(out)
        return out

    def next_due(self) -> datetime | None:
        return self.inner.next_due()
