"""The Kafka fold acks a record (so Faust may commit its offset) only once the broker has every
write the record caused and every earlier record of its partition is acked; a failed write
leaves it unacked and stops the worker."""

from __future__ import annotations

import asyncio
from typing import Any

from loopservice.streams.kafka_acks import StoredAcks
from loopservice.streams.kafka_runs import Cut, RunWriter


class Record:
    def __init__(self, acked: list[str], name: str) -> None:
        self.acked = acked
        self.name = name

    def ack(self) -> bool:
        self.acked.append(self.name)
        return True


class Worker:
    def __init__(self) -> None:
        self.crashed: list[BaseException] = []

    async def crash(self, reason: BaseException) -> None:
        self.crashed.append(reason)


def writes(n: int) -> list[asyncio.Future[Any]]:
    loop = asyncio.get_running_loop()
    return [loop.create_future() for _ in range(n)]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_record_without_writes_is_acked_at_once() -> None:
    acked: list[str] = []
    StoredAcks(Worker().crash).add(0, Record(acked, "tick"), [])
    assert acked == ["tick"]


async def test_a_record_is_acked_once_after_its_last_write_lands() -> None:
    acked: list[str] = []
    pending = writes(3)
    StoredAcks(Worker().crash).add(0, Record(acked, "a"), pending)
    for write in pending[:2]:
        write.set_result(None)
    await settle()
    assert acked == [], "acked while a write was still in flight"
    pending[2].set_result(None)
    await settle()
    assert acked == ["a"]


async def test_records_of_a_partition_are_acked_in_order_others_do_not_wait() -> None:
    acked: list[str] = []
    acks = StoredAcks(Worker().crash)
    first, second = writes(1), writes(1)
    acks.add(0, Record(acked, "p0 first"), first)
    acks.add(0, Record(acked, "p0 tick"), [])  # nothing to write, but after `first`
    acks.add(0, Record(acked, "p0 second"), second)
    acks.add(1, Record(acked, "p1 tick"), [])
    second[0].set_result(None)
    await settle()
    assert acked == ["p1 tick"]
    first[0].set_result(None)
    await settle()
    assert acked == ["p1 tick", "p0 first", "p0 tick", "p0 second"]


async def test_a_failed_write_leaves_its_partition_unacked_and_stops_the_worker() -> None:
    acked: list[str] = []
    worker = Worker()
    acks = StoredAcks(worker.crash)
    failing = writes(2)
    acks.add(0, Record(acked, "a"), failing)
    acks.add(0, Record(acked, "b"), [])
    failing[0].set_exception(ConnectionError("broker gone"))
    failing[1].set_result(None)
    await settle()
    assert acked == []
    assert [type(e) for e in worker.crashed] == [ConnectionError]


async def test_a_run_of_records_is_acked_together_after_its_writes_in_order() -> None:
    acked: list[str] = []
    acks = StoredAcks(Worker().crash)
    first, second = writes(2), writes(1)
    acks.add_all(0, [Record(acked, "a"), Record(acked, "b")], first)
    acks.add_all(0, [Record(acked, "c")], second)
    second[0].set_result(None)
    first[0].set_result(None)
    await settle()
    assert acked == [], "a run acked while one of its writes was in flight"
    first[1].set_result(None)
    await settle()
    assert acked == ["a", "b", "c"]


class Writes:
    """What a `RunWriter` wrote, in order."""

    def __init__(self) -> None:
        self.done: list[str] = []

    async def write(self, name: str) -> None:
        self.done.append(name)


async def test_a_run_is_written_only_once_its_signals_and_every_earlier_run_landed() -> None:
    out = Writes()
    writer: RunWriter[str] = RunWriter(out.write, Worker().crash)
    first, second = writes(2), writes(1)
    writer.submit(Cut(first, "first"))
    writer.submit(Cut(second, "second"))
    writer.submit(Cut([], "third"))  # no signals: still after the others
    second[0].set_result(None)
    first[0].set_result(None)
    await settle()
    assert out.done == [], "written before all its signals landed"
    first[1].set_result(None)
    await settle()
    assert out.done == ["first", "second", "third"]
    assert writer.pending == 0


async def test_a_lost_signal_stops_the_writer_for_good_and_the_worker() -> None:
    out = Writes()
    worker = Worker()
    writer: RunWriter[str] = RunWriter(out.write, worker.crash)
    first, second = writes(1), writes(1)
    writer.submit(Cut(first, "first"))
    writer.submit(Cut(second, "second"))
    second[0].set_result(None)
    first[0].set_exception(ConnectionError("broker gone"))
    await settle()
    writer.submit(Cut([], "later"))
    await settle()
    assert out.done == []
    assert [type(e) for e in worker.crashed] == [ConnectionError]


async def test_the_fold_waits_while_too_many_runs_are_unwritten() -> None:
    writer: RunWriter[str] = RunWriter(Writes().write, Worker().crash, max_pending=2)
    signals = writes(2)
    writer.submit(Cut(signals[:1], "first"))
    await asyncio.wait_for(writer.room(), 1)  # one pending: room left
    writer.submit(Cut(signals[1:], "second"))
    waiting = asyncio.ensure_future(writer.room())
    await settle()
    assert not waiting.done()
    signals[0].set_result(None)
    await settle()
    assert waiting.done()


async def test_writes_without_records_hold_back_the_records_after_them() -> None:
    acked: list[str] = []
    acks = StoredAcks(Worker().crash)
    caught_up = writes(1)  # the state of records read back from the log: nothing to ack
    acks.add_all(0, [], caught_up)
    acks.add_all(0, [Record(acked, "tick")], [])
    await settle()
    assert acked == []
    caught_up[0].set_result(None)
    await settle()
    assert acked == ["tick"]
