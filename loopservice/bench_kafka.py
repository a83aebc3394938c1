"""`loopservice bench kafka`: throughput of the Kafka engine with one worker, then two."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import click
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from loopservice.domain.events import EVENT_ADAPTER, Event, clock_tick
from loopservice.infra.kafka_log import (
    ensure_topics,
    interaction_log,
    topic_names,
)
from loopservice.simulator import generate
from loopservice.simulator_world import SimulationConfig

console = Console()
KAFKA_SH = Path(__file__).resolve().parent.parent / "infra" / "kafka" / "kafka.sh"


@click.command("kafka")
@click.option("--events", default=50_000, show_default=True, help="Simulated events to process.")
@click.option("--partitions", default=8, show_default=True)
@click.option("--bootstrap", help="a running broker (default: start one with infra/kafka/kafka.sh)")
@click.option("--max-workers", default=2, show_default=True, help="measure 1..N workers")
def bench_kafka(events: int, partitions: int, bootstrap: str | None, max_workers: int) -> None:
    """Events/s through the Kafka engine with 1, 2, … workers in one consumer group.

    Each run produces the same simulated log to fresh topics, starts the workers
    (`loopservice worker --no-ticks`) and times how long the group takes to commit the end
    offset of every partition. On one machine the workers share its cores, so the gain from a
    second worker shows how far the work is CPU-bound.
    """
    accounts = max(10, events // 256)
    log = [
        EVENT_ADAPTER.validate_python(raw)
        for raw in generate(SimulationConfig(accounts=accounts, days=256))
    ][:events]
    end = max(e.occurred_at for e in log) + timedelta(days=1)
    log += [clock_tick(end, partition=p) for p in range(partitions)]
    with tempfile.TemporaryDirectory(prefix="loop-bench-kafka-") as tmp:
        own_broker = bootstrap is None
        if own_broker:
            subprocess.run([str(KAFKA_SH), "up", "--dir", tmp, "--port", "19392"], check=True)
            bootstrap = "127.0.0.1:19392"
        assert bootstrap is not None
        try:
            table = Table(title=f"Kafka engine, {len(log):,} records, {partitions} partitions")
            for column in ("workers", "seconds", "events/s"):
                table.add_column(column, justify="right")
            for workers in range(1, max_workers + 1):
                seconds = _run(bootstrap, log, partitions, workers, Path(tmp))
                table.add_row(str(workers), f"{seconds:.1f}", f"{len(log) / seconds:,.0f}")
            console.print(table)
        finally:
            if own_broker:
                subprocess.run([str(KAFKA_SH), "down", "--dir", tmp], check=False)


def _run(bootstrap: str, log: list[Event], partitions: int, workers: int, tmp: Path) -> float:
    prefix = f"bench{workers}-{os.getpid()}."
    names = topic_names(prefix)
    ensure_topics(bootstrap, partitions, topics=names)
    with interaction_log(bootstrap, topic=names[0]) as kafka:
        for i in range(0, len(log), 5000):
            kafka.append(log[i : i + 5000])
        ends = kafka.heads()
    group = prefix.rstrip(".")
    started = time.monotonic()
    processes = [
        subprocess.Popen(
            [
                sys.executable, "-m", "loopservice", "worker", "--bootstrap", bootstrap,
                "--topic-prefix", prefix, "--app-id", group, "--partitions", str(partitions),
                "--data-dir", str(tmp / f"{group}-{n}"), "--web-port", str(16100 + n),
                "--no-ticks", "--loglevel", "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for n in range(workers)
    ]  # fmt: skip
    try:
        with console.status(f"{workers} worker(s) folding {len(log):,} records"):
            while not group_consumed(bootstrap, group, names[0], ends):
                time.sleep(0.5)
        return time.monotonic() - started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


def group_consumed(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> bool:
    """True once `group` has committed the end offset of every partition of `topic`."""

    async def committed() -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}

    try:
        done = asyncio.run(committed())
    except KafkaError:
        return False
    return all(done.get(p, -1) >= end for p, end in ends.items())
