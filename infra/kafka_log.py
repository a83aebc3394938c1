"""The Kafka log: interactions and signals as Kafka topics, written and read through aiokafka.

Topics (`ensure_topics` creates them; brokers run with `auto.create.topics.enable=false`):
`loop.interactions` and `loop.signals` with N partitions, plus `loop.dead-letters`, all with
`retention.ms=-1` (kept forever) and `message.timestamp.type=LogAppendTime`, so the broker's
append time is each record's `recorded_at` (millisecond resolution).

A record's key is its `account_id` (Kafka's murmur2 partitioner, the one Faust and Java
clients use), its value the model's JSON, and its headers `type` (the model to decode with)
and `id` (event id or signal id). A clock tick goes to the partition it names rather than
where its key would hash, because watermarks and ticks are per partition.

Positions. Kafka has no order across partitions, so a position is per partition: the record's
offset plus one. That keeps the port's conventions (the first record is 1, `head()` is 0 for
an empty log, reading on from `last.position + 1`) and, since nothing here writes transaction
markers, stays gapless. `append` returns `KafkaAppended`, which adds the partition; `read` and
`head` show one partition, the log's `partition` (0 unless given), and `read_partition` /
`head_of` any other.

Duplicates. Kafka cannot check an id before appending: every append reports
`duplicate=False`. The idempotent producer (`enable_idempotence=True`, `acks=all`) keeps its
own retries from writing twice; a repeated submission is a second record, with the same key
(the account), so in the same partition. The Kafka fold (`streams/partitioned.py`) drops an
event whose id is among the last 256 folded into its account; a repeat arriving after 256 other
events of that account is folded again. The tenant-wide surge count skips an opening still
pending or in its window, and a signal derived twice keeps its identity, by which the alert
delivery and the breach clusters drop the copy. The projections do not read Kafka yet.

Failure. `append` returns only once the broker has acknowledged every record (acks=all). If
that does not happen within `timeout` seconds, or the broker cannot be reached at all, it
raises `LogUnavailable`, and the records' fate is unknown: after a time-out those already
queued in the producer stay queued and are written, in order and once, if the broker comes
back before `close()`; after a connection error the producer is dropped and some may have
been written. Retrying is safe because consumers deduplicate (within the fold's bound above).
`read` and `head` raise `LogUnavailable` likewise.

Two faces: `AsyncKafkaLog` is the adapter proper, for code on an asyncio loop (a Faust agent,
the API). `KafkaLog` is the synchronous log port over it: it owns a private event loop in a
daemon thread and runs each call there, so it may be called from any thread, including from
inside another event loop (blocking that loop for the call, as the SQLite log does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from loopservice.domain.events import ClockTick, Event, PolicyPublished
from loopservice.domain.signals import Signal
from loopservice.infra.sqlite_log import decode_interaction, decode_signal
from loopservice.streams.log import Appended, LogRecord, T

INTERACTIONS = "loop.interactions"
SIGNALS = "loop.signals"
DEAD_LETTERS = "loop.dead-letters"

TOPIC_CONFIG: dict[str, str] = {
    "retention.ms": "-1",
    "retention.bytes": "-1",
    "cleanup.policy": "delete",
    "message.timestamp.type": "LogAppendTime",
}

R = TypeVar("R")


def topic_names(prefix: str = "") -> tuple[str, str, str]:
    """The interactions, signals and dead-letter topics of one deployment (`<prefix>loop.…`)."""
    return (prefix + INTERACTIONS, prefix + SIGNALS, prefix + DEAD_LETTERS)


class LogUnavailable(RuntimeError):
    """The broker did not acknowledge (or answer) in time; an append's outcome is unknown."""


@dataclass(frozen=True, slots=True)
class KafkaAppended(Appended):
    partition: int


