"""How the Kafka fold writes: records folded in runs, one publish and one state write per run.

Folding a record is cheap next to a round trip to the broker, and a record's state write is
mostly the same accounts again. So the fold takes the records that keep coming, up to `MAX_RECORDS`
or `MAX_SECONDS`, as one run: it folds them one by one, sending their signals as it goes, then
*cuts* the run — takes each partition's snapshot (`Partition.flush`, pickled there and then,
so later records cannot leak into it) — and hands it to a `RunWriter`. A run also ends once the
fold has waited `IDLE_SECONDS` for a next record, so a quiet stream writes at once. (Faust's
fetcher hands the stream one record at a time, so "nothing fetched is waiting" is no sign of a
quiet stream.) Signals are not held back by the run: they are sent as they are derived.

The guarantees are those of one record, for the run as a whole (`streams/kafka_acks.py`):

* the snapshot is written only once the broker has acknowledged every signal of the run (and
  of every run before it), so a crash can make a worker derive a signal again, never lose one;
* runs are written in the order they were cut, each snapshot with its partition's position
  (`pos/<partition>`) last, so the changelog keeps one partition's writes in fold order;
* a run's records are acked only once its writes have landed, in offset order per partition.

The fold goes on with the next run while the last one's signals are in flight, at most
`MAX_PENDING` runs ahead of the writer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

MAX_RECORDS = 1000  # records in one run
MAX_SECONDS = 0.25  # how long a run may stay open while records keep coming
IDLE_SECONDS = 0.005  # how long the fold waits for a next record before it cuts the run
MAX_PENDING = 4  # runs cut and not yet written before the fold waits

S = TypeVar("S")  # what the run holds besides its signals: snapshots, records to ack


@dataclass
class Cut(Generic[S]):
    """A run as cut: the futures of its signals and what to write once they have landed."""

    published: list[asyncio.Future[Any]]
    payload: S


@dataclass
class RunWriter(Generic[S]):
    """Writes cut runs in order, each only after its signals and every earlier run's.

    `write` gets a run's payload once its signals have landed; it must send what it writes
    before it returns (the next run's writes follow it). A failed signal or write stops the
    writer for good — no later run is written, since its state could follow the lost signal —
    and calls `crash` once.
    """

    write: Callable[[S], Awaitable[None]]
    crash: Callable[[BaseException], Awaitable[None]]
    max_pending: int = MAX_PENDING
    _last: asyncio.Future[None] | None = None
    _pending: int = 0
    _failed: bool = False
    _room: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, cut: Cut[S]) -> None:
        self._pending += 1
        if self._pending >= self.max_pending:
            self._room.clear()
        self._last = written = asyncio.ensure_future(self._written(cut, self._last))
        written.add_done_callback(_retrieved)  # the next run or the crash reports a failure

    async def room(self) -> None:
        """Waits until fewer than `max_pending` runs are waiting to be written."""
        while self._pending >= self.max_pending and not self._failed:
            await self._room.wait()

    async def _written(self, cut: Cut[S], previous: asyncio.Future[None] | None) -> None:
        try:
            if cut.published:
                await asyncio.gather(*cut.published)
            if previous is not None:
                await previous
            if self._failed:
                raise _Stopped
            await self.write(cut.payload)
        except (_Stopped, asyncio.CancelledError):
            raise  # reported by the run that failed; cancelled: the worker is stopping
        except BaseException as exc:
            if not self._failed:
                self._failed = True
                logger.error("a run's signals or state did not reach the broker (%r)", exc)
                await self.crash(exc)
            raise _Stopped from exc
        finally:
            self._pending -= 1
            if self._pending < self.max_pending:
                self._room.set()


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class _Stopped(Exception):
    """A run not written because an earlier one failed."""
