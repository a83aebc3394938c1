"""Alert delivery to on-call: an outbox of deliveries, a dispatcher, and the sinks.

The outbox is two SQLite tables in the log's own database file:

- `alert_deliveries`, one row per (alert, route): the alert is a derived signal (`alert_id` is
  its `signal_id`), the route an `[[oncall.routes]]` entry of the policy in force when the
  signal was detected. `Outbox.enqueue` is the engine's signal sink and inserts pending rows
  with INSERT OR IGNORE, so a signal that the engine derives again (every start replays the
  log) never makes a second row: an alert goes to a route at most once, across restarts.
- `alert_acks`, one row per acknowledged alert, written from the `alert.acknowledged` events
  on the log (`AckFollower` is a processor the engine drives), so a replay re-derives them.

`Dispatcher` runs in the live process. Each step claims due pending rows (attempts + 1 and a
lease, in one statement), groups them per route, as Alertmanager's webhook does, and hands each
group of up to `max_batch` alerts to the route's sink at once; every alert of the group is
marked delivered only after the sink succeeded (a webhook: a 2xx answer to the one `POST`). A
failure is retried after 1 s, 2 s, 4 s, … (per alert, by its attempts) capped at 5 min, all on
the injected clock; after `max_attempts` the row is `failed` (still listed). Delivery is at
least once: a crash between a 2xx and its commit re-sends after the lease. The dispatcher
drains without pausing while it finds due rows and polls every 50 ms when idle.

Escalation: a delivered `sla.breached` alert that nobody acknowledged within its route's
`escalate_after_minutes` (on the dispatcher's clock, counted from delivery) gets a pending row
for `escalate_to` with `escalation_level + 1`. A retraction of the breach stops escalation too.
A retraction that no route claims by type follows the routes its breach went to.

Webhook requests are `POST` with a JSON body `{"route": …, "alerts": [{"alert_id",
"escalation_level", "signal"}, …]}` (keys sorted) and the headers `X-Loop-Signature:
sha256=<hex HMAC-SHA256 of the exact body bytes>` (one signature for the batch),
`Idempotency-Key` (hex SHA-256 of the sorted `alert_id:route:escalation_level` lines, so a
retried batch repeats it) and `X-Loop-Timestamp` (unix seconds; not signed). A retry may be
regrouped with alerts that came due since, so a receiver should deduplicate on each alert's
`alert_id` + `escalation_level` too. The key is
`LOOP_WEBHOOK_SECRET_<ROUTE>` (route name upper-cased, other characters as `_`) or else
`LOOP_WEBHOOK_SECRET`; without one the delivery fails at once rather than go out unsigned.
Neither secrets nor bodies are logged.

Signals detected more than `stale_after` before the outbox clock's now (a bulk import of old
history, a first start on an old log) are recorded as `stale` and never sent: on-call is not
paged for last year's breaches.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

import httpx
import orjson
from eventsourcing.sqlite import SQLiteCursor, SQLiteDatastore
from prometheus_client import CollectorRegistry, Counter, Histogram
from rich.console import Console
from rich.markup import escape

from loopservice.domain.events import (
    Actor,
    ActorKind,
    AlertAcknowledged,
    Channel,
    Event,
    Source,
)
from loopservice.domain.policy import OncallRoute, Policy
from loopservice.domain.signals import Signal, SlaBreachRetracted
from loopservice.streams.clock import Clock

log = logging.getLogger(__name__)

DELIVERIES = "alert_deliveries"
ACKS = "alert_acks"

ALERTABLE_TYPES: frozenset[str] = frozenset(
    {
        "sla.breached",
        "sla.warning",
        "sla.breach_retracted",
        "handoff.rule_violated",
        "risk.raised",
        "risk.cleared",
        "pattern.detected",
    }
)
ESCALATING_TYPES: frozenset[str] = frozenset({"sla.breached"})

Status = Literal["pending", "delivered", "failed", "stale"]

_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {DELIVERIES} ("
    "alert_id TEXT NOT NULL, "
    "route TEXT NOT NULL, "
    "tenant_id TEXT NOT NULL, "
    "signal_type TEXT NOT NULL, "
    "signal TEXT NOT NULL, "
    "detected_at REAL NOT NULL, "
    "due_at REAL, "
    "retracts TEXT, "
    "status TEXT NOT NULL, "
    "attempts INTEGER NOT NULL DEFAULT 0, "
    "next_attempt_at REAL, "
    "delivered_at REAL, "
    "last_error TEXT, "
    "escalation_level INTEGER NOT NULL DEFAULT 0, "
    "escalation_due REAL, "
    "escalated_at REAL, "
    "created_at REAL NOT NULL, "
    "PRIMARY KEY (alert_id, route))",
    f"CREATE INDEX IF NOT EXISTS {DELIVERIES}_due ON {DELIVERIES} (status, next_attempt_at)",
    f"CREATE INDEX IF NOT EXISTS {DELIVERIES}_tenant ON {DELIVERIES} (tenant_id, detected_at)",
    f"CREATE INDEX IF NOT EXISTS {DELIVERIES}_escalation ON {DELIVERIES} (escalation_due) "
    "WHERE escalation_due IS NOT NULL AND escalated_at IS NULL",
    f"CREATE TABLE IF NOT EXISTS {ACKS} ("
    "alert_id TEXT PRIMARY KEY, "
    "tenant_id TEXT NOT NULL, "
    "acked_at REAL NOT NULL, "
    "note TEXT NOT NULL, "
    "event_id TEXT)",
)

_INSERT = (
    f"INSERT OR IGNORE INTO {DELIVERIES} (alert_id, route, tenant_id, signal_type, signal, "
    "detected_at, due_at, retracts, status, next_attempt_at, escalation_level, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _ts(at: datetime) -> float:
    return at.timestamp()


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _rowcount(cursor: SQLiteCursor) -> int:
    return max(0, int(cursor.sqlite_cursor.rowcount))


def backoff(attempts: int, cap: float = 300.0) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: 1, 2, 4, … capped at `cap`."""
    return float(min(2.0 ** max(attempts - 1, 0), cap))


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One row of the outbox: one alert to one route."""

    alert_id: str
    route: str
    tenant_id: str
    signal_type: str
    signal: dict[str, Any] = field(repr=False)
    status: Status
    attempts: int
    escalation_level: int
    detected_at: datetime
    due_at: datetime | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    alert_id: str
    acked_at: datetime
    note: str


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert with its delivery per route and its acknowledgement."""

    alert_id: str
    tenant_id: str
    signal_type: str
    signal: dict[str, Any] = field(repr=False)
    detected_at: datetime
    due_at: datetime | None
    deliveries: tuple[Delivery, ...]
    ack: Ack | None

    def to_json(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "type": self.signal_type,
            "tenant_id": self.tenant_id,
            "account_id": self.signal.get("account_id"),
            "case_id": self.signal.get("case_id"),
            "detected_at": self.detected_at.isoformat(),
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "acknowledged": self.ack is not None,
            "acked_at": self.ack.acked_at.isoformat() if self.ack else None,
            "ack_note": self.ack.note if self.ack else None,
            "deliveries": [
                {
                    "route": d.route,
                    "status": d.status,
                    "attempts": d.attempts,
                    "escalation_level": d.escalation_level,
                    "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
                    "next_attempt_at": (
                        d.next_attempt_at.isoformat()
                        if d.next_attempt_at and d.status == "pending"
                        else None
                    ),
                    "last_error": d.last_error,
                }
                for d in self.deliveries
            ],
            "signal": self.signal,
        }


