"""`loopservice run` and `loopservice demo`: the engine and the HTTP API in one process."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Coroutine
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import click
import uvicorn
from rich.console import Console
from rich.progress import Progress

from loopservice.bootstrap import System, build_app, build_system, console_sink
from loopservice.infra.alerts import AlertMetrics, Dispatcher
from loopservice.infra.api import create_app
from loopservice.infra.kafka_log import (
    LogUnavailable,
    ensure_topics,
    topic_names,
)
from loopservice.infra.kafka_log import interaction_log as kafka_interaction_log
from loopservice.infra.settings import Settings, load_tokens
from loopservice.simulator import generate
from loopservice.simulator_world import SimulationConfig
from loopservice.streams.clock import Clock, ScaledClock, WallClock
from loopservice.streams.ingest import IngestService

console = Console(stderr=True)


def replay_existing(system: System) -> None:
    """Rebuilds processor state from the log before going live (state lives in memory)."""
    head = system.log.head()
    if head == 0:
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying the log", total=head)
        system.engine.catch_up(lambda n: progress.advance(task, n))
    console.print(
        f"replayed {head:,} records: {system.sla.open_clocks():,} SLA clocks running, "
        f"{system.engine.stats.signals:,} signals derived"
    )


async def serve(
    system: System,
    clock: Clock,
    *,
    host: str,
    port: int,
    speedup: float = 1.0,
    feeder: Coroutine[Any, Any, None] | None = None,
    exit_when: asyncio.Event | None = None,
) -> None:
    """Runs the live engine and the API until interrupted, or until `exit_when` is set."""
    stop = asyncio.Event()
    app = build_app(system, speedup=speedup)
    dispatcher = Dispatcher(
        system.outbox, clock, console=console, metrics=AlertMetrics(system.metrics.registry)
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    engine = asyncio.create_task(system.engine.run_live(clock, stop))
    alerts = asyncio.create_task(dispatcher.run(stop))
    projector = asyncio.create_task(system.projections.follow(stop))
    tasks = [asyncio.create_task(server.serve())]
    if feeder is not None:
        tasks.append(asyncio.create_task(feeder))
    if exit_when is not None:

        async def exit_later() -> None:
            await exit_when.wait()
            server.should_exit = True

        tasks.append(asyncio.create_task(exit_later()))
    try:
        await tasks[0]  # uvicorn returns on Ctrl-C / SIGTERM
    finally:
        stop.set()
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(engine, alerts, projector, *tasks[1:], return_exceptions=True)


def _link(settings: Settings, host: str, port: int) -> str:
    source = load_tokens(settings)
    read = next((g for g in source.grants if "read" in g.scopes), None)
    fragment = f"#token={read.token.get_secret_value()}" if read and source.origin == "dev" else ""
    return f"http://{host}:{port}/{fragment}"


@click.command("run")
@click.option("--host", default=None, help="Interface to listen on [default: LOOP_HTTP_HOST].")
@click.option("--port", type=int, default=None, help="Port [default: LOOP_HTTP_PORT or 8080].")
@click.option("--db", type=click.Path(path_type=Path), default=None, help="Embedded log file.")
def run_command(host: str | None, port: int | None, db: Path | None) -> None:
    """Run the embedded engine and the HTTP API (ingest, read API, dashboard, /metrics).

    The engine replays the log to rebuild its state, then follows it live: SLA timers fire on
    the watermark, and clock ticks are appended once the engine has caught up.

    With LOOP_ENGINE=kafka it serves only the ingest API (and /healthz, /metrics) in front of
    the broker; `loopservice worker` processes run the processors.
    """
    settings = Settings.from_env(
        http_host=host, http_port=port, log_url=f"sqlite:///{db}" if db else None
    )
    if settings.engine == "kafka":
        serve_kafka_ingest(settings)
        return
    system = build_system(settings, WallClock())
    replay_existing(system)
    console.print(f"Loop Service on {_link(settings, settings.http_host, settings.http_port)}")
    asyncio.run(serve(system, system.clock, host=settings.http_host, port=settings.http_port))


def serve_kafka_ingest(settings: Settings) -> None:
    """With `LOOP_ENGINE=kafka` this process is the ingest API in front of the broker: an event
    is acknowledged (2xx) only once the broker has it (acks=all), and while the broker cannot
    be reached requests get 503 with nothing acknowledged. `loopservice worker` processes run
    the processors."""
    names = topic_names(settings.kafka_topic_prefix)
    topic = names[0]
    try:
        ensure_topics(settings.kafka_bootstrap, settings.kafka_partitions, topics=names)
    except (LogUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    with kafka_interaction_log(settings.kafka_bootstrap, topic=topic, timeout=5.0) as log:
        app = create_app(settings, log, clock=WallClock())
        console.print(
            f"Loop Service ingest on http://{settings.http_host}:{settings.http_port}/v1/events "
            f"→ {topic} on {settings.kafka_bootstrap}"
        )
        uvicorn.run(app, host=settings.http_host, port=settings.http_port, log_level="warning")


@click.command("demo")
@click.option("--accounts", default=300, show_default=True, help="Simulated customer accounts.")
@click.option("--days", default=30, show_default=True, help="Simulated days to stream.")
@click.option("--seed", default=7, show_default=True, help="Simulation seed.")
@click.option(
    "--speedup",
    default=3600.0,
    show_default=True,
    help="Simulated seconds per real second (3600: one simulated hour a second).",
)
@click.option("--port", default=8080, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("var/demo"),
              show_default=True, help="Where the demo's log lives; wiped at start.")  # fmt: skip
@click.option("--exit-after/--keep-serving", default=False,
              help="Stop when the simulation ends instead of serving until Ctrl-C.")  # fmt: skip
def demo_command(
    accounts: int, days: int, seed: int, speedup: float, port: int, data_dir: Path,
    exit_after: bool,
) -> None:  # fmt: skip
    """Stream a simulated service operation into the running system, live.

    The simulator's platforms publish events as their simulated time comes, on a clock that
    runs SPEEDUP times faster than the wall clock; the engine is given the same clock, so
    cases open, SLA clocks run, warnings and breaches fire as they happen. Open the printed
    link to watch the SLA board.
    """
    logging.basicConfig(level=logging.WARNING)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    config = SimulationConfig(accounts=accounts, days=days, seed=seed)
    start = datetime.combine(config.start, time(), UTC)
    clock = ScaledClock(start, speedup)
    settings = Settings.from_env(
        data_dir=data_dir, log_url=f"sqlite:///{data_dir / 'loop.db'}", http_port=port
    )
    system = build_system(settings, clock)
    system.engine.sinks.append(console_sink(console))
    ingest = IngestService(system.log, clock, settings.clock_skew_tolerance, system.dead_letters)
    console.print(
        f"[bold]Loop Service demo[/]: {accounts} accounts, {days} simulated days at "
        f"{speedup:g}× — dashboard: {_link(settings, settings.http_host, port)}"
    )
    finished = asyncio.Event()

    async def feed() -> None:
        await stream_simulation(config, clock, ingest)
        console.print(
            "[bold green]simulation finished[/]" + ("" if exit_after else "; Ctrl-C to stop")
        )
        await asyncio.sleep(1)  # let the engine fold the last events
        finished.set()

    asyncio.run(
        serve(
            system,
            clock,
            host=settings.http_host,
            port=port,
            speedup=speedup,
            feeder=feed(),
            exit_when=finished if exit_after else None,
        )
    )
    stats = system.engine.stats
    console.print(
        f"{stats.records:,} records processed, {stats.ticks:,} clock ticks, "
        f"{stats.signals:,} signals"
    )


async def stream_simulation(
    config: SimulationConfig, clock: Clock, ingest: IngestService, batch: int = 200
) -> None:
    """Publishes each simulated event once the clock reaches its `occurred_at`."""
    pending: list[object] = []
    for raw in generate(config):
        at = datetime.fromisoformat(raw["occurred_at"])
        while at > clock.now():
            if pending:
                await asyncio.to_thread(ingest.submit_each, pending)
                pending = []
            await asyncio.sleep(0.05)
        pending.append(raw)
        if len(pending) >= batch:
            await asyncio.to_thread(ingest.submit_each, pending)
            pending = []
    if pending:
        await asyncio.to_thread(ingest.submit_each, pending)
