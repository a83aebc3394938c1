"""The Kafka fold acks a record (so Faust may commit its offset) only once the broker has every
write the record caused; a failed write leaves it unacked and stops the worker."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import faust

from loopservice.streams.faust_app import _ack_when_stored


class Record:
    def __init__(self) -> None:
        self.acks = 0

    def ack(self) -> bool:
        self.acks += 1
        return True


class App:
    def __init__(self) -> None:
        self.crashed: list[BaseException] = []

    async def crash(self, reason: BaseException) -> None:
        self.crashed.append(reason)


def ack_when_stored(app: App, record: Record, stored: list[asyncio.Future[Any]]) -> None:
    _ack_when_stored(cast(faust.App, app), record, cast(list[Any], stored))


async def test_a_record_without_writes_is_acked_at_once() -> None:
    record = Record()
    ack_when_stored(App(), record, [])
    assert record.acks == 1


async def test_a_record_is_acked_once_after_its_last_write_lands() -> None:
    loop = asyncio.get_running_loop()
    writes: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(3)]
    record = Record()
    ack_when_stored(App(), record, writes)
    for write in writes[:2]:
        write.set_result(None)
    await asyncio.sleep(0)
    assert record.acks == 0, "acked while a write was still in flight"
    writes[2].set_result(None)
    await asyncio.sleep(0)
    assert record.acks == 1


async def test_a_failed_write_leaves_the_record_unacked_and_stops_the_worker() -> None:
    loop = asyncio.get_running_loop()
    writes: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(2)]
    record, app = Record(), App()
    ack_when_stored(app, record, writes)
    writes[0].set_exception(ConnectionError("broker gone"))
    writes[1].set_result(None)
    for _ in range(3):
        await asyncio.sleep(0)
    assert record.acks == 0
    assert [type(e) for e in app.crashed] == [ConnectionError]