_COLUMNS = (
    "alert_id, route, tenant_id, signal_type, signal, status, attempts, escalation_level, "
    "detected_at, due_at, next_attempt_at, delivered_at, last_error"
)


def _delivery(row: Sequence[Any]) -> Delivery:
    detected = _dt(row[8])
    assert detected is not None
    return Delivery(
        alert_id=row[0],
        route=row[1],
        tenant_id=row[2],
        signal_type=row[3],
        signal=orjson.loads(row[4]),
        status=row[5],
        attempts=row[6],
        escalation_level=row[7],
        detected_at=detected,
        due_at=_dt(row[9]),
        next_attempt_at=_dt(row[10]),
        delivered_at=_dt(row[11]),
        last_error=row[12],
    )


# --- the outbox ------------------------------------------------------------------------------


PolicyAt = Callable[[datetime], Policy]


class Outbox:
    """The delivery table; `enqueue` is the engine's signal sink (blocking, call from a thread)."""

    def __init__(
        self,
        datastore: SQLiteDatastore,
        policy_at: PolicyAt,
        clock: Clock,
        *,
        stale_after: timedelta | None = timedelta(hours=24),
    ) -> None:
        self.datastore = datastore
        self.policy_at = policy_at
        self.clock = clock
        self.stale_after = stale_after
        with self.datastore.transaction(commit=True) as cursor:
            for statement in _SCHEMA:
                cursor.execute(statement)

    # -- writing -----------------------------------------------------------------------------

    def enqueue(self, signals: Sequence[Signal]) -> None:
        """The engine's signal sink: `add`."""
        self.add(signals)

    def add(self, signals: Sequence[Signal]) -> int:
        """One pending row per (alertable signal, route); returns how many rows were new."""
        now = self.clock.now()
        rows: list[tuple[Any, ...]] = []
        retractions: list[SlaBreachRetracted] = []
        for s in signals:
            if s.type not in ALERTABLE_TYPES:
                continue
            route = self.policy_at(s.detected_at).oncall.route_for(
                s.type, getattr(s, "team", None), getattr(s, "priority", None)
            )
            if isinstance(s, SlaBreachRetracted):
                retractions.append(s)
            if route is not None:
                rows.append(self._row(s, route.name, now))
        with self.datastore.transaction(commit=True) as cursor:
            for r in retractions:
                if not any(row[0] == r.signal_id for row in rows):
                    cursor.execute(
                        f"SELECT route FROM {DELIVERIES} WHERE alert_id = ?", (r.retracts,)
                    )
                    rows += [self._row(r, name, now) for (name,) in cursor.fetchall()]
            if not rows:
                return 0
            cursor.executemany(_INSERT, rows)
            return _rowcount(cursor)

    def _row(self, s: Signal, route: str, now: datetime, level: int = 0) -> tuple[Any, ...]:
        due = getattr(s, "due_at", None)
        stale = self.stale_after is not None and s.detected_at < now - self.stale_after
        return (
            s.signal_id,
            route,
            s.tenant_id,
            s.type,
            orjson.dumps(s.model_dump(mode="json")).decode(),
            _ts(s.detected_at),
            _ts(due) if due is not None else None,
            getattr(s, "retracts", None),
            "stale" if stale else "pending",
            _ts(now),
            level,
            _ts(now),
        )

    def record_ack(self, event: AlertAcknowledged) -> bool:
        """Records an acknowledgement (the first one wins); True if it was new."""
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(
                f"INSERT OR IGNORE INTO {ACKS} (alert_id, tenant_id, acked_at, note, event_id) "
                "VALUES (?, ?, ?, ?, ?)",
                (event.alert_id, event.tenant_id, _ts(event.occurred_at), event.note,
                 event.event_id),
            )  # fmt: skip
            return _rowcount(cursor) > 0

    # -- the dispatcher's side ---------------------------------------------------------------

    def claim_due(self, now: datetime, lease: timedelta, limit: int) -> list[Delivery]:
        """Due pending rows, each with one more attempt and leased until `now + lease`."""
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(
                f"UPDATE {DELIVERIES} SET attempts = attempts + 1, next_attempt_at = ? "
                f"WHERE rowid IN (SELECT rowid FROM {DELIVERIES} WHERE status = 'pending' "
                "AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?) "
                f"RETURNING {_COLUMNS}",
                (_ts(now + lease), _ts(now), limit),
            )
            rows = cursor.fetchall()
        return sorted((_delivery(r) for r in rows), key=lambda d: d.detected_at)

    def finish(self, outcomes: Sequence[Outcome]) -> None:
        with self.datastore.transaction(commit=True) as cursor:
            for o in outcomes:
                d = o.delivery
                if o.ok:
                    cursor.execute(
                        f"UPDATE {DELIVERIES} SET status = 'delivered', delivered_at = ?, "
                        "last_error = NULL, escalation_due = ? WHERE alert_id = ? AND route = ?",
                        (_ts(o.at), o.escalation_due, d.alert_id, d.route),
                    )
                elif o.retry_at is None:
                    cursor.execute(
                        f"UPDATE {DELIVERIES} SET status = 'failed', last_error = ? "
                        "WHERE alert_id = ? AND route = ?",
                        (o.error, d.alert_id, d.route),
                    )
                else:
                    cursor.execute(
                        f"UPDATE {DELIVERIES} SET next_attempt_at = ?, last_error = ? "
                        "WHERE alert_id = ? AND route = ?",
                        (_ts(o.retry_at), o.error, d.alert_id, d.route),
                    )

    def escalate(self, now: datetime) -> list[tuple[str, str]]:
        """Adds the next route's row for every unacknowledged alert past its escalation time;
        returns the (alert_id, route) pairs escalated to."""
        made: list[tuple[str, str]] = []
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(
                f"SELECT {_COLUMNS} FROM {DELIVERIES} d WHERE escalation_due IS NOT NULL "
                "AND escalated_at IS NULL AND escalation_due <= ? "
                f"AND NOT EXISTS (SELECT 1 FROM {ACKS} a WHERE a.alert_id = d.alert_id) "
                f"AND NOT EXISTS (SELECT 1 FROM {DELIVERIES} r WHERE r.retracts = d.alert_id)",
                (_ts(now),),
            )
            for row in cursor.fetchall():
                d = _delivery(row)
                route = self.route(d)
                if route is not None and route.escalate_to is not None:
                    cursor.execute(
                        _INSERT,
                        (d.alert_id, route.escalate_to, d.tenant_id, d.signal_type,
                         orjson.dumps(d.signal).decode(), _ts(d.detected_at),
                         _ts(d.due_at) if d.due_at else None, None, "pending", _ts(now),
                         d.escalation_level + 1, _ts(now)),
                    )  # fmt: skip
                    if _rowcount(cursor):
                        made.append((d.alert_id, route.escalate_to))
                cursor.execute(
                    f"UPDATE {DELIVERIES} SET escalated_at = ? WHERE alert_id = ? AND route = ?",
                    (_ts(now), d.alert_id, d.route),
                )
        return made

    def route(self, d: Delivery) -> OncallRoute | None:
        routes = self.policy_at(d.detected_at).oncall.routes
        return next((r for r in routes if r.name == d.route), None)

    # -- reading -----------------------------------------------------------------------------

    def deliveries(self, alert_id: str | None = None) -> list[Delivery]:
        sql = f"SELECT {_COLUMNS} FROM {DELIVERIES}"
        params: tuple[Any, ...] = ()
        if alert_id is not None:
            sql += " WHERE alert_id = ?"
            params = (alert_id,)
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(sql + " ORDER BY created_at, escalation_level", params)
            return [_delivery(r) for r in cursor.fetchall()]

    def alert(self, alert_id: str) -> Alert | None:
        found = self._alerts("WHERE alert_id = ?", (alert_id,))
        return found[0] if found else None

    def alerts(self, tenant: str | None = None, limit: int = 100) -> list[Alert]:
        """Newest first (by detection time); every tenant's when `tenant` is None."""
        where, params = ("WHERE tenant_id = ?", (tenant,)) if tenant is not None else ("", ())
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                f"SELECT alert_id FROM {DELIVERIES} {where} GROUP BY alert_id "
                "ORDER BY MAX(detected_at) DESC, alert_id LIMIT ?",
                (*params, limit),
            )
            ids = [r[0] for r in cursor.fetchall()]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        by_id = {a.alert_id: a for a in self._alerts(f"WHERE alert_id IN ({marks})", tuple(ids))}
        return [by_id[i] for i in ids]

    def _alerts(self, where: str, params: tuple[Any, ...]) -> list[Alert]:
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(
                f"SELECT {_COLUMNS} FROM {DELIVERIES} {where} "
                "ORDER BY created_at, escalation_level",
                params,
            )
            rows = [_delivery(r) for r in cursor.fetchall()]
            ids = sorted({d.alert_id for d in rows})
            acks: dict[str, Ack] = {}
            if ids:
                cursor.execute(
                    f"SELECT alert_id, acked_at, note FROM {ACKS} "
                    f"WHERE alert_id IN ({','.join('?' * len(ids))})",
                    tuple(ids),
                )
                for alert_id, acked_at, note in cursor.fetchall():
                    at = _dt(acked_at)
                    assert at is not None
                    acks[alert_id] = Ack(alert_id, at, note)
        grouped: dict[str, list[Delivery]] = {}
        for d in rows:
            grouped.setdefault(d.alert_id, []).append(d)
        return [
            Alert(
                alert_id=alert_id,
                tenant_id=ds[0].tenant_id,
                signal_type=ds[0].signal_type,
                signal=ds[0].signal,
                detected_at=ds[0].detected_at,
                due_at=ds[0].due_at,
                deliveries=tuple(ds),
                ack=acks.get(alert_id),
            )
            for alert_id, ds in grouped.items()
        ]


