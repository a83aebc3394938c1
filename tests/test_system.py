"""The wired system end to end: HTTP ingest → log → engine → signals → board, metrics."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from factories import T0, raw_event
from loopservice.bootstrap import build_app, build_system
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.streams.clock import FixedClock

ACME_ALL = "acme-token-with-every-scope"
ACME_READ = "acme-token-read-only-0001"
GLOBEX_READ = "globex-token-read-only-01"


def system_and_client(tmp_path: Path) -> tuple[object, TestClient, FixedClock]:
    settings = Settings(
        data_dir=tmp_path,
        log_url=f"sqlite:///{tmp_path / 'loop.db'}",
        tokens=(
            TokenGrant.model_validate(
                {"token": ACME_ALL, "tenant": "acme", "scopes": ["ingest", "read", "admin"]}
            ),
            TokenGrant.model_validate({"token": ACME_READ, "tenant": "acme", "scopes": ["read"]}),
            TokenGrant.model_validate(
                {"token": GLOBEX_READ, "tenant": "globex", "scopes": ["read"]}
            ),
        ),
    )
    clock = FixedClock(T0 + timedelta(minutes=1))
    system = build_system(settings, clock)
    return system, TestClient(build_app(system)), clock


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_ingested_case_runs_clocks_breaches_and_shows_on_board_and_metrics(
    tmp_path: Path,
) -> None:
    system, client, clock = system_and_client(tmp_path)
    opened = raw_event(
        "case.opened", 0, subject="Login fails", topic="login", impact="critical", urgency="high"
    )
    r = client.post("/v1/events", json=[opened], headers=auth(ACME_ALL))
    assert r.status_code == 202, r.text
    system.engine.catch_up()  # type: ignore[attr-defined]

    board = client.get("/v1/board", headers=auth(ACME_READ)).json()
    metrics = {c["metric"] for c in board["clocks"]}
    assert metrics == {"first_response", "resolution"}
    assert all(c["priority"] == "P1" for c in board["clocks"])
    assert client.get("/v1/board", headers=auth(GLOBEX_READ)).json()["clocks"] == []
    assert client.get("/v1/board").status_code == 401

    first = next(c for c in board["clocks"] if c["metric"] == "first_response")
    clock.at = T0 + timedelta(days=10)  # long past every deadline
    engine = system.engine  # type: ignore[attr-defined]
    assert engine.tick_if_due(clock)
    engine.catch_up()
    signals = client.get("/v1/signals", headers=auth(ACME_READ)).json()["signals"]
    breaches = [s for s in signals if s["type"] == "sla.breached"]
    assert {b["metric"] for b in breaches} == {"first_response", "resolution"}
    due = datetime.fromisoformat(first["due_at"])
    assert any(datetime.fromisoformat(b["due_at"]) == due for b in breaches)
    assert client.get("/v1/signals", headers=auth(GLOBEX_READ)).json()["signals"] == []

    text = client.get("/metrics").text
    assert (
        'loop_sla_signals_total{metric="first_response",priority="P1",type="sla.breached"} 1.0'
        in text
    )
    assert "loop_sla_open_clocks 2.0" in text


def test_dashboard_page_is_served(tmp_path: Path) -> None:
    _, client, _ = system_and_client(tmp_path)
    page = client.get("/")
    assert page.status_code == 200
    assert "/v1/board" in page.text


def test_explain_endpoint_gives_the_priority_rule_and_is_tenant_scoped(tmp_path: Path) -> None:
    _, client, _ = system_and_client(tmp_path)
    opened = raw_event(
        "case.opened", 0, subject="Login fails", topic="login", impact="critical", urgency="high"
    )
    assert client.post("/v1/events", json=[opened], headers=auth(ACME_ALL)).status_code == 202
    found = client.get("/v1/cases/c1/explain", headers=auth(ACME_READ))
    assert found.status_code == 200
    body = found.json()
    assert body["priority"] == "P1"
    assert body["priority_rule"].startswith("matrix[critical][high]")
    assert {c["metric"] for c in body["clocks"]} == {"first_response", "resolution"}
    assert client.get("/v1/cases/c1/explain", headers=auth(GLOBEX_READ)).status_code == 404
    assert client.get("/v1/cases/nope/explain", headers=auth(ACME_READ)).status_code == 404


def test_board_per_team_and_team_queues(tmp_path: Path) -> None:
    system, client, _ = system_and_client(tmp_path)
    events = [
        raw_event("case.opened", 0, case="c1", subject="Login", topic="login", impact="critical",
                  urgency="high"),
        raw_event("case.opened", 1, case="c2", subject="Export", topic="export", impact="low",
                  urgency="low"),
        raw_event("case.opened", 2, case="c3", subject="Setup", topic="setup", impact="medium",
                  urgency="medium"),
        raw_event("case.handed_off", 3, case="c3", from_team="support", to_team="onboarding",
                  reason="first-week setup", summary="customer needs the import wizard",
                  actor={"kind": "agent", "id": "a-1", "team": "support"}),
    ]  # fmt: skip
    r = client.post("/v1/events", json=events, headers=auth(ACME_ALL))
    assert r.status_code == 202, r.text
    system.engine.catch_up()  # type: ignore[attr-defined]

    support = client.get("/v1/board?team=support", headers=auth(ACME_READ)).json()["clocks"]
    assert {c["case_id"] for c in support} == {"c1", "c2"}
    onboarding = client.get("/v1/board?team=onboarding", headers=auth(ACME_READ)).json()
    assert {c["case_id"] for c in onboarding["clocks"]} == {"c3"}
    assert client.get("/v1/board?team=nobody", headers=auth(ACME_READ)).status_code == 422

    queues = client.get("/v1/queues", headers=auth(ACME_READ)).json()["queues"]
    by_team = {q["team"]: q for q in queues}
    assert by_team["support"]["cases"] == 2 and by_team["onboarding"]["cases"] == 1
    assert sum(by_team["support"]["by_priority"].values()) == 2
    assert by_team["support"]["by_priority"].get("P1") == 1
    assert by_team["support"]["breached"] == 0
    due = min(c["due_at"] for c in support)
    assert by_team["support"]["next_due"] == due
    assert client.get("/v1/queues", headers=auth(GLOBEX_READ)).json()["queues"] == []
