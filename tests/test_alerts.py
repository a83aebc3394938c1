import hashlib
import hmac
import io
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from rich.console import Console

from factories import T0, opened
from loopservice.bench_alerts import LocalReceiver, measure_delivery
from loopservice.cli import main
from loopservice.domain.events import AlertAcknowledged, Event, Priority, clock_tick
from loopservice.domain.policy import OncallRoute, OncallSection, Policy, policy_from_mapping
from loopservice.domain.signals import SlaBreached, SlaBreachRetracted, SlaWarning
from loopservice.infra.alerts import (
    AckFollower,
    AlertMetrics,
    Dispatcher,
    Outbox,
    ack_event,
    backoff,
    env_secret,
    verify,
    webhook_body,
)
from loopservice.infra.alerts_api import alerts_router
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.metrics import Metrics
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.streams.clock import FixedClock
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.processors import SlaProcessor
from loopservice.streams.rules import RulesBook

SECRET = b"test-webhook-secret"
NOW = T0 + timedelta(seconds=30)


def breach(n: int = 1, tenant: str = "acme", priority: Priority = Priority.P1) -> SlaBreached:
    return SlaBreached(
        signal_id=f"sig-{n}",
        tenant_id=tenant,
        account_id="acct-1",
        case_id=f"c{n}",
        detected_at=T0,
        caused_by=(f"ev-{n}",),
        metric="first_response",
        cycle=0,
        due_at=T0,
        priority=priority,
    )


def policy_with(*routes: OncallRoute) -> Policy:
    return default_policy().model_copy(update={"oncall": OncallSection(routes=list(routes))})


@pytest.fixture
def receiver() -> Iterator[LocalReceiver]:
    r = LocalReceiver(SECRET).start()
    yield r
    r.stop()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


def escalating_policy(url: str) -> Policy:
    return policy_with(
        OncallRoute(
            name="pager",
            signal_types=["sla.breached", "sla.breach_retracted"],
            priorities=[Priority.P1],
            sink=url,
            escalate_after_minutes=15,
            escalate_to="leads",
        ),
        OncallRoute(name="leads", signal_types=["sla.breached"], sink=url),
    )