# --- acknowledging --------------------------------------------------------------------------


def ack_event(alert: Alert, note: str, actor_id: str, at: datetime) -> AlertAcknowledged:
    """The `alert.acknowledged` event for `alert`. Its id names the alert, so acknowledging
    twice is a duplicate on the log (the first note stays)."""
    digest = hashlib.sha256(f"{alert.tenant_id}\0{alert.alert_id}".encode()).hexdigest()[:32]
    return AlertAcknowledged(
        event_id=f"ack:{digest}",
        occurred_at=at,
        tenant_id=alert.tenant_id,
        account_id=str(alert.signal.get("account_id") or "-"),
        source=Source(platform="loopservice", channel=Channel.WEB),
        actor=Actor(kind=ActorKind.AGENT, id=actor_id),
        alert_id=alert.alert_id,
        note=note,
    )


# --- acknowledgements from the log -----------------------------------------------------------


class AckFollower:
    """A processor that records `alert.acknowledged` events into the outbox's ack table.

    It derives no signals; the log stays the source of truth and a replay writes the same
    acknowledgements again (the first one per alert wins).
    """

    name = "alert-acks"

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def handle(self, event: Event) -> list[Signal]:
        if isinstance(event, AlertAcknowledged):
            self.outbox.record_ack(event)
        return []

    def advance(self, watermark: datetime) -> list[Signal]:
        return []

    def next_due(self) -> datetime | None:
        return None


