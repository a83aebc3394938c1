import asyncio
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
    idempotency_key,
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


def expected_key(route: str, *alerts: tuple[str, int]) -> str:
    """The documented Idempotency-Key, computed independently of the code under test."""
    lines = sorted(f"{alert_id}:{route}:{level}" for alert_id, level in alerts)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


async def test_a_batch_is_one_post_with_one_signature_the_receiver_verifies(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    registry = CollectorRegistry()
    outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
    dispatcher = dispatchers(outbox, clock, metrics=AlertMetrics(registry))
    warning = SlaWarning(
        **breach(2).model_dump(exclude={"type", "signal_id"}), signal_id="w2", threshold_pct=80
    )
    assert outbox.add([breach(1), breach(3), warning]) == 2  # no route takes warnings
    assert await dispatcher.step() == 2
    assert await dispatcher.step() == 0

    assert (receiver.requests, receiver.count, receiver.alerts) == (1, 1, 2)
    assert (receiver.bad_signatures, receiver.duplicates) == (0, 0)
    [body] = receiver.bodies
    assert set(body) == {"route", "alerts"} and body["route"] == "pager"
    assert [(a["alert_id"], a["escalation_level"]) for a in body["alerts"]] == [
        ("sig-1", 0),
        ("sig-3", 0),
    ]
    assert all(set(a) == {"alert_id", "escalation_level", "signal"} for a in body["alerts"])
    assert body["alerts"][0]["signal"]["type"] == "sla.breached"
    assert body["alerts"][1]["signal"]["case_id"] == "c3"
    headers = receiver.headers[0]
    assert headers["Idempotency-Key"] == expected_key("pager", ("sig-3", 0), ("sig-1", 0))
    assert headers["X-Loop-Timestamp"] == str(int(NOW.timestamp()))
    ds = outbox.deliveries()
    assert [(d.status, d.attempts, d.delivered_at) for d in ds] == [("delivered", 1, NOW)] * 2
    assert receiver.raw == [webhook_body("pager", ds)]
    expected = hmac.new(SECRET, receiver.raw[0], hashlib.sha256).hexdigest()
    assert headers["X-Loop-Signature"] == f"sha256={expected}"
    assert verify(SECRET, receiver.raw[0], headers["X-Loop-Signature"])
    assert not verify(SECRET, receiver.raw[0].replace(b"c3", b"c4"), headers["X-Loop-Signature"])
    # the delay histogram still counts every alert of the batch
    labels = {"route": "pager"}
    assert registry.get_sample_value("loop_alert_delivery_delay_seconds_count", labels) == 2
    assert registry.get_sample_value(
        "loop_alert_delivery_delay_seconds_sum", labels
    ) == pytest.approx(60.0)
    assert (
        registry.get_sample_value(
            "loop_alert_deliveries_total", {"route": "pager", "result": "delivered"}
        )
        == 2
    )


def test_the_idempotency_key_depends_on_the_set_of_alerts_not_their_order(
    tmp_path: Path, clock: FixedClock
) -> None:
    outbox = outbox_at(tmp_path / "log.db", escalating_policy("http://127.0.0.1:9/"), clock)
    outbox.add([breach(i) for i in range(1, 6)])
    ds = outbox.deliveries()
    key = idempotency_key("pager", ds)
    assert key == expected_key("pager", *((f"sig-{i}", 0) for i in range(1, 6)))
    assert idempotency_key("pager", ds[::-1]) == key
    assert idempotency_key("pager", [ds[2], ds[0], ds[4], ds[1], ds[3]]) == key
    assert idempotency_key("pager", ds[:4]) != key  # another set of alerts
    assert idempotency_key("leads", ds) != key  # another route
    raised = [d.__class__(**{**_fields(d), "escalation_level": 1}) for d in ds]
    assert idempotency_key("pager", raised) != key  # another escalation level


def _fields(d: Any) -> dict[str, Any]:
    return {name: getattr(d, name) for name in d.__slots__}


async def test_batches_split_at_max_batch_and_go_out_concurrently_in_any_order(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    policy = policy_with(
        OncallRoute(
            name="pager",
            signal_types=["sla.breached"],
            priorities=[Priority.P1],
            sink=receiver.url,
        ),
        OncallRoute(name="p2", signal_types=["sla.breached"], sink=receiver.url),
    )
    outbox = outbox_at(tmp_path / "log.db", policy, clock)
    dispatcher = dispatchers(outbox, clock, max_batch=3, concurrency=4)
    p1 = [breach(i) for i in range(1, 8)]  # 7 → batches of 3, 3, 1
    p2 = [breach(i, priority=Priority.P2) for i in range(8, 12)]  # 4 → 3, 1
    assert outbox.add(p1 + p2) == 11
    assert await dispatcher.step() == 11
    assert await dispatcher.step() == 0

    assert (receiver.requests, receiver.count, receiver.bad_signatures) == (5, 5, 0)
    sizes: dict[str, list[int]] = {}
    for body, headers, raw in zip(receiver.bodies, receiver.headers, receiver.raw, strict=True):
        sizes.setdefault(body["route"], []).append(len(body["alerts"]))
        alerts = [(a["alert_id"], a["escalation_level"]) for a in body["alerts"]]
        assert headers["Idempotency-Key"] == expected_key(body["route"], *alerts)
        assert verify(SECRET, raw, headers["X-Loop-Signature"])
    # whatever order the concurrent batches arrived in, each alert arrived once, to its route
    assert {k: sorted(v) for k, v in sizes.items()} == {"pager": [1, 3, 3], "p2": [1, 3]}
    assert sorted(receiver.received) == sorted(
        [(f"sig-{i}", "pager", 0) for i in range(1, 8)]
        + [(f"sig-{i}", "p2", 0) for i in range(8, 12)]
    )
    assert len(set(receiver.keys)) == 5 and receiver.duplicates == 0
    assert {d.status for d in outbox.deliveries()} == {"delivered"}


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


async def test_a_batch_that_fails_twice_is_delivered_on_the_third_attempt_after_backoff(
    tmp_path: Path, clock: FixedClock, dispatchers: Any
) -> None:
    receiver = LocalReceiver(SECRET, fail_first=2).start()
    try:
        outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
        dispatcher = dispatchers(outbox, clock)
        outbox.enqueue([breach(1), breach(2), breach(3)])
        assert await dispatcher.step() == 3  # 503
        assert await dispatcher.step() == 0  # backing off for 1 s
        assert {(d.attempts, d.last_error) for d in outbox.deliveries()} == {(1, "HTTP 503")}
        clock.advance(timedelta(seconds=1))
        assert await dispatcher.step() == 3  # 503 again
        clock.advance(timedelta(seconds=1))
        assert await dispatcher.step() == 0  # now 2 s
        clock.advance(timedelta(seconds=1))
        assert await dispatcher.step() == 3
        ds = outbox.deliveries()
        assert [(d.alert_id, d.status, d.attempts, d.last_error) for d in ds] == [
            (f"sig-{i}", "delivered", 3, None) for i in (1, 2, 3)
        ]
        assert (receiver.requests, receiver.count, receiver.alerts) == (3, 1, 3)
        # the retried batch carried the same key each time
        key = expected_key("pager", ("sig-1", 0), ("sig-2", 0), ("sig-3", 0))
        assert receiver.attempt_keys == [key, key, key]
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
    # a new alert after the restart goes out alone, not with the one already delivered
    assert again.add([breach(1), breach(2)]) == 1
    assert await dispatchers(again, clock).step() == 1
    assert receiver.received == [("sig-1", "pager", 0), ("sig-2", "pager", 0)]
    assert (receiver.requests, receiver.duplicates) == (2, 0)


async def test_a_crash_after_the_answer_resends_the_batch_with_the_same_key_after_the_lease(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    db = tmp_path / "log.db"
    policy = escalating_policy(receiver.url)
    first = outbox_at(db, policy, clock)
    first.enqueue([breach(1), breach(2)])

    def crash(outcomes: Any) -> None:
        raise RuntimeError("killed between the 2xx and the commit")

    first.finish = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await dispatchers(first, clock).step()
    assert receiver.alerts == 2

    again = outbox_at(db, policy, clock)  # the restarted process
    dispatcher = dispatchers(again, clock)
    assert await dispatcher.step() == 0  # still leased
    clock.advance(timedelta(minutes=2))
    assert await dispatcher.step() == 2
    assert receiver.requests == 2 and len(set(receiver.attempt_keys)) == 1
    assert (receiver.count, receiver.alerts, receiver.duplicates) == (1, 2, 2)
    assert [(d.status, d.attempts) for d in again.deliveries()] == [("delivered", 2)] * 2
    assert await dispatcher.step() == 0


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

    received = receiver.received
    # the first two go out in one batch; the escalation comes after, alone, to leads
    assert receiver.requests == 2
    assert sorted(received[:2]) == [("sig-1", "pager", 0), ("sig-2", "pager", 0)]
    assert received[2:] == [("sig-1", "leads", 1)]
    assert receiver.headers[1]["Idempotency-Key"] == expected_key("leads", ("sig-1", 1))
    assert [a["signal"]["type"] for a in receiver.bodies[1]["alerts"]] == ["sla.breached"]
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
    assert receiver.received == [("sig-1", "pager", 0), ("sig-1:retracted", "pager", 0)]
    assert [d.escalation_level for d in outbox.deliveries()] == [0, 0]  # no escalation


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


async def test_the_dispatcher_drains_without_sleeping_while_deliveries_come_due(
    tmp_path: Path, receiver: LocalReceiver, clock: FixedClock, dispatchers: Any
) -> None:
    outbox = outbox_at(tmp_path / "log.db", escalating_policy(receiver.url), clock)
    finish = outbox.finish
    added: list[int] = []

    def finish_while_more_fall_due(outcomes: Any) -> None:
        finish(outcomes)
        if not added:  # deadlines that pass while the first step was delivering
            added.append(outbox.add([breach(i) for i in range(100, 130)]))

    outbox.finish = finish_while_more_fall_due  # type: ignore[method-assign]
    outbox.enqueue([breach(i) for i in range(1, 61)])
    dispatcher = dispatchers(outbox, clock, poll=timedelta(seconds=30))
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        async with asyncio.timeout(5):  # far less than the 30 s poll
            while receiver.alerts < 90:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task
    assert added == [30] and (receiver.alerts, receiver.duplicates) == (90, 0)
    assert receiver.requests == 2


def test_the_idle_poll_is_short_and_batches_default_to_500(
    tmp_path: Path, clock: FixedClock
) -> None:
    outbox = outbox_at(tmp_path / "log.db", default_policy(), clock)
    d = Dispatcher(
        outbox, clock, secret=lambda _: SECRET, metrics=AlertMetrics(CollectorRegistry())
    )
    assert d.poll <= 0.05 and d.max_batch == 500


async def test_measure_delivery_small_run() -> None:
    result = await measure_delivery(50, window_s=0.5, timeout_s=60)
    assert result["n"] == 50 and result["received"] == 50
    assert result["bad_signatures"] == 0 and result["duplicates"] == 0
    assert 0 <= result["p50_s"] <= result["p99_s"] <= result["max_s"] < 5


async def test_measure_delivery_all_due_at_once_goes_out_in_batches_of_500() -> None:
    result = await measure_delivery(600, window_s=0, timeout_s=60)
    assert (result["received"], result["requests"], result["duplicates"]) == (600, 2, 0)