async def ensure_topics_async(
    bootstrap: str,
    partitions: int = 8,
    *,
    replication: int = 1,
    topics: Sequence[str] = (INTERACTIONS, SIGNALS, DEAD_LETTERS),
    timeout: float = 30.0,
    config: Mapping[str, str] = TOPIC_CONFIG,
) -> None:
    """Creates the topics that are missing; an existing topic must have `partitions`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout)
        for name in topics:
            try:
                await asyncio.wait_for(
                    admin.create_topics(
                        [NewTopic(name, partitions, replication, topic_configs=dict(config))]
                    ),
                    timeout,
                )
            except TopicAlreadyExistsError:
                pass
        for name, found in (await _partition_counts(admin, topics, timeout)).items():
            if found != partitions:
                raise ValueError(
                    f"topic {name} has {found} partitions, not {partitions}: "
                    "keys would map to other partitions than the state built from them"
                )
    except (KafkaError, OSError, TimeoutError) as exc:
        raise LogUnavailable(f"cannot create topics on {bootstrap}: {exc!r}") from exc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), 5)


async def _partition_counts(
    admin: AIOKafkaAdminClient, topics: Sequence[str], timeout: float
) -> dict[str, int]:
    """Each topic's partition count, once the new topics' metadata has reached the broker."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        described = await asyncio.wait_for(admin.describe_topics(list(topics)), timeout)
        counts = {d["topic"]: len(d["partitions"]) for d in described if not d["error_code"]}
        if len(counts) == len(topics) and all(counts.values()):
            return counts
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"topics not ready: {described!r}")
        await asyncio.sleep(0.1)


def ensure_topics(
    bootstrap: str,
    partitions: int = 8,
    *,
    replication: int = 1,
    topics: Sequence[str] = (INTERACTIONS, SIGNALS, DEAD_LETTERS),
    timeout: float = 30.0,
    config: Mapping[str, str] = TOPIC_CONFIG,
) -> None:
    asyncio.run(
        ensure_topics_async(
            bootstrap,
            partitions,
            replication=replication,
            topics=topics,
            timeout=timeout,
            config=config,
        )
    )


