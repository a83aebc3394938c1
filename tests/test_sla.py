"""Scenario tests of the SLA clocks, driven through the embedded engine and a real log."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from factories import T0, event, message, opened
from fake_rules import FakeRules
from loopservice.domain.events import Event, clock_tick
from loopservice.domain.signals import Signal, SlaBreached, SlaBreachRetracted, SlaWarning
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.streams.clock import FixedClock
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.processors import CaseStateProcessor, SlaProcessor
from loopservice.streams.rules import RulesBook

AGENT = {"kind": "agent", "id": "ag-1", "team": "support"}


class Harness:
    def __init__(self, path: Path) -> None:
        ds = open_datastore(path / "loop.db")
        self.log = interaction_log(ds)
        self.signals = signal_log(ds)
        self.sla = SlaProcessor(RulesBook(FakeRules(), lambda raw: FakeRules(str(raw["version"]))))
        self.cases = CaseStateProcessor()
        self.engine = EmbeddedEngine(self.log, self.signals, [self.cases, self.sla])

    def feed(self, *events: Event) -> list[Signal]:
        self.log.append(list(events))
        out: list[Signal] = []
        while records := self.log.read(self.engine.position, 100):
            out += self.engine.process(records)
        return out

    def tick(self, minutes: float) -> list[Signal]:
        return self.feed(clock_tick(T0 + timedelta(minutes=minutes)))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def kinds(signals: list[Signal]) -> list[str]:
    return [
        f"{s.type}:{getattr(s, 'metric', '')}:{getattr(s, 'threshold_pct', '')}" for s in signals
    ]


def test_first_response_warns_then_breaches_on_the_watermark(h: Harness) -> None:
    # high impact x medium urgency = P2 in the fake matrix: first response 60 min
    assert h.feed(opened(0)) == []
    assert kinds(h.tick(29)) == []
    assert kinds(h.tick(30)) == ["sla.warning:first_response:50"]
    assert kinds(h.tick(48)) == ["sla.warning:first_response:80"]
    out = h.tick(60)
    assert kinds(out) == ["sla.breached:first_response:"]
    breach = out[0]
    assert isinstance(breach, SlaBreached)
    assert breach.due_at == T0 + timedelta(minutes=60)
    assert breach.caused_by == ("ev-0",)
    assert breach.policy_version == "test-1"
    assert h.tick(61) == []  # fires once


def test_reply_in_time_stops_the_clock(h: Harness) -> None:
    h.feed(opened(0), event("case.agent_replied", 20, actor=AGENT))
    assert not [s for s in h.tick(600) if s.type != "sla.warning" and "first" in s.signal_id]


def test_watermark_allows_lateness_before_firing(h: Harness) -> None:
    h.feed(opened(0))
    # another case's event at due + 0.5 s does not yet move W past the deadline (lateness 1 s)
    out = h.feed(opened(1, case_id="c2", at=T0 + timedelta(minutes=60, seconds=0.5)))
    assert "sla.breached:first_response:" not in kinds(out)
    out = h.feed(opened(2, case_id="c3", at=T0 + timedelta(minutes=60, seconds=1)))
    assert "sla.breached:first_response:" in kinds(out)


def test_a_case_event_after_the_deadline_finds_the_breach_signalled(h: Harness) -> None:
    # The case's own timers come first whatever the watermark, so a reply that occurs after
    # the deadline (still inside the lateness) follows the breach instead of preventing it.
    h.feed(opened(0))
    out = h.feed(event("case.agent_replied", 1, at=T0 + timedelta(minutes=60, seconds=0.5),
                       actor=AGENT))  # fmt: skip
    assert kinds(out) == [
        "sla.warning:first_response:50",
        "sla.warning:first_response:80",
        "sla.breached:first_response:",
    ]
    assert not [s for s in h.tick(600) if s.signal_id in {x.signal_id for x in out}]


def test_waiting_on_customer_pauses_resolution(h: Harness) -> None:
    h.feed(opened(0), event("case.agent_replied", 5, actor=AGENT))
    h.feed(event("case.status_changed", 10, status="waiting_on_customer", actor=AGENT))
    h.feed(event("case.status_changed", 130, status="open", actor=AGENT))
    # P2 resolution 480 min: 10 counted before the pause, due at 130 + 470 = 600
    out = h.tick(599)
    assert "sla.breached:resolution:" not in kinds(out)
    out = h.tick(600)
    breach = next(s for s in out if isinstance(s, SlaBreached) and s.metric == "resolution")
    assert breach.due_at == T0 + timedelta(minutes=600)


def test_priority_change_retargets_keeping_elapsed_time(h: Harness) -> None:
    h.feed(opened(0))  # P2: first response due at 60
    h.feed(event("case.priority_changed", 10, priority="P1", reason="exec escalation",
                 actor=AGENT))  # fmt: skip
    out = h.tick(30)  # P1 first response 30 min: due at 30
    breach = next(s for s in out if isinstance(s, SlaBreached))
    assert breach.metric == "first_response" and breach.priority == "P1"
    assert breach.due_at == T0 + timedelta(minutes=30)


def test_next_response_cycles(h: Harness) -> None:
    h.feed(opened(0), event("case.agent_replied", 5, actor=AGENT))
    h.feed(message(10))
    h.feed(event("case.agent_replied", 20, actor=AGENT))
    h.feed(message(30))
    out = h.tick(30 + 120)
    breaches = [s for s in out if isinstance(s, SlaBreached) and s.metric == "next_response"]
    assert [b.cycle for b in breaches] == [2]
    assert breaches[0].caused_by == ("ev-30",)


def test_late_reply_retracts_the_breach(h: Harness) -> None:
    h.feed(opened(0))
    out = h.tick(61)
    breach = next(s for s in out if isinstance(s, SlaBreached))
    # the reply happened at minute 50 but reaches the log only now
    out = h.feed(event("case.agent_replied", 50, actor=AGENT))
    retraction = next(s for s in out if isinstance(s, SlaBreachRetracted))
    assert retraction.retracts == breach.signal_id
    assert "before the deadline" in retraction.reason
    assert retraction.caused_by == ("ev-0", "ev-50")


def test_reply_after_the_deadline_does_not_retract(h: Harness) -> None:
    h.feed(opened(0))
    h.tick(61)
    out = h.feed(event("case.agent_replied", 70, actor=AGENT))
    assert not [s for s in out if isinstance(s, SlaBreachRetracted)]


def test_reopen_starts_a_new_resolution_cycle(h: Harness) -> None:
    h.feed(opened(0), event("case.agent_replied", 5, actor=AGENT))
    h.feed(event("case.resolved", 60, resolution_code="reset-password", actor=AGENT))
    h.feed(event("case.reopened", 100))
    out = h.tick(100 + 480)
    breach = next(s for s in out if isinstance(s, SlaBreached) and s.metric == "resolution")
    assert breach.cycle == 1 and breach.due_at == T0 + timedelta(minutes=580)


def test_bulk_import_of_old_history_raises_no_false_alarm(h: Harness) -> None:
    # a whole year-old, well-handled case imported at once: no tick, no breach
    events = [
        opened(0),
        event("case.agent_replied", 20, actor=AGENT),
        message(40),
        event("case.agent_replied", 50, actor=AGENT),
        event("case.resolved", 100, resolution_code="fixed", actor=AGENT),
    ]
    assert [s for s in h.feed(*events) if isinstance(s, SlaBreached)] == []


def test_live_run_and_replay_give_the_same_signals(tmp_path: Path) -> None:
    live = Harness(tmp_path / "live")
    clock = FixedClock(T0)
    for minute in range(0, 300, 7):
        clock.at = T0 + timedelta(minutes=minute)
        if minute % 21 == 0:
            live.feed(opened(minute, case=f"c{minute}"))
        live.engine.catch_up()
        while live.engine.tick_if_due(clock):
            live.engine.catch_up()
    live_signals = [r.value for r in live.signals.read(1, 10_000)]
    assert any(isinstance(s, SlaBreached) for s in live_signals)
    assert any(isinstance(s, SlaWarning) for s in live_signals)

    replay = Harness(tmp_path / "replay")
    replay.log.append([r.value for r in live.log.read(1, 10_000)])
    replay.engine.catch_up()
    replayed = [r.value for r in replay.signals.read(1, 10_000)]
    assert [s.model_dump_json() for s in replayed] == [s.model_dump_json() for s in live_signals]
    assert replay.cases.digest() == live.cases.digest()
