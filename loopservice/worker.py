"""`loopservice worker`: one Faust worker of the Kafka engine (`streams/faust_app.py`)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import astuple
from pathlib import Path

import click
import faust
import httpx
from prometheus_client import Counter, start_http_server

from loopservice.domain.signals import Signal
from loopservice.infra.kafka_log import (
    LogUnavailable,
    ensure_topics,
    topic_names,
)
from loopservice.infra.metrics import Metrics
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import decode_interaction
from loopservice.policy_cli import default_policy
from loopservice.streams.clock import WallClock
from loopservice.streams.faust_app import TABLES, KafkaTopics, WorkerConfig, create_app

logger = logging.getLogger(__name__)

ALERTS = Counter("loop_worker_alerts_total", "On-call alerts sent by this worker", ["sink"])


def alert_sink(webhook: str | None) -> Callable[[Signal, str], Awaitable[None]]:
    """Sends an alert to `webhook` when given (overriding the policy's sinks), else to the
    route's own sink: an http(s) URL gets a POST, `console` a log line (ids only, no text)."""
    client = httpx.AsyncClient(timeout=10.0)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    async def send(signal: Signal, sink: str) -> None:
        target = webhook or sink
        if target == "console":
            logger.warning("ALERT %s %s case=%s", signal.type, signal.signal_id, signal.case_id)
            ALERTS.labels("console").inc()
            return
        response = await client.post(
            target,
            content=signal.model_dump_json(),
            headers={
                "content-type": "application/json",
                "x-loop-signal-id": signal.signal_id,  # the receiver's idempotency key
                "x-loop-worker": worker,
            },
        )
        # A failed delivery raises: the alert is retried, its offset not committed until sent.
        response.raise_for_status()
        ALERTS.labels("webhook").inc()

    return send


@click.command("worker")
@click.option("--bootstrap", help="Kafka bootstrap servers (default: LOOP_KAFKA_BOOTSTRAP)")
@click.option(
    "--partitions", type=int, help="partitions of each topic (default: LOOP_KAFKA_PARTITIONS)"
)
@click.option("--topic-prefix", help="prefix of the topic names (default: LOOP_KAFKA_TOPIC_PREFIX)")
@click.option("--app-id", default="loopservice", show_default=True, help="consumer group id")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Faust's local directory")
@click.option("--web-port", type=int, default=6066, show_default=True, help="Faust's web port")
@click.option(
    "--metrics-port",
    type=int,
    default=0,
    help="serve Prometheus /metrics on this port (0 = off)",
)
@click.option("--alert-webhook", help="send every routed alert to this URL instead")
@click.option(
    "--ticks/--no-ticks",
    default=True,
    show_default=True,
    help="append clock ticks when deadlines come due on the wall clock (off: timers advance "
    "only with the log's own event times and ticks, as when re-running a fixed log)",
)
@click.option("--loglevel", default="warning", show_default=True)
def worker_command(
    bootstrap: str | None,
    partitions: int | None,
    topic_prefix: str | None,
    app_id: str,
    data_dir: Path | None,
    web_port: int,
    metrics_port: int,
    alert_webhook: str | None,
    ticks: bool,
    loglevel: str,
) -> None:
    """Run one worker of the Kafka engine.

    Workers with the same --app-id share the partitions of the interactions topic (key =
    account_id); each runs the embedded engine's processors for its partitions, keeps their
    state in a Faust table (changelog topic), appends clock ticks for its partitions when a
    deadline comes due, writes signals to the signals topic and delivers on-call alerts.
    Start more workers to add throughput; a worker that dies is replaced by the others.
    """
    settings = Settings.from_env(
        kafka_bootstrap=bootstrap, kafka_partitions=partitions, kafka_topic_prefix=topic_prefix
    )
    count = settings.kafka_partitions
    topics = KafkaTopics(*topic_names(settings.kafka_topic_prefix))
    try:
        ensure_topics(settings.kafka_bootstrap, count, topics=astuple(topics))
        # The tables' changelogs too, before any worker starts: two workers racing to create
        # them can leave one with a metadata snapshot of 0 partitions, which Faust rejects.
        ensure_topics(
            settings.kafka_bootstrap,
            count,
            topics=[f"{app_id}-{table}-changelog" for table in TABLES],
            config={"cleanup.policy": "compact"},
        )
    except (LogUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    metrics = Metrics()  # the API's signal metrics, so one dashboard sums every process
    metrics.registry.register(ALERTS)
    if metrics_port:
        start_http_server(metrics_port, addr="0.0.0.0", registry=metrics.registry)
    config = WorkerConfig(
        bootstrap=settings.kafka_bootstrap,
        topics=topics,
        partitions=count,
        app_id=app_id,
        data_dir=str(data_dir or settings.data_dir / "faust" / f"{app_id}-{web_port}"),
        allowed_lateness=settings.allowed_lateness,
        web_port=web_port,
        tick_interval=0.5 if ticks else None,
    )
    engine = create_app(
        config,
        policy=default_policy(),
        decode=decode_interaction,
        clock=WallClock(),
        alert_sink=alert_sink(alert_webhook),
        on_signals=metrics.count_signals,
        on_repeat=metrics.count_repeat,
    )
    worker = faust.Worker(engine.app, loglevel=loglevel)
    # Faust's terminal spinner sets the root logger to DEBUG to turn on every log call, so
    # aiokafka and Faust built a record for each debug line they log (5% of a busy worker).
    worker.spinner = None
    worker.execute_from_commandline()
