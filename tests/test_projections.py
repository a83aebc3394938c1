"""Projections: the folds, tracked positions, rebuild, as_of, the read API, and a SIGKILL.

The store tests run on both stores: SQLite (the log's own file) and a real PostgreSQL started
by `infra/postgres/pg.sh` (one fresh database per store).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from eventsourcing.persistence import IntegrityError
from fastapi.testclient import TestClient

from factories import T0, event, message, opened
from loopservice.domain.events import Event
from loopservice.domain.signals import SlaBreached, SlaWarning
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.event_codec import encode_event
from loopservice.infra.projections_api import projections_router
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.projections.cases import CasesFold
from loopservice.projections.context import ContextFold
from loopservice.projections.queries import ProjectionQueries
from loopservice.projections.runner import ProjectionRunner, default_folds
from loopservice.projections.store import memory_view, open_projection_store
from loopservice.streams.clock import FixedClock
from postgres_server import PostgresServer, postgres_server  # noqa: F401  (the fixture)

AGENT = {"kind": "agent", "id": "a-7", "team": "support"}
POLICY = default_policy()


def story(account: str = "acct-1", case: str = "c1", start: int = 0, **kw: Any) -> list[Event]:
    """One customer's case from first contact to survey, with ids and times from `start`."""
    n = start
    return [
        event("account.updated", n + 1, case=None, account_id=account, name="Initech",
              plan="pro", tier="enterprise", arr=120000.0, renewal_date="2027-01-31",
              owner_id="csm-1", **kw),
        opened(n + 2, case=case, account_id=account, **kw),
        message(n + 3, case=case, account_id=account, **kw),
        event("case.agent_replied", n + 4, case=case, account_id=account, actor=AGENT,
              body="secret reply text", **kw),
        event("case.handed_off", n + 5, case=case, account_id=account, actor=AGENT,
              from_team="support", to_team="success", reason="renewal question", **kw),
        event("case.status_changed", n + 6, case=case, account_id=account, actor=AGENT,
              status="waiting_on_customer", **kw),
        event("case.priority_changed", n + 7, case=case, account_id=account, actor=AGENT,
              priority="P1", reason="exec escalation", **kw),
        event("case.resolved", n + 8, case=case, account_id=account, actor=AGENT,
              resolution_code="sso_fixed", summary="internal details", **kw),
        event("survey.answered", n + 9, case=case, account_id=account, kind="nps", score=3,
              comment="private comment", **kw),
    ]  # fmt: skip


def breach(case: str = "c1", account: str = "acct-1", minutes: int = 30) -> SlaBreached:
    due = T0 + timedelta(minutes=minutes)
    return SlaBreached(
        signal_id=f"sla.breached/acme/{case}/first_response/0/{due.isoformat()}/v1",
        tenant_id="acme", account_id=account, case_id=case, detected_at=due,
        caused_by=("ev-2",), metric="first_response", cycle=0, due_at=due, priority="P1",
    )  # fmt: skip


def stored(fold: ContextFold | CasesFold, e: Event) -> Any:
    """The event as the runner hands it to the fold: decoded from its stored bytes."""
    return fold.decode(e.type, encode_event(e))


StoreUrls = Callable[[], str]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> StoreUrls:
    """Makes URLs of empty projection stores: "" (the log's own SQLite file) or a new
    PostgreSQL database."""
    if request.param == "sqlite":
        return lambda: ""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.database


class World:
    def __init__(self, path: Path, batch: int = 5000, store: str = "") -> None:
        self.datastore = open_datastore(path)
        clock = FixedClock(T0 + timedelta(days=400))
        self.log: SQLiteLog[Event] = interaction_log(self.datastore, clock)
        self.signals = signal_log(self.datastore, clock)
        self.store_url = store
        self.store = open_projection_store(store, self.datastore)
        self.runner = ProjectionRunner(
            self.store, self.log, self.signals, default_folds(POLICY), batch=batch,
            rebuild_batch=batch,
        )  # fmt: skip
        self.queries = ProjectionQueries(self.store, self.log, self.signals, POLICY)


