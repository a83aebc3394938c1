"""The inner loop, driven through the embedded engine on a real SQLite log."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from factories import T0, event
from loopservice.domain.events import Event, clock_tick
from loopservice.domain.patterns import PatternRules
from loopservice.domain.signals import PatternDetected, Signal
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.streams.clock import FixedClock
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.pattern_processors import FollowupProcessor

OWNER = {"kind": "agent", "id": "csm-1", "team": "success"}
OTHER = {"kind": "agent", "id": "ag-9", "team": "support"}
HOUR = 60


class Harness:
    def __init__(self, path: Path, rules: PatternRules | None = None) -> None:
        ds = open_datastore(path / "loop.db")
        self.log = interaction_log(ds)
        self.signals = signal_log(ds)
        self.followups = FollowupProcessor(rules)
        self.engine = EmbeddedEngine(self.log, self.signals, [self.followups])

    def feed(self, *events: Event) -> list[PatternDetected]:
        self.log.append(list(events))
        out: list[Signal] = []
        while records := self.log.read(self.engine.position, 100):
            out += self.engine.process(records)
        return [s for s in out if isinstance(s, PatternDetected)]

    def tick(self, minutes: float) -> list[PatternDetected]:
        return self.feed(clock_tick(T0 + timedelta(minutes=minutes)))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    hh = Harness(tmp_path)
    hh.feed(owner(0, "csm-1"))
    return hh


def owner(n: int, owner_id: str) -> Event:
    return event("account.updated", n, case=None, owner_id=owner_id,
                 actor={"kind": "system", "id": "crm"})  # fmt: skip


def survey(n: int, kind: str, score: int, **kw: Any) -> Event:
    return event("survey.answered", n, case=None, kind=kind, score=score, **kw)


def note(n: int, actor: dict[str, str], **kw: Any) -> Event:
    return event("case.note_added", n, body="called the customer", actor=actor, **kw)


def names(signals: list[PatternDetected]) -> list[str]:
    return [s.pattern for s in signals]


def test_a_detractor_opens_a_followup_owed_by_the_owner(h: Harness) -> None:
    out = h.feed(survey(10, "nps", 6))
    assert names(out) == ["followup.opened"]
    opened = out[0]
    assert opened.signal_id == "pattern/followup.opened/acme/ev-10"
    assert opened.caused_by == ("ev-10",) and opened.key == "acct-1"
    assert "owed by csm-1" in opened.detail
    assert (T0 + timedelta(minutes=10, hours=48)).isoformat() in opened.detail


@pytest.mark.parametrize(("kind", "score"), [("nps", 7), ("nps", 10), ("csat", 3), ("ces", 1)])
def test_no_followup_for_passives_promoters_or_ces(h: Harness, kind: str, score: int) -> None:
    assert h.feed(survey(10, kind, score)) == []


def test_csat_detractor_threshold(h: Harness) -> None:
    assert names(h.feed(survey(10, "csat", 2))) == ["followup.opened"]


def test_the_owners_note_closes_the_loop_with_time_to_close(h: Harness) -> None:
    h.feed(survey(10, "nps", 3))
    assert h.feed(note(20, OTHER)) == []  # someone else's note does not close it
    out = h.feed(note(10 + 5 * HOUR, OWNER))
    assert names(out) == ["followup.closed"]
    closed = out[0]
    assert closed.signal_id == "pattern/followup.closed/acme/ev-10"
    assert closed.evidence == ("ev-10", f"ev-{10 + 5 * HOUR}")
    assert "closed in time after 5h 0m (time_to_close_s=18000)" in closed.detail
    assert h.tick(60 * HOUR) == []  # closed: never overdue


def test_a_public_reply_by_the_new_owner_closes_it(h: Harness) -> None:
    h.feed(survey(10, "nps", 0), owner(20, "csm-2"))
    out = h.feed(event("case.agent_replied", 30, actor={"kind": "agent", "id": "csm-2"}))
    assert names(out) == ["followup.closed"]


def test_a_later_non_detractor_answer_closes_it(h: Harness) -> None:
    h.feed(survey(10, "nps", 2))
    assert h.feed(survey(20, "csat", 5)) == []  # another kind of survey: still open
    out = h.feed(survey(30, "nps", 9))
    assert names(out) == ["followup.closed"] and "no longer a detractor" in out[0].detail


def test_recovery_closing_can_be_switched_off(tmp_path: Path) -> None:
    h = Harness(tmp_path, PatternRules(followup_closed_by_recovery=False))
    h.feed(owner(0, "csm-1"), survey(10, "nps", 2))
    assert h.feed(survey(30, "nps", 9)) == []


def test_overdue_fires_on_the_watermark_then_a_late_close(h: Harness) -> None:
    h.feed(survey(10, "nps", 4))
    assert h.tick(10 + 48 * HOUR - 1) == []
    out = h.tick(10 + 48 * HOUR)
    assert names(out) == ["followup.overdue"]
    assert out[0].detected_at == T0 + timedelta(minutes=10, hours=48)
    assert out[0].signal_id == "pattern/followup.overdue/acme/ev-10"
    assert h.tick(100 * HOUR) == []  # once
    out = h.feed(note(101 * HOUR, OWNER))
    assert names(out) == ["followup.closed"] and "closed late" in out[0].detail


def test_each_detractor_answer_is_its_own_followup(h: Harness) -> None:
    h.feed(survey(10, "nps", 1), survey(20, "csat", 1))
    out = h.feed(note(30, OWNER))
    assert sorted(s.signal_id for s in out) == [
        "pattern/followup.closed/acme/ev-10",
        "pattern/followup.closed/acme/ev-20",
    ]


def test_a_note_that_occurred_before_the_survey_does_not_close_it(h: Harness) -> None:
    h.feed(survey(100, "nps", 1))
    assert h.feed(note(50, OWNER)) == []  # arrives late, happened before the answer


def test_without_a_known_owner_any_agent_closes_it(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    out = h.feed(survey(10, "nps", 1))
    assert "no known owner" in out[0].detail
    assert names(h.feed(note(20, OTHER))) == ["followup.closed"]


def test_live_run_and_replay_give_the_same_followup_signals(tmp_path: Path) -> None:
    live = Harness(tmp_path / "live")
    clock = FixedClock(T0)
    script = {
        0: [owner(0, "csm-1")],
        60: [survey(60, "nps", 2, account_id="acct-1")],
        120: [survey(120, "csat", 1, account_id="acct-2")],
        600: [note(600, OWNER)],
    }
    for minute in range(0, 60 * HOUR, 30):
        clock.at = T0 + timedelta(minutes=minute)
        if minute in script:
            live.log.append(script[minute])
        live.engine.catch_up()
        while live.engine.tick_if_due(clock):
            live.engine.catch_up()
    live_signals = [r.value for r in live.signals.read(1, 10_000)]
    assert [s.pattern for s in live_signals if isinstance(s, PatternDetected)] == [
        "followup.opened",
        "followup.opened",
        "followup.closed",
        "followup.overdue",
    ]

    replay = Harness(tmp_path / "replay")
    replay.log.append([r.value for r in live.log.read(1, 10_000)])
    replay.engine.catch_up()
    replayed = [r.value for r in replay.signals.read(1, 10_000)]
    assert [s.model_dump_json() for s in replayed] == [s.model_dump_json() for s in live_signals]
