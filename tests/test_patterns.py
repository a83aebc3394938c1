"""Pattern detectors driven through the embedded engine on a real SQLite log."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from factories import T0, event, message, opened
from loopservice.domain.events import Event, clock_tick
from loopservice.domain.patterns import Baseline, PatternRules, TopicRate, baseline
from loopservice.domain.signals import PatternDetected, Signal
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.streams.clock import FixedClock
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.pattern_processors import CasePatternProcessor, TopicSurgeProcessor

AGENT = {"kind": "agent", "id": "ag-1", "team": "support"}
DAY = 24 * 60


class Harness:
    def __init__(self, path: Path, rules: PatternRules | None = None) -> None:
        ds = open_datastore(path / "loop.db")
        self.log = interaction_log(ds)
        self.signals = signal_log(ds)
        self.cases = CasePatternProcessor(rules)
        self.surges = TopicSurgeProcessor(rules)
        self.engine = EmbeddedEngine(self.log, self.signals, [self.cases, self.surges])

    def feed(self, *events: Event) -> list[PatternDetected]:
        self.log.append(list(events))
        out: list[Signal] = []
        while records := self.log.read(self.engine.position, 100):
            out += self.engine.process(records)
        assert all(isinstance(s, PatternDetected) for s in out)
        return [s for s in out if isinstance(s, PatternDetected)]

    def tick(self, minutes: float) -> list[PatternDetected]:
        return self.feed(clock_tick(T0 + timedelta(minutes=minutes)))


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def names(signals: list[PatternDetected]) -> list[str]:
    return [s.pattern for s in signals]


def surges(signals: list[PatternDetected]) -> list[PatternDetected]:
    return [s for s in signals if s.pattern == "topic_surge"]


# --- repeat contact ----------------------------------------------------------------------


def test_repeat_contact_within_the_window_names_both_openings(h: Harness) -> None:
    assert h.feed(opened(0, case="c1")) == []
    out = h.feed(opened(3 * DAY, case="c2"))
    assert names(out) == ["repeat_contact"]
    found = out[0]
    assert found.evidence == ("ev-0", f"ev-{3 * DAY}") == found.caused_by
    assert found.key == "acct-1/login" and found.case_id == "c2"
    assert found.signal_id == "pattern/repeat_contact/acme/acct-1/login/c2"
    assert found.detected_at == T0 + timedelta(days=3)


def test_no_repeat_on_another_topic_account_or_after_the_window(h: Harness) -> None:
    h.feed(opened(0, case="c1"))
    assert h.feed(opened(10, case="c2", topic="billing")) == []
    assert h.feed(opened(20, case="c3", account_id="acct-2")) == []
    assert h.feed(opened(8 * DAY, case="c4")) == []
    assert names(h.feed(opened(9 * DAY, case="c5"))) == ["repeat_contact"]  # 1 day after c4


def test_a_duplicate_open_of_the_same_case_is_no_repeat(h: Harness) -> None:
    h.feed(opened(0, case="c1"))
    assert h.feed(opened(5, case="c1")) == []


# --- reopen loop -------------------------------------------------------------------------


def test_second_reopen_is_a_loop_signalled_once(h: Harness) -> None:
    h.feed(opened(0), event("case.resolved", 10, resolution_code="fixed", actor=AGENT))
    assert h.feed(event("case.reopened", 20)) == []
    h.feed(event("case.resolved", 30, resolution_code="fixed", actor=AGENT))
    out = h.feed(event("case.reopened", 40))
    assert names(out) == ["reopen_loop"]
    assert out[0].evidence == ("ev-20", "ev-40") and out[0].signal_id.endswith("/acme/c1")
    h.feed(event("case.resolved", 50, resolution_code="fixed", actor=AGENT))
    assert h.feed(event("case.reopened", 60)) == []


# --- handoff ping-pong -------------------------------------------------------------------


def handoff(n: int, a: str, b: str) -> Event:
    return event("case.handed_off", n, from_team=a, to_team=b, actor=AGENT)


def test_handoff_back_to_a_team_it_left_is_ping_pong(h: Harness) -> None:
    h.feed(opened(0))
    assert h.feed(handoff(10, "support", "success")) == []
    out = h.feed(handoff(20, "success", "support"))
    assert names(out) == ["handoff_pingpong"]
    assert out[0].evidence == ("ev-10", "ev-20")
    assert "handed back to support" in out[0].detail
    assert h.feed(handoff(30, "support", "success")) == []  # once per case


def test_many_handoffs_without_return_are_ping_pong(tmp_path: Path) -> None:
    h = Harness(tmp_path, PatternRules(handoff_pingpong_max=2))
    h.feed(opened(0))
    assert h.feed(handoff(10, "support", "success")) == []
    out = h.feed(handoff(20, "success", "onboarding"))
    assert names(out) == ["handoff_pingpong"] and out[0].detail == "2 handoffs"


# --- stale waiting -----------------------------------------------------------------------


def waiting_then_customer_replies(h: Harness) -> None:
    h.feed(opened(0), event("case.agent_replied", 5, actor=AGENT))
    h.feed(event("case.status_changed", 6, status="waiting_on_customer", actor=AGENT))
    h.feed(message(30))


def test_waiting_on_customer_after_the_customer_replied_goes_stale(h: Harness) -> None:
    waiting_then_customer_replies(h)
    assert h.tick(30 + 239) == []
    out = h.tick(30 + 240)
    assert names(out) == ["stale_waiting"]
    assert out[0].evidence == ("ev-6", "ev-30")
    assert out[0].detected_at == T0 + timedelta(minutes=270)
    assert (
        out[0].signal_id
        == f"pattern/stale_waiting/acme/c1/{(T0 + timedelta(minutes=30)).isoformat()}"
    )
    assert h.tick(600) == []  # once per episode


def test_an_agent_reply_or_leaving_waiting_ends_the_episode(h: Harness) -> None:
    waiting_then_customer_replies(h)
    h.feed(event("case.agent_replied", 100, actor=AGENT))
    assert h.tick(600) == []
    h.feed(message(700))  # customer speaks last again, still waiting: a new episode
    h.feed(event("case.status_changed", 710, status="open", actor=AGENT))
    assert h.tick(1000) == []


def test_a_new_episode_is_a_new_signal(h: Harness) -> None:
    waiting_then_customer_replies(h)
    assert names(h.tick(300)) == ["stale_waiting"]
    h.feed(event("case.agent_replied", 310, actor=AGENT), message(320))
    out = h.tick(320 + 240)
    assert names(out) == ["stale_waiting"] and out[0].evidence == ("ev-6", "ev-320")


def test_no_stale_waiting_when_the_agent_spoke_last(h: Harness) -> None:
    h.feed(opened(0), event("case.agent_replied", 5, actor=AGENT))
    h.feed(event("case.status_changed", 6, status="waiting_on_customer", actor=AGENT))
    assert h.tick(DAY) == []


# --- topic surge -------------------------------------------------------------------------


def background(days: int, start: int = 0) -> list[Event]:
    """One case every six hours on rotating topics, across accounts: a quiet tenant."""
    topics = ("login", "billing", "export", "api")
    return [
        opened(start + i * 360, case=f"bg{i}", topic=topics[i % 4], account_id=f"acct-{i % 7}")
        for i in range(days * 4)
    ]


def burst(n0: int, count: int, *, spacing: float = 5, topic: str = "outage") -> list[Event]:
    return [
        opened(n0 + i, at=T0 + timedelta(minutes=n0 + i * spacing), case=f"s{n0 + i}",
               topic=topic, account_id=f"acct-{100 + i}")
        for i in range(count)
    ]  # fmt: skip


def settled(*events: Event) -> list[Event]:
    """The events, then a clock tick just past the last: openings are counted in event-time
    order as the watermark passes them."""
    return [*events, clock_tick(max(e.occurred_at for e in events) + timedelta(seconds=2))]


def test_a_burst_on_one_topic_is_a_surge_signalled_once_per_episode(h: Harness) -> None:
    assert surges(h.feed(*settled(*background(3)))) == []
    start = 3 * DAY + 180  # midway between the background's cases
    assert surges(h.feed(*settled(*burst(start, 2)))) == []  # below the minimum count
    out = surges(h.feed(*settled(*burst(start + 30, 1))))
    assert len(out) == 1
    surge = out[0]
    assert surge.key == "acme/outage" and surge.account_id == "*" and surge.case_id is None
    assert len(surge.evidence) == 3 and surge.evidence[0] == f"ev-{start}"
    onset = (T0 + timedelta(minutes=start)).isoformat()
    assert surge.signal_id == f"pattern/topic_surge/acme/outage/{onset}"
    # still surging: no second signal for the same episode
    assert surges(h.feed(*settled(*burst(start + 60, 6, spacing=3)))) == []
    # quiet for longer than the window, then a new burst is a new episode
    out = surges(h.feed(*settled(*burst(start + DAY, 5))))
    assert len(out) == 1 and out[0].signal_id != surge.signal_id


def test_a_busy_topic_needs_more_than_its_usual_rate(h: Harness) -> None:
    # "login" sees a case every 15 minutes for 4 days: 4 in every 1 h window, and a count of
    # 17 has Poisson probability 1.1e-6 at mean 4, above surge_alpha; 18 has 2.5e-7
    usual = [
        opened(i, at=T0 + timedelta(minutes=15 * i), case=f"u{i}", account_id=f"acct-{i}")
        for i in range(4 * 96)
    ]
    assert surges(h.feed(*settled(*usual))) == []
    spike = [
        opened(10_000 + i, at=T0 + timedelta(days=4, minutes=i), case=f"p{i}", account_id="x")
        for i in range(15)
    ]
    assert surges(h.feed(*settled(*spike[:14]))) == []  # 3 usual + 14 = 17 in the hour
    out = surges(h.feed(*settled(spike[14])))
    assert len(out) == 1 and "18 cases on login in 60 min" in out[0].detail


def test_no_surge_before_the_tenant_has_history(h: Harness) -> None:
    assert surges(h.feed(*settled(*burst(0, 10)))) == []


def rare(days: int) -> list[Event]:
    """The quiet tenant, plus a "webhooks" case every fourth day at 13:00: a rare topic."""
    return background(days) + [
        opened(50_000 + d, at=T0 + timedelta(days=d, hours=4), case=f"w{d}", topic="webhooks",
               account_id=f"acct-{d % 7}")
        for d in range(0, days, 4)
    ]  # fmt: skip


def test_three_cases_in_half_an_hour_on_a_rare_topic_are_a_surge(h: Harness) -> None:
    # the shape the fixed minimum of 5 in 2 h used to miss: a small tenant's incident whose
    # first hour brings only three cases on a topic it sees about once in four days
    assert surges(h.feed(*settled(*rare(14)))) == []
    start = 14 * DAY + 120
    out = surges(h.feed(*settled(*burst(start, 3, spacing=12, topic="webhooks"))))
    assert len(out) == 1 and out[0].key == "acme/webhooks"
    assert out[0].detected_at == T0 + timedelta(minutes=start + 24)
    assert "3 cases on webhooks in 60 min" in out[0].detail


def test_an_earlier_surge_does_not_raise_the_bar_for_the_next(h: Harness) -> None:
    assert surges(h.feed(*settled(*rare(14)))) == []
    first = surges(h.feed(*settled(*burst(14 * DAY + 120, 30, spacing=4, topic="webhooks"))))
    assert len(first) == 1
    # six days later, the 30 cases still inside the 14-day baseline: three are a surge again
    start = 20 * DAY + 120
    out = surges(h.feed(*settled(*burst(start, 3, spacing=12, topic="webhooks"))))
    assert len(out) == 1 and out[0].signal_id != first[0].signal_id


def in_time_order(events: list[Event]) -> list[Event]:
    return sorted(events, key=lambda e: e.occurred_at)


def morning_peak(h: Harness, days: int) -> list[PatternDetected]:
    """Every day at 10:00 the tenant's "billing" queue takes 8 cases in 35 minutes and is
    otherwise quiet. The first three days settle the history; the surges of the rest."""
    peaks = [
        opened(100_000 + d * 100 + i, at=T0 + timedelta(days=d, hours=1, minutes=5 * i),
               case=f"b{d}-{i}", topic="billing", account_id=f"acct-{i}")
        for d in range(days)
        for i in range(8)
    ]  # fmt: skip
    events = in_time_order(background(days) + peaks)
    settle = T0 + timedelta(days=3)
    h.feed(*settled(*[e for e in events if e.occurred_at < settle]))
    return surges(h.feed(*settled(*[e for e in events if e.occurred_at >= settle])))


def test_a_topic_busy_at_the_same_hour_every_day_is_not_a_surge(h: Harness) -> None:
    # against the tenant's day (its mornings are busy) the peak is the usual morning,
    # weekend included
    assert morning_peak(h, 10) == []


def test_without_the_tenant_profile_the_morning_peak_would_fire(tmp_path: Path) -> None:
    # against a flat baseline (0.38 an hour) seven cases in an hour are a surge every morning
    out = morning_peak(Harness(tmp_path, PatternRules(surge_tenant_profile=False)), 10)
    assert len(out) == 7


# --- replay ------------------------------------------------------------------------------


def test_live_run_and_replay_give_the_same_pattern_signals(tmp_path: Path) -> None:
    live = Harness(tmp_path / "live")
    clock = FixedClock(T0)
    script: dict[int, list[Event]] = {
        0: [opened(0, case="c1")],
        10: [event("case.agent_replied", 10, case="c1", actor=AGENT),
             event("case.status_changed", 11, case="c1", status="waiting_on_customer",
                   actor=AGENT)],
        20: [message(20, case="c1"), opened(21, case="c2")],
        40: [event("case.handed_off", 40, case="c2", from_team="support", to_team="success",
                   actor=AGENT)],
        50: [event("case.handed_off", 50, case="c2", from_team="success", to_team="support",
                   actor=AGENT)],
    }  # fmt: skip
    for minute in range(0, 400, 5):
        clock.at = T0 + timedelta(minutes=minute)
        if minute in script:
            live.log.append(script[minute])
        live.engine.catch_up()
        while live.engine.tick_if_due(clock):
            live.engine.catch_up()
    live_signals = [r.value for r in live.signals.read(1, 10_000)]
    assert sorted(s.pattern for s in live_signals if isinstance(s, PatternDetected)) == [
        "handoff_pingpong",
        "repeat_contact",
        "stale_waiting",
    ]

    replay = Harness(tmp_path / "replay")
    replay.log.append([r.value for r in live.log.read(1, 10_000)])
    replay.engine.catch_up()
    replayed = [r.value for r in replay.signals.read(1, 10_000)]
    assert [s.model_dump_json() for s in replayed] == [s.model_dump_json() for s in live_signals]


# --- the surge baseline against its definition ---------------------------------------------


def baseline_by_definition(
    rate: TopicRate, at: datetime, history_from: datetime, rules: PatternRules, minutes: int
) -> Baseline:
    """`patterns.baseline` as its docstring defines it, window by window and bucket by
    bucket (the detector's own code before it summed each bucket once)."""
    bucket_s = rules.surge_bucket_minutes * 60
    width = max(1, minutes // rules.surge_bucket_minutes)
    per_day = 86_400 // bucket_s
    stride = {"none": width, "day": per_day, "week": 7 * per_day}[rules.surge_season]
    now, first = int(at.timestamp()) // bucket_s, int(history_from.timestamp()) // bucket_s
    since = max(first, now - rules.surge_baseline_days * per_day)
    days: dict[int, int] = {}
    for b, c in rate.buckets.items():
        if since <= b < now:
            days[b // per_day] = days.get(b // per_day, 0) + c
    busiest = max(days, key=lambda d: (days[d], d)) if len(days) >= 2 else None
    counts = []
    for j in range(1, rules.surge_baseline_days * per_day // stride + 1):
        end = now - j * stride
        if end - width + 1 < first:
            break
        if end // per_day != busiest:
            counts.append(sum(rate.buckets.get(b, 0) for b in range(end - width + 1, end + 1)))
    if not counts:
        return Baseline(0.0, 0.0, 0)
    total = square = 0.0
    for count in counts:
        total += count
        square += count * count
    mean = total / len(counts)
    return Baseline(mean, math.sqrt(max(0.0, square / len(counts) - mean * mean)), len(counts))


@pytest.mark.parametrize("season", ["none", "day", "week"])
def test_the_surge_baseline_is_its_definition_on_random_histories(season: str) -> None:
    rng = random.Random(season)
    for _ in range(300):
        rules = PatternRules(
            surge_season=season,  # type: ignore[arg-type]
            surge_bucket_minutes=rng.choice([5, 15, 30]),
            surge_baseline_days=rng.choice([1, 3, 14]),
        )
        bucket_s = rules.surge_bucket_minutes * 60
        at = T0 + timedelta(seconds=rng.randrange(40 * 86_400))
        history_from = at - timedelta(seconds=rng.randrange(30 * 86_400))
        now = int(at.timestamp()) // bucket_s
        rate = TopicRate()
        span = rng.choice([20, 400, 4000])  # buckets before `at` (and a few after: late ones)
        for _ in range(rng.randrange(120)):
            b = now - rng.randrange(-5, span)
            rate.buckets[b] = rate.buckets.get(b, 0) + rng.choice([1, 1, 2, 7])
        for minutes in (rng.choice([5, 15, 60, 120, 240, 1440, 3000]), 120, 60):
            got = baseline(rate, at, history_from, rules, minutes)
            assert got == baseline_by_definition(rate, at, history_from, rules, minutes)