# --- folds ---------------------------------------------------------------------------------


def test_context_fold_builds_profile_cases_surveys_and_a_timeline_without_bodies() -> None:
    fold, view = ContextFold(POLICY), memory_view()
    events = story()
    for position, e in enumerate(events[:5], 1):
        fold.apply_event(view, position, stored(fold, e))
    doc = view.find("account", "acme", "acct-1")
    assert doc is not None
    assert doc["profile"]["tier"] == "enterprise" and doc["profile"]["owner_id"] == "csm-1"
    assert doc["profile"]["renewal_date"] == "2027-01-31"
    case = doc["open_cases"]["c1"]
    assert case["priority"] == "P1"  # matrix[high][medium] = P2, enterprise raises one step
    assert case["team"] == "success"
    for position, e in enumerate(events[5:], 6):
        fold.apply_event(view, position, stored(fold, e))
    fold.apply_signal(view, 1, breach())
    assert doc["open_cases"] == {}
    assert doc["recent_closed"][0]["outcome"] == "resolved"
    assert doc["surveys"]["latest"]["nps"]["score"] == 3
    assert doc["signals"]["counts"] == {"sla.breached": 1}
    assert doc["lifecycle"]["stage"] == "active"
    assert len(view.rows) == len(events) + 1
    kinds = {orjson.loads(r[5])["type"] for r in view.rows}
    assert {"case.handed_off", "survey.answered", "sla.breached"} <= kinds
    dumped = "".join(r[5] for r in view.rows) + orjson.dumps(doc).decode()
    for secret in ("secret reply", "private comment", "internal details", "still broken"):
        assert secret not in dumped


def test_lifecycle_moves_through_onboarding_renewal_and_churn() -> None:
    fold, view = ContextFold(POLICY), memory_view()
    steps = [
        (event("onboarding.milestone_reached", 1, case=None, milestone="kickoff"), "onboarding"),
        (event("onboarding.milestone_reached", 2, case=None, milestone="team_trained"), "active"),
        (event("account.renewed", 3, case=None, arr=5.0), "renewed"),
        (event("account.churned", 4, case=None, reason="budget"), "churned"),
    ]
    for position, (e, stage) in enumerate(steps, 1):
        fold.apply_event(view, position, stored(fold, e))
        doc = view.find("account", "acme", "acct-1")
        assert doc is not None and doc["lifecycle"]["stage"] == stage


def test_case_fold_keeps_priority_history_handoffs_sla_and_earlier_cases() -> None:
    fold, view = CasesFold(POLICY), memory_view()
    events = [*story(), *story(case="c2", start=20)]
    for position, e in enumerate(events, 1):
        fold.apply_event(view, position, stored(fold, e))
    fold.apply_signal(view, 1, breach())
    fold.apply_signal(view, 2, breach(minutes=40).model_copy(update={"signal_id": "x"}))
    first, second = view.find("case", "acme", "c1"), view.find("case", "acme", "c2")
    assert first is not None and second is not None
    assert [(p["priority"], p["reason"]) for p in first["priority_history"]] == [
        ("P1", "matrix[high][medium] = P2; tier enterprise raises one step → P1"),
        ("P1", "exec escalation"),
    ]
    assert first["handoffs"][0]["to_team"] == "success"
    assert first["lifecycle"] == "resolved" and first["resolution_code"] == "sso_fixed"
    assert first["sla"]["breached"] == 2
    assert second["earlier_cases"] == ["c1"] and first["earlier_cases"] == []


# --- runner, store and queries -------------------------------------------------------------


def many(accounts: int, tenant: str = "acme") -> list[Event]:
    out: list[Event] = []
    for a in range(accounts):
        out += story(f"acct-{a}", f"case-{a}", start=a * 100, tenant_id=tenant)
    return out


