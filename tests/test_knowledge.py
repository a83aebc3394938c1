"""The knowledge view: candidates at exactly N repeats, coverage, deflection, the API."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from factories import T0, event, opened
from loopservice.domain.events import Event
from loopservice.domain.knowledge import normalise_summary
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.loop_api import loop_router
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.projections.knowledge import KnowledgeFold
from loopservice.projections.loop_queries import LoopQueries
from loopservice.projections.store import View, memory_view
from loopservice.projections_cli import open_runner
from loopservice.streams.clock import FixedClock

POLICY = default_policy()
AGENT = {"kind": "agent", "id": "a-1", "team": "support"}
N = POLICY.knowledge.min_repeats
CUSTOMER = {"kind": "customer", "id": "u-1"}


def resolved_case(
    i: int, at: datetime, *, code: str = "password_reset", summary: str = "Reset password #41",
    account: str = "acct-1", topic: str = "login", hours: float = 2, tenant: str = "acme",
) -> list[Event]:  # fmt: skip
    case = f"{tenant}-case-{i}"
    return [
        opened(10 * i, at=at - timedelta(hours=hours), case=case, account_id=account,
               topic=topic, tenant_id=tenant),
        event("case.resolved", 10 * i + 1, at=at, case=case, account_id=account, actor=AGENT,
              resolution_code=code, summary=summary, tenant_id=tenant),
    ]  # fmt: skip


def fold(events: Iterable[Event]) -> View:
    f, view = KnowledgeFold(POLICY), memory_view()
    for position, e in enumerate(events, 1):
        f.apply_event(view, position, e)
    return view


def group(view: View, topic: str = "login", code: str = "password_reset") -> Any:
    return view.find("group", "acme", f"{topic}|{code}|reset password")


def test_summaries_are_normalised_to_their_words() -> None:
    assert normalise_summary("Reset the password for user #4411.") == "reset password user"
    assert normalise_summary("reset  PASSWORD for user 918 see https://x.io/a") == (
        "reset password user see"
    )
    assert normalise_summary("") == ""


def test_a_resolution_becomes_a_candidate_at_exactly_n_repeats_within_the_window() -> None:
    days = POLICY.knowledge.window_days / (N - 1)  # the n-th lands exactly on the window's end
    cases = [resolved_case(i, T0 + timedelta(days=days * i)) for i in range(N)]
    before = fold(e for c in cases[:-1] for e in c)
    assert group(before)["resolutions"] == N - 1 and group(before)["candidate_since"] is None
    after = fold(e for c in cases for e in c)
    g = group(after)
    assert g["candidate_since"] == (T0 + timedelta(days=days * (N - 1))).isoformat()
    assert g["recent"] and len(g["recent"]) == N


def test_repeats_spread_wider_than_the_window_are_no_candidate() -> None:
    days = POLICY.knowledge.window_days / (N - 1) + 0.01
    view = fold(e for i in range(N) for e in resolved_case(i, T0 + timedelta(days=days * i)))
    assert group(view)["resolutions"] == N and group(view)["candidate_since"] is None


def test_other_codes_and_a_case_resolved_twice_do_not_count_as_repeats() -> None:
    events = [e for i in range(N - 1) for e in resolved_case(i, T0 + timedelta(hours=i))]
    events += resolved_case(50, T0 + timedelta(hours=9), code="mfa_reset")
    again = events[-3]  # case N-2 resolved a second time, same resolution
    events.append(
        again.model_copy(update={"event_id": "again", "occurred_at": T0 + timedelta(hours=20)})
    )
    view = fold(events)
    assert group(view)["resolutions"] == N - 1 and group(view)["candidate_since"] is None
    assert view.find("group", "acme", "login|mfa_reset|reset password")["resolutions"] == 1


def test_candidates_carry_the_volume_and_handling_time_they_would_save(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.append([e for i in range(N) for e in resolved_case(i, T0 + timedelta(days=i), hours=3)])
    found = world.queries.knowledge("acme")
    assert found["candidates_total"] == 1 and found["uncovered_candidates"] == 1
    c = found["candidates"][0]
    assert (c["topic"], c["resolution_code"], c["summary"]) == ("login", "password_reset",
                                                                "reset password")  # fmt: skip
    assert c["would_save"] == {"cases_in_window": N, "handling_hours_in_window": 3.0 * N,
                               "mean_handling_hours": 3.0}  # fmt: skip


def article(n: int, at: datetime, code: str | None = "password_reset", topic: str = "login",
            article_id: str = "kb-1") -> Event:  # fmt: skip
    return event("knowledge.article_published", n, at=at, case=None, account_id="_knowledge",
                 actor=AGENT, article_id=article_id, title="How to reset", topic=topic,
                 resolution_code=code)  # fmt: skip


def test_an_article_covers_its_group_and_counts_its_use_in_later_resolutions() -> None:
    events = [*resolved_case(1, T0), article(900, T0 + timedelta(hours=1)),
              *resolved_case(2, T0 + timedelta(hours=2)),
              *resolved_case(3, T0 + timedelta(hours=3), code="mfa_reset"),
              *resolved_case(4, T0 + timedelta(hours=4), topic="billing")]  # fmt: skip
    view = fold(events)
    assert group(view)["covered_by"] == ["kb-1"] and group(view)["covered_resolutions"] == 1
    kb = view.find("article", "acme", "kb-1")
    assert kb is not None and kb["used_in_resolutions"] == 1
    summary = view.find("summary", "acme", "acme")
    assert summary is not None
    assert (summary["resolutions"], summary["covered_resolutions"]) == (4, 1)
    topic_wide = fold([*events, article(901, T0 + timedelta(hours=5), code=None,
                                        article_id="kb-2"),
                       *resolved_case(5, T0 + timedelta(hours=6), code="mfa_reset")])  # fmt: skip
    mfa = topic_wide.find("group", "acme", "login|mfa_reset|reset password")
    assert mfa is not None and mfa["covered_by"] == ["kb-2"] and mfa["covered_resolutions"] == 1


def session(n: int, at: datetime, account: str, topic: str = "login",
            articles: tuple[str, ...] = ("kb-1",), resolved: bool = True) -> Event:  # fmt: skip
    return event("selfservice.session", n, at=at, case=None, account_id=account, actor=CUSTOMER,
                 topic=topic, article_ids=list(articles), resolved=resolved)  # fmt: skip


def test_deflection_counts_sessions_without_a_case_on_their_topic_within_the_window() -> None:
    window = timedelta(hours=POLICY.knowledge.deflection_window_hours)
    lateness = timedelta(seconds=POLICY.allowed_lateness_seconds)
    events = [
        article(1, T0 - timedelta(days=1)),
        session(2, T0, "acct-a"),  # a case on its topic 1 h later: became a case
        session(3, T0, "acct-b", resolved=False),  # only a case on another topic: deflected
        session(4, T0, "acct-c"),  # its case comes after the window: deflected
        session(5, T0, "acct-d", articles=()),  # no case at all, no article: deflected
        opened(6, at=T0 + timedelta(hours=1), case="ca", account_id="acct-a"),
        opened(7, at=T0 + timedelta(hours=1), case="cb", account_id="acct-b", topic="billing"),
        opened(8, at=T0 + window + timedelta(minutes=1), case="cc", account_id="acct-c"),
    ]
    early = fold([*events[:-1], event("clock.tick", 9, at=T0 + window, case=None)])
    summary = early.find("summary", "acme", "acme")
    assert summary is not None and summary["sessions"]["settled"] == 1  # only acct-a so far
    view = fold([*events, event("clock.tick", 9, at=T0 + window + lateness, case=None)])
    s = view.find("summary", "acme", "acme")
    assert s is not None
    assert s["sessions"] == {"started": 4, "settled": 4, "deflected": 3, "became_case": 1,
                             "self_reported_resolved": 3, "with_articles": 3,
                             "with_articles_deflected": 2}  # fmt: skip
    kb = view.find("article", "acme", "kb-1")
    assert kb is not None and (kb["sessions"], kb["deflected"], kb["became_case"]) == (3, 2, 1)
    assert s["topics"]["login"] == {"settled": 4, "deflected": 3}


# --- runner, rebuild, API ------------------------------------------------------------------


class World:
    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "loop.db"
        datastore = open_datastore(path)
        clock = FixedClock(T0 + timedelta(days=400))
        self.log = interaction_log(datastore, clock)
        self.signals = signal_log(datastore, clock)
        self.runner = open_runner(path)
        self.queries = LoopQueries(self.runner.store, POLICY)

    def append(self, events: list[Event]) -> None:
        self.log.append(events)
        self.runner.catch_up()


def test_rebuild_equals_the_view_built_live(tmp_path: Path) -> None:
    world = World(tmp_path)
    events = [e for i in range(12) for e in resolved_case(i, T0 + timedelta(days=i))]
    events += [article(900, T0 + timedelta(days=3)), session(901, T0, "acct-9"),
               session(902, T0 + timedelta(days=2), "acct-1")]  # fmt: skip
    for i in range(0, len(events), 5):
        world.append(events[i : i + 5])
    live = world.runner.store.checksum("knowledge")
    assert world.runner.rebuild("knowledge").checksum == live


ACME, GLOBEX, INGEST = "acme-read-token-000001", "globex-read-token-0001", "acme-ingest-token-001"


def client(world: World, tmp_path: Path) -> TestClient:
    grants = [
        TokenGrant.model_validate({"token": ACME, "tenant": "acme", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": GLOBEX, "tenant": "globex", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": INGEST, "tenant": "acme", "scopes": ["ingest"]}),
    ]
    app = create_app(Settings(data_dir=tmp_path), world.log, tokens=TokenRegistry(grants),
                     routers=[loop_router(world.queries)])  # fmt: skip
    return TestClient(app)


def test_api_serves_each_tenant_only_its_knowledge(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.append([e for i in range(N) for e in resolved_case(i, T0 + timedelta(days=i))])
    world.append(resolved_case(99, T0, tenant="globex", topic="billing", code="refund"))
    http = client(world, tmp_path)
    acme = http.get("/v1/knowledge", headers={"Authorization": f"Bearer {ACME}"}).json()
    assert acme["candidates_total"] == 1 and acme["resolutions"] == N
    globex = http.get("/v1/knowledge", headers={"Authorization": f"Bearer {GLOBEX}"}).json()
    assert globex["candidates_total"] == 0 and globex["resolutions"] == 1
    assert http.get("/v1/knowledge").status_code == 401
    assert http.get("/v1/knowledge", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert http.get("/v1/knowledge",
                    headers={"Authorization": f"Bearer {INGEST}"}).status_code == 403  # fmt: skip