# --- sinks -----------------------------------------------------------------------------------


class DeliveryError(Exception):
    """A failed attempt; `permanent` ones are not retried."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


class Sink(Protocol):
    async def deliver_batch(
        self, route: str, deliveries: Sequence[Delivery], now: datetime
    ) -> None:
        """Returns once every alert of the batch is delivered; raises `DeliveryError` (or
        anything) if not, and then none of them counts as delivered."""
        ...


class ConsoleSink:
    """Prints one line per alert: the demo's pager."""

    _STYLES: Mapping[str, str] = {
        "sla.breached": "bold red",
        "sla.warning": "yellow",
        "sla.breach_retracted": "green",
    }

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    async def deliver_batch(
        self, route: str, deliveries: Sequence[Delivery], now: datetime
    ) -> None:
        for d in deliveries:
            await self.deliver(d, now)

    async def deliver(self, delivery: Delivery, now: datetime) -> None:
        s = delivery.signal
        style = self._STYLES.get(delivery.signal_type, "cyan")
        what = s.get("metric") or s.get("rule") or s.get("pattern") or s.get("level") or ""
        due = f" due {delivery.due_at:%a %H:%M}" if delivery.due_at else ""
        escalated = f" [bold]↑{delivery.escalation_level}[/]" if delivery.escalation_level else ""
        where = escape(f"{delivery.tenant_id}/{s.get('case_id') or s.get('account_id')}")
        self.console.print(
            f"[{style}]{delivery.signal_type:<22}[/] → {escape(delivery.route)}{escalated} "
            f"{where} {escape(str(what))}{due} {s.get('priority') or ''}".rstrip(),
            markup=True,
            highlight=False,
        )


