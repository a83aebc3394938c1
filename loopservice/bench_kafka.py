"""`loopservice bench kafka`: throughput of the Kafka engine with one worker, then two, beside
the raw consume rate of the interactions topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import click
from aiokafka import AIOKafkaConsumer, TopicPartition
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
from loopservice.infra.sqlite_log import decode_interaction
from loopservice.policy_cli import default_policy
from loopservice.simulator import generate
from loopservice.simulator_world import SimulationConfig
from loopservice.streams.kafka_headers import header
from loopservice.streams.kafka_runs import MAX_RECORDS
from loopservice.streams.partitioned import Partition

console = Console()
KAFKA_SH = Path(__file__).resolve().parent.parent / "infra" / "kafka" / "kafka.sh"


@click.command("kafka")
@click.option("--events", default=50_000, show_default=True, help="Simulated events to process.")
@click.option("--partitions", default=8, show_default=True)
@click.option("--bootstrap", help="a running broker (default: start one with infra/kafka/kafka.sh)")
@click.option("--max-workers", default=2, show_default=True, help="measure 1..N workers")
def bench_kafka(events: int, partitions: int, bootstrap: str | None, max_workers: int) -> None:
    """Records/s through the Kafka engine with 1, 2, … workers, beside the raw consume rate.

    The limit is a plain aiokafka consumer reading every record of the interactions topic (no
    decoding); two more in-process rows show what decoding and then the processors' own fold
    (no Kafka writes) leave of it. Each worker run produces the same simulated log to fresh
    topics, starts the workers (`loopservice worker --no-ticks`) and polls the group's
    committed offsets: the rate counts from the first commit (start-up and the first
    rebalance excluded, shown apart) to the commit of every partition's end. The broker, the
    workers and this process share the machine's cores: the load average is shown per row.
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
            rows = _measure(bootstrap, log, partitions, max_workers, Path(tmp))
        finally:
            if own_broker:
                subprocess.run([str(KAFKA_SH), "down", "--dir", tmp], check=False)
    # Wide enough for every column when the output is not a terminal (a log, a note).
    Console(width=max(console.width, 132)).print(_table(rows, len(log), partitions))


@dataclass(frozen=True)
class Row:
    name: str
    seconds: float  # wall time of the measured span
    records: int  # records in that span
    cpu: float | None  # CPU seconds of the process(es) doing the work, whole run
    startup: float | None = None  # workers: seconds until the first commit

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


def _measure(
    bootstrap: str, log: list[Event], partitions: int, max_workers: int, tmp: Path
) -> list[tuple[Row, tuple[float, float, float]]]:
    rows: list[tuple[Row, tuple[float, float, float]]] = []
    topic, _ = _produce(bootstrap, log, partitions, f"benchraw-{os.getpid()}.")
    for decode, fold in ((False, False), (True, False), (True, True)):
        row = asyncio.run(_consume(bootstrap, topic, partitions, decode, fold))
        rows.append((row, os.getloadavg()))
    for workers in range(1, max_workers + 1):
        rows.append((_run(bootstrap, log, partitions, workers, tmp), os.getloadavg()))
    return rows


def _table(
    rows: list[tuple[Row, tuple[float, float, float]]], records: int, partitions: int
) -> Table:
    table = Table(title=f"Kafka engine, {records:,} records, {partitions} partitions")
    for column in (
        "run",
        "seconds",
        "records/s",
        "vs raw",
        "vs 1 worker",
        "CPU s",
        "records/CPU s",
        "start-up s",
        "load 1/5/15",
    ):
        table.add_column(column, justify="right")
    raw = rows[0][0].rate
    one = next((r.rate for r, _ in rows if r.name == "1 worker"), None)
    for row, load in rows:
        table.add_row(
            row.name,
            f"{row.seconds:.1f}",
            f"{row.rate:,.0f}",
            f"{row.rate / raw:.1%}",
            f"{row.rate / one:.2f}x" if one and row.name.endswith("workers") else "",
            f"{row.cpu:.1f}" if row.cpu is not None else "?",
            f"{records / row.cpu:,.0f}" if row.cpu else "?",
            f"{row.startup:.1f}" if row.startup is not None else "",
            " ".join(f"{x:.2f}" for x in load),
        )
    return table


def _produce(
    bootstrap: str, log: list[Event], partitions: int, prefix: str
) -> tuple[str, dict[int, int]]:
    """Writes `log` to fresh topics named with `prefix`; the interactions topic and its ends."""
    names = topic_names(prefix)
    ensure_topics(bootstrap, partitions, topics=names)
    with interaction_log(bootstrap, topic=names[0]) as kafka:
        for i in range(0, len(log), 5000):
            kafka.append(log[i : i + 5000])
        return names[0], kafka.heads()


async def _consume(bootstrap: str, topic: str, partitions: int, decode: bool, fold: bool) -> Row:
    """Reads every record of `topic` with one plain consumer; optionally decodes each into its
    event, and folds it in-process with the worker's per-partition processors (no writes to
    Kafka, but the state pickled as a worker's runs flush it)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # no position yet: from the first record
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        parts = {tp.partition: Partition(tp.partition, default_policy()) for tp in tps}
        # A worker's run of records spans the partitions: each flushes about this many.
        per_flush = max(1, MAX_RECORDS // partitions)
        left = {tp for tp in tps if ends[tp] > 0}
        count = 0
        started, cpu = time.perf_counter(), time.process_time()
        while left:
            batches = await consumer.getmany(*left, timeout_ms=1000, max_records=10_000)
            for tp, records in batches.items():
                count += len(records)
                if decode:
                    part = parts[tp.partition]
                    for i, record in enumerate(records, 1):
                        kind = header(record.headers, "type")
                        assert kind is not None
                        event = decode_interaction(kind.decode(), record.value)
                        if fold:
                            part.process(record.offset, event)
                            if i % per_flush == 0 or i == len(records):
                                part.flush()
                if records and records[-1].offset + 1 >= ends[tp]:
                    left.discard(tp)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await consumer.stop()
    name = "fold in-process" if fold else "consume + decode" if decode else "raw consume"
    return Row(name, seconds, count, cpu)


def _run(bootstrap: str, log: list[Event], partitions: int, workers: int, tmp: Path) -> Row:
    prefix = f"bench{workers}-{os.getpid()}."
    topic, ends = _produce(bootstrap, log, partitions, prefix)
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
        first: tuple[float, int] | None = None
        with console.status(f"{workers} worker(s) folding {len(log):,} records"):
            while True:
                done = committed_offsets(bootstrap, group, topic)
                now = time.monotonic()
                if first is None and any(done.values()):
                    first = (now, sum(done.values()))
                if all(done.get(p, -1) >= end for p, end in ends.items()):
                    break
                time.sleep(0.25)
        cpu = sum(_cpu_seconds(p.pid) for p in processes)
        assert first is not None
        name = "1 worker" if workers == 1 else f"{workers} workers"
        return Row(name, now - first[0], len(log) - first[1], cpu, first[0] - started)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The offsets `group` has committed on `topic`'s partitions ({} if unknown)."""

    async def committed() -> dict[int, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}

    try:
        return asyncio.run(committed())
    except KafkaError:
        return {}


def group_consumed(bootstrap: str, group: str, topic: str, ends: dict[int, int]) -> bool:
    """True once `group` has committed the end offset of every partition of `topic`."""
    done = committed_offsets(bootstrap, group, topic)
    return all(done.get(p, -1) >= end for p, end in ends.items())
