"""The Kafka engine on a real broker: `loopservice worker` processes, fed a simulated log, give
the embedded engine's signals — one worker, two workers splitting the partitions, and a worker
killed with SIGKILL mid-stream whose partitions the other takes over from the changelog."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from test_partitioned import by_identity, embedded_signals, simulated, with_repeats

from kafka_broker import KafkaBroker, kafka_broker  # noqa: F401
from loopservice.bench_kafka import group_consumed
from loopservice.domain.events import Event, clock_tick
from loopservice.domain.signals import Signal
from loopservice.infra.kafka_log import (
    ensure_topics,
    interaction_log,
    signal_log,
    topic_names,
)
from loopservice.policy_cli import default_policy
from loopservice.streams.kafka_delivery import delivery_group

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 8


class Webhook:
    """An on-call receiver: records every delivery (id header + body)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.senders: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append((self.headers["x-loop-signal-id"], body))
                outer.senders.add(self.headers["x-loop-worker"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.server.shutdown()


def produce(bootstrap: str, prefix: str, events: list[Event]) -> None:
    ensure_topics(bootstrap, PARTITIONS, topics=topic_names(prefix))
    with interaction_log(bootstrap, topic=topic_names(prefix)[0]) as log:
        for i in range(0, len(events), 2000):
            log.append(events[i : i + 2000])


def start_worker(
    bootstrap: str, prefix: str, group: str, hook: Webhook, tmp: Path, n: int
) -> subprocess.Popen[bytes]:
    port = 17000 + (os.getpid() * 7 + n) % 2000
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loopservice",
            "worker",
            "--bootstrap",
            bootstrap,
            "--topic-prefix",
            prefix,
            "--app-id",
            group,
            "--partitions",
            str(PARTITIONS),
            "--data-dir",
            str(tmp / f"faust-{n}"),
            "--web-port",
            str(port),
            "--alert-webhook",
            hook.url,
            "--loglevel",
            os.environ.get("LOOP_TEST_WORKER_LOGLEVEL", "warning"),
            "--no-ticks",  # the log ends with its own ticks: the wall clock must not add any
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # a SIGKILLed worker's log is complete
        stdout=open(tmp / f"worker-{n}.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kafka_signals(bootstrap: str, prefix: str) -> list[Signal]:
    with signal_log(bootstrap, topic=topic_names(prefix)[1]) as log:
        return [
            r.value for p, head in log.heads().items() for r in log.read_partition(p, 1, head + 1)
        ]


def signal_positions(
    bootstrap: str, prefix: str, ids: set[str]
) -> dict[str, list[tuple[int, int]]]:
    """Where the copies of these signals sit in the signals topic: (partition, position)."""
    found: dict[str, list[tuple[int, int]]] = {}
    with signal_log(bootstrap, topic=topic_names(prefix)[1]) as log:
        for p, head in log.heads().items():
            for r in log.read_partition(p, 1, head + 1):
                if r.value.signal_id in ids:
                    found.setdefault(r.value.signal_id, []).append((p, r.position))
    return found


def delivery_offsets(bootstrap: str, group: str) -> dict[str, int]:
    return committed_offsets(bootstrap, delivery_group(group))


def committed_offsets(bootstrap: str, group: str) -> dict[str, int]:
    """A group's committed offsets, by "topic:partition"."""

    async def committed() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(group)
        finally:
            await admin.close()
        return {f"{tp.topic}:{tp.partition}": meta.offset for tp, meta in offsets.items()}

    return asyncio.run(committed())


def routed(signals: dict[str, Signal]) -> set[str]:
    oncall = default_policy().oncall
    return {
        sid
        for sid, s in signals.items()
        if oncall.route_for(s.type, getattr(s, "team", None), getattr(s, "priority", None))
    }


def run_to_the_end(broker: KafkaBroker, prefix: str, group: str) -> None:
    """Waits until `group` has consumed the whole interactions topic, then every signal.

    It fails when the consumers stop making progress, not after a fixed time: on a loaded
    2-core box one worker folds a few hundred records a second, and how long the workload takes
    is a benchmark's question (`loopservice bench kafka`), not this test's."""
    interactions, signals_topic, _ = topic_names(prefix)
    with interaction_log(broker.bootstrap, topic=interactions) as log:
        ends = log.heads()
    wait_for_progress(broker.bootstrap, group, interactions, ends, "the interactions")
    # The breach clusters follow the folds' commits by a second or so, after the last
    # interaction: done once the signals topic has stopped growing and all of it is delivered.
    signal_heads: dict[int, int] = {}
    while True:
        with signal_log(broker.bootstrap, topic=signals_topic) as log:
            heads = log.heads()
        if heads == signal_heads:
            return
        signal_heads = heads
        wait_for_progress(
            broker.bootstrap, delivery_group(group), signals_topic, signal_heads, "the signals"
        )
        time.sleep(5.0)


def wait_for_progress(
    bootstrap: str,
    group: str,
    topic: str,
    ends: dict[int, int],
    what: str,
    *,
    stalled_after: float = 120.0,
    give_up_after: float = 1800.0,
) -> None:
    """Until `group` has committed `ends` on `topic`; fails once its committed offsets have not
    moved for `stalled_after` seconds."""
    started = moved = time.monotonic()
    last: dict[str, int] = {}
    while not group_consumed(bootstrap, group, topic, ends):
        now = time.monotonic()
        try:
            committed = committed_offsets(bootstrap, group)
        except KafkaError:
            committed = last  # the broker is busy: no news is no progress
        if committed != last:
            last, moved = committed, now
        if now - moved > stalled_after or now - started > give_up_after:
            raise AssertionError(
                f"{group} stopped consuming {what} ({now - moved:.0f} s without progress, "
                f"{now - started:.0f} s in all): committed {last}, ends {ends}"
            )
        time.sleep(2.0)


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Event], dict[str, Signal]]:
    """≥ 50k simulated events, one in 50 submitted twice (the Kafka log keeps both), plus a
    final tick per partition, and the embedded engine's signals for them (its log keeps one),
    topic surges and breach clusters included."""
    events = simulated(accounts=210, days=200, seed=5)
    end = max(e.occurred_at for e in events) + timedelta(days=30)
    expected = by_identity(
        embedded_signals(
            [*events, clock_tick(end)], tmp_path_factory.mktemp("embedded"), tenant_wide=True
        )
    )
    ticks = [clock_tick(end, partition=p) for p in range(PARTITIONS)]
    return [*with_repeats(events, every=50), *ticks], expected


def test_one_worker_gives_the_embedded_engines_signals(
    kafka_broker: KafkaBroker,  # noqa: F811
    workload: tuple[list[Event], dict[str, Signal]],
    webhook: Webhook,
    tmp_path: Path,
) -> None:
    events, expected = workload
    assert len(events) >= 50_000
    assert sum(1 for s in expected.values() if s.type == "sla.breached") >= 300
    assert any(getattr(s, "pattern", None) == "topic_surge" for s in expected.values())
    assert any(getattr(s, "pattern", None) == "breach_cluster" for s in expected.values())
    produce(kafka_broker.bootstrap, "one.", events)
    worker = start_worker(kafka_broker.bootstrap, "one.", "one", webhook, tmp_path, 1)
    try:
        run_to_the_end(kafka_broker, "one.", "one")
    finally:
        worker.terminate()
        worker.wait(30)
    got = by_identity(kafka_signals(kafka_broker.bootstrap, "one."))
    assert got.keys() == expected.keys()
    assert got == expected
    delivered = {sid for sid, _ in webhook.received}
    assert delivered == routed(expected)


def commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    async def run() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            tps = {TopicPartition(topic, p): o for p, o in offsets.items()}
            consumer.assign(list(tps))
            await consumer.commit(tps)
        finally:
            await consumer.stop()

    asyncio.run(run())


def test_a_commit_past_the_state_is_read_again_from_the_state(
    kafka_broker: KafkaBroker,  # noqa: F811
    webhook: Webhook,
    tmp_path: Path,
) -> None:
    """Faust acks the records it skips in a rebalance into the offsets it commits, so a commit
    can lie past records nobody folded (seen: the first records of a partition — its accounts'
    plan and owner — lost after a rebalance). The worker must fold from the state's position."""
    events = simulated(accounts=40, days=30, seed=7)
    end = max(e.occurred_at for e in events) + timedelta(days=30)
    expected = by_identity(embedded_signals([*events, clock_tick(end)], tmp_path, tenant_wide=True))
    produce(
        kafka_broker.bootstrap,
        "ahead.",
        [*with_repeats(events), *(clock_tick(end, partition=p) for p in range(PARTITIONS))],
    )
    interactions = topic_names("ahead.")[0]
    commit(kafka_broker.bootstrap, "ahead", interactions, dict.fromkeys(range(PARTITIONS), 25))
    worker = start_worker(kafka_broker.bootstrap, "ahead.", "ahead", webhook, tmp_path, 1)
    try:
        run_to_the_end(kafka_broker, "ahead.", "ahead")
    finally:
        worker.terminate()
        worker.wait(30)
    log = (tmp_path / "worker-1.log").read_text(errors="replace")
    got = by_identity(kafka_signals(kafka_broker.bootstrap, "ahead."))
    assert got.keys() == expected.keys(), log[-3000:]
    assert got == expected


def test_two_workers_split_the_partitions_and_survive_a_sigkill(
    kafka_broker: KafkaBroker,  # noqa: F811
    workload: tuple[list[Event], dict[str, Signal]],
    webhook: Webhook,
    tmp_path: Path,
) -> None:
    events, expected = workload
    first = start_worker(kafka_broker.bootstrap, "two.", "two", webhook, tmp_path, 1)
    second = start_worker(kafka_broker.bootstrap, "two.", "two", webhook, tmp_path, 2)
    try:
        time.sleep(8)  # both join the group before the log fills
        produce(kafka_broker.bootstrap, "two.", events)
        # mid-stream: some signals out, far from all
        wait_until(
            lambda: len(webhook.received) >= len(routed(expected)) // 4,
            600,
            "a quarter of the alerts",
        )
        assert len({sid for sid, _ in webhook.received}) < len(routed(expected))
        assert len(webhook.senders) == 2, "both workers own partitions of the signals topic"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        run_to_the_end(kafka_broker, "two.", "two")
    finally:
        for worker in (first, second):
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)
    logs = [(tmp_path / f"worker-{n}.log").read_text(errors="replace") for n in (1, 2)]
    got = by_identity(kafka_signals(kafka_broker.bootstrap, "two."))
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    (tmp_path / "signals.json").write_bytes(
        orjson.dumps({"missing": missing, "extra": extra}, option=orjson.OPT_INDENT_2)
    )
    assert not missing, (missing[:20], len(missing), extra[:20], len(extra), logs[1][-2000:])
    assert got.keys() == expected.keys()
    assert got == expected
    # at least once, deduplicated by identity: every routed alert arrived; any arrival twice
    # (a delivery the killed worker made but had not recorded) carries the same identity+body
    bodies: dict[str, bytes] = {}
    for sid, body in webhook.received:
        assert orjson.loads(bodies.setdefault(sid, body)) == orjson.loads(body)
    undelivered = routed(expected) - bodies.keys()
    assert not undelivered, (
        len(undelivered),
        signal_positions(kafka_broker.bootstrap, "two.", undelivered),
        delivery_offsets(kafka_broker.bootstrap, "two"),
        logs[1][-3000:],
    )
    assert bodies.keys() == routed(expected)
