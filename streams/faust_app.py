"""The Kafka engine: a Faust app whose agents run the embedded engine's processors per partition.

`fold` consumes the interactions topic (key = `account_id`) and hands each record to the
`Partition` of its partition number (`streams/partitioned.py`): the same processors as the
embedded engine, per account, state pickled into the `state` table, whose changelog topic is
how a worker that takes the partition over gets the state back. Signals go to the signals topic
and are acknowledged by the broker before the state that produced them is written, so a crash
can only make a worker derive a signal again (same identity), never lose one. Records are folded
in runs, one state write per run for the accounts it changed (`streams/kafka_runs.py`).

Time is per partition: the watermark follows the partition's own event times and clock ticks.
`tick` (every `tick_interval` seconds, on every worker, for the partitions it owns) appends a
clock tick to a partition once it has caught up and its next deadline has come due on the wall
clock, exactly as the embedded engine does for its one log.

`deliver` sends each on-call alert of the signals topic to its sink (routed by the policy in
force when it was detected), at least once and deduplicated by identity, in a consumer group of
its own (`streams/kafka_delivery.py`).

`tenant_wide` runs the processors that count across a tenant's accounts (topic surges) in every
worker, over all partitions, in event-time order (see `_run_tenant_wide`); `breach_clusters`
counts the SLA breaches of the signals topic per team as far as every fold has got
(`streams/kafka_clusters.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import faust
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from mode.utils.times import Seconds

from loopservice.domain.events import Event, PolicyPublished, clock_tick
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import Signal
from loopservice.streams.clock import Clock
from loopservice.streams.kafka_acks import StoredAcks
from loopservice.streams.kafka_clusters import FoldMarks, run_breach_clusters
from loopservice.streams.kafka_delivery import AlertSink, PolicyFeed, run_delivery
from loopservice.streams.kafka_headers import header
from loopservice.streams.kafka_runs import (
    IDLE_SECONDS,
    MAX_RECORDS,
    MAX_SECONDS,
    Cut,
    RunWriter,
)
from loopservice.streams.partitioned import Partition
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import build_topology

logger = logging.getLogger(__name__)

TABLES = ("state",)  # their changelogs: <app id>-<table>-changelog
Decode = Callable[[str, bytes], Event]


@dataclass(frozen=True)
class KafkaTopics:
    interactions: str
    signals: str
    dead_letters: str


@dataclass(frozen=True)
class WorkerConfig:
    bootstrap: str
    topics: KafkaTopics
    partitions: int = 8
    app_id: str = "loopservice"
    data_dir: str = "var/faust"
    allowed_lateness: timedelta = timedelta(seconds=1)
    tick_interval: Seconds | None = 0.5  # None: no clock ticks (a fixed log is re-run)
    session_timeout: float = 10.0
    web_port: int = 6066


Failure = tuple[int, int, Event, str, Exception]  # partition, offset, event, processor, error


@dataclass
class _Run:
    """Records folded since the last cut: their signals (sent) and the partitions they changed."""

    started: float  # loop time of its first record
    folded: int = 0
    published: list[asyncio.Future[Any]] = field(default_factory=list)
    signals: list[Signal] = field(default_factory=list)
    parts: dict[int, Partition] = field(default_factory=dict)
    records: dict[int, list[Any]] = field(default_factory=dict)  # Faust's, to ack


@dataclass(frozen=True)
class _Snapshot:
    """A cut run: what to write once its signals have landed, and the records to ack then."""

    signals: list[Signal]
    failures: list[Failure]
    states: list[tuple[Partition, list[tuple[str, bytes]]]]
    records: dict[int, list[Any]]


@dataclass
class Engine:
    """What `create_app` built, for the worker command and for tests."""

    app: faust.App
    partitions: dict[int, Partition]


def create_app(
    config: WorkerConfig,
    *,
    policy: Policy,
    decode: Decode,
    clock: Clock,
    alert_sink: AlertSink,
    on_signals: Callable[[list[Signal]], None] = lambda _: None,
    on_repeat: Callable[[Event], None] = lambda _: None,
) -> Engine:
    app = faust.App(
        config.app_id,
        broker=f"kafka://{config.bootstrap}",
        store="memory://",
        datadir=config.data_dir,
        topic_partitions=config.partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        table_standby_replicas=0,
        processing_guarantee="at_least_once",
        consumer_auto_offset_reset="earliest",
        web_port=config.web_port,
        web_host="127.0.0.1",
        producer_acks=-1,
        broker_commit_every=500,
        broker_commit_interval=1.0,
        # A worker killed without leaving the group is noticed after this; its partitions then
        # move to the others.
        broker_session_timeout=config.session_timeout,
        broker_heartbeat_interval=config.session_timeout / 4,
    )
    raw: faust.Schema = faust.Schema(
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )
    interactions = app.topic(
        config.topics.interactions,
        schema=raw,
        partitions=config.partitions,
        internal=False,
    )
    signals_topic = app.topic(
        config.topics.signals,
        schema=raw,
        partitions=config.partitions,
        internal=False,
    )
    dead_letters = app.topic(config.topics.dead_letters, schema=raw, internal=False)
    state = app.Table(
        "state",
        default=None,
        partitions=config.partitions,
        key_type=bytes,  # "raw" in the changelog; recovery decodes by these types
        value_type=bytes,
        schema=raw,
    )
    engine = Engine(app, {})
    owned: set[int] = set()  # partitions of the interactions topic this worker holds now
    # False from a revoke until Faust has read the changelogs of the new assignment: a
    # partition restored before that would start from part of its state.
    settled = False
    first_offsets: dict[int, int] = {}  # partition -> its first record on the log
    unsettled = 0  # records skipped since the last revoke, before the state was read
    failures: list[Failure] = []

    def partition(number: int) -> Partition:
        found = engine.partitions.get(number)
        if found is None:

            def on_failure(offset: int, event: Event, processor: str, exc: Exception) -> None:
                failures.append((number, offset, event, processor, exc))

            found = Partition(
                number,
                policy,
                allowed_lateness=config.allowed_lateness,
                on_failure=on_failure,
                on_repeat=on_repeat,
            )
            found.restore(_stored(state), first_offsets.get(number, 0))
            engine.partitions[number] = found
            logger.info(
                "partition %s restored: %s accounts, folding from offset %s",
                number,
                len(found.accounts),
                found.next_offset,
            )
        return found

    def forgo(record: Any) -> None:
        """Leaves a record unfolded: marked done for Faust's wait at the next rebalance, but not
        acked, which would add it to the offsets Faust commits."""
        nonlocal unsettled
        record.message.acked = True
        unsettled += 1

    run: _Run | None = None  # the records folded and not yet cut (`streams/kafka_runs.py`)
    waiting_since: float | None = None  # loop time the fold began to wait for a record

    def cut_when_idle(open_run: _Run) -> None:
        """Cuts `open_run` once the fold has waited `IDLE_SECONDS` for its next record (a quiet
        stream, or a rebalance skipping the records fetched): checked by the loop while the
        run is open, never while a record is being folded."""
        if run is not open_run:
            return  # cut already
        loop = asyncio.get_running_loop()
        if waiting_since is not None and loop.time() - waiting_since >= IDLE_SECONDS:
            cut()
            return
        since = waiting_since if waiting_since is not None else loop.time()
        loop.call_at(since + IDLE_SECONDS, cut_when_idle, open_run)

    async def fold_record(part: Partition, offset: int, headers: Any, body: bytes) -> _Run:
        """Folds one record into the open run, sending the signals it causes."""
        nonlocal run
        if run is None:
            loop = asyncio.get_running_loop()
            run = _Run(loop.time())
            loop.call_later(IDLE_SECONDS, cut_when_idle, run)
        current = run
        event = decode(_type_of(headers, body), body)
        out = part.process(offset, event)
        current.parts[part.number] = part
        current.folded += 1
        if out:
            current.published += await _send(signals_topic, out)
            current.signals += out
        return current

    def cut() -> None:
        """Ends the open run: each partition's state as of now, written once its signals land."""
        nonlocal run
        if run is None:
            return
        current, run = run, None
        snapshot = _Snapshot(
            current.signals,
            failures[:],
            [(part, part.flush()) for part in current.parts.values()],
            current.records,
        )
        failures.clear()
        writer.submit(Cut(current.published, snapshot))

    async def write(snapshot: _Snapshot) -> None:
        """Writes a run's state; its signals have landed. Acks its records with the writes."""
        if snapshot.signals:
            on_signals(snapshot.signals)
        dead: dict[int, list[Any]] = {}
        for failure in snapshot.failures:
            dead.setdefault(failure[0], []).append(await _dead_letter(dead_letters, *failure))
        for part, entries in snapshot.states:
            records = snapshot.records.get(part.number, [])
            if engine.partitions.get(part.number) is not part:
                # Revoked since the run was cut: writing this state now could land after the
                # new owner restored and overwrite what it folds since. Nothing is acked: the
                # records are folded again from the committed offset.
                for record in records:
                    forgo(record)
                continue
            stored = dead.get(part.number, [])
            for key, value in entries:
                # What `state[key] = value` does, keeping the changelog write's future.
                state.data[key.encode()] = value
                stored.append(state.send_changelog(part.number, key.encode(), value))
            acks.add_all(part.number, records, stored)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def forget(sender: Any, revoked: set[Any], **_: Any) -> None:
        nonlocal settled
        settled = False
        # Another worker may change these partitions' state before we get them back.
        for tp in revoked:
            if tp.topic == config.topics.interactions:
                engine.partitions.pop(tp.partition, None)
                owned.discard(tp.partition)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def own(sender: Any, assigned: set[Any], **_: Any) -> None:
        owned.update(tp.partition for tp in assigned if tp.topic == config.topics.interactions)

    @app.on_rebalance_complete.connect  # type: ignore[arg-type]
    async def recovered(sender: Any, **_: Any) -> None:
        nonlocal settled, unsettled
        mine = {tp for tp in app.consumer.assignment() if tp.topic == config.topics.interactions}
        if mine:
            try:
                earliest = await app.consumer.earliest_offsets(*mine)
            except Exception as exc:  # 0 then: a read from there starts at the earliest kept
                logger.warning("first offsets not known (%s)", type(exc).__name__)
            else:
                first_offsets.update({tp.partition: offset for tp, offset in earliest.items()})
        settled = True
        if unsettled:
            logger.info("%s records fetched during the rebalance left to their owner", unsettled)
        unsettled = 0

    acks = StoredAcks(app.crash)
    writer: RunWriter[_Snapshot] = RunWriter(write, app.crash)

    @app.agent(interactions)
    async def fold(stream: Any) -> None:
        # One record at a time from the stream (batches from `take_events` hung across
        # rebalances), folded in runs (`streams/kafka_runs.py`) written once their signals
        # have landed, acked by hand once the broker has everything they wrote
        # (`streams/kafka_acks.py`).
        nonlocal waiting_since
        now = asyncio.get_running_loop().time
        async for record in stream.noack().events():
            waiting_since = None
            message = record.message
            if not settled or message.partition not in owned:
                # Fetched before a rebalance: whoever owns the partition once its state is
                # read from the changelog folds it.
                forgo(record)
            else:
                await fold_message(record)
            if run is not None and (
                not settled or run.folded >= MAX_RECORDS or now() - run.started >= MAX_SECONDS
            ):
                cut()
            await writer.room()
            # Whether the next record is already fetched or not, the stream may yield to
            # the fetcher first: the run stays open until the fold has waited a while.
            waiting_since = now()

    async def fold_message(record: Any) -> None:
        now = asyncio.get_running_loop().time
        message = record.message
        part = partition(message.partition)
        resume_at = part.resume_from(message.offset)
        if resume_at is not None:
            # The committed offset lies past the state (Faust commits records it skipped
            # in a rebalance): fold the records in between, read straight from the log.
            logger.warning(
                "partition %s: record %s arrived, the state ends before %s: reading the "
                "records in between",
                message.partition,
                message.offset,
                resume_at,
            )
            cut()  # the records folded so far are not held back by the reading
            between = _records_between(config.bootstrap, message.tp, resume_at, message.offset)
            async with aclosing(between):
                async for missed in between:
                    if engine.partitions.get(message.partition) is not part:
                        break  # revoked meanwhile: the new owner catches up itself
                    folded = await fold_record(part, missed.offset, missed.headers, missed.value)
                    if folded.folded >= MAX_RECORDS or now() - folded.started >= MAX_SECONDS:
                        cut()
                        await writer.room()
        folded = await fold_record(part, message.offset, message.headers, message.value)
        folded.records.setdefault(message.partition, []).append(record)

    async def tick() -> None:
        now = clock.now() - config.allowed_lateness
        for number, part in list(engine.partitions.items()):
            due = part.next_due()
            if due is None or now < due:
                continue
            if part.watermark is not None and now <= part.watermark:
                continue
            tp = _tp(app, config.topics.interactions, number)
            if tp is None or app.consumer.highwater(tp) > part.offset + 1:
                continue  # not caught up: the backlog moves the watermark first
            tick_event = clock_tick(now, partition=number)
            await interactions.send(
                key=tick_event.account_id.encode(),
                value=tick_event.model_dump_json().encode(),
                partition=number,
                headers=[("type", b"clock.tick"), ("id", tick_event.event_id.encode())],
            )

    policies = PolicyFeed(RulesBook(policy, policy_from_mapping))
    fold_marks = FoldMarks()

    async def publish(out: list[Signal]) -> None:
        await _publish(signals_topic, out)
        on_signals(out)

    @app.task
    async def tenant_wide() -> None:
        await _run_tenant_wide(config, policies, decode, fold_marks, publish)

    @app.task
    async def breach_clusters() -> None:
        await run_breach_clusters(
            config.bootstrap,
            config.topics.interactions,
            config.topics.signals,
            config.app_id,  # the fold's consumer group
            config.partitions,
            policies.rules,
            fold_marks,
            publish,
        )

    if config.tick_interval is not None:
        app.timer(interval=config.tick_interval)(tick)

    @app.task
    async def deliver() -> None:
        await run_delivery(
            config.bootstrap,
            config.topics.signals,
            config.app_id,
            policies,
            alert_sink,
            session_timeout=config.session_timeout,
        )

    return engine