def test_restart_resumes_exactly_at_the_tracked_position(
    tmp_path: Path, store_url: StoreUrls
) -> None:
    world = World(tmp_path / "loop.db", batch=4, store=store_url())
    world.log.append(many(3))
    world.signals.append([breach("case-0", "acct-0")])
    for _ in range(3):
        world.runner.step("context")
        world.runner.step("cases")
    assert world.runner.positions("context")["interactions"] == 12
    again = World(tmp_path / "loop.db", batch=4, store=world.store_url)
    again.runner.catch_up()
    again.runner.catch_up()  # nothing left: must not count anything twice
    ctx = again.queries.account_context("acme", "acct-0")
    assert ctx is not None
    assert ctx["context"]["counts"]["cases_opened"] == 1
    assert ctx["context"]["signals"]["counts"] == {"sla.breached": 1}
    case = again.queries.case_view("acme", "case-0")
    assert case is not None and case["case"]["counts"]["customer_messages"] == 1
    assert case["timeline_total"] == 9  # eight case events and one signal
    live = {name: again.store.checksum(name) for name in ("context", "cases")}
    fresh = World(tmp_path / "fresh.db", store=store_url())
    fresh.log.append(many(3))
    fresh.signals.append([breach("case-0", "acct-0")])
    fresh.runner.catch_up()
    assert {name: fresh.store.checksum(name) for name in live} == live


def test_a_batch_already_committed_cannot_be_applied_twice(
    tmp_path: Path, store_url: StoreUrls
) -> None:
    world = World(tmp_path / "loop.db", store=store_url())
    world.log.append(story())
    world.runner.catch_up()
    version = world.store.current_version("context")
    assert version is not None
    view = memory_view()
    fold = ContextFold(POLICY)
    fold.apply_event(view, 1, stored(fold, story()[0]))
    before = world.store.checksum("context")
    with pytest.raises(IntegrityError):
        world.store.commit("context", version, view.take(), {"interactions": 1})
    assert world.store.checksum("context") == before


def test_rebuild_matches_the_live_build_byte_for_byte_and_switches_atomically(
    tmp_path: Path, store_url: StoreUrls
) -> None:
    world = World(tmp_path / "loop.db", batch=5, store=store_url())
    events = many(4)
    for i in range(0, len(events), 7):  # live: appends and folds interleaved, odd batch sizes
        world.log.append(events[i : i + 7])
        if i % 2:
            world.signals.append([breach(f"case-{i % 4}", f"acct-{i % 4}", minutes=i)])
        world.runner.catch_up()
    live = {n: world.store.checksum(n) for n in ("context", "cases")}
    seen: list[tuple[int | None, Any]] = []

    def progress(_: int) -> None:  # reads during the rebuild answer from the old version
        seen.append(
            (world.store.current_version("context"),
             world.queries.account_context("acme", "acct-1"))
        )  # fmt: skip

    before = world.queries.account_context("acme", "acct-1")
    world.store.bulk_rows = 1  # a real rebuild's batch size: written in bulk, not row by row
    world.runner.max_cached = 2  # documents dropped from the cache are read back as text,
    world.runner.max_cold = 1  # and once written out early, from the tables
    result = world.runner.rebuild("context", progress)
    assert result.version == 2 and result.checksum == live["context"]
    assert result.events == world.log.head() + world.signals.head()
    assert len(seen) > 2 and all(v == 1 and ctx == before for v, ctx in seen[:-1])
    assert world.store.current_version("context") == 2 and world.store.versions("context") == [2]
    docs, timeline = world.store.tables("context", 2)
    with world.store.reading() as c:  # keys and indexes left to the switch are there
        c.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename IN (?, ?)"
            if world.store_url
            else "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name IN (?, ?)",
            (docs, timeline),
        )
        indexes = {r[0] for r in c.fetchall()}
    assert {f"{docs}_account", f"{docs}_sort"} <= indexes
    assert not world.store_url or {f"{docs}_pkey", f"{timeline}_pkey"} <= indexes
    assert world.queries.account_context("acme", "acct-1") == before
    assert world.runner.rebuild("cases").checksum == live["cases"]
    world.log.append(story("acct-9", "case-9", start=900))  # the live runner follows v2
    world.runner.catch_up()
    assert world.queries.account_context("acme", "acct-9") is not None


