"""Outer-loop trends: weekly cohorts, rising topics with their signals, improvement effects."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from factories import T0, event, opened
from loopservice.domain import trends as tr
from loopservice.domain.events import Event
from loopservice.domain.signals import PatternDetected, Signal, SlaBreached, SlaBreachRetracted
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.loop_api import loop_router
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.projections.loop_queries import LoopQueries
from loopservice.projections.store import memory_view
from loopservice.projections.trends import TrendsFold
from loopservice.projections_cli import open_runner
from loopservice.streams.clock import FixedClock

POLICY = default_policy()
AGENT = {"kind": "agent", "id": "a-1", "team": "support"}
WEEK = timedelta(days=7)
W0 = T0.date().isoformat()  # T0 is a Monday


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        self.n += 1
        return self.n


def case(ids: Ids, name: str, at: datetime, topic: str = "login", *, csat: int | None = None,
         reopen: bool = False, channel: str = "email", tenant: str = "acme",
         **kw: Any) -> list[Event]:  # fmt: skip
    source = {"platform": "zendesk", "channel": channel}
    out = [opened(ids(), at=at, case=name, topic=topic, source=source, tenant_id=tenant, **kw),
           event("case.resolved", ids(), at=at + timedelta(hours=1), case=name, actor=AGENT,
                 resolution_code="fixed", tenant_id=tenant)]  # fmt: skip
    if reopen:
        out.append(event("case.reopened", ids(), at=at + timedelta(hours=2), case=name,
                         tenant_id=tenant))  # fmt: skip
    if csat is not None:
        out.append(event("survey.answered", ids(), at=at + timedelta(days=1), case=name,
                         kind="csat", score=csat, tenant_id=tenant))  # fmt: skip
    return out


def breach(name: str, at: datetime, account: str = "acct-1") -> SlaBreached:
    return SlaBreached(
        signal_id=f"breach/{name}/{at.isoformat()}", tenant_id="acme", account_id=account,
        case_id=name, detected_at=at, caused_by=("x",), metric="first_response", cycle=0,
        due_at=at, priority="P2",
    )  # fmt: skip


def pattern(name: str | None, at: datetime, kind: str, key: str = "k") -> PatternDetected:
    return PatternDetected(
        signal_id=f"pattern/{kind}/{name}/{at.isoformat()}", tenant_id="acme",
        account_id="acct-1" if name else "*", case_id=name, detected_at=at, caused_by=("x",),
        pattern=kind, key=key,
    )  # fmt: skip


class World:
    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "loop.db"
        datastore = open_datastore(path)
        clock = FixedClock(T0 + timedelta(days=400))
        self.log = interaction_log(datastore, clock)
        self.signals = signal_log(datastore, clock)
        self.runner = open_runner(path)
        self.queries = LoopQueries(self.runner.store, POLICY)

    def add(self, events: list[Event] | None = None, signals: list[Signal] | None = None) -> None:
        if events:
            self.log.append(events)
        if signals:
            self.signals.append(signals)
        self.runner.catch_up()


# --- domain ---------------------------------------------------------------------------------


def test_weeks_are_iso_weeks_named_by_their_monday() -> None:
    assert tr.week_of(T0) == W0
    assert tr.week_of(T0 + timedelta(days=6, hours=14)) == W0  # Sunday 23:00 UTC
    assert tr.week_of(T0 + WEEK) == "2026-03-09"
    assert tr.product_area("login", None, {"login": "auth"}) == "auth"
    assert tr.product_area("login", "identity", {"login": "auth"}) == "identity"
    assert tr.product_area("other", None, {}) == "unassigned"


def test_rising_ranks_by_excess_over_the_mean_of_the_weeks_before() -> None:
    weeks = [tr.shift_week(W0, k) for k in range(5)]
    volumes = {
        "login": dict(zip(weeks, [4, 4, 4, 4, 5], strict=True)),  # +1
        "api": dict(zip(weeks, [0, 1, 0, 1, 9], strict=True)),  # +8.5
        "billing": dict(zip(weeks, [6, 6, 6, 6, 2], strict=True)),  # falling
    }
    found = tr.rising(volumes, weeks[4], baseline_weeks=4, since=W0)
    assert [(r["topic"], r["rise"], r["baseline"]) for r in found] == [
        ("api", 8.5, 0.5), ("login", 1.0, 4.0),
    ]  # fmt: skip


def test_effect_weeks_are_full_weeks_either_side_of_the_effective_day() -> None:
    before, after = tr.effect_weeks(date(2026, 3, 18), 2)  # a Wednesday
    assert before == ["2026-03-02", "2026-03-09"] and after == ["2026-03-23", "2026-03-30"]
    before, after = tr.effect_weeks(date(2026, 3, 16), 1)  # a Monday counts as after
    assert before == ["2026-03-09"] and after == ["2026-03-16"]


# --- the fold and the view ------------------------------------------------------------------


def test_weekly_cohorts_per_topic_area_and_channel(tmp_path: Path) -> None:
    ids, world = Ids(), World(tmp_path)
    events = [
        *case(ids, "c1", T0, csat=5, channel="chat"),
        *case(ids, "c2", T0 + timedelta(days=1), csat=2, reopen=True),
        *case(ids, "c3", T0 + timedelta(days=2), topic="billing", product_area="payments"),
        *case(ids, "c4", T0 + WEEK, topic="login"),
    ]
    world.add(events, [breach("c2", T0 + timedelta(days=1, hours=1)),
                       breach("c4", T0 + WEEK + timedelta(hours=1))])  # fmt: skip
    world.add(signals=[SlaBreachRetracted(
        signal_id="retract-c4", tenant_id="acme", account_id="acct-1", case_id="c4",
        detected_at=T0 + WEEK + timedelta(hours=2), caused_by=("x",), metric="first_response",
        cycle=0, due_at=T0 + WEEK, priority="P2",
        retracts=f"breach/c4/{(T0 + WEEK + timedelta(hours=1)).isoformat()}", reason="late reply",
    )])  # fmt: skip
    found = world.queries.trends("acme", "topic", weeks=2)
    assert found["weeks"] == [W0, "2026-03-09"] and found["week"] == "2026-03-09"
    login = next(s for s in found["series"] if s["value"] == "login")["weeks"]
    assert login[0] == {"week": W0, "volume": 2, "csat": 3.5, "csat_answers": 2,
                        "breach_rate": 0.5, "reopen_rate": 0.5}  # fmt: skip
    assert login[1]["volume"] == 1 and login[1]["breach_rate"] == 0.0  # the breach was retracted
    by_area = world.queries.trends("acme", "area", weeks=2)["series"]
    areas = {s["value"]: s["weeks"][0]["volume"] for s in by_area}
    assert areas == {"auth": 2, "payments": 1}
    channels = world.queries.trends("acme", "channel", weeks=2)["series"]
    assert {s["value"]: [p["volume"] for p in s["weeks"]] for s in channels} == {
        "chat": [1, 0], "email": [2, 1],
    }  # fmt: skip
    with pytest.raises(ValueError):
        world.queries.trends("acme", "team")


def test_signals_before_or_after_their_case_give_the_same_buckets() -> None:
    ids = Ids()
    events = case(ids, "c1", T0)
    signals: list[Signal] = [breach("c1", T0 + timedelta(hours=1)),
                             pattern("c1", T0 + timedelta(hours=3), "reopen_loop")]  # fmt: skip
    docs = []
    for order in ("events first", "signals first"):
        fold, view = TrendsFold(POLICY), memory_view()
        if order == "signals first":
            for p, s in enumerate(signals, 1):
                fold.apply_signal(view, p, s)
        for p, e in enumerate(events, 1):
            fold.apply_event(view, p, e)
        if order == "events first":
            for p, s in enumerate(signals, 1):
                fold.apply_signal(view, p, s)
        docs.append({k: v.doc for k, v in view.docs.items() if k[0] == "week"})
    assert docs[0] == docs[1]
    bucket = docs[0][("week", "acme", f"topic|login|{W0}")]
    assert bucket["breached"] == 1 and bucket["signals"] == {"sla.breached": 1,
                                                             "pattern.reopen_loop": 1}  # fmt: skip


def test_fastest_rising_topics_come_with_their_co_occurring_signals(tmp_path: Path) -> None:
    ids, world = Ids(), World(tmp_path)
    events: list[Event] = []
    for w in range(4):
        events += case(ids, f"l{w}", T0 + w * WEEK, "login")
        events += case(ids, f"b{w}-1", T0 + w * WEEK, "billing")
        events += case(ids, f"b{w}-2", T0 + w * WEEK, "billing")
    surge_week = T0 + 4 * WEEK
    for i in range(6):
        events += case(ids, f"api{i}", surge_week + timedelta(hours=i), "api_errors")
    events += case(ids, "l4", surge_week, "login")
    events += case(ids, "l5", surge_week, "login")
    world.add(events, [
        pattern(None, surge_week + timedelta(hours=5), "topic_surge", key="acme/api_errors"),
        breach("api1", surge_week + timedelta(hours=2)),
        breach("api2", surge_week + timedelta(hours=3)),
    ])  # fmt: skip
    found = world.queries.trends("acme")
    assert found["week"] == tr.week_of(surge_week)
    assert [(r["topic"], r["volume"], r["baseline"]) for r in found["rising"]] == [
        ("api_errors", 6, 0.0), ("login", 2, 1.0),
    ]  # fmt: skip
    assert found["rising"][0]["signals"] == [
        {"signal": "sla.breached", "count": 2}, {"signal": "pattern.topic_surge", "count": 1},
    ]  # fmt: skip
    earlier = world.queries.trends("acme", week=(T0 + WEEK).date().isoformat())
    assert earlier["rising"] == []  # steady weeks: nothing rises


def test_an_improvement_is_measured_before_and_after_on_the_same_metrics(tmp_path: Path) -> None:
    ids, world = Ids(), World(tmp_path)
    events: list[Event] = []
    breaches: list[Signal] = []
    for w in range(8):
        start = T0 + w * WEEK
        per_week = 4 if w < 4 else 2
        for i in range(per_week):
            name = f"w{w}-{i}"
            events += case(ids, name, start + timedelta(hours=i), "sso", csat=2 if w < 4 else 5,
                           reopen=w < 4 and i == 0)  # fmt: skip
            if w < 4 and i < 2:
                breaches.append(breach(name, start + timedelta(hours=i, minutes=30)))
    effective = (T0 + 4 * WEEK).date()  # a Monday: weeks 4..7 are after, 0..3 before
    events.append(event("improvement.recorded", ids(), case=None, account_id="_operations",
                        actor=AGENT, improvement_id="imp-1", topic="sso",
                        description="Renewed the SAML certificate rotation runbook",
                        effective_date=effective.isoformat()))  # fmt: skip
    world.add(events, breaches)
    imp = world.queries.trends("acme")["improvements"][0]
    assert imp["improvement_id"] == "imp-1" and imp["measured_on"] == {"dimension": "topic",
                                                                       "value": "sso"}  # fmt: skip
    assert imp["before"]["weeks"][0] == W0 and imp["after"]["weeks"][0] == effective.isoformat()
    assert imp["complete"]
    before, after = imp["before"], imp["after"]
    assert (before["volume"], before["csat"], before["breach_rate"], before["reopen_rate"]) == (
        4, 2.0, 0.5, 0.25)  # fmt: skip
    assert (after["volume"], after["csat"], after["breach_rate"], after["reopen_rate"]) == (
        2, 5.0, 0.0, 0.0)  # fmt: skip
    assert imp["change"] == {"volume": -2, "csat": 3.0, "breach_rate": -0.5, "reopen_rate": -0.25}


def test_an_improvement_needs_a_topic_or_an_area() -> None:
    with pytest.raises(ValueError, match="topic or a product_area"):
        event("improvement.recorded", 1, case=None, improvement_id="i", description="d",
              effective_date="2026-03-02")  # fmt: skip


def test_rebuild_equals_live_with_both_logs_interleaved(tmp_path: Path) -> None:
    ids, world = Ids(), World(tmp_path)
    events: list[Event] = []
    for i in range(20):
        events += case(ids, f"c{i}", T0 + timedelta(days=i), ("login", "sso")[i % 2],
                       csat=1 + i % 5, reopen=i % 3 == 0)  # fmt: skip
    signals: list[Signal] = [breach(f"c{i}", T0 + timedelta(days=i, hours=1)) for i in range(20)]
    for i in range(0, 20):  # signals of a case sometimes land before the case itself
        world.add(events[i * 4 : i * 4 + 4] if i % 3 else [], signals[i : i + 1])
        if i % 3 == 0:
            world.add(events[i * 4 : i * 4 + 4])
    live = {n: world.runner.store.checksum(n) for n in ("trends", "maturity")}
    assert {n: world.runner.rebuild(n).checksum for n in live} == live


ACME, GLOBEX, INGEST = "acme-read-token-000001", "globex-read-token-0001", "acme-ingest-token-001"


def test_api_serves_each_tenant_only_its_trends(tmp_path: Path) -> None:
    ids, world = Ids(), World(tmp_path)
    world.add([*case(ids, "a1", T0), *case(ids, "g1", T0, "billing", tenant="globex")])
    grants = [
        TokenGrant.model_validate({"token": ACME, "tenant": "acme", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": GLOBEX, "tenant": "globex", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": INGEST, "tenant": "acme", "scopes": ["ingest"]}),
    ]
    http = TestClient(create_app(Settings(data_dir=tmp_path), world.log,
                                 tokens=TokenRegistry(grants),
                                 routers=[loop_router(world.queries)]))  # fmt: skip

    def values(token: str) -> list[str]:
        r = http.get("/v1/trends", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        return [s["value"] for s in r.json()["series"]]

    assert values(ACME) == ["login"] and values(GLOBEX) == ["billing"]
    assert http.get("/v1/trends").status_code == 401
    assert http.get("/v1/trends", headers={"Authorization": f"Bearer {INGEST}"}).status_code == 403
    bad = http.get("/v1/trends", params={"dimension": "team"},
                   headers={"Authorization": f"Bearer {ACME}"})  # fmt: skip
    assert bad.status_code == 422
