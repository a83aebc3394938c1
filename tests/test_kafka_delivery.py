"""Alert delivery on the Kafka engine without a broker: the consumer is a stand-in that hands out
batches and records commits; what is sent, skipped, committed and routed is the real code's.
(`tests/test_kafka_engine.py` runs it on a real broker, with a worker SIGKILLed.)"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from factories import T0
from loopservice.domain.events import Actor, ActorKind, Channel, PolicyPublished, Priority, Source
from loopservice.domain.policy import policy_from_mapping, policy_from_toml
from loopservice.domain.signals import Signal, SlaBreached
from loopservice.policy_cli import default_policy, default_policy_text
from loopservice.streams.kafka_delivery import PolicyFeed, _Delivery
from loopservice.streams.rules import RulesBook

SIGNALS = TopicPartition("loop.signals", 0)
INTERACTIONS = TopicPartition("loop.interactions", 0)


class StandIn:
    """What `_Delivery` asks of its consumer (and the feed of its reader)."""

    def __init__(self, held: set[TopicPartition], ends: dict[TopicPartition, int]) -> None:
        self.held = held
        self.ends = ends
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.held

    async def committed(self, tp: TopicPartition) -> int | None:
        return None

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.ends[tp] for tp in tps}


def breach(n: int, minutes: int = 0) -> SlaBreached:
    at = T0 + timedelta(minutes=minutes)
    return SlaBreached(
        signal_id=f"sla.breached/acme/c{n}/first_response/0/{at.isoformat()}/2026.1",
        tenant_id="acme",
        account_id="acct-1",
        case_id=f"c{n}",
        detected_at=at,
        caused_by=(f"ev-{n}",),
        metric="first_response",
        cycle=0,
        due_at=at,
        priority=Priority.P1,
        team="support",
    )


def record(offset: int, signal: Signal) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=SIGNALS.topic,
        partition=SIGNALS.partition,
        offset=offset,
        timestamp=0,
        timestamp_type=1,
        key=signal.account_id.encode(),
        value=signal.model_dump_json().encode(),
        checksum=None,
        serialized_key_size=0,
        serialized_value_size=0,
        headers=[("type", signal.type.encode()), ("id", signal.signal_id.encode())],
    )


async def delivery(
    book: RulesBook[Any], held: set[TopicPartition]
) -> tuple[_Delivery, StandIn, list[tuple[str, str]]]:
    consumer = StandIn(held, {})
    feed = PolicyFeed(book)
    sent: list[tuple[str, str]] = []

    async def sink(signal: Signal, route: str) -> None:
        sent.append((signal.signal_id, route))

    await feed.started(StandIn({INTERACTIONS}, {INTERACTIONS: 3}))
    await feed.advance({INTERACTIONS: 3})  # the reader has read the whole log
    return _Delivery(consumer, "unused:9092", feed, sink), consumer, sent


async def test_a_signal_derived_twice_is_sent_once_and_its_offset_committed_after() -> None:
    d, consumer, sent = await delivery(RulesBook(default_policy(), policy_from_mapping), {SIGNALS})
    first, second = breach(1), breach(2)
    batch = [record(0, first), record(1, second), record(2, first)]
    await d.deliver({SIGNALS: batch})
    # p1-breaches and support-leads both take a P1 breach; the delivery keeps the first route
    assert [sid for sid, _ in sent] == [first.signal_id, second.signal_id]
    assert consumer.commits == [{SIGNALS: 3}]
    await d.deliver({SIGNALS: [record(3, second)]})
    assert len(sent) == 2
    assert consumer.commits[-1] == {SIGNALS: 4}


async def test_records_of_a_partition_no_longer_held_are_left_to_its_owner() -> None:
    d, consumer, sent = await delivery(RulesBook(default_policy(), policy_from_mapping), set())
    await d.deliver({SIGNALS: [record(0, breach(1))]})
    assert sent == []
    assert consumer.commits == []


async def test_alerts_are_routed_by_the_policy_in_force_when_they_were_detected() -> None:
    text = default_policy_text()
    paged = text.replace(
        'name = "p1-breaches"\npriorities = ["P1"]\nsignal_types = ["sla.breached", "sla.warning"]'
        '\nsink = "console"',
        'name = "p1-breaches"\npriorities = ["P1"]\nsignal_types = ["sla.breached", "sla.warning"]'
        '\nsink = "https://pager.example/hook"',
    ).replace('version = "2026.1"', 'version = "2026.2"')
    assert "pager.example" in paged
    book = RulesBook(default_policy(), policy_from_mapping)
    book.publish(
        PolicyPublished(
            event_id="policy:2026.2",
            occurred_at=T0 + timedelta(hours=1),
            tenant_id="acme",
            account_id="_policy",
            source=Source(platform="loopservice", channel=Channel.WEB),
            actor=Actor(kind=ActorKind.SYSTEM, id="test"),
            version="2026.2",
            policy=policy_from_toml(paged).model_dump(mode="json", by_alias=True),
        )
    )
    d, _, sent = await delivery(book, {SIGNALS})
    before, after = breach(1, minutes=30), breach(2, minutes=90)
    await d.deliver({SIGNALS: [record(0, before), record(1, after)]})
    assert sent == [(before.signal_id, "console"), (after.signal_id, "https://pager.example/hook")]


async def test_a_batch_waits_until_the_reader_has_read_the_policies_on_the_log() -> None:
    d, _, sent = await delivery(RulesBook(default_policy(), policy_from_mapping), {SIGNALS})
    feed = d.policies

    await feed.started(StandIn({INTERACTIONS}, {INTERACTIONS: 5}))
    waiting = asyncio.create_task(d.deliver({SIGNALS: [record(0, breach(1))]}))
    await asyncio.sleep(0.05)
    assert sent == []  # two more interactions on the log than the reader has read
    await feed.advance({INTERACTIONS: 5})
    await asyncio.wait_for(waiting, 5)
    assert len(sent) == 1