def webhook_body(route: str, deliveries: Sequence[Delivery]) -> bytes:
    """`{"route", "alerts": [{"alert_id", "escalation_level", "signal"}, …]}`, keys sorted,
    alerts in the order given."""
    return orjson.dumps(
        {
            "route": route,
            "alerts": [
                {
                    "alert_id": d.alert_id,
                    "escalation_level": d.escalation_level,
                    "signal": d.signal,
                }
                for d in deliveries
            ],
        },
        option=orjson.OPT_SORT_KEYS,
    )


def idempotency_key(route: str, deliveries: Sequence[Delivery]) -> str:
    """Hex SHA-256 of the sorted `alert_id:route:escalation_level` lines: the same set of
    alerts gives the same key whatever their order, so a retried batch repeats its key."""
    lines = sorted(f"{d.alert_id}:{route}:{d.escalation_level}" for d in deliveries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str) -> bool:
    """What a receiver does with `X-Loop-Signature`."""
    return hmac.compare_digest(sign(secret, body), signature)


def env_secret(environ: Mapping[str, str] | None = None) -> Callable[[str], bytes | None]:
    """`LOOP_WEBHOOK_SECRET_<ROUTE>`, else `LOOP_WEBHOOK_SECRET`, read at each call."""
    env = os.environ if environ is None else environ

    def secret(route: str) -> bytes | None:
        key = "LOOP_WEBHOOK_SECRET_" + re.sub(r"[^A-Z0-9]", "_", route.upper())
        value = env.get(key) or env.get("LOOP_WEBHOOK_SECRET")
        return value.encode() if value else None

    return secret


