"""The embedded engine around the processors: dead letters and rule signals, on a real log."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from factories import T0, event, opened
from loopservice.bootstrap import build_system
from loopservice.domain.events import Event
from loopservice.domain.signals import HandoffRuleViolated, Signal
from loopservice.infra.settings import Settings
from loopservice.streams.clock import FixedClock

AGENT = {"kind": "agent", "id": "ag-1", "team": "support"}


class Exploding:
    """A processor that fails on one event type, to show the engine dead-letters and goes on."""

    name = "exploding"

    def handle(self, event: Event) -> list[Signal]:
        if event.type == "case.note_added":
            raise ValueError("cannot digest notes")
        return []

    def advance(self, watermark: datetime) -> list[Signal]:
        return []

    def next_due(self) -> datetime | None:
        return None


def system_at(tmp_path: Path):  # type: ignore[no-untyped-def]
    return build_system(
        Settings(data_dir=tmp_path, log_url=f"sqlite:///{tmp_path / 'loop.db'}"), FixedClock(T0)
    )


def test_a_failing_processor_dead_letters_the_event_and_the_loop_goes_on(tmp_path: Path) -> None:
    system = system_at(tmp_path)
    system.engine.processors.append(Exploding())
    note = event("case.note_added", 1, actor=AGENT)
    reply = event("case.agent_replied", 2, actor=AGENT)
    system.log.append([opened(0), note, reply])
    system.engine.catch_up()
    assert system.engine.position == 4
    letters = system.dead_letters.list()
    assert [(d.stage, d.event_id, d.position) for d in letters] == [("exploding", "ev-1", 2)]
    assert "cannot digest notes" in letters[0].reason
    # the other processors saw every event: the reply stopped the first-response clock
    assert "first_response" not in system.sla.cases[("acme", "c1")].clocks


def test_a_handoff_that_breaks_the_policy_is_signalled_and_still_recorded(tmp_path: Path) -> None:
    system = system_at(tmp_path)
    route = {"actor": AGENT, "from_team": "support"}
    bad = event("case.handed_off", 1, to_team="support", reason="", summary="", **route)
    good = event(
        "case.handed_off", 2, to_team="success", reason="renewal", summary="terms", **route
    )
    system.log.append([opened(0), bad, good])
    signals = system.engine.process(system.log.read(1, 10))
    violations = [s for s in signals if isinstance(s, HandoffRuleViolated)]
    assert {v.rule for v in violations} == {
        "handoff support → support is not an allowed route",
        "handoff summary is required and empty",
    }
    assert all(v.caused_by == ("ev-1",) for v in violations)
    assert system.cases.cases[("acme", "c1")].team.value == "success"
