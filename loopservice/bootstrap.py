"""The composition root: settings in, a wired system out. Nothing else builds adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from rich.console import Console

from loopservice.domain.events import Event, Team
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import Signal
from loopservice.infra.alerts import AckFollower, Outbox
from loopservice.infra.alerts_api import alerts_router
from loopservice.infra.api import create_app
from loopservice.infra.dashboard import dashboard_router
from loopservice.infra.dead_letters import DeadLetterStore
from loopservice.infra.loop_api import loop_router, maturity_page_router
from loopservice.infra.metrics import Metrics
from loopservice.infra.projections_api import projections_router
from loopservice.infra.read_api import read_router
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.projections.loop_queries import LoopQueries
from loopservice.projections.queries import ProjectionQueries
from loopservice.projections.runner import ProjectionRunner, default_folds
from loopservice.projections.store import open_projection_store
from loopservice.streams.clock import Clock, WallClock
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.explain import EXPLAIN_TOPICS, explain_case
from loopservice.streams.log import LogRecord
from loopservice.streams.processors import CaseStateProcessor, HandoffProcessor, SlaProcessor
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import build_topology


@dataclass
class System:
    settings: Settings
    clock: Clock
    log: SQLiteLog[Event]
    signals: SQLiteLog[Signal]
    dead_letters: DeadLetterStore
    rules: RulesBook[Policy]
    cases: CaseStateProcessor
    sla: SlaProcessor
    handoffs: HandoffProcessor
    engine: EmbeddedEngine
    metrics: Metrics
    outbox: Outbox
    projections: ProjectionRunner
    queries: ProjectionQueries


def build_system(settings: Settings, clock: Clock | None = None) -> System:
    clock = clock or WallClock()
    datastore = open_datastore(settings.sqlite_path())
    log = interaction_log(datastore, clock)
    signals = signal_log(datastore, clock)
    dead_letters = DeadLetterStore(datastore, clock)
    projection_store = open_projection_store(settings.projections_url, datastore)
    projections = ProjectionRunner(projection_store, log, signals, default_folds(default_policy()))
    queries = ProjectionQueries(projection_store, log, signals, default_policy())
    rules: RulesBook[Policy] = RulesBook(default_policy(), policy_from_mapping)
    topology = build_topology(rules)
    cases, sla, handoffs = topology.cases, topology.sla, topology.handoffs
    outbox = Outbox(datastore, rules.in_force, clock)

    def dead_letter(record: LogRecord[Event], processor: str, exc: Exception) -> None:
        dead_letters.add(
            processor,
            f"{type(exc).__name__}: {exc}",
            record.value.model_dump(mode="json"),
            event_id=record.value.event_id,
            position=record.position,
        )

    engine = EmbeddedEngine(
        log,
        signals,
        [*topology.processors, AckFollower(outbox)],
        allowed_lateness=settings.allowed_lateness,
        on_failure=dead_letter,
        sinks=[outbox.enqueue],
    )
    metrics = Metrics()
    engine.sinks.append(metrics.count_signals)

    def open_clocks() -> int:
        with engine.lock:  # the scrape runs beside the engine's thread
            return sla.open_clocks()

    metrics.open_clocks.set_function(open_clocks)
    metrics.engine_position.set_function(lambda: engine.position)
    return System(
        settings,
        clock,
        log,
        signals,
        dead_letters,
        rules,
        cases,
        sla,
        handoffs,
        engine,
        metrics,
        outbox,
        projections,
        queries,
    )


def build_app(system: System, routers: Sequence[APIRouter] = (), speedup: float = 1.0) -> FastAPI:
    def board(tenant: str, team: Team | None) -> list[dict[str, Any]]:
        with system.engine.lock:
            return system.sla.board(tenant, team=team)

    def queues(tenant: str) -> list[dict[str, Any]]:
        with system.engine.lock:
            return system.sla.queues(tenant)

    def latest_signals(tenant: str, limit: int) -> list[dict[str, Any]]:
        head = system.signals.head()
        recent = system.signals.read(max(1, head - 5000), 5001)
        mine = [r.value.model_dump(mode="json") for r in recent if r.value.tenant_id == tenant]
        return mine[-limit:][::-1]

    def explanation(tenant: str, case_id: str) -> dict[str, Any] | None:
        rules: RulesBook[Policy] = RulesBook(default_policy(), policy_from_mapping)
        found = explain_case(system.log.values(topics=EXPLAIN_TOPICS), tenant, case_id, rules)
        return dataclasses.asdict(found) if found is not None else None

    read = read_router(board, queues, latest_signals, explanation, system.clock.now, speedup)
    return create_app(
        system.settings,
        system.log,
        clock=system.clock,
        metrics=system.metrics,
        routers=[
            read,
            alerts_router(system.outbox, system.log.append, system.clock),
            projections_router(system.queries),
            loop_router(LoopQueries(system.queries.store, default_policy())),
            maturity_page_router(),
            dashboard_router(),
            *routers,
        ],
    )


def console_sink(console: Console) -> Callable[[Sequence[Signal]], None]:
    """The demo's feed: one short dim line per derived signal (alerts print on their own)."""

    def show(signals: Sequence[Signal]) -> None:
        for s in signals:
            what = (
                getattr(s, "metric", None) or getattr(s, "rule", None) or getattr(s, "pattern", "")
            )
            pct = getattr(s, "threshold_pct", None)
            console.print(
                f"[dim]signal {s.type} {s.case_id or s.account_id} {what}"
                f"{f' {pct}%' if pct else ''}[/]",
                highlight=False,
            )

    return show