class AsyncKafkaLog(Generic[T]):
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        identity: Callable[[T], str],
        kind: Callable[[T], str],
        decode: Callable[[str, bytes], T],
        *,
        route: Callable[[T], int | None] = lambda _: None,
        fan_out: Callable[[T], bool] = lambda _: False,
        partition: int = 0,
        timeout: float = 10.0,
    ) -> None:
        """`kind` names a value's model (its `type`); `route` may pin a value to a partition;
        a value for which `fan_out` is true is written to every partition."""
        self.bootstrap = bootstrap
        self.topic = topic
        self.partition = partition
        self.timeout = timeout
        self._identity: Callable[[T], str] = identity
        self._kind: Callable[[T], str] = kind
        self._decode: Callable[[str, bytes], T] = decode
        self._route: Callable[[T], int | None] = route
        self._fan_out: Callable[[T], bool] = fan_out
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: int | None = None
        self._append_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    async def append(self, values: Sequence[T]) -> list[KafkaAppended]:
        if not values:
            return []
        async with self._append_lock:
            try:
                return await asyncio.wait_for(self._append(values), self.timeout)
            except TimeoutError as exc:
                raise LogUnavailable(
                    f"{self.topic} on {self.bootstrap}: {len(values)} record(s) not "
                    f"acknowledged within {self.timeout:g} s (is the broker up, the topic "
                    "created?); those queued stay queued and may still be written, and a "
                    "retry is safe"
                ) from exc
            except (KafkaError, OSError) as exc:
                await self._discard_producer()
                raise LogUnavailable(
                    f"{self.topic} on {self.bootstrap}: {len(values)} record(s) not "
                    f"acknowledged ({exc!r}); some may have been written, and a retry is safe"
                ) from exc

    async def read(self, start: int, limit: int) -> list[LogRecord[T]]:
        return await self.read_partition(self.partition, start, limit)

    async def head(self) -> int:
        return await self.head_of(self.partition)

    async def read_partition(self, partition: int, start: int, limit: int) -> list[LogRecord[T]]:
        """Records of one partition with position >= start, in order, at most `limit`."""
        async with self._read_lock:
            return await self._bounded(self._read(partition, max(start, 1) - 1, limit))

    async def head_of(self, partition: int) -> int:
        """The last position written to `partition` (its high watermark), 0 when empty."""
        async with self._read_lock:
            return await self._bounded(self._end_offset(partition))

    async def heads(self) -> dict[int, int]:
        count = await self.partition_count()
        async with self._read_lock:
            consumer = await self._reader()
            tps = [TopicPartition(self.topic, p) for p in range(count)]
            ends = await self._bounded(consumer.end_offsets(tps))
            return {tp.partition: ends[tp] for tp in tps}

    async def partition_count(self) -> int:
        async with self._append_lock:
            await self._bounded(self._writer())
        assert self._partitions is not None
        return self._partitions

    async def close(self) -> None:
        """Flushes queued records for up to `timeout` seconds, then drops what is left."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _stop(producer, self.timeout)
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), self.timeout)

    async def _append(self, values: Sequence[T]) -> list[KafkaAppended]:
        producer = await self._writer()
        assert self._partitions is not None
        routes = [self._route(value) for value in values]
        for partition in routes:
            if partition is not None and not 0 <= partition < self._partitions:
                raise ValueError(
                    f"{self.topic} has {self._partitions} partitions: no partition {partition}"
                )
        pending = []
        for value, partition in zip(values, routes, strict=True):
            headers = [("type", self._kind(value).encode()), ("id", self._identity(value).encode())]
            copies = range(self._partitions) if self._fan_out(value) else (partition,)
            sent = [
                await producer.send(
                    self.topic,
                    value.model_dump_json().encode(),
                    key=value.account_id.encode(),
                    partition=copy,
                    headers=headers,
                )
                for copy in copies
            ]
            pending.append(asyncio.gather(*sent))
        outcomes: list[KafkaAppended] = []
        for value, copies_sent in zip(values, await asyncio.gather(*pending), strict=True):
            metadata = copies_sent[0]
            outcomes.append(
                KafkaAppended(
                    self._identity(value),
                    metadata.offset + 1,
                    duplicate=False,
                    partition=metadata.partition,
                )
            )
        return outcomes

    async def _writer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                enable_idempotence=True,
                acks="all",
                linger_ms=2,
                request_timeout_ms=int(self.timeout * 1000),
            )
            try:
                await producer.start()
                partitions = await producer.partitions_for(self.topic)
            except BaseException:
                await _stop(producer, 1)
                raise
            self._producer = producer
            self._partitions = len(partitions)
        return self._producer

    async def _discard_producer(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await _stop(producer, 1)

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                request_timeout_ms=int(self.timeout * 1000),
            )
            try:
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 1)
                raise
            self._consumer = consumer
        return self._consumer

    async def _end_offset(self, partition: int) -> int:
        consumer = await self._reader()
        tp = TopicPartition(self.topic, partition)
        ends = await consumer.end_offsets([tp])
        return int(ends[tp])

    async def _read(self, partition: int, first: int, limit: int) -> list[LogRecord[T]]:
        consumer = await self._reader()
        tp = TopicPartition(self.topic, partition)
        end = int((await consumer.end_offsets([tp]))[tp])
        if limit <= 0 or first >= end:
            return []
        if consumer.assignment() != {tp}:
            consumer.assign([tp])
        consumer.seek(tp, first)
        out: list[LogRecord[T]] = []
        next_offset = first
        while len(out) < limit and next_offset < end:
            batch = await consumer.getmany(tp, timeout_ms=200, max_records=limit - len(out))
            for record in batch.get(tp, []):
                next_offset = record.offset + 1
                if record.offset >= first:
                    out.append(self._record(record))
        return out

    def _record(self, record: Any) -> LogRecord[T]:
        headers = dict(record.headers or ())
        body: bytes = record.value
        kind = headers.get("type")
        # A platform producing straight to the topic may leave the header out.
        name = kind.decode() if kind is not None else orjson.loads(body)["type"]
        recorded_at = datetime.fromtimestamp(record.timestamp / 1000, UTC)
        return LogRecord(record.offset + 1, recorded_at, self._decode(name, body))

    async def _bounded(self, operation: Coroutine[Any, Any, R]) -> R:
        try:
            return await asyncio.wait_for(operation, self.timeout)
        except TimeoutError as exc:
            raise LogUnavailable(
                f"{self.topic} on {self.bootstrap}: no answer within {self.timeout:g} s"
            ) from exc
        except (KafkaError, OSError) as exc:
            raise LogUnavailable(f"{self.topic} on {self.bootstrap}: {exc!r}") from exc


async def _stop(producer: AIOKafkaProducer, timeout: float) -> None:
    """Stops a producer, flushing for at most `timeout` seconds.

    aiokafka's `stop()` flushes first, which never ends while the broker is away; past the
    limit the sender task is cancelled (through aiokafka internals) and what was queued is lost.
    """
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait([stopping], timeout=timeout)
    if done:
        with contextlib.suppress(Exception):
            stopping.result()
        return
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sender.close(), 1)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(stopping, 1)


class _LoopThread:
    """A private event loop in a daemon thread, to run coroutines from synchronous code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, R], timeout: float) -> R:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise LogUnavailable(f"no answer within {timeout:g} s") from exc

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class KafkaLog(Generic[T]):
    """The synchronous log port over `AsyncKafkaLog`, on a private event loop."""

    def __init__(self, log: AsyncKafkaLog[T]) -> None:
        self.log: AsyncKafkaLog[T] = log
        self._thread = _LoopThread(f"kafka-log:{log.topic}")
        # Every bounded step inside allows `timeout`; the facade's own limit covers a start-up
        # (connect, metadata) plus the operation itself.
        self._limit = 3 * log.timeout + 5

    @property
    def partition(self) -> int:
        return self.log.partition

    def append(self, values: Sequence[T]) -> list[Appended]:
        return list(self._thread.run(self.log.append(values), self._limit))

    def append_kafka(self, values: Sequence[T]) -> list[KafkaAppended]:
        """`append`, typed with the partition of each record."""
        return self._thread.run(self.log.append(values), self._limit)

    def read(self, start: int, limit: int) -> list[LogRecord[T]]:
        return self._thread.run(self.log.read(start, limit), self._limit)

    def head(self) -> int:
        return self._thread.run(self.log.head(), self._limit)

    def read_partition(self, partition: int, start: int, limit: int) -> list[LogRecord[T]]:
        return self._thread.run(self.log.read_partition(partition, start, limit), self._limit)

    def head_of(self, partition: int) -> int:
        return self._thread.run(self.log.head_of(partition), self._limit)

    def heads(self) -> dict[int, int]:
        return self._thread.run(self.log.heads(), self._limit)

    def partition_count(self) -> int:
        return self._thread.run(self.log.partition_count(), self._limit)

    def close(self) -> None:
        with contextlib.suppress(LogUnavailable):
            self._thread.run(self.log.close(), self._limit)
        self._thread.stop()

    def __enter__(self) -> KafkaLog[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tick_partition(event: Event) -> int | None:
    return event.partition if isinstance(event, ClockTick) else None


def _every_partition(event: Event) -> bool:
    # Every account's decisions depend on the policy in force, and accounts live in all of them.
    return isinstance(event, PolicyPublished)


def async_interaction_log(
    bootstrap: str, *, topic: str = INTERACTIONS, partition: int = 0, timeout: float = 10.0
) -> AsyncKafkaLog[Event]:
    return AsyncKafkaLog(
        bootstrap,
        topic,
        identity=lambda e: e.event_id,
        kind=lambda e: e.type,
        decode=decode_interaction,
        route=_tick_partition,
        fan_out=_every_partition,
        partition=partition,
        timeout=timeout,
    )


def async_signal_log(
    bootstrap: str, *, topic: str = SIGNALS, partition: int = 0, timeout: float = 10.0
) -> AsyncKafkaLog[Signal]:
    return AsyncKafkaLog(
        bootstrap,
        topic,
        identity=lambda s: s.signal_id,
        kind=lambda s: s.type,
        decode=decode_signal,
        partition=partition,
        timeout=timeout,
    )


def interaction_log(
    bootstrap: str, *, topic: str = INTERACTIONS, partition: int = 0, timeout: float = 10.0
) -> KafkaLog[Event]:
    return KafkaLog(
        async_interaction_log(bootstrap, topic=topic, partition=partition, timeout=timeout)
    )


def signal_log(
    bootstrap: str, *, topic: str = SIGNALS, partition: int = 0, timeout: float = 10.0
) -> KafkaLog[Signal]:
    return KafkaLog(async_signal_log(bootstrap, topic=topic, partition=partition, timeout=timeout))