class WebhookSink:
    """One signed `POST` per batch of alerts."""

    def __init__(
        self,
        url: str,
        secret: bytes | None,
        client: httpx.AsyncClient,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self._secret = secret
        self.client = client
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"WebhookSink({self.url!r})"

    async def deliver_batch(
        self, route: str, deliveries: Sequence[Delivery], now: datetime
    ) -> None:
        if self._secret is None:
            raise DeliveryError("no webhook secret configured", permanent=True)
        body = webhook_body(route, deliveries)
        headers = {
            "Content-Type": "application/json",
            "X-Loop-Signature": sign(self._secret, body),
            "Idempotency-Key": idempotency_key(route, deliveries),
            "X-Loop-Timestamp": str(int(now.timestamp())),
        }
        try:
            response = await self.client.post(
                self.url, content=body, headers=headers, timeout=self.timeout
            )
        except httpx.HTTPError as exc:
            raise DeliveryError(type(exc).__name__) from None
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"HTTP {response.status_code}")


# --- metrics ---------------------------------------------------------------------------------


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.delivery_delay = Histogram(
            "loop_alert_delivery_delay_seconds",
            "From an alert's deadline (its detection when it has none) to its first delivery, "
            "in the engine clock's seconds, by route; escalations are not counted.",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600),
            registry=registry,
        )
        self.deliveries = Counter(
            "loop_alert_deliveries",
            "Delivery attempts by route and result (delivered, retry, failed).",
            ["route", "result"],
            registry=registry,
        )
        self.escalations = Counter(
            "loop_alert_escalations",
            "Unacknowledged alerts escalated, by the route escalated to.",
            ["route"],
            registry=registry,
        )


# --- the dispatcher --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery: Delivery
    at: datetime
    ok: bool
    error: str | None = None
    retry_at: datetime | None = None
    escalation_due: float | None = None


SinkFactory = Callable[[OncallRoute], Sink]