async def _run_tenant_wide(
    config: WorkerConfig,
    policies: PolicyFeed,
    decode: Decode,
    fold_marks: FoldMarks,
    publish: Callable[[list[Signal]], Awaitable[None]],
) -> None:
    """The tenant-wide processors (topic surges), over every partition of the log.

    Their input is small (case openings), so every worker runs them whole, from the start of
    the log, instead of re-keying it by tenant; the copies of a signal share its identity and
    delivery keeps one. The watermark is the lowest of the partitions' that still have records
    to read (a caught-up partition would otherwise hold it back forever), so openings are
    counted in event-time order, as the embedded engine counts them.

    It reads the policy events too, into `policies`: the alert delivery routes by them.
    """
    processors = build_topology(policies.rules).tenant_wide
    topic = config.topics.interactions
    consumer = AIOKafkaConsumer(
        bootstrap_servers=config.bootstrap, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(config.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await policies.started(consumer)
        marks: dict[int, datetime] = {}
        watermark: datetime | None = None
        while True:
            batches = await consumer.getmany(*tps, timeout_ms=500, max_records=5000)
            out: list[Signal] = []
            for tp, records in batches.items():
                for record in records:
                    kind = _type_of(record.headers, record.value)
                    if kind in ("case.opened", "policy.published"):
                        event = decode(kind, record.value)
                        if isinstance(event, PolicyPublished):
                            policies.rules.publish(event)
                        for processor in processors:
                            out += processor.handle(event)
                        at = event.occurred_at - config.allowed_lateness
                    else:
                        at = datetime.fromisoformat(orjson.loads(record.value)["occurred_at"])
                        if kind != "clock.tick":
                            at -= config.allowed_lateness
                    if tp.partition not in marks or at > marks[tp.partition]:
                        marks[tp.partition] = at
                if records:
                    fold_marks.record(tp.partition, records[-1].offset + 1, marks[tp.partition])
            await policies.advance({tp: rs[-1].offset + 1 for tp, rs in batches.items() if rs})
            candidate = await _lowest_mark(consumer, tps, marks)
            if candidate is not None and (watermark is None or candidate > watermark):
                watermark = candidate
                for processor in processors:
                    out += processor.advance(candidate)
            if out:
                await publish(out)
    finally:
        await consumer.stop()


async def _lowest_mark(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], marks: dict[int, datetime]
) -> datetime | None:
    """The lowest watermark among partitions with records still to read; None while one of
    them has given none yet (its first records may be the earliest of all)."""
    behind: list[datetime] = []
    for tp in tps:
        highwater = consumer.highwater(tp)
        if highwater is not None and await consumer.position(tp) >= highwater:
            continue  # caught up: it holds nothing back
        if tp.partition not in marks:
            return None
        behind.append(marks[tp.partition])
    if behind:
        return min(behind)
    return min(marks.values()) if marks else None


def _stored(table: Any) -> Iterator[tuple[str, bytes]]:
    for key, value in list(table.items()):
        if value is not None:
            yield (key.decode() if isinstance(key, bytes) else str(key)), value


def _tp(app: faust.App, topic: str, number: int) -> Any:
    for tp in app.consumer.assignment():
        if tp.topic == topic and tp.partition == number:
            return tp
    return None


async def _records_between(
    bootstrap: str, tp: Any, start: int, stop: int
) -> AsyncGenerator[Any, None]:
    """The records of `tp` from offset `start` up to (without) `stop`, as they are fetched, read
    with a consumer of no group: Faust's own fetcher, sought back, drops records below the
    offset it last read."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # `start` no longer kept: from the first record kept
    )
    await consumer.start()
    try:
        partition = TopicPartition(tp.topic, tp.partition)
        consumer.assign([partition])
        consumer.seek(partition, start)
        read, last, empty_polls = 0, start - 1, 0
        while last < stop - 1 and empty_polls < 30:
            batch = await consumer.getmany(partition, timeout_ms=1000)
            records = [r for r in batch.get(partition, []) if r.offset < stop]
            empty_polls = 0 if records else empty_polls + 1
            for record in records:
                read, last = read + 1, record.offset
                yield record
        if read < stop - start:
            logger.error(
                "%s: %s of the records %s to %s are not on the log",
                tp,
                stop - start - read,
                start,
                stop - 1,
            )
    finally:
        await consumer.stop()


async def _publish(topic: Any, signals: list[Signal]) -> None:
    """Sends the signals and waits until the broker has them (acks=all)."""
    for future in await _send(topic, signals):
        await future


async def _send(topic: Any, signals: list[Signal]) -> list[asyncio.Future[Any]]:
    """Sends the signals, in order; the futures of the broker's acknowledgements."""
    return [
        await topic.send(
            key=s.account_id.encode(),
            value=s.model_dump_json().encode(),
            headers=[("type", s.type.encode()), ("id", s.signal_id.encode())],
        )
        for s in signals
    ]


async def _dead_letter(
    topic: Any, partition: int, offset: int, event: Event, processor: str, exc: Exception
) -> asyncio.Future[Any]:
    """Sends the failed record to the dead-letter topic; returns the send's future."""
    # The reason names the exception type only: messages may quote the event's text.
    body = orjson.dumps(
        {
            "partition": partition,
            "offset": offset,
            "event_id": event.event_id,
            "type": event.type,
            "processor": processor,
            "reason": type(exc).__name__,
            "event": event.model_dump(mode="json"),
        }
    )
    return cast(asyncio.Future[Any], await topic.send(key=event.account_id.encode(), value=body))


def _type_of(headers: Any, body: bytes) -> str:
    kind = header(headers, "type")
    # A platform producing straight to the topic may leave the header out.
    return kind.decode() if kind is not None else str(orjson.loads(body)["type"])
