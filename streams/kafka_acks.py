"""When the Kafka fold acks a record: once the broker has every write the record caused, and
never before an earlier record of its partition.

Faust commits a partition up to its first record not acked. Its default ack (when the agent
moves on) let a commit overtake the record's state: changelog writes wait in Faust's producer
buffer, and the flush before a commit gives up after 0.1 s without progress. A worker killed
then had committed offsets its changelog did not cover, and the worker taking over skipped
records whose effect was lost (missing signals, seen in CI).

Acks go out in offset order because Faust's check for a record missing at the head of the
acked ones is off by one (and skipped while nothing was committed): a record without writes
(a clock tick) acked before an earlier one still waiting would let the commit jump past it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Ackable(Protocol):
    def ack(self) -> bool: ...


@dataclass(slots=True)
class _Pending:
    records: Sequence[Ackable]
    left: int  # writes still in flight


class StoredAcks:
    """Acks the records of each partition in order, each once its writes have landed.

    A write that fails leaves its record, and every later one of the partition, unacked and
    calls `crash`: the worker stops and the records are folded again from the committed offset.
    """

    def __init__(self, crash: Callable[[BaseException], Awaitable[None]]) -> None:
        self._crash = crash
        self._queues: dict[int, deque[_Pending]] = {}
        self._crashing: set[asyncio.Future[None]] = set()  # held so the task is not collected

    def add(self, partition: int, record: Ackable, writes: list[asyncio.Future[Any]]) -> None:
        self.add_all(partition, [record], writes)

    def add_all(
        self, partition: int, records: Sequence[Ackable], writes: list[asyncio.Future[Any]]
    ) -> None:
        """Acks `records` (in order, after the partition's earlier ones) once all of `writes`
        have landed: a run of records whose state went out in one write. With no records, the
        writes still hold back the records added after them (records read back from the log
        have nothing to ack, and the records after them must wait for their state)."""
        queue = self._queues.setdefault(partition, deque())
        pending = _Pending(records, len(writes))
        queue.append(pending)
        if not writes:
            _ack_ready(queue)
        for write in writes:
            write.add_done_callback(lambda w: self._landed(queue, pending, w))

    def _landed(
        self, queue: deque[_Pending], pending: _Pending, write: asyncio.Future[Any]
    ) -> None:
        error = write.exception() if not write.cancelled() else asyncio.CancelledError()
        if error is not None:
            logger.error("a state write failed (%s): stopping", type(error).__name__)
            self._crashing.add(asyncio.ensure_future(self._crash(error)))
            return
        pending.left -= 1
        if pending.left == 0:
            _ack_ready(queue)


def _ack_ready(queue: deque[_Pending]) -> None:
    while queue and queue[0].left == 0:
        for record in queue.popleft().records:
            record.ack()
