"""Processors, each one concern, written once for both engines."""

from __future__ import annotations

import hashlib
import heapq
from datetime import datetime
from itertools import count
from typing import Any

import orjson

from loopservice.domain import case as case_model
from loopservice.domain import sla
from loopservice.domain.calendar import epoch_us, from_epoch_us
from loopservice.domain.events import (
    AccountUpdated,
    CaseClosed,
    CaseMerged,
    CaseOpened,
    CaseStatus,
    Event,
    HandedOff,
    Level,
    PolicyPublished,
    Priority,
    Team,
    Tier,
)
from loopservice.domain.policy import Policy
from loopservice.domain.signals import HandoffRuleViolated, Signal
from loopservice.domain.sla import SlaRules
from loopservice.streams.rules import RulesBook


class CaseStateProcessor:
    """Keeps every case's state; emits no signals, but its digest pins replay determinism."""

    name = "case-state"

    def __init__(self) -> None:
        self.cases: dict[tuple[str, str], case_model.CaseState] = {}

    def handle(self, event: Event) -> list[Signal]:
        if event.case_id is None:
            return []
        key = (event.tenant_id, event.case_id)
        state = case_model.evolve(self.cases.get(key), event)
        if state is not None:
            self.cases[key] = state
        return []

    def advance(self, watermark: datetime) -> list[Signal]:
        return []

    def next_due(self) -> datetime | None:
        return None

    def digest(self) -> str:
        h = hashlib.sha256()
        for key in sorted(self.cases):
            h.update(orjson.dumps(self.cases[key]))
        return h.hexdigest()


