"""The Kafka log adapter against a real single-node broker (started by infra/kafka/kafka.sh)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from factories import T0, message, opened
from kafka_broker import KafkaBroker, kafka_broker  # noqa: F401  (the fixture)
from loopservice.domain.events import Event, Priority, clock_tick
from loopservice.domain.signals import SlaBreached
from loopservice.infra.kafka_log import (
    DEAD_LETTERS,
    INTERACTIONS,
    SIGNALS,
    KafkaLog,
    LogUnavailable,
    ensure_topics,
    interaction_log,
    signal_log,
)

pytestmark = pytest.mark.kafka

PARTITIONS = 4


@pytest.fixture(scope="module")
def broker(kafka_broker: KafkaBroker) -> KafkaBroker:  # noqa: F811
    ensure_topics(kafka_broker.bootstrap, PARTITIONS)
    return kafka_broker


@pytest.fixture
def log(broker: KafkaBroker) -> Iterator[KafkaLog[Event]]:
    with interaction_log(broker.bootstrap, timeout=5) as opened_log:
        yield opened_log


def _accounts_events(first: int) -> list[Event]:
    """Two cases each for three accounts, interleaved."""
    events: list[Event] = []
    n = first
    for i in range(2):
        for account in ("acct-a", "acct-b", "acct-c"):
            case = f"{account}-c{i}"
            events.append(opened(n, account_id=account, case=case))
            events.append(message(n + 1, account_id=account, case=case))
            n += 2
    return events


def test_topics_exist_with_append_time_and_no_retention(broker: KafkaBroker) -> None:
    ensure_topics(broker.bootstrap, PARTITIONS)  # a second call changes nothing

    async def configs() -> dict[str, dict[str, str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        try:
            resources = [
                ConfigResource(ConfigResourceType.TOPIC, t)
                for t in (INTERACTIONS, SIGNALS, DEAD_LETTERS)
            ]
            out: dict[str, dict[str, str]] = {}
            for response in await admin.describe_configs(resources):
                for resource in response.resources:
                    name, entries = resource[3], resource[4]
                    out[name] = {entry[0]: entry[1] for entry in entries}
            return out
        finally:
            await admin.close()

    found = asyncio.run(configs())
    assert set(found) == {INTERACTIONS, SIGNALS, DEAD_LETTERS}
    for config in found.values():
        assert config["message.timestamp.type"] == "LogAppendTime"
        assert config["retention.ms"] == "-1"
    with pytest.raises(ValueError, match="partitions"):
        ensure_topics(broker.bootstrap, PARTITIONS + 1)


def test_append_is_keyed_by_account_and_reads_back_with_broker_time(
    log: KafkaLog[Event],
) -> None:
    assert log.partition_count() == PARTITIONS
    heads_before = log.heads()
    events = _accounts_events(1000)
    before = datetime.now(UTC).replace(microsecond=0)
    outcomes = log.append_kafka(events)
    after = datetime.now(UTC) + timedelta(seconds=1)

    assert [o.record_id for o in outcomes] == [e.event_id for e in events]
    assert not any(o.duplicate for o in outcomes)
    partition_of: dict[str, int] = {}
    for event, outcome in zip(events, outcomes, strict=True):
        assert partition_of.setdefault(event.account_id, outcome.partition) == outcome.partition
    # Positions are per partition, gapless, continuing from that partition's head.
    by_partition: dict[int, list[int]] = {}
    for outcome in outcomes:
        by_partition.setdefault(outcome.partition, []).append(outcome.position)
    for partition, positions in by_partition.items():
        start = heads_before[partition] + 1
        assert positions == list(range(start, start + len(positions)))
        assert log.head_of(partition) == positions[-1]

        records = log.read_partition(partition, start, 1000)
        assert [r.position for r in records] == positions
        expected = [e for e, o in zip(events, outcomes, strict=True) if o.partition == partition]
        assert [r.value for r in records] == expected
        for record in records:
            assert before <= record.recorded_at <= after  # the broker's append time
        assert log.read_partition(partition, start + 1, 1) == records[1:2]
        assert log.read_partition(partition, positions[-1] + 1, 10) == []


def test_port_view_is_one_partition(broker: KafkaBroker) -> None:
    with interaction_log(broker.bootstrap, partition=2, timeout=5) as view:
        head = view.head()
        tick = clock_tick(T0, partition=2)
        [outcome] = view.append_kafka([tick])
        assert outcome.partition == 2  # a tick goes to the partition it names
        assert outcome.position == head + 1 == view.head()
        [record] = view.read(head + 1, 10)
        assert record.value == tick
        assert view.read(1, 1)[0].position == 1
        with pytest.raises(ValueError, match="no partition 9"):
            view.append([clock_tick(T0, partition=9)])


def test_signals_round_trip(broker: KafkaBroker) -> None:
    breach = SlaBreached(
        signal_id="sla:c1:first_response:0:P2:v1",
        tenant_id="acme",
        account_id="acct-a",
        case_id="c1",
        detected_at=T0,
        caused_by=("ev-1",),
        metric="first_response",
        cycle=0,
        due_at=T0,
        priority=Priority.P2,
    )
    with signal_log(broker.bootstrap, timeout=5) as signals:
        [outcome] = signals.append_kafka([breach])
        [record] = signals.read_partition(outcome.partition, outcome.position, 1)
        assert record.value == breach


def test_unavailable_broker_fails_fast_and_acknowledged_records_survive_restart(
    broker: KafkaBroker,
) -> None:
    log = interaction_log(broker.bootstrap, timeout=2)
    acknowledged = log.append_kafka(_accounts_events(2000))
    broker.down()
    try:
        started = time.monotonic()
        with pytest.raises(LogUnavailable):
            log.append([opened(2100, account_id="acct-a", case="during-outage")])
        append_failed_after = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(LogUnavailable):
            log.head_of(0)
        read_failed_after = time.monotonic() - started
        assert append_failed_after < 2 + 2, append_failed_after
        assert read_failed_after < 2 + 2, read_failed_after
    finally:
        broker.up()

    for outcome in acknowledged:
        [record] = log.read_partition(outcome.partition, outcome.position, 1)
        assert record.value.event_id == outcome.record_id
    # The same log object recovers once the broker is back.
    [again] = log.append_kafka([opened(2200, account_id="acct-a", case="after-outage")])
    assert again.partition == acknowledged[0].partition
    log.close()
    with interaction_log(broker.bootstrap, timeout=5) as fresh:
        ids = [r.value.event_id for r in fresh.read_partition(again.partition, 1, 10_000)]
    # The record refused during the outage stayed queued and was written once, in order.
    assert ids.count("ev-2100") == 1
    assert ids.index("ev-2100") == len(ids) - 2
    assert ids[-1] == "ev-2200"
