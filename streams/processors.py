"""Processors, each one concern, written once for both engines."""

from __future__ import annotations

import hashlib
import heapq
from datetime import datetime
from itertools import count

import orjson

from loopservice.domain import case as case_model
from loopservice.domain import sla
from loopservice.domain.events import (
    AccountUpdated,
    CaseClosed,
    CaseMerged,
    CaseOpened,
    Event,
    PolicyPublished,
    Tier,
)
from loopservice.domain.signals import Signal
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

    def __init__(self, rules: RulesBook) -> None:
        self.rules = rules
        self.cases: dict[tuple[str, str], sla.CaseClocks] = {}
        self.tiers: dict[tuple[str, str], Tier] = {}
        self._queue: list[tuple[datetime, int, sla.Timer]] = []
        self._seq = count()

    def handle(self, event: Event) -> list[Signal]:
        if isinstance(event, PolicyPublished):
            self.rules.publish(event)
            return []
        if isinstance(event, AccountUpdated):
            if event.tier is not None:
                self.tiers[(event.tenant_id, event.account_id)] = event.tier
            return []
        if event.case_id is None:
            return []
        key = (event.tenant_id, event.case_id)
        rules = self.rules.in_force(event.occurred_at)
        if isinstance(event, CaseOpened):
            if key in self.cases:
                return []
            case = sla.open_case(event, self.tiers.get((event.tenant_id, event.account_id)), rules)
            self.cases[key] = case
            self._schedule(case, rules)
            return []
        case_clocks = self.cases.get(key)
        if case_clocks is None:
            return []
        signals: list[Signal] = list(sla.apply(case_clocks, event, rules))
        if isinstance(event, CaseClosed | CaseMerged):
            del self.cases[key]  # resolved cases stay: a reopen restarts their clocks
        else:
            self._schedule(case_clocks, rules)
        return signals

    def advance(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        queue = self._queue
        while queue and queue[0][0] <= watermark:
            _, _, timer = heapq.heappop(queue)
            case_clocks = self.cases.get(timer.case_key)
            if case_clocks is None:
                continue
            signal = sla.fire(case_clocks, timer)
            if signal is not None:
                out.append(signal)
        return out

    def next_due(self) -> datetime | None:
        return self._queue[0][0] if self._queue else None

    def open_clocks(self) -> int:
        return sum(len(c.clocks) for c in self.cases.values())

    def _schedule(self, case_clocks: sla.CaseClocks, rules: sla.SlaRules) -> None:
        for timer in sla.new_timers(case_clocks, rules):
            heapq.heappush(self._queue, (timer.at, next(self._seq), timer))