class SlaProcessor:
    """Live SLA clocks for every open case; deadlines wait in one priority queue.

    The queue is lazily invalidated: a timer whose clock has moved on (stopped, paused,
    re-targeted) is dropped when it comes up, so no tick ever scans the open cases.
    """

    name = "sla"

    def __init__(
        self, rules: RulesBook[SlaRules], *, cache: dict[int, CachedRules] | None = None
    ) -> None:
        self.rules = rules
        self.cases: dict[tuple[str, str], sla.CaseClocks] = {}
        self.tiers: dict[tuple[str, str], Tier] = {}
        self._queue: list[tuple[int, int, sla.Timer]] = []  # (epoch µs, order, timer)
        self._cached: dict[int, CachedRules] = {} if cache is None else cache
        self._seq = count()
        self._last: tuple[object, CachedRules] | None = None  # `_fast`'s latest answer
        self._next_due: tuple[int, datetime] | None = None  # `next_due`'s latest answer

    def handle(self, event: Event) -> list[Signal]:
        # Exact classes, not `isinstance`: on a pydantic model a miss goes through `ABCMeta`,
        # and every event would pay for several (the event types are final classes).
        kind = type(event)
        if type(event) is PolicyPublished:
            self.rules.publish(event)
            return []
        if type(event) is AccountUpdated:
            if event.tier is not None:
                self.tiers[(event.tenant_id, event.account_id)] = event.tier
            return []
        if event.case_id is None:
            return []
        key = (event.tenant_id, event.case_id)
        if type(event) is CaseOpened:
            if key in self.cases:
                return []
            rules = self._fast(event.occurred_at)
            case = sla.open_case(event, self.tiers.get((event.tenant_id, event.account_id)), rules)
            self.cases[case.key] = case  # the case's own key tuple, which its timers share
            self._schedule(case, rules)
            return []
        case_clocks = self.cases.get(key)
        if case_clocks is None:
            return []
        rules = self._fast(event.occurred_at)
        at = epoch_us(event.occurred_at)
        signals: list[Signal] = []
        fired = sla.fire_due_before(case_clocks, at, rules)
        if fired:  # what follows the timers just fired (their queued entries will find them done)
            signals += fired
            for clock in case_clocks.clocks.values():
                following = sla.next_timer(case_clocks, clock, rules)
                if following is not None:
                    heapq.heappush(self._queue, (following[0], next(self._seq), following))
        retracted = sla.apply(case_clocks, event, rules, at)
        if retracted:
            signals += retracted
        if kind is CaseClosed or kind is CaseMerged:
            del self.cases[key]  # resolved cases stay: a reopen restarts their clocks
        else:
            self._schedule(case_clocks, rules)
        return signals

    def advance(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        queue = self._queue
        if not queue:
            return out
        limit = epoch_us(watermark)
        while queue and queue[0][0] <= limit:
            timer = queue[0][2]
            case_clocks = self.cases.get(timer[1])
            signal = sla.fire(case_clocks, timer) if case_clocks is not None else None
            if case_clocks is None or signal is None:
                heapq.heappop(queue)
                continue
            out.append(signal)
            clock = case_clocks.clocks[timer[2]]
            following = sla.next_timer(case_clocks, clock, self._fast(signal.detected_at))
            if following is None:
                heapq.heappop(queue)
            else:  # pop and push in one pass; the order of what follows is the same
                heapq.heapreplace(queue, (following[0], next(self._seq), following))
        return out

    def next_due(self) -> datetime | None:
        if not self._queue:
            return None
        at = self._queue[0][0]
        if self._next_due is None or self._next_due[0] != at:  # asked after every record
            self._next_due = (at, from_epoch_us(at))
        return self._next_due[1]

    def _fast(self, at: datetime) -> sla.SlaRules:
        policy = self.rules.in_force(at)
        last = self._last
        if last is not None and last[0] is policy:  # nearly always: policies change rarely
            return last[1]
        cached = self._cached.get(id(policy))
        if cached is None or cached.rules is not policy:
            cached = self._cached[id(policy)] = CachedRules(policy)
        self._last = (policy, cached)
        return cached

    def board(
        self, tenant_id: str, limit: int = 200, team: Team | None = None
    ) -> list[dict[str, object]]:
        """Running clocks of one tenant (and team), the nearest deadline first (the live SLA
        board)."""
        rows: list[dict[str, object]] = []
        for (tenant, case_id), case_clocks in list(self.cases.items()):
            if tenant != tenant_id or (team is not None and case_clocks.team != team):
                continue
            for clock in list(case_clocks.clocks.values()):
                if clock.due_at is None:
                    continue
                rows.append(
                    {
                        "case_id": case_id,
                        "account_id": case_clocks.account_id,
                        "team": case_clocks.team.value,
                        "priority": case_clocks.priority.value,
                        "priority_source": case_clocks.priority_source,
                        "metric": clock.metric,
                        "cycle": clock.cycle,
                        "due_at": clock.due_at.isoformat(),
                        "breached": "breach" in clock.fired,
                        "policy_version": clock.policy_version,
                    }
                )
        rows.sort(key=lambda r: str(r["due_at"]))
        return rows[:limit]

    def queues(self, tenant_id: str) -> list[dict[str, object]]:
        """Per team: cases with a running clock, by priority, breached, nearest deadline."""
        teams: dict[Team, dict[str, Any]] = {}
        for (tenant, _), case_clocks in list(self.cases.items()):
            dues = [c.due_at for c in case_clocks.clocks.values() if c.due_at is not None]
            if tenant != tenant_id or not dues:
                continue
            queue = teams.setdefault(
                case_clocks.team,
                {"team": case_clocks.team.value, "cases": 0, "by_priority": {}, "breached": 0,
                 "next_due": None},
            )  # fmt: skip
            queue["cases"] += 1
            priority = case_clocks.priority.value
            queue["by_priority"][priority] = queue["by_priority"].get(priority, 0) + 1
            if any("breach" in c.fired for c in case_clocks.clocks.values()):
                queue["breached"] += 1
            nearest = min(dues)
            if queue["next_due"] is None or nearest < queue["next_due"]:
                queue["next_due"] = nearest
        rows = sorted(teams.values(), key=lambda q: str(q["team"]))
        for row in rows:
            row["next_due"] = row["next_due"].isoformat()
        return rows

    def open_clocks(self) -> int:
        return sum(len(c.clocks) for c in self.cases.values())

    def _schedule(self, case_clocks: sla.CaseClocks, rules: sla.SlaRules) -> None:
        timers = sla.new_timers(case_clocks, rules)
        if not timers:
            return
        queue = self._queue
        for timer in timers:
            heapq.heappush(queue, (timer[0], next(self._seq), timer))
        if len(queue) > 16 and len(queue) > 4 * len(self.cases):
            self._compact()

    def _compact(self) -> None:
        """Drops queued timers whose clock has moved on: lazily invalidated entries would
        otherwise pile up until their (possibly far) instants pass."""
        self._queue = [entry for entry in self._queue if self._live(entry[2])]
        heapq.heapify(self._queue)

    def _live(self, timer: sla.Timer) -> bool:
        _, key, metric, cycle, kind, due = timer
        case_clocks = self.cases.get(key)
        clock = case_clocks.clocks.get(metric) if case_clocks is not None else None
        return (
            clock is not None
            and clock.cycle == cycle
            and clock.due == due
            and kind not in clock.fired
        )


class HandoffProcessor:
    """Checks each handoff against the policy; a broken rule is signalled, the handoff stands."""

    name = "handoff-rules"

    def __init__(self, rules: RulesBook[Policy]) -> None:
        self.rules = rules
        self.handoffs: dict[tuple[str, str], int] = {}

    def handle(self, event: Event) -> list[Signal]:
        if isinstance(event, PolicyPublished):
            self.rules.publish(event)
            return []
        if not isinstance(event, HandedOff):
            return []
        assert event.case_id is not None
        key = (event.tenant_id, event.case_id)
        before = self.handoffs.get(key, 0)
        self.handoffs[key] = before + 1
        policy = self.rules.in_force(event.occurred_at)
        return [
            HandoffRuleViolated(
                signal_id=f"handoff.rule_violated/{event.tenant_id}/{event.event_id}/{n}",
                tenant_id=event.tenant_id,
                account_id=event.account_id,
                case_id=event.case_id,
                detected_at=event.occurred_at,
                caused_by=(event.event_id,),
                policy_version=policy.version,
                rule=rule,
                from_team=event.from_team,
                to_team=event.to_team,
                detail=f"handoff {before + 1} of this case",
            )
            for n, rule in enumerate(policy.handoffs.violations(event, before))
        ]

    def advance(self, watermark: datetime) -> list[Signal]:
        return []

    def next_due(self) -> datetime | None:
        return None


class CachedRules:
    """Memoises a policy's answers: the SLA hot path asks the same few questions millions of
    times, and a policy is immutable once published."""

    def __init__(self, rules: sla.SlaRules) -> None:
        self.rules = rules
        self.version = rules.version
        self._warnings = rules.warning_percents()
        self._priority: dict[tuple[Level, Level, Tier | None], Priority] = {}
        self._targets: dict[tuple[sla.Metric, Priority, Tier | None], float] = {}
        self._pauses: dict[tuple[sla.Metric, CaseStatus], bool] = {}
        self._calendars: dict[tuple[Team, Tier | None], sla.Calendar] = {}

    def priority_for(self, impact: Level, urgency: Level, tier: Tier | None) -> Priority:
        key = (impact, urgency, tier)
        found = self._priority.get(key)
        if found is None:
            found = self._priority[key] = self.rules.priority_for(impact, urgency, tier)
        return found

    def target_seconds(self, metric: sla.Metric, priority: Priority, tier: Tier | None) -> float:
        key = (metric, priority, tier)
        found = self._targets.get(key)
        if found is None:
            found = self._targets[key] = self.rules.target_seconds(metric, priority, tier)
        return found

    def pauses(self, metric: sla.Metric, status: CaseStatus) -> bool:
        key = (metric, status)
        found = self._pauses.get(key)
        if found is None:
            found = self._pauses[key] = self.rules.pauses(metric, status)
        return found

    def warning_percents(self) -> tuple[int, ...]:
        return self._warnings

    def calendar_for(self, team: Team, tier: Tier | None) -> sla.Calendar:
        key = (team, tier)
        found = self._calendars.get(key)
        if found is None:
            found = self._calendars[key] = self.rules.calendar_for(team, tier)
        return found
