"""Processors around the pattern detectors and the inner loop, written once for both engines.

`CasePatternProcessor` and `FollowupProcessor` keep per-account state (partition-local under
Kafka's `account_id` key); `TopicSurgeProcessor` counts across a tenant's accounts, so under
Kafka it needs the opened cases re-keyed by tenant. `BreachClusterProcessor` counts SLA
breaches (signals, handed over by the SLA processor's tap) across a tenant's accounts. Timers
wait in a heap, lazily invalidated like the SLA processor's: an entry whose episode has ended
is dropped when it comes up.
"""

from __future__ import annotations

import heapq
from datetime import datetime
from itertools import count

from loopservice.domain import followups, patterns
from loopservice.domain.events import (
    AccountUpdated,
    AgentReplied,
    CaseOpened,
    Event,
    NoteAdded,
    PolicyPublished,
    SurveyAnswered,
)
from loopservice.domain.patterns import PatternRules
from loopservice.domain.policy import Policy
from loopservice.domain.signals import Signal, SlaBreached, SlaBreachRetracted
from loopservice.streams.rules import RulesBook

_CASE_TYPES = frozenset(
    {
        "case.customer_message",
        "case.agent_replied",
        "case.status_changed",
        "case.handed_off",
        "case.resolved",
        "case.reopened",
        "case.closed",
        "case.merged",
    }
)


