import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from factories import T0, raw_event
from loopservice.domain.events import Event
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.metrics import Metrics
from loopservice.infra.settings import Settings, TokenGrant, load_tokens
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore
from loopservice.streams.clock import FixedClock

INGEST = "ingest-token-acme-0000"
READ_ONLY = "read-token-acme-000000"
ADMIN_OTHER = "admin-token-globex-000"
NOW = T0 + timedelta(days=1)


def opened_raw(n: int, **kw: object) -> dict[str, object]:
    fields: dict[str, object] = {"subject": "s", "topic": "t", "impact": "high", "urgency": "low"}
    fields.update(kw)
    return raw_event("case.opened", n, **fields)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def log(tmp_path: Path) -> SQLiteLog[Event]:
    return interaction_log(open_datastore(tmp_path / "log.db"), FixedClock(NOW))


@pytest.fixture
async def client(log: SQLiteLog[Event], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    grants = [
        TokenGrant.model_validate({"token": INGEST, "tenant": "acme", "scopes": ["ingest"]}),
        TokenGrant.model_validate({"token": READ_ONLY, "tenant": "acme", "scopes": ["read"]}),
        TokenGrant.model_validate(
            {"token": ADMIN_OTHER, "tenant": "globex", "scopes": ["ingest", "read", "admin"]}
        ),
    ]
    app = create_app(
        Settings(data_dir=tmp_path, max_batch_events=50, max_request_bytes=20_000),
        log,
        tokens=TokenRegistry(grants),
        metrics=Metrics(),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://loop.test") as c:
        yield c


async def test_accepts_an_array_with_positions_once_durable(
    client: httpx.AsyncClient, log: SQLiteLog[Event]
) -> None:
    r = await client.post("/v1/events", json=[opened_raw(1), opened_raw(2)], headers=auth(INGEST))
    assert r.status_code == 202, r.text
    assert r.json() == {
        "results": [
            {"index": 0, "event_id": "ev-1", "position": 1, "duplicate": False},
            {"index": 1, "event_id": "ev-2", "position": 2, "duplicate": False},
        ]
    }
    assert [rec.value.event_id for rec in log.read(1, 10)] == ["ev-1", "ev-2"]


async def test_one_object_and_duplicates(client: httpx.AsyncClient, log: SQLiteLog[Event]) -> None:
    assert (
        await client.post("/v1/events", json=opened_raw(1), headers=auth(INGEST))
    ).status_code == 202
    r = await client.post("/v1/events", json=[opened_raw(2), opened_raw(1)], headers=auth(INGEST))
    assert r.status_code == 202
    assert [(x["event_id"], x["position"], x["duplicate"]) for x in r.json()["results"]] == [
        ("ev-2", 2, False),
        ("ev-1", 1, True),
    ]
    assert log.head() == 2


async def test_ndjson_body(client: httpx.AsyncClient, log: SQLiteLog[Event]) -> None:
    body = "\n".join(json.dumps(opened_raw(n)) for n in (1, 2, 3)) + "\n"
    headers = {**auth(INGEST), "Content-Type": "application/x-ndjson"}
    r = await client.post("/v1/events", content=body, headers=headers)
    assert r.status_code == 202, r.text
    assert [x["position"] for x in r.json()["results"]] == [1, 2, 3]
    assert log.head() == 3


async def test_invalid_events_reject_the_whole_request(
    client: httpx.AsyncClient, log: SQLiteLog[Event]
) -> None:
    await client.post("/v1/events", json=[opened_raw(1)], headers=auth(INGEST))
    bad_actor = opened_raw(3, actor={"kind": "robot", "id": "x"})
    future = opened_raw(4, at=NOW + timedelta(hours=2))
    r = await client.post(
        "/v1/events", json=[opened_raw(2), bad_actor, future], headers=auth(INGEST)
    )
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {
            "index": 1,
            "event_id": "ev-3",
            "field": "actor.kind",
            "reason": "Input should be 'customer', 'agent', 'bot' or 'system'",
        },
        {
            "index": 2,
            "event_id": "ev-4",
            "field": "occurred_at",
            "reason": "in the future by 7200 s",
        },
    ]
    assert log.head() == 1


async def test_unreadable_bodies(client: httpx.AsyncClient, log: SQLiteLog[Event]) -> None:
    headers = {**auth(INGEST), "Content-Type": "application/json"}
    r = await client.post("/v1/events", content=b'{"event_id": ', headers=headers)
    assert r.status_code == 400 and "invalid JSON" in r.json()["detail"]
    assert (await client.post("/v1/events", content=b"[]", headers=headers)).status_code == 400
    r = await client.post(
        "/v1/events", json=[opened_raw(n) for n in range(51)], headers=auth(INGEST)
    )
    assert r.status_code == 413
    r = await client.post(
        "/v1/events", json=opened_raw(1, subject="x" * 20_000), headers=auth(INGEST)
    )
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    headers = {**auth(INGEST), "Content-Type": "text/plain"}
    assert (await client.post("/v1/events", content=b"{}", headers=headers)).status_code == 415
    assert log.head() == 0


async def test_authentication_and_scope(client: httpx.AsyncClient, log: SQLiteLog[Event]) -> None:
    body = [opened_raw(1)]
    r = await client.post("/v1/events", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert (await client.post("/v1/events", json=body, headers=auth("x" * 20))).status_code == 401
    r = await client.post("/v1/events", json=body, headers={"Authorization": f"Basic {INGEST}"})
    assert r.status_code == 401
    r = await client.post("/v1/events", json=body, headers=auth(READ_ONLY))
    assert r.status_code == 403 and "ingest" in r.json()["detail"]
    assert log.head() == 0


async def test_events_of_another_tenant_are_forbidden_even_to_admin(
    client: httpx.AsyncClient,
    log: SQLiteLog[Event],
) -> None:
    body = [opened_raw(1), opened_raw(2, tenant_id="globex")]
    r = await client.post("/v1/events", json=body, headers=auth(INGEST))
    assert r.status_code == 403
    assert [(e["index"], e["field"]) for e in r.json()["errors"]] == [(1, "tenant_id")]
    assert "index 1" in r.json()["detail"]
    r = await client.post("/v1/events", json=body, headers=auth(ADMIN_OTHER))
    assert r.status_code == 403
    assert [e["index"] for e in r.json()["errors"]] == [0]
    assert log.head() == 0


async def test_health_and_metrics(client: httpx.AsyncClient) -> None:
    await client.post("/v1/events", json=[opened_raw(1), opened_raw(1)], headers=auth(INGEST))
    await client.post("/v1/events", json=[{"type": "nonsense"}], headers=auth(INGEST))
    assert (await client.get("/healthz")).json() == {"status": "ok", "log_head": 1}
    text = (await client.get("/metrics")).text
    assert 'loop_ingest_events_total{result="accepted",type="case.opened"} 1.0' in text
    assert 'loop_ingest_events_total{result="duplicate",type="case.opened"} 1.0' in text
    assert 'loop_ingest_events_total{result="rejected",type="unknown"} 1.0' in text
    assert 'loop_ingest_requests_total{status="422",transport="http"} 1.0' in text
    assert "loop_ingest_latency_seconds_bucket" in text


def test_settings_from_env_and_token_sources(tmp_path: Path) -> None:
    entries = [{"token": INGEST, "tenant": "acme", "scopes": ["ingest", "read"]}]
    env = {
        "LOOP_HTTP_PORT": "9090",
        "LOOP_CLOCK_SKEW_TOLERANCE_S": "30",
        "LOOP_LOG_URL": "sqlite:////data/loop.db",
        "LOOP_TOKENS": json.dumps(entries),
        "HOME": "/ignored",
    }
    settings = Settings.from_env(env)
    assert settings.http_port == 9090
    assert settings.clock_skew_tolerance == timedelta(seconds=30)
    assert settings.sqlite_path() == Path("/data/loop.db")
    assert Settings().sqlite_path() == Path("var/loop.db")
    assert INGEST not in repr(settings)
    assert load_tokens(settings).grants[0].scopes == {"ingest", "read"}

    toml = tmp_path / "tokens.toml"
    toml.write_text(f'[[tokens]]\ntoken = "{READ_ONLY}"\ntenant = "acme"\nscopes = ["read"]\n')
    source = load_tokens(Settings.from_env({"LOOP_TOKENS_FILE": str(toml)}))
    assert (source.origin, [g.tenant for g in source.grants]) == ("configured", ["acme"])
    assert source.notice() is None

    with pytest.raises(ValueError):
        Settings.from_env({"LOOP_TOKENS": json.dumps([{**entries[0], "scopes": ["root"]}])})


def test_dev_tokens_are_generated_once_and_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = load_tokens(settings)
    assert first.origin == "dev" and first.dev_file == tmp_path / "dev-tokens.json"
    assert first.grants[0].scopes == {"ingest", "read", "admin"}
    assert (first.dev_file.stat().st_mode & 0o777) == 0o600
    again = load_tokens(settings)
    assert [g.token.get_secret_value() for g in again.grants] == [
        g.token.get_secret_value() for g in first.grants
    ]
    notice = first.notice()
    assert notice is not None and str(first.dev_file) in notice
    assert first.grants[0].token.get_secret_value() not in notice