ODD = 'quote " back\\slash tab\t line\nfeed bell\x07 é 😀 \u2028 end'


def test_bulk_and_row_by_row_writes_store_the_same_bytes(
    tmp_path: Path, store_url: StoreUrls
) -> None:
    """A batch goes in row by row or in bulk (SQLite: one JSON array; PostgreSQL: COPY) by its
    size; texts that JSON and COPY must escape come back the same either way."""
    url = store_url()
    world = World(tmp_path / "loop.db", batch=4, store=url)
    odd = {"account": 'acct-"odd\\1 é', "case": "case-😀\t1"}
    events = [
        *many(2),
        *story(odd["account"], odd["case"], start=300),
        opened(400, case="c-odd-2", account_id=odd["account"], subject=ODD, topic="odd"),
        event("case.handed_off", 401, case="c-odd-2", account_id=odd["account"], actor=AGENT,
              from_team="support", to_team="success", reason=ODD),
    ]  # fmt: skip
    if not url:  # PostgreSQL text cannot hold NUL; SQLite's JSON path must step aside for it
        events.append(event("case.note_added", 402, case="c-odd-2", account_id="acct-nul\x00",
                            body="n"))  # fmt: skip
    world.store.bulk_rows = 1_000_000  # live: row by row
    world.log.append(events)
    world.signals.append([breach(odd["case"], odd["account"])])
    world.runner.catch_up()
    live = {n: world.store.checksum(n) for n in ("context", "cases")}
    world.store.bulk_rows = 1  # the rebuild: in bulk
    for name in live:
        assert world.runner.rebuild(name).checksum == live[name]
    ctx = world.queries.account_context("acme", odd["account"])
    assert ctx is not None and ctx["context"]["open_cases"][0]["subject"] == " ".join(ODD.split())
    assert any(ODD.split()[0] in e["summary"] for e in ctx["timeline"])
    if not url:  # stored as BLOBs either way (the checksum reads them as text)
        with world.store.reading() as c:
            for name in live:
                docs, timeline = world.store.tables(name, 2)
                c.execute(f"SELECT DISTINCT typeof(doc) FROM {docs}")
                assert c.fetchall() == [("blob",)]
                c.execute(f"SELECT DISTINCT typeof(entry), typeof(position) FROM {timeline}")
                assert c.fetchall() == [("blob", "integer")]


def test_as_of_gives_the_context_as_it_stood(tmp_path: Path, store_url: StoreUrls) -> None:
    world = World(tmp_path / "loop.db", store=store_url())
    world.log.append(story())
    world.signals.append([breach()])
    world.runner.catch_up()
    then = world.queries.as_of("acme", "acct-1", T0 + timedelta(minutes=4, seconds=30))
    assert then is not None
    assert [c["case_id"] for c in then["context"]["open_cases"]] == ["c1"]
    assert then["context"]["open_cases"][0]["team"] == "support"  # the handoff came later
    assert len(then["timeline"]) == 4 and then["context"]["signals"]["counts"] == {}
    now = world.queries.account_context("acme", "acct-1")
    later = world.queries.as_of("acme", "acct-1", T0 + timedelta(days=30))
    assert now is not None and later is not None
    assert later["context"] == now["context"] and later["timeline"] == now["timeline"]
    assert world.queries.as_of("acme", "acct-1", T0) is None
    assert world.queries.as_of("globex", "acct-1", T0 + timedelta(days=1)) is None