@pytest.fixture
async def dispatchers() -> AsyncIterator[Callable[..., Dispatcher]]:
    made: list[Dispatcher] = []

    def make(outbox: Outbox, clock: FixedClock, **kw: Any) -> Dispatcher:
        kw.setdefault("secret", lambda _route: SECRET)
        kw.setdefault("metrics", AlertMetrics(CollectorRegistry()))
        d = Dispatcher(outbox, clock, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        await d.aclose()


def outbox_at(path: Path, policy: Policy, clock: FixedClock) -> Outbox:
    return Outbox(open_datastore(path), lambda _: policy, clock)


async def test_delivered_once_with_a_signature_the_receiver_verifies(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    registry = CollectorRegistry()
    outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
    dispatcher = dispatchers(outbox, clock, metrics=AlertMetrics(registry))
    warning = SlaWarning(
        **breach(2).model_dump(exclude={"type", "signal_id"}), signal_id="w2", threshold_pct=80
    )
    assert outbox.add([breach(1), warning]) == 1  # no route takes warnings
    assert await dispatcher.step() == 1
    assert await dispatcher.step() == 0

    assert (receiver.count, receiver.bad_signatures, receiver.duplicates) == (1, 0, 0)
    [body] = receiver.bodies
    assert body["alert_id"] == "sig-1" and body["route"] == "pager"
    assert body["escalation_level"] == 0 and body["signal"]["type"] == "sla.breached"
    headers = receiver.headers[0]
    assert headers["Idempotency-Key"] == "sig-1:pager"
    assert headers["X-Loop-Timestamp"] == str(int(NOW.timestamp()))
    [d] = outbox.deliveries("sig-1")
    assert (d.status, d.attempts, d.delivered_at) == ("delivered", 1, NOW)
    assert receiver.raw == [webhook_body(d)]
    expected = hmac.new(SECRET, receiver.raw[0], hashlib.sha256).hexdigest()
    assert headers["X-Loop-Signature"] == f"sha256={expected}"
    assert verify(SECRET, receiver.raw[0], headers["X-Loop-Signature"])
    assert registry.get_sample_value(
        "loop_alert_delivery_delay_seconds_sum", {"route": "pager"}
    ) == pytest.approx(30.0)
    assert (
        registry.get_sample_value(
            "loop_alert_deliveries_total", {"route": "pager", "result": "delivered"}
        )
        == 1
    )


async def test_a_wrong_secret_is_refused_and_retried(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
    dispatcher = dispatchers(outbox, clock, secret=lambda _route: b"not-the-secret")
    outbox.enqueue([breach(1)])
    await dispatcher.step()
    assert (receiver.count, receiver.bad_signatures) == (0, 1)
    [d] = outbox.deliveries()
    assert (d.status, d.attempts, d.last_error) == ("pending", 1, "HTTP 401")
    assert d.next_attempt_at == NOW + timedelta(seconds=1)


async def test_fails_twice_then_delivered_on_the_third_attempt_after_backoff(
    tmp_path: Path, clock: FixedClock, dispatchers: Any
) -> None:
    receiver = LocalReceiver(SECRET, fail_first=2).start()
    try:
        outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
        dispatcher = dispatchers(outbox, clock)
        outbox.enqueue([breach(1)])
        assert await dispatcher.step() == 1  # 503
        assert await dispatcher.step() == 0  # backing off for 1 s
        clock.advance(timedelta(seconds=1))
        assert await dispatcher.step() == 1  # 503 again
        clock.advance(timedelta(seconds=1))
        assert await dispatcher.step() == 0  # now 2 s
        clock.advance(timedelta(seconds=1))
        assert await dispatcher.step() == 1
        [d] = outbox.deliveries()
        assert (d.status, d.attempts, receiver.requests, receiver.count) == (
            "delivered",
            3,
            3,
            1,
        )
    finally:
        receiver.stop()


async def test_gives_up_after_max_attempts_and_still_lists_it(
    tmp_path: Path, clock: FixedClock, dispatchers: Any
) -> None:
    receiver = LocalReceiver(SECRET, fail_first=100).start()
    try:
        outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
        dispatcher = dispatchers(outbox, clock, max_attempts=3)
        outbox.enqueue([breach(1)])
        for _ in range(5):
            await dispatcher.step()
            clock.advance(timedelta(minutes=5))
        [alert] = outbox.alerts("acme")
        [d] = alert.deliveries
        assert (d.status, d.attempts, d.last_error, receiver.requests) == (
            "failed",
            3,
            "HTTP 503",
            3,
        )
    finally:
        receiver.stop()


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4, 9, 10, 20)] == [1, 2, 4, 8, 256, 300, 300]


async def test_no_secret_fails_at_once_instead_of_sending_unsigned(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
    dispatcher = dispatchers(outbox, clock, secret=env_secret({}))
    outbox.enqueue([breach(1)])
    await dispatcher.step()
    [d] = outbox.deliveries()
    assert (d.status, d.last_error, receiver.requests) == (
        "failed",
        "no webhook secret configured",
        0,
    )


def test_per_route_secret_wins_over_the_shared_one() -> None:
    secret = env_secret({"LOOP_WEBHOOK_SECRET": "all", "LOOP_WEBHOOK_SECRET_P1_BREACHES": "p1"})
    assert (secret("p1-breaches"), secret("support-leads")) == (b"p1", b"all")


async def test_a_restart_re_deriving_the_signal_does_not_deliver_again(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    db = tmp_path / "log.db"
    policy = escalating_policy(receiver.url)
    first = outbox_at(db, policy, clock)
    first.enqueue([breach(1)])
    await dispatchers(first, clock).step()
    assert receiver.count == 1

    again = outbox_at(db, policy, clock)  # a new process on the same file replays the log
    assert again.add([breach(1)]) == 0
    assert await dispatchers(again, clock).step() == 0
    assert (receiver.requests, [d.attempts for d in again.deliveries()]) == (1, [1])


async def test_unacknowledged_breach_escalates_after_the_delay_acknowledged_does_not(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
    dispatcher = dispatchers(outbox, clock)
    outbox.enqueue([breach(1), breach(2)])
    assert await dispatcher.step() == 2
    alert_2 = outbox.alert("sig-2")
    assert alert_2 is not None
    AckFollower(outbox).handle(ack_event(alert_2, "on it", "u-9", clock.now()))

    clock.advance(timedelta(minutes=14, seconds=59))
    assert await dispatcher.step() == 0
    clock.advance(timedelta(seconds=1))
    assert await dispatcher.step() == 1
    assert await dispatcher.step() == 0
    clock.advance(timedelta(hours=1))
    assert await dispatcher.step() == 0  # leads has no escalation of its own

    received = [(b["alert_id"], b["route"], b["escalation_level"]) for b in receiver.bodies]
    # the first two go out concurrently, in either order; the escalation comes after both
    assert sorted(received[:2]) == [("sig-1", "pager", 0), ("sig-2", "pager", 0)]
    assert received[2:] == [("sig-1", "leads", 1)]
    alert_1, alert_2 = outbox.alert("sig-1"), outbox.alert("sig-2")
    assert alert_1 is not None and alert_2 is not None
    assert alert_1.ack is None and [d.route for d in alert_1.deliveries] == ["pager", "leads"]
    assert alert_2.ack is not None and alert_2.ack.note == "on it"
    assert [d.route for d in alert_2.deliveries] == ["pager"]


async def test_a_retraction_follows_the_breach_and_stops_its_escalation(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    policy = policy_with(
        OncallRoute(
            name="pager",
            signal_types=["sla.breached"],
            sink=receiver.url,
            escalate_after_minutes=15,
            escalate_to="leads",
        ),
        OncallRoute(name="leads", signal_types=["sla.breached"], sink=receiver.url),
    )
    outbox = outbox_at(tmp_path / "log.db", policy, clock)
    dispatcher = dispatchers(outbox, clock)
    b = breach(1)
    outbox.enqueue([b])
    await dispatcher.step()
    retraction = SlaBreachRetracted(
        **b.model_dump(exclude={"type", "signal_id"}),
        signal_id="sig-1:retracted",
        retracts="sig-1",
        reason="a reply before the deadline arrived late",
    )
    assert outbox.add([retraction]) == 1  # no route takes retractions: the breach's does
    clock.advance(timedelta(minutes=20))
    await dispatcher.step()
    assert [(x["alert_id"], x["route"]) for x in receiver.bodies] == [
        ("sig-1", "pager"),
        ("sig-1:retracted", "pager"),
    ]


async def test_console_sink_prints_one_line_and_old_history_is_not_paged(
    tmp_path: Path, clock: FixedClock, dispatchers: Any
) -> None:
    out = io.StringIO()
    policy = policy_with(OncallRoute(name="screen", sink="console"))
    outbox = outbox_at(tmp_path / "log.db", policy, clock)
    dispatcher = dispatchers(outbox, clock, console=Console(file=out, width=200))
    warning = SlaWarning(
        **breach(1).model_dump(exclude={"type", "signal_id"}), signal_id="w1", threshold_pct=80
    )
    old = breach(2).model_copy(update={"detected_at": NOW - timedelta(days=30)})
    outbox.enqueue([warning, old])
    assert await dispatcher.step() == 1
    [line] = out.getvalue().splitlines()
    assert "sla.warning" in line and "screen" in line and "acme/c1" in line
    assert [(d.alert_id, d.status) for d in outbox.deliveries()] == [
        ("w1", "delivered"),
        ("sig-2", "stale"),
    ]


def test_acks_come_from_the_log_through_the_engine(tmp_path: Path, clock: FixedClock) -> None:
    datastore = open_datastore(tmp_path / "log.db")
    outbox = Outbox(datastore, lambda _: default_policy(), clock)
    outbox.enqueue([breach(1)])
    alert = outbox.alert("sig-1")
    assert alert is not None and alert.ack is None
    log = interaction_log(datastore, clock)
    log.append([ack_event(alert, "seen", "u-1", NOW)])
    engine = EmbeddedEngine(log, signal_log(datastore, clock), [AckFollower(outbox)])
    engine.catch_up()
    alert = outbox.alert("sig-1")
    assert alert is not None and alert.ack is not None
    assert (alert.ack.note, alert.ack.acked_at) == ("seen", NOW)


def test_the_engine_sink_enqueues_derived_alerts_once_across_replays(tmp_path: Path) -> None:
    clock = FixedClock(T0 + timedelta(hours=6))
    db = tmp_path / "log.db"

    def engine() -> tuple[EmbeddedEngine, Outbox]:
        datastore = open_datastore(db)
        outbox = Outbox(datastore, lambda _: default_policy(), clock)
        rules: RulesBook[Policy] = RulesBook(default_policy(), policy_from_mapping)
        e = EmbeddedEngine(
            interaction_log(datastore, clock),
            signal_log(datastore, clock),
            [SlaProcessor(rules), AckFollower(outbox)],
            sinks=[outbox.enqueue],
        )
        return e, outbox

    first, outbox = engine()
    first.log.append([opened(1, impact="critical", urgency="critical"), clock_tick(clock.now())])
    first.catch_up()
    rows = [(d.signal_type, d.route, d.status) for d in outbox.deliveries()]
    assert rows == [
        ("sla.warning", "p1-breaches", "pending"),
        ("sla.warning", "p1-breaches", "pending"),
        ("sla.breached", "p1-breaches", "pending"),
    ]
    replayed, outbox = engine()
    replayed.catch_up()
    assert replayed.stats.signals == 3
    assert [(d.signal_type, d.route, d.status) for d in outbox.deliveries()] == rows


# --- API and CLI -----------------------------------------------------------------------------

ADMIN = "admin-token-acme-00000"
READ = "read-token-acme-000000"
OTHER = "admin-token-globex-000"


def grant(token: str, tenant: str, scopes: list[str]) -> TokenGrant:
    return TokenGrant.model_validate({"token": token, "tenant": tenant, "scopes": scopes})


@pytest.fixture
def api(tmp_path: Path, clock: FixedClock) -> Iterator[tuple[TestClient, Outbox, Any]]:
    datastore = open_datastore(tmp_path / "log.db")
    log = interaction_log(datastore, clock)
    outbox = Outbox(datastore, lambda _: default_policy(), clock)
    tokens = TokenRegistry(
        [
            grant(ADMIN, "acme", ["ingest", "read", "admin"]),
            grant(READ, "acme", ["read"]),
            grant(OTHER, "globex", ["ingest", "read", "admin"]),
        ]
    )
    app = create_app(
        Settings(data_dir=tmp_path),
        log,
        tokens=tokens,
        metrics=Metrics(),
        clock=clock,
        routers=[alerts_router(outbox, log.append, clock)],
    )
    with TestClient(app) as client:
        yield client, outbox, log


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_api_lists_the_tenants_alerts_and_acknowledges_through_the_log(
    api: tuple[TestClient, Outbox, Any],
) -> None:
    client, outbox, log = api
    outbox.enqueue([breach(1), breach(2, tenant="globex")])

    r = client.get("/v1/alerts", headers=auth(READ))
    assert r.status_code == 200, r.text
    [alert] = r.json()["alerts"]
    assert (alert["alert_id"], alert["acknowledged"]) == ("sig-1", False)
    assert [(d["route"], d["status"]) for d in alert["deliveries"]] == [("p1-breaches", "pending")]

    assert client.post("/v1/alerts/sig-1/ack", headers=auth(READ)).status_code == 403
    assert client.post("/v1/alerts/sig-1/ack", headers=auth(OTHER)).status_code == 404
    assert client.post("/v1/alerts/nope/ack", headers=auth(ADMIN)).status_code == 404
    r = client.post("/v1/alerts/sig-1/ack", json={"note": "paging db team"}, headers=auth(ADMIN))
    assert r.status_code == 202, r.text
    assert r.json()["duplicate"] is False
    [record] = log.read(1, 10)
    event: Event = record.value
    assert isinstance(event, AlertAcknowledged)
    assert (event.alert_id, event.note, event.tenant_id) == ("sig-1", "paging db team", "acme")
    again = client.post("/v1/alerts/sig-1/ack", headers=auth(ADMIN))
    assert (again.status_code, again.json()["duplicate"], log.head()) == (202, True, 1)

    [alert] = client.get("/v1/alerts", headers=auth(READ)).json()["alerts"]
    assert (alert["acknowledged"], alert["ack_note"]) == (True, "paging db team")
    [other] = client.get("/v1/alerts", headers=auth(OTHER)).json()["alerts"]
    assert other["alert_id"] == "sig-2"


def test_cli_lists_and_acknowledges(tmp_path: Path, clock: FixedClock) -> None:
    db = tmp_path / "log.db"
    outbox = Outbox(open_datastore(db), lambda _: default_policy(), clock)
    outbox.enqueue([breach(1)])
    runner = CliRunner()
    listed = runner.invoke(main, ["alerts", "list", "--db", str(db)])
    assert listed.exit_code == 0, listed.output
    assert "sig-1" in listed.output and "p1-breaches: pending" in listed.output

    acked = runner.invoke(main, ["alerts", "ack", "sig-1", "--note", "looking", "--db", str(db)])
    assert acked.exit_code == 0, acked.output
    [record] = interaction_log(open_datastore(db)).read(1, 10)
    assert isinstance(record.value, AlertAcknowledged) and record.value.note == "looking"
    listed = runner.invoke(main, ["alerts", "list", "--db", str(db)])
    assert "looking" in listed.output
    missing = runner.invoke(main, ["alerts", "ack", "nope", "--db", str(db)])
    assert missing.exit_code != 0 and "no alert" in missing.output


async def test_measure_delivery_small_run() -> None:
    result = await measure_delivery(50)
    assert result["n"] == 50 and result["bad_signatures"] == 0 and result["duplicates"] == 0
    assert 0 <= result["p50_s"] <= result["p99_s"] <= result["max_s"]
