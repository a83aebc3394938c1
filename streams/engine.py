"""The embedded engine: one asyncio process reads the log in order and drives the processors.

Watermark W = highest `occurred_at` seen minus the allowed lateness, or the time of the latest
clock tick, whichever is later; timers fire when W passes them. In live mode the engine, once it
has caught up with the log, appends a clock tick when the wall clock (minus the lateness) has
reached the next deadline, so every firing is caused by a record on the log and a replay of
that log gives the same signals. Processor state lives in memory: on start the engine replays
the log from the beginning (signals it derives again are deduplicated by identity on the
signal log).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from loopservice.domain.events import ClockTick, Event, clock_tick
from loopservice.domain.signals import Signal
from loopservice.streams.clock import Clock
from loopservice.streams.log import Log, LogRecord
from loopservice.streams.processor import Processor

log = logging.getLogger(__name__)

FailureHandler = Callable[[LogRecord[Event], str, Exception], None]
SignalSink = Callable[[Sequence[Signal]], None]


@dataclass
class EngineStats:
    records: int = 0
    ticks: int = 0
    signals: int = 0
    failures: int = 0


class EmbeddedEngine:
    def __init__(
        self,
        log: Log[Event],
        signals: Log[Signal],
        processors: Sequence[Processor],
        *,
        allowed_lateness: timedelta = timedelta(seconds=1),
        on_failure: FailureHandler | None = None,
        sinks: Sequence[SignalSink] = (),
        batch_size: int = 2000,
    ) -> None:
        self.log = log
        self.signal_log = signals
        self.processors = list(processors)
        self.allowed_lateness = allowed_lateness
        self.on_failure = on_failure
        self.sinks = list(sinks)
        self.batch_size = batch_size
        self.position = 1  # the next position to read
        self.watermark: datetime | None = None
        self._max_seen: datetime | None = None
        self.stats = EngineStats()
        # held while folding, so readers of processor state (the live board) see whole batches
        self.lock = threading.Lock()

    # -- the fold ----------------------------------------------------------------------------

    def process(self, records: Sequence[LogRecord[Event]]) -> list[Signal]:
        """Folds records in order; returns the signals they caused, already on the signal log."""
        out: list[Signal] = []
        with self.lock:
            for record in records:
                out += self._process_one(record)
                self.position = record.position + 1
        self.stats.records += len(records)
        if out:
            self.signal_log.append(out)
            self.stats.signals += len(out)
            for sink in self.sinks:
                sink(out)
        return out

    def _process_one(self, record: LogRecord[Event]) -> list[Signal]:
        event = record.value
        out: list[Signal] = []
        if isinstance(event, ClockTick):
            self.stats.ticks += 1
            candidate = event.occurred_at
        else:
            for processor in self.processors:
                try:
                    out += processor.handle(event)
                except Exception as exc:  # a bad event must not stop the loop: dead-letter it
                    self.stats.failures += 1
                    log.warning(
                        "processor %s failed on position %s (%s): %s",
                        processor.name,
                        record.position,
                        event.type,
                        type(exc).__name__,
                    )
                    if self.on_failure is not None:
                        self.on_failure(record, processor.name, exc)
            if self._max_seen is None or event.occurred_at > self._max_seen:
                self._max_seen = event.occurred_at
            candidate = self._max_seen - self.allowed_lateness
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate
            for processor in self.processors:
                out += processor.advance(candidate)
        return out

    def next_due(self) -> datetime | None:
        dues = [d for p in self.processors if (d := p.next_due()) is not None]
        return min(dues) if dues else None

    # -- replay ------------------------------------------------------------------------------

    def catch_up(self, progress: Callable[[int], None] | None = None) -> int:
        """Processes everything on the log now; returns how many records were read."""
        read = 0
        while True:
            records = self.log.read(self.position, self.batch_size)
            if not records:
                return read
            self.process(records)
            read += len(records)
            if progress is not None:
                progress(len(records))

    # -- live --------------------------------------------------------------------------------

    def tick_if_due(self, clock: Clock) -> bool:
        """Appends a clock tick when a deadline has come due on `clock`; True if it did."""
        due = self.next_due()
        if due is None:
            return False
        now = clock.now() - self.allowed_lateness
        if now < due or (self.watermark is not None and now <= self.watermark):
            return False
        self.log.append([clock_tick(now)])
        return True

    async def run_live(
        self,
        clock: Clock,
        stop: asyncio.Event,
        poll: timedelta = timedelta(milliseconds=100),
    ) -> None:
        """Tails the log until `stop` is set, ticking whenever a deadline comes due."""
        while not stop.is_set():
            read = await asyncio.to_thread(self.catch_up)
            if read == 0:
                ticked = await asyncio.to_thread(self.tick_if_due, clock)
                if not ticked:
                    await _sleep_or_stop(stop, self._idle_wait(clock, poll))

    def _idle_wait(self, clock: Clock, poll: timedelta) -> float:
        due = self.next_due()
        if due is None:
            return poll.total_seconds()
        until_due = (due + self.allowed_lateness - clock.now()).total_seconds()
        return max(0.0, min(poll.total_seconds(), until_due))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