# --- HTTP ----------------------------------------------------------------------------------

ACME, GLOBEX, INGEST_ONLY = "acme-read-token-0000001", "globex-read-token-00001", "acme-ing-0000001"


def client_for(world: World, tmp_path: Path) -> TestClient:
    grants = [
        TokenGrant.model_validate({"token": ACME, "tenant": "acme", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": GLOBEX, "tenant": "globex", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": INGEST_ONLY, "tenant": "acme", "scopes": ["ingest"]}),
    ]
    settings = Settings(data_dir=tmp_path, log_url=f"sqlite:///{tmp_path / 'loop.db'}")
    app = create_app(
        settings, world.log, tokens=TokenRegistry(grants),
        routers=[projections_router(world.queries)],
    )  # fmt: skip
    return TestClient(app)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_api_serves_context_and_cases_per_tenant(tmp_path: Path, store_url: StoreUrls) -> None:
    world = World(tmp_path / "loop.db", store=store_url())
    world.log.append([*story(), *story("g-1", "g-case", start=50, tenant_id="globex")])
    world.signals.append([breach()])
    world.runner.catch_up()
    client = client_for(world, tmp_path)
    acme, globex = auth(ACME), auth(GLOBEX)

    accounts = client.get("/v1/accounts", headers=acme).json()
    assert accounts["total"] == 1 and accounts["items"][0]["account_id"] == "acct-1"
    assert client.get("/v1/accounts", headers=globex).json()["items"][0]["account_id"] == "g-1"
    ctx = client.get("/v1/accounts/acct-1/context", headers=acme)
    assert ctx.status_code == 200 and ctx.json()["context"]["profile"]["name"] == "Initech"
    assert client.get("/v1/accounts/acct-1/context", headers=globex).status_code == 404
    assert client.get("/v1/accounts/nope/context", headers=acme).status_code == 404
    past = client.get(
        "/v1/accounts/acct-1/context",
        params={"as_of": (T0 + timedelta(minutes=4, seconds=30)).isoformat()},
        headers=acme,
    ).json()
    assert len(past["context"]["open_cases"]) == 1
    assert (
        client.get(
            "/v1/accounts/acct-1/context", params={"as_of": "2026-03-05"}, headers=globex
        ).status_code
        == 404
    )

    cases = client.get("/v1/cases", params={"account_id": "acct-1"}, headers=acme).json()
    assert [c["case_id"] for c in cases["items"]] == ["c1"]
    assert client.get("/v1/cases", headers=globex).json()["items"][0]["case_id"] == "g-case"
    view = client.get("/v1/cases/c1", headers=acme).json()
    assert view["case"]["sla"]["breached"] == 1 and view["case"]["priority"] == "P1"
    assert client.get("/v1/cases/c1", headers=globex).status_code == 404
    assert client.get("/v1/cases/g-case", headers=acme).status_code == 404
    page = client.get("/v1/cases/c1/timeline", params={"limit": 3, "offset": 2}, headers=acme)
    body = page.json()
    assert body["total"] == 9 and len(body["entries"]) == 3
    assert body["entries"][0]["type"] == "case.agent_replied"
    assert client.get("/v1/cases/c1/timeline", headers=globex).status_code == 404
    assert client.get("/v1/cases/c1").status_code == 401
    assert client.get("/v1/cases/c1", headers=auth(INGEST_ONLY)).status_code == 403
    assert client.get("/v1/cases", params={"limit": 0}, headers=acme).status_code == 422