class Dispatcher:
    """Delivers due outbox rows through their route's sink; run one per datastore.

    Each step claims up to `batch` due rows, groups them by route (and sink) and hands each
    group of up to `max_batch` alerts to the sink at once (one webhook `POST`), at most
    `concurrency` groups at a time; the one answer settles every alert of the group."""

    def __init__(
        self,
        outbox: Outbox,
        clock: Clock,
        *,
        client: httpx.AsyncClient | None = None,
        console: Console | None = None,
        secret: Callable[[str], bytes | None] | None = None,
        metrics: AlertMetrics | None = None,
        max_attempts: int = 10,
        max_backoff: timedelta = timedelta(minutes=5),
        lease: timedelta = timedelta(minutes=2),
        batch: int = 2000,
        max_batch: int = 500,
        concurrency: int = 4,
        poll: timedelta = timedelta(milliseconds=50),
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self._client = client
        self._own_client = client is None
        self.console_sink = ConsoleSink(console)
        self.secret = secret or env_secret()
        self.metrics = metrics or AlertMetrics()
        self.max_attempts = max_attempts
        self.max_backoff = max_backoff.total_seconds()
        self.lease = lease
        self.batch = batch
        self.max_batch = max(1, max_batch)
        self.concurrency = asyncio.Semaphore(concurrency)
        self._pool = concurrency
        self.poll = poll.total_seconds()
        self._sinks: dict[tuple[str, str], Sink] = {}

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(
                    max_connections=self._pool, max_keepalive_connections=self._pool
                )
            )
        return self._client

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def sink_for(self, route: OncallRoute) -> Sink:
        key = (route.name, route.sink)
        sink = self._sinks.get(key)
        if sink is None:
            if route.sink == "console":
                sink = self.console_sink
            else:
                sink = WebhookSink(route.sink, self.secret(route.name), self.client)
            self._sinks[key] = sink
        return sink

    async def step(self) -> int:
        """Escalates what is due, then delivers one claim of due rows, in batches per route;
        returns how many deliveries (alerts × routes) were attempted."""
        now = self.clock.now()
        escalated = await asyncio.to_thread(self.outbox.escalate, now)
        for _, to in escalated:
            self.metrics.escalations.labels(to).inc()
        due = await asyncio.to_thread(self.outbox.claim_due, now, self.lease, self.batch)
        if not due:
            return 0
        outcomes: list[Outcome] = []
        groups: dict[tuple[str, str], list[tuple[Delivery, OncallRoute]]] = {}
        for d in due:
            route = self.outbox.route(d)
            if route is None:
                error = DeliveryError(f"route {d.route!r} is not in the policy", permanent=True)
                outcomes.append(self._failed(d, error))
            else:
                groups.setdefault((route.name, route.sink), []).append((d, route))
        chunks = [
            members[i : i + self.max_batch]
            for members in groups.values()
            for i in range(0, len(members), self.max_batch)
        ]
        for settled in await asyncio.gather(*(self._attempt(c) for c in chunks)):
            outcomes += settled
        await asyncio.to_thread(self.outbox.finish, outcomes)
        return len(due)

    async def _attempt(self, members: Sequence[tuple[Delivery, OncallRoute]]) -> list[Outcome]:
        route = members[0][1]
        deliveries = [d for d, _ in members]
        try:
            async with self.concurrency:
                await self.sink_for(route).deliver_batch(route.name, deliveries, self.clock.now())
        except Exception as exc:
            return [self._failed(d, exc) for d in deliveries]
        at = self.clock.now()
        self.metrics.deliveries.labels(route.name, "delivered").inc(len(deliveries))
        delay = self.metrics.delivery_delay.labels(route.name)
        outcomes = []
        for d, r in members:
            if d.escalation_level == 0:
                deadline = d.due_at or d.detected_at
                delay.observe(max(0.0, (at - deadline).total_seconds()))
            escalation_due = None
            if d.signal_type in ESCALATING_TYPES and r.escalate_after_minutes is not None:
                escalation_due = _ts(at) + r.escalate_after_minutes * 60.0
            outcomes.append(Outcome(d, at, True, escalation_due=escalation_due))
        return outcomes

    def _failed(self, d: Delivery, exc: Exception) -> Outcome:
        reason = str(exc) if isinstance(exc, DeliveryError) else type(exc).__name__
        permanent = isinstance(exc, DeliveryError) and exc.permanent
        at = self.clock.now()
        if permanent or d.attempts >= self.max_attempts:
            log.warning("alert %s to %s failed for good: %s", d.alert_id, d.route, reason)
            self.metrics.deliveries.labels(d.route, "failed").inc()
            return Outcome(d, at, False, reason)
        self.metrics.deliveries.labels(d.route, "retry").inc()
        wait = backoff(d.attempts, self.max_backoff)
        return Outcome(d, at, False, reason, retry_at=at + timedelta(seconds=wait))

    async def run(self, stop: asyncio.Event) -> None:
        """Delivers until `stop` is set: straight on while a step finds work (more may have
        come due meanwhile), every `poll` when idle; a failing step is logged and retried."""
        try:
            while not stop.is_set():
                try:
                    busy = await self.step()
                except Exception:
                    log.exception("alert dispatcher step failed")
                    busy = 0
                if busy == 0:
                    await _sleep_or_stop(stop, self.poll)
        finally:
            await self.aclose()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


__all__ = [
    "ALERTABLE_TYPES",
    "Ack",
    "AckFollower",
    "Alert",
    "AlertMetrics",
    "ConsoleSink",
    "Delivery",
    "DeliveryError",
    "Dispatcher",
    "Outbox",
    "Sink",
    "WebhookSink",
    "backoff",
    "env_secret",
    "idempotency_key",
    "sign",
    "verify",
    "webhook_body",
]