class CasePatternProcessor:
    """repeat_contact, reopen_loop, handoff_pingpong and (timer) stale_waiting."""

    name = "case-patterns"

    def __init__(self, rules: PatternRules | None = None) -> None:
        self.rules = rules or PatternRules()
        self.last_open: dict[tuple[str, str, str], patterns.LastOpen] = {}
        self.cases: dict[tuple[str, str], patterns.CaseWatch] = {}
        self._queue: list[tuple[datetime, int, tuple[str, str], datetime]] = []
        self._seq = count()

    def handle(self, event: Event) -> list[Signal]:
        if isinstance(event, CaseOpened):
            assert event.case_id is not None
            key = (event.tenant_id, event.case_id)
            if key in self.cases:
                return []
            self.cases[key] = patterns.watch_case(event)
            topic = (event.tenant_id, event.account_id, event.topic)
            self.last_open[topic], found = patterns.repeat_contact(
                self.last_open.get(topic), event, self.rules
            )
            return list(found)
        if event.type not in _CASE_TYPES or event.case_id is None:
            return []
        case = self.cases.get((event.tenant_id, event.case_id))
        if case is None:
            return []
        out: list[Signal] = []
        # The case's own timer first when it came due before this event occurred, so what a
        # case gets does not depend on the engine's watermark (see `sla.fire_due_before`).
        due = patterns.stale_due(case, self.rules)
        if due is not None and due < event.occurred_at and case.stale_since is not None:
            stale = patterns.fire_stale(case, case.stale_since, due, self.rules)
            if stale is not None:
                out.append(stale)
        out += patterns.evolve_case(case, event, self.rules)
        if event.type in ("case.closed", "case.merged"):
            del self.cases[case.key]  # resolved cases stay: they may be reopened
            return out
        due = patterns.stale_due(case, self.rules)
        if due is not None and case.stale_since != case.scheduled:
            case.scheduled = case.stale_since
            assert case.stale_since is not None
            heapq.heappush(self._queue, (due, next(self._seq), case.key, case.stale_since))
        return out

    def advance(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        queue = self._queue
        while queue and queue[0][0] <= watermark:
            due, _, key, since = heapq.heappop(queue)
            case = self.cases.get(key)
            if case is None:
                continue
            found = patterns.fire_stale(case, since, due, self.rules)
            if found is not None:
                out.append(found)
        return out

    def next_due(self) -> datetime | None:
        return self._queue[0][0] if self._queue else None


class TopicSurgeProcessor:
    """topic_surge per tenant and topic, from bucketed counts this processor owns: per topic,
    and per tenant over all its topics (the shape of the tenant's day scales a topic's
    baseline).

    Openings are counted in event-time order as the watermark passes them, not in arrival
    order: under Kafka they arrive from many partitions interleaved differently on every run,
    and the signal (which case tips the count, the evidence) must not depend on that. An opening
    that arrives below the watermark (late) is counted at once.
    """

    name = "topic-surge"

    def __init__(self, rules: PatternRules | None = None) -> None:
        self.rules = rules or PatternRules()
        self.rates: dict[tuple[str, str], patterns.TopicRate] = {}
        self.tenant_rates: dict[str, patterns.TopicRate] = {}  # all topics: the day's shape
        self.history_from: dict[str, datetime] = {}
        self._pending: list[tuple[datetime, str, CaseOpened]] = []
        self._pending_ids: set[str] = set()
        self._watermark: datetime | None = None

    def handle(self, event: Event) -> list[Signal]:
        if not isinstance(event, CaseOpened) or event.event_id in self._pending_ids:
            return []
        first = self.history_from.get(event.tenant_id)
        if first is None or event.occurred_at < first:
            self.history_from[event.tenant_id] = event.occurred_at
        if self._watermark is not None and event.occurred_at <= self._watermark:
            return self._count(event)
        heapq.heappush(self._pending, (event.occurred_at, event.event_id, event))
        self._pending_ids.add(event.event_id)
        return []

    def advance(self, watermark: datetime) -> list[Signal]:
        if self._watermark is None or watermark > self._watermark:
            self._watermark = watermark
        out: list[Signal] = []
        while self._pending and self._pending[0][0] <= watermark:
            _, event_id, event = heapq.heappop(self._pending)
            self._pending_ids.discard(event_id)
            out += self._count(event)
        return out

    def next_due(self) -> datetime | None:
        return self._pending[0][0] if self._pending else None

    def _count(self, event: CaseOpened) -> list[Signal]:
        key = (event.tenant_id, event.topic)
        rate = self.rates.get(key)
        if rate is None:
            rate = self.rates[key] = patterns.TopicRate()
        if any(r[1] == event.event_id for r in rate.recent):
            return []  # a repeated submission of an opening already counted
        tenant = self.tenant_rates.get(event.tenant_id)
        if tenant is None:
            tenant = self.tenant_rates[event.tenant_id] = patterns.TopicRate()
        first = self.history_from[event.tenant_id]
        return list(patterns.surge(rate, event, first, self.rules, tenant))


class BreachClusterProcessor:
    """breach_cluster per tenant and team, from the SLA processor's breaches.

    Processors see events, not signals: the topology taps the SLA processor and hands its
    signals to `observe` in the same step (as for the health model). Breaches are counted in
    the order of their due instants as the watermark passes them (the SLA processor fires a
    breach once the watermark reaches its due instant, and runs first), so the clusters and
    their evidence do not depend on the order in which accounts' breaches happened to be
    derived; one that arrives below the watermark already passed (a late case) is counted at
    the next record. It never needs a clock tick of its own.
    """

    name = "breach-cluster"

    def __init__(self, rules: RulesBook[Policy]) -> None:
        self.rules = rules
        self.teams: dict[tuple[str, str], patterns.TeamBreaches] = {}
        self._pending: list[tuple[datetime, str, SlaBreached]] = []
        self._watermark: datetime | None = None

    def observe(self, signals: list[Signal]) -> None:
        for signal in signals:
            if isinstance(signal, SlaBreached):
                if signal.team is not None and signal.case_id is not None:
                    heapq.heappush(self._pending, (signal.due_at, signal.signal_id, signal))
            elif isinstance(signal, SlaBreachRetracted):
                if any(p[1] == signal.retracts for p in self._pending):
                    self._pending = [p for p in self._pending if p[1] != signal.retracts]
                    heapq.heapify(self._pending)
                if signal.team is not None:
                    team = self.teams.get((signal.tenant_id, signal.team.value))
                    if team is not None:
                        patterns.unbreach(team, signal.retracts)

    def handle(self, event: Event) -> list[Signal]:
        if isinstance(event, PolicyPublished):
            self.rules.publish(event)  # idempotent: the book is shared with the other processors
        return self.count_late()

    def count_late(self) -> list[Signal]:
        """What `handle` derives from any event: the clusters of the breaches the SLA processor
        derived late (their due instants already below the watermark)."""
        if self._watermark is None:
            return []
        return self._count(self._watermark)

    def advance(self, watermark: datetime) -> list[Signal]:
        if self._watermark is None or watermark > self._watermark:
            self._watermark = watermark
        return self._count(self._watermark)

    def next_due(self) -> datetime | None:
        return None  # it counts what the SLA processor's own timers fire

    def pending_due(self) -> datetime | None:
        """The earliest due instant of a breach observed and not yet counted: `advance` to a
        watermark below it counts nothing."""
        return self._pending[0][0] if self._pending else None

    def _count(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        while self._pending and self._pending[0][0] <= watermark:
            _, _, breach = heapq.heappop(self._pending)
            assert breach.team is not None
            key = (breach.tenant_id, breach.team.value)
            team = self.teams.get(key)
            if team is None:
                team = self.teams[key] = patterns.TeamBreaches()
            policy = self.rules.in_force(breach.due_at)
            out += patterns.breach_cluster(team, breach, policy.breach_cluster, policy.version)
        return out


class FollowupProcessor:
    """The inner loop: detractor follow-ups opened, closed, and (timer) overdue."""

    name = "followups"

    def __init__(self, rules: PatternRules | None = None) -> None:
        self.rules = rules or PatternRules()
        self.accounts: dict[tuple[str, str], followups.AccountLoop] = {}
        self._queue: list[tuple[datetime, int, tuple[str, str], str]] = []
        self._seq = count()

    def handle(self, event: Event) -> list[Signal]:
        if not isinstance(event, AccountUpdated | SurveyAnswered | NoteAdded | AgentReplied):
            return []
        key = (event.tenant_id, event.account_id)
        loop = self.accounts.get(key)
        if loop is None:
            if not isinstance(event, AccountUpdated | SurveyAnswered):
                return []  # nothing is owed on an account never surveyed or owned
            loop = self.accounts[key] = followups.AccountLoop(event.tenant_id, event.account_id)
        out: list[Signal] = []
        for survey_id, followup in sorted(loop.open.items(), key=lambda item: item[1].due_at):
            if followup.due_at < event.occurred_at:  # came due first (`sla.fire_due_before`)
                found = followups.fire_overdue(loop, survey_id, followup.due_at, self.rules)
                if found is not None:
                    out.append(found)
        out += followups.evolve(loop, event, self.rules)
        if isinstance(event, SurveyAnswered):
            opened = loop.open.get(event.event_id)
            if opened is not None:
                heapq.heappush(self._queue, (opened.due_at, next(self._seq), key, event.event_id))
        return out

    def advance(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        queue = self._queue
        while queue and queue[0][0] <= watermark:
            _, _, key, survey_id = heapq.heappop(queue)
            loop = self.accounts.get(key)
            if loop is None:
                continue
            found = followups.fire_overdue(loop, survey_id, watermark, self.rules)
            if found is not None:
                out.append(found)
        return out

    def next_due(self) -> datetime | None:
        return self._queue[0][0] if self._queue else None

    def open_followups(self) -> int:
        return sum(len(loop.open) for loop in self.accounts.values())