# --- SIGKILL -------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
    from loopservice.policy_cli import default_policy
    from loopservice.projections.runner import ProjectionRunner, default_folds
    from loopservice.projections.store import open_projection_store

    ds = open_datastore(sys.argv[1])
    store = open_projection_store(sys.argv[2], ds)
    runner = ProjectionRunner(store, interaction_log(ds), signal_log(ds),
                              default_folds(default_policy()), batch=3)
    while True:
        if not runner.step("context").scanned:
            break
        print(runner.positions("context")["interactions"], flush=True)
    print("done", flush=True)
    """
)


def test_sigkill_mid_stream_leaves_view_and_position_in_agreement(
    tmp_path: Path, store_url: StoreUrls
) -> None:
    path = tmp_path / "loop.db"
    world = World(path, store=store_url())
    events = many(60)  # 540 events, 180 batches of 3
    world.log.append(events)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), world.store_url],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == "done" or int(line) >= 150:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()

    again = World(path, store=world.store_url)
    version = again.store.current_version("context")
    assert version is not None
    position = again.store.position("context", version, "interactions")
    assert 150 <= position < len(events)  # killed mid-stream
    docs, timeline = again.store.tables("context", version)
    with again.store.reading() as c:
        c.execute(f"SELECT COUNT(*), MAX(position) FROM {timeline}")
        rows, last = c.fetchone()
        c.execute(f"SELECT doc FROM {docs} WHERE kind='account'")
        docs_rows = [orjson.loads(r[0]) for r in c.fetchall()]
    assert rows == position and last == position  # every event up to it, nothing beyond
    assert sum(len(d["surveys"]["recent"]) for d in docs_rows) == position // 9
    again.runner.catch_up()
    fresh = World(tmp_path / "fresh.db", store=store_url())
    fresh.log.append(events)
    fresh.runner.catch_up()
    assert again.store.checksum("context") == fresh.store.checksum("context")


def test_sla_warning_lands_in_the_case_view() -> None:
    fold, view = CasesFold(POLICY), memory_view()
    fold.apply_event(view, 1, stored(fold, opened(1)))
    warn = SlaWarning(
        signal_id="w", tenant_id="acme", account_id="acct-1", case_id="c1",
        detected_at=T0, caused_by=("ev-1",), metric="resolution", cycle=0,
        due_at=T0 + timedelta(hours=1), priority="P2", threshold_pct=50,
    )  # fmt: skip
    fold.apply_signal(view, 1, warn)
    doc = view.find("case", "acme", "c1")
    assert doc is not None and doc["sla"]["signals"][0]["threshold_pct"] == 50


async def test_follow_keeps_projections_caught_up_until_stopped(
    tmp_path: Path, store_url: StoreUrls
) -> None:
    world = World(tmp_path / "loop.db", batch=2, store=store_url())
    world.runner.max_cached = 1  # documents are read back from the tables after each batch
    world.log.append(many(2))
    stop = asyncio.Event()
    task = asyncio.create_task(world.runner.follow(stop, poll=0.01))
    for _ in range(500):
        if world.runner.positions("cases")["interactions"] == world.log.head():
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)
    fresh = World(tmp_path / "fresh.db", store=store_url())
    fresh.log.append(many(2))
    fresh.runner.catch_up()
    for name in ("context", "cases"):
        assert world.store.checksum(name) == fresh.store.checksum(name)


@pytest.mark.postgres
def test_sqlite_and_postgres_build_the_same_views(
    tmp_path: Path,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    worlds = [World(tmp_path / "a.db", batch=7), World(tmp_path / "b.db", batch=11,
              store=postgres_server.database())]  # fmt: skip
    for world in worlds:
        world.log.append(many(5))
        world.signals.append([breach("case-1", "acct-1"), breach("case-3", "acct-3")])
        world.runner.catch_up()
    sqlite, postgres = worlds
    for name in ("context", "cases"):
        assert sqlite.store.checksum(name) == postgres.store.checksum(name)
    assert sqlite.queries.accounts("acme") == postgres.queries.accounts("acme")
    assert sqlite.queries.case_timeline("acme", "case-2", 4, 3) == postgres.queries.case_timeline(
        "acme", "case-2", 4, 3
    )
