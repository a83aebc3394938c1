"""On-call alert delivery on the Kafka engine: a plain consumer group over the signals topic.

It runs inside every worker but in a consumer group of its own (`delivery_group`), not as a
Faust agent: when a worker died, Faust's recovery of a dedup table for the partitions it took
over sometimes never finished, and delivery stopped with no error. A plain group has nothing to
recover but its committed offsets.

At least once, deduplicated by identity: an offset is committed only after its alert was
delivered, so a worker killed between the two makes the next owner send that alert again, with
the same idempotency key (`X-Loop-Signal-Id`). A signal derived twice (a fold redone after a
crash, or the tenant-wide copies every worker publishes) has one identity and one key, hence one
partition: the ids of the partition up to its committed offset are read back on assignment, so
a copy later in the partition is not sent again.

Alerts are routed by the policy in force when they were detected, as the embedded engine routes
them: the policy events are on the interactions topic, which the tenant-wide reader of the same
worker reads whole anyway (`PolicyFeed`). A batch of signals waits until that reader has passed
every interaction on the log when the batch was fetched, so it knows every policy the fold had
seen when it derived them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from loopservice.domain.policy import Policy
from loopservice.domain.signals import SIGNAL_ADAPTER, Signal
from loopservice.streams.kafka_headers import header
from loopservice.streams.rules import RulesBook

logger = logging.getLogger(__name__)

AlertSink = Callable[[Signal, str], Awaitable[None]]


def delivery_group(app_id: str) -> str:
    """The consumer group that delivers a deployment's alerts."""
    return f"{app_id}-alerts"


class PolicyFeed:
    """The policies of the interactions topic, as far as this worker's reader has read it."""

    def __init__(self, rules: RulesBook[Policy]) -> None:
        self.rules = rules
        self.reader: AIOKafkaConsumer | None = None  # assigned every interactions partition
        self._read: dict[TopicPartition, int] = {}  # next offset to read
        self._moved = asyncio.Condition()

    async def advance(self, read: dict[TopicPartition, int]) -> None:
        async with self._moved:
            self._read.update(read)
            self._moved.notify_all()

    async def wait_for_the_log(self) -> None:
        """Returns once the reader has read every record on the log now."""
        async with self._moved:
            await self._moved.wait_for(lambda: self.reader is not None)
        assert self.reader is not None
        ends = await self.reader.end_offsets(list(self.reader.assignment()))
        async with self._moved:
            await self._moved.wait_for(
                lambda: all(self._read.get(tp, 0) >= end for tp, end in ends.items())
            )

    async def started(self, reader: AIOKafkaConsumer) -> None:
        async with self._moved:
            self.reader = reader
            self._moved.notify_all()


async def run_delivery(
    bootstrap: str,
    topic: str,
    app_id: str,
    policies: PolicyFeed,
    sink: AlertSink,
    *,
    session_timeout: float = 10.0,
) -> None:
    """Delivers the routed alerts of the signals topic until cancelled."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=delivery_group(app_id),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(session_timeout * 1000),
        heartbeat_interval_ms=int(session_timeout * 250),
    )
    delivery = _Delivery(consumer, bootstrap, policies, sink)
    consumer.subscribe([topic], listener=delivery)
    await consumer.start()
    try:
        while True:
            await delivery.deliver(await consumer.getmany(timeout_ms=500, max_records=500))
    finally:
        await consumer.stop()


class _Delivery(ConsumerRebalanceListener):
    def __init__(
        self, consumer: AIOKafkaConsumer, bootstrap: str, policies: PolicyFeed, sink: AlertSink
    ) -> None:
        self.consumer = consumer
        self.bootstrap = bootstrap
        self.policies = policies
        self.sink = sink
        self.sent: dict[TopicPartition, set[bytes]] = {}  # ids up to the committed offset
        # Held while a batch is delivered: a revocation waits for the alert in flight and
        # commits it, so the next owner starts right after it.
        self.busy = asyncio.Lock()
        self.revoking = False

    async def deliver(self, batches: dict[TopicPartition, list[Any]]) -> None:
        if batches:
            await self.policies.wait_for_the_log()
        async with self.busy:
            held = self.consumer.assignment()
            for tp, records in batches.items():
                if tp not in held:
                    # Fetched before a rebalance took it: whoever holds it now starts again
                    # at the committed offset.
                    continue
                sent = await self._sent_before_committed(tp)
                done = None
                for record in records:
                    if self.revoking:
                        break
                    signal_id = header(record.headers, "id") or b""
                    if signal_id not in sent:
                        await self._send(record.value)
                        sent.add(signal_id)
                    done = record.offset + 1
                if done is not None:
                    await self._commit(tp, done)
                if self.revoking:
                    return

    async def _sent_before_committed(self, tp: TopicPartition) -> set[bytes]:
        # Built here, not in `on_partitions_assigned`: the fetcher may return a new partition's
        # records before that callback has finished, and skipping them would lose them.
        sent = self.sent.get(tp)
        if sent is None:
            committed = await self.consumer.committed(tp)
            sent = self.sent[tp] = await _ids_before(self.bootstrap, tp, committed or 0)
            logger.info(
                "alerts: partition %d taken at offset %s, %d ids before it",
                tp.partition,
                committed,
                len(sent),
            )
        return sent

    async def _send(self, body: bytes) -> None:
        signal = SIGNAL_ADAPTER.validate_json(body)
        policy = self.policies.rules.in_force(signal.detected_at)
        route = policy.oncall.route_for(
            signal.type, getattr(signal, "team", None), getattr(signal, "priority", None)
        )
        if route is not None:
            await deliver_until_done(self.sink, signal, route.sink)

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self.consumer.commit({tp: offset})
        except Exception as exc:
            # The group moved on (the partition went elsewhere): its new owner sends these
            # alerts again under the same idempotency keys.
            logger.warning("alerts: commit of %s failed (%s)", tp, type(exc).__name__)

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        logger.info("alerts: revoking %s", sorted(tp.partition for tp in revoked))
        self.revoking = True
        try:
            async with self.busy:
                for tp in revoked:
                    self.sent.pop(tp, None)
        finally:
            self.revoking = False

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        pass  # what was sent is read back on the first batch of each (`_sent_before_committed`)


async def _ids_before(bootstrap: str, tp: TopicPartition, end: int) -> set[bytes]:
    """The signal ids of a partition's records before offset `end`."""
    ids: set[bytes] = set()
    if end <= 0:
        return ids
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await reader.start()
    try:
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        while await reader.position(tp) < end:
            batches = await reader.getmany(tp, timeout_ms=1000, max_records=5000)
            for record in batches.get(tp, []):
                if record.offset < end:
                    ids.add(header(record.headers, "id") or b"")
    finally:
        await reader.stop()
    return ids


async def deliver_until_done(sink: AlertSink, signal: Signal, route: str) -> None:
    """Retries with backoff until the sink takes the alert: at least once means never skipping
    one, however long a receiver is down."""
    for attempt in itertools.count():
        try:
            await sink(signal, route)
            return
        except Exception as exc:
            delay = min(30.0, 0.2 * 2**attempt)
            logger.warning(
                "alert %s: delivery failed (%s), retrying in %.1f s",
                signal.signal_id,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
