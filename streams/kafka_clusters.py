"""Breach clusters on the Kafka engine: the embedded engine's `BreachClusterProcessor`, fed from
the signals topic and advanced only as far as every partition's fold has provably got.

The embedded engine counts a team's breaches in the order of their due instants as its one
watermark passes them. Under Kafka the breaches are derived by as many folds as there are
partitions, each at its own pace, and reach the signals topic in no useful order. A breach due
at D is on the signals topic once the fold of its partition has folded a record that moved the
partition's watermark past D. The fold's committed offset says how far it has folded (Faust
commits a record only after the signals it caused were acknowledged by the broker), and the
tenant-wide reader, which reads every interaction anyway, knows each partition's watermark at
each offset (`FoldMarks`). So: read the committed offsets, then the signals topic up to its end
as of after that, and every breach due at or before the lowest of those watermarks is there to
be counted — in due order, as the embedded engine counts it.

Like the topic surges, every worker runs this over the whole topic; the copies of a cluster
share its identity, and delivery keeps one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from loopservice.domain.policy import Policy
from loopservice.domain.signals import SIGNAL_ADAPTER, Signal
from loopservice.streams.kafka_headers import header
from loopservice.streams.pattern_processors import BreachClusterProcessor
from loopservice.streams.rules import RulesBook

logger = logging.getLogger(__name__)

COUNTED_TYPES = (b"sla.breached", b"sla.breach_retracted")


class FoldMarks:
    """Each partition's watermark after each batch the tenant-wide reader read: (next offset,
    watermark) pairs, rising in both. The watermark a fold has reached at a committed offset is
    at least the mark of the last pair at or before that offset."""

    def __init__(self) -> None:
        self._offsets: dict[int, list[int]] = {}
        self._marks: dict[int, list[datetime]] = {}

    def record(self, partition: int, next_offset: int, mark: datetime) -> None:
        offsets = self._offsets.setdefault(partition, [])
        marks = self._marks.setdefault(partition, [])
        if marks and mark <= marks[-1]:
            return  # not higher: the earlier pair says as much
        offsets.append(next_offset)
        marks.append(mark)

    def at(self, partition: int, offset: int) -> datetime | None:
        """The watermark the fold has at least reached once it has folded up to `offset`."""
        offsets = self._offsets.get(partition, [])
        i = bisect.bisect_right(offsets, offset)
        return self._marks[partition][i - 1] if i else None

    def forget_before(self, partition: int, offset: int) -> None:
        """Drops the pairs that a committed `offset` has made useless (keeps the last one)."""
        offsets = self._offsets.get(partition, [])
        i = bisect.bisect_right(offsets, offset) - 1
        if i > 0:
            del offsets[:i]
            del self._marks[partition][:i]


def fold_watermark(
    marks: FoldMarks, committed: dict[int, int], highwaters: dict[int, int]
) -> datetime | None:
    """How far every partition's fold has got, as one watermark: the lowest of the folds that
    still have records to fold (a caught-up partition holds nothing back, as in the tenant-wide
    reader); None while one of them has folded nothing we know a watermark for."""
    behind: list[datetime] = []
    done: list[datetime] = []
    for partition, highwater in highwaters.items():
        offset = committed.get(partition, 0)
        mark = marks.at(partition, offset)
        if offset >= highwater:
            if mark is not None:
                done.append(mark)
            continue
        if mark is None:
            return None
        behind.append(mark)
    if behind:
        return min(behind)
    return min(done) if done else None


async def run_breach_clusters(
    bootstrap: str,
    interactions: str,
    signals: str,
    fold_group: str,
    partitions: int,
    rules: RulesBook[Policy],
    marks: FoldMarks,
    publish: Callable[[list[Signal]], Awaitable[None]],
    *,
    interval: float = 1.0,
) -> None:
    """Counts the breaches of the signals topic into clusters until cancelled."""
    clusters = BreachClusterProcessor(rules)
    seen: set[str] = set()  # a breach derived again after a crash is on the topic twice
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        signal_tps = [TopicPartition(signals, p) for p in range(partitions)]
        interaction_tps = [TopicPartition(interactions, p) for p in range(partitions)]
        consumer.assign(signal_tps)
        await consumer.seek_to_beginning(*signal_tps)
        while True:
            try:
                committed = await _committed(admin, fold_group, interactions)
                highwaters = await consumer.end_offsets(interaction_tps)
                ends = await consumer.end_offsets(signal_tps)  # after the commits: theirs are in
            except KafkaError as exc:
                logger.warning("breach clusters: broker not answering (%s)", type(exc).__name__)
                await asyncio.sleep(interval)
                continue
            while await _behind(consumer, ends):
                batches = await consumer.getmany(*signal_tps, timeout_ms=500, max_records=5000)
                for records in batches.values():
                    for record in records:
                        kind = header(record.headers, "type")
                        if kind not in COUNTED_TYPES or record.value is None:
                            continue
                        signal = SIGNAL_ADAPTER.validate_json(record.value)
                        if signal.signal_id in seen:
                            continue
                        seen.add(signal.signal_id)
                        clusters.observe([signal])
            watermark = fold_watermark(
                marks,
                committed,
                {tp.partition: offset for tp, offset in highwaters.items()},
            )
            if watermark is not None:
                out = clusters.advance(watermark)
                if out:
                    await publish(out)
            for partition, offset in committed.items():
                marks.forget_before(partition, offset)
            await asyncio.sleep(interval)
    finally:
        await admin.close()
        await consumer.stop()


async def _behind(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return True
    return False


async def _committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> dict[int, int]:
    offsets = await admin.list_consumer_group_offsets(group)
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
