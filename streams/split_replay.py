"""Audit replay split across processes by account, with the embedded engine's signals.

The embedded engine folds every record through every processor on one core. Most of that work
(SLA clocks, handoffs, case patterns, follow-ups, health) keeps state per account and per
case — the Kafka engine runs it per account (`streams.partitioned`) — so a replay can give each
worker process the accounts whose `crc32(tenant/account)` falls to it, while this process runs
the tenant-wide processors (topic surges, breach clusters), which must see every account in
event-time order. (A replay leaves the case-state processor out: it derives no signals.)

What makes it the engine's fold, record for record:

* This process reads the log once, parses each record's envelope (type, event time, tenant,
  account, case) and computes the engine's watermark after every record. Each worker gets its
  accounts' records and every watermark rise; it hands a record to its processors at the same
  point of the sequence as the engine does, and calls `advance(w)` at every rise at which any of
  its processors has something due (`next_due() <= w`). This rests on what the account-keyed
  processors are: at any other rise their `advance` pops nothing (each pops only timers at or
  below the watermark), and none reads the watermark when it handles an event. A processor
  added to the topology must be so too (tests/test_split_replay.py holds the split to the
  engine, signal by signal, record, step and processor).
* `policy.published` records go to every worker (each has its own rules book), clock ticks to
  none (they only move the watermark).
* Every record of a case must fall to one worker, as its account's do: this process checks it
  as it routes, and each worker checks that the record it decodes has the envelope this process
  routed by (type, event time, tenant, account, case). If either check fails, `NotSplittable`
  is raised and the caller replays on one process instead.
* The tenant-wide processors get here what the engine would give them, at the same points:
  `topic-surge` the opened cases and the watermark; `breach-cluster` the SLA processor's signals
  (the workers report each with its record and step) before it counts, and the watermark.

Every signal is tagged with its record's position, the step (event or watermark) and the
processor's place in the replay's list; merged by those tags, the result is the engine's list
of signals, except that signals of different workers' accounts derived by one processor in the
same watermark step come worker by worker (the engine orders them by its own timer heaps). Each
account's and each case's signals keep the engine's order, and the set is the same.
"""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing
import queue
import time
import traceback
import zlib
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any, Protocol, cast, runtime_checkable

import orjson

from loopservice.domain.events import ClockTick, Event, PolicyPublished
from loopservice.domain.policy import Policy
from loopservice.domain.signals import Signal
from loopservice.streams.processor import Processor
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import Topology, build_topology

logger = logging.getLogger(__name__)

HANDLE, ADVANCE = 0, 1  # the two steps of a record, in the engine's order
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_TICK, _POLICY, _OPENED = "clock.tick", "policy.published", "case.opened"

IN_FLIGHT = 6  # batches sent to the workers and not yet merged, at most

# (position, step, processor index, sequence number, signal)
Tagged = tuple[int, int, int, int, Signal]


class NotSplittable(Exception):
    """The log cannot be split by account and stay the engine's fold; replay it on one process."""


@runtime_checkable
class BodySource(Protocol):
    """A log that hands over its records' JSON undecoded, and decodes one as its `read` does
    (`infra.sqlite_log.SQLiteLog`)."""

    def read_bodies(self, start: int, limit: int) -> list[tuple[int, bytes]]: ...

    def decode_body(self, body: bytes) -> Event: ...


def owner(tenant_id: str, account_id: str, workers: int) -> int:
    """The worker an account's records go to."""
    return zlib.crc32(f"{tenant_id}/{account_id}".encode()) % workers


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // _US


def _at(micros: int) -> datetime:
    return _EPOCH + micros * _US


def account_processors(topology: Topology) -> list[Processor]:
    """The account-keyed processors a replay runs: the topology's, less the case-state
    processor, which derives no signals (it keeps the live read side's view of each case)."""
    return [p for p in topology.by_account if p is not topology.cases]


def replay_processors(topology: Topology) -> list[Processor]:
    """Everything a one-process replay runs: the engine's processors, in its order, less the
    case-state processor (see `account_processors`)."""
    return [p for p in topology.processors if p is not topology.cases]


# -- routing (this process) -------------------------------------------------------------------

# A routed record: position, JSON, then the envelope it was routed by, which the worker checks.
Row = tuple[int, bytes, str, int, str, str, str | None]


@dataclass
class Batch:
    """One read of the log: each worker's records, the watermark's rises, and the events this
    process decodes for itself (opened cases, policies)."""

    number: int
    size: int  # records read
    last: int  # the last position read
    rows: list[list[Row]]  # per worker
    rise_positions: list[int] = field(default_factory=list)
    rise_micros: list[int] = field(default_factory=list)  # the watermark after each rise
    events: dict[int, Event] = field(default_factory=dict)

    def share(self, worker: int) -> Share:
        return Share(
            self.number, self.last, self.rows[worker], self.rise_positions, self.rise_micros
        )


@dataclass
class Share:
    """What one worker gets of a batch."""

    number: int
    last: int
    rows: list[Row]
    rise_positions: list[int]
    rise_micros: list[int]


class Router:
    """Parses envelopes, follows the engine's watermark and deals records to workers.

    Event times are parsed as the decoder parses them (ISO text, then UTC) and kept as
    microseconds since the epoch: the watermark is their maximum minus the allowed lateness,
    or a tick's time, as in the engine; a worker turns a rise back into the same instant."""

    def __init__(
        self, workers: int, allowed_lateness: timedelta, decode: Callable[[bytes], Event]
    ) -> None:
        self.workers = workers
        self.decode = decode
        self.lateness = allowed_lateness // _US
        self.watermark: int | None = None
        self.max_seen: int | None = None
        self.owners: dict[tuple[str, str], int] = {}
        self.case_owner: dict[tuple[str, str], int] = {}
        self.policies: list[PolicyPublished] = []
        self.batches = 0

    def route(self, records: Sequence[tuple[int, bytes]]) -> Batch:
        rows: list[list[Row]] = [[] for _ in range(self.workers)]
        batch = Batch(self.batches, len(records), records[-1][0], rows)
        self.batches += 1
        owners, case_owner = self.owners, self.case_owner
        rise_positions, rise_micros = batch.rise_positions, batch.rise_micros
        watermark, max_seen = self.watermark, self.max_seen
        for position, body in records:
            try:
                values = _loads(body)
                kind, tenant, account, occurred = _ENVELOPE(values)
                case_id = values.get("case_id")
                at = _from_iso(occurred)
                if at.tzinfo is not UTC:  # as the decoder does
                    at = _in_utc(at)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise NotSplittable(f"position {position}: no envelope ({exc!r})") from None
            micros = (at - _EPOCH) // _US
            if kind == _TICK:
                self._expect(ClockTick, position, body, at)
                candidate = micros
            else:
                row = (position, body, kind, micros, tenant, account, case_id)
                if kind == _OPENED or kind == _POLICY:
                    batch.events[position] = self._expect(kind, position, body, at)
                if kind == _POLICY:  # every worker's rules book takes it
                    self.policies.append(cast(PolicyPublished, batch.events[position]))
                    for share in rows:
                        share.append(row)
                else:
                    worker = owners.get((tenant, account))
                    if worker is None:
                        worker = owners[(tenant, account)] = owner(tenant, account, self.workers)
                    if case_id is not None:
                        known = case_owner.setdefault((tenant, case_id), worker)
                        if known != worker:
                            raise NotSplittable(f"case {tenant}/{case_id} has two accounts")
                    rows[worker].append(row)
                if max_seen is None or micros > max_seen:
                    max_seen = micros
                candidate = max_seen - self.lateness
            if watermark is None or candidate > watermark:
                watermark = candidate
                rise_positions.append(position)
                rise_micros.append(candidate)
        self.watermark, self.max_seen = watermark, max_seen
        return batch

    def _expect(self, kind: type | str, position: int, body: bytes, at: datetime) -> Event:
        """The record decoded here (a tick, an opened case, a policy): the type and event time
        it was routed by, or the log is not split."""
        event = self.decode(body)
        fits = isinstance(event, kind) if isinstance(kind, type) else event.type == kind
        if not fits or event.occurred_at != at:
            raise NotSplittable(f"position {position}: not the {kind} its envelope says")
        return event


_loads = orjson.loads
_ENVELOPE = itemgetter("type", "tenant_id", "account_id", "occurred_at")
_from_iso = datetime.fromisoformat


def _in_utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("a naive event time")
    return at.astimezone(UTC)


# -- a worker's share: the account-keyed processors -------------------------------------------


class Shard:
    """The account-keyed processors of one worker, driven at the engine's points."""

    def __init__(
        self,
        index: int,
        workers: int,
        processors: Sequence[Processor],
        decode: Callable[[bytes], Event],
    ) -> None:
        self.index = index
        self.workers = workers
        self.processors = list(processors)
        self.decode = decode
        self._seq = 0

    def run(self, share: Share) -> list[Tagged]:
        out: list[Tagged] = []
        positions = share.rise_positions
        rise, rises = 0, len(positions)  # the next rise of the batch not yet passed
        processors, decode, mine = self.processors, self.decode, self.index
        for row in share.rows:
            position, body, kind, micros, tenant, account, case_id = row
            if rise < rises and positions[rise] < position:
                rise = self._advance_until(share, position, rise, out)
            event = decode(body)
            decoded = (event.type, (event.occurred_at - _EPOCH) // _US, event.tenant_id)
            if decoded != (kind, micros, tenant) or (event.account_id, event.case_id) != (
                account,
                case_id,
            ):
                raise NotSplittable(f"position {position}: routed as {row[2:]}, not {event!r}")
            if kind != _POLICY and owner(tenant, account, self.workers) != mine:
                raise NotSplittable(f"position {position}: dealt to the wrong worker")
            for index, processor in enumerate(processors):
                try:
                    signals = processor.handle(event)
                except Exception as exc:
                    _failed(processor, position, event.type, exc)
                    continue
                if signals:
                    self._tag(position, HANDLE, index, signals, out)
        self._advance_until(share, share.last + 1, rise, out)
        return out

    def _advance_until(self, share: Share, limit: int, rise: int, out: list[Tagged]) -> int:
        """Advances at each rise before position `limit` at which a processor has something
        due; returns the index of the first rise at or after `limit`."""
        positions, micros = share.rise_positions, share.rise_micros
        end = bisect_left(positions, limit, rise)
        while rise < end:
            due = None
            for processor in self.processors:
                d = processor.next_due()
                if d is not None and (due is None or d < due):
                    due = d
            if due is None:
                break
            rise = bisect_left(micros, (due - _EPOCH) // _US, rise, end)
            if rise == end:
                break
            position, watermark = positions[rise], _at(micros[rise])
            for index, processor in enumerate(self.processors):
                try:
                    signals = processor.advance(watermark)
                except Exception as exc:
                    _failed(processor, position, "watermark", exc)
                    continue
                if signals:
                    self._tag(position, ADVANCE, index, signals, out)
            rise += 1
        return end

    def _tag(
        self, position: int, step: int, index: int, signals: list[Signal], out: list[Tagged]
    ) -> None:
        for signal in signals:
            out.append((position, step, index, self._seq, signal))
            self._seq += 1


def _failed(processor: Processor, position: int, what: str, exc: Exception) -> None:
    """A processor's failure is what it is in the engine: a warning, and no signals from that
    processor for that step."""
    logger.warning(
        "processor %s failed on position %s (%s): %s",
        processor.name,
        position,
        what,
        type(exc).__name__,
    )


def _step(
    processor: Processor, position: int, event: Event | None, watermark: datetime | None = None
) -> list[Signal]:
    """`processor.handle(event)`, or `advance(watermark)`, failing as in the engine."""
    try:
        if event is not None:
            return processor.handle(event)
        assert watermark is not None
        return processor.advance(watermark)
    except Exception as exc:
        _failed(processor, position, event.type if event is not None else "watermark", exc)
        return []


def _work(
    index: int,
    workers: int,
    rules: RulesBook[Policy],
    decode: Callable[[bytes], Event],
    inbox: Any,
    outbox: Any,
) -> None:
    """A worker process: folds its share of each batch and reports the tagged signals."""
    gc.freeze()  # what it inherited stays as it is: the collector need not scan it again
    try:
        shard = Shard(index, workers, account_processors(build_topology(rules)), decode)
        while (share := inbox.get()) is not None:
            outbox.put(("signals", index, share.number, shard.run(share)))
        outbox.put(("done", index, -1, time.process_time()))
    except NotSplittable as exc:
        outbox.put(("unsplittable", index, -1, str(exc)))
    except BaseException:  # reported, so this process does not wait for it forever
        outbox.put(("failed", index, -1, traceback.format_exc()))


# -- the tenant-wide processors (this process) ------------------------------------------------


class TenantWide:
    """Topic surges and breach clusters, fed what the engine feeds them: the opened cases and
    policies, the SLA processor's signals at the step that derived them, and the watermark."""

    def __init__(self, rules: RulesBook[Policy]) -> None:
        topology = build_topology(rules)
        assert topology.breach_clusters is not None
        by_account = [p.name for p in account_processors(topology)]
        self.sla_index = by_account.index(topology.sla.name)
        self.first_index = len(by_account)  # of these processors in the replay's list
        self.surges = list(topology.tenant_wide)
        self.clusters = topology.breach_clusters
        self.processors: list[Processor] = [*self.surges, self.clusters]
        self._applied = 0  # rises of the current batch passed
        self._seq = 0

    def run(self, batch: Batch, derived: Iterator[Tagged]) -> list[Tagged]:
        """This batch's signals of the tenant-wide processors; `derived`: the workers'."""
        out: list[Tagged] = []
        self._applied = 0
        sla: dict[tuple[int, int], list[Signal]] = {}
        for position, step, index, _, signal in derived:
            if index == self.sla_index:
                sla.setdefault((position, step), []).append(signal)
        for position in sorted({p for p, _ in sla} | batch.events.keys()):
            self._advance_until(batch, position, out)
            event = batch.events.get(position)
            breaches = sla.get((position, HANDLE))
            if breaches or event is not None:
                self._watermark_before(batch, position, out)
                if breaches:
                    self.clusters.observe(breaches)
                self._handle(position, event, out)
            fired = sla.get((position, ADVANCE))
            if fired:  # the SLA processor fired them at this record's rise
                self.clusters.observe(fired)
                self._rise(batch, bisect_left(batch.rise_positions, position), out)
        self._advance_until(batch, batch.last + 1, out)
        if self._applied < len(batch.rise_micros):  # the next batch's first events are judged by it
            self._rise(batch, len(batch.rise_micros) - 1, out)
        return out

    def _handle(self, position: int, event: Event | None, out: list[Tagged]) -> None:
        for offset, processor in enumerate(self.processors):
            if event is not None:
                signals = _step(processor, position, event)
            elif processor is self.clusters:  # what its `handle` does with any other event
                signals = self.clusters.count_late()
            else:
                continue  # a surge detector takes opened cases only
            self._tag(position, HANDLE, offset, signals, out)

    def _next_due(self) -> datetime | None:
        dues = [d for p in self.surges if (d := p.next_due()) is not None]
        if (due := self.clusters.pending_due()) is not None:
            dues.append(due)
        return min(dues) if dues else None

    def _advance_until(self, batch: Batch, limit: int, out: list[Tagged]) -> None:
        end = bisect_left(batch.rise_positions, limit, self._applied)
        while self._applied < end and (due := self._next_due()) is not None:
            rise = bisect_left(batch.rise_micros, _micros(due), self._applied, end)
            if rise == end:
                break
            self._rise(batch, rise, out)

    def _watermark_before(self, batch: Batch, position: int, out: list[Tagged]) -> None:
        """Passes the last rise before `position`: a handled event is judged late by it."""
        last = bisect_left(batch.rise_positions, position, self._applied) - 1
        if last >= self._applied:
            self._rise(batch, last, out)

    def _rise(self, batch: Batch, rise: int, out: list[Tagged]) -> None:
        position, watermark = batch.rise_positions[rise], _at(batch.rise_micros[rise])
        for offset, processor in enumerate(self.processors):
            self._tag(position, ADVANCE, offset, _step(processor, position, None, watermark), out)
        self._applied = rise + 1

    def _tag(
        self, position: int, step: int, offset: int, signals: list[Signal], out: list[Tagged]
    ) -> None:
        for signal in signals:
            out.append((position, step, self.first_index + offset, self._seq, signal))
            self._seq += 1


def merge(batch: Batch, by_worker: list[list[Tagged]], tenant_wide: TenantWide) -> list[Tagged]:
    """A batch's signals, the workers' and the tenant-wide processors', in the engine's order:
    by record, step and processor; within one processor's step, worker by worker."""
    keyed = [(t, worker) for worker, tagged in enumerate(by_worker) for t in tagged]
    derived = (t for tagged in by_worker for t in tagged)
    keyed += [(t, len(by_worker)) for t in tenant_wide.run(batch, derived)]
    keyed.sort(key=lambda k: (k[0][0], k[0][1], k[0][2], k[1], k[0][3]))
    return [t for t, _ in keyed]


# -- the whole -------------------------------------------------------------------------------


@dataclass
class SplitStats:
    """CPU seconds of a split replay's processes (for `loopservice bench replay`)."""

    workers: list[float] = field(default_factory=list)
    this_process: float = 0.0


def can_split() -> bool:
    """Workers are forked (they inherit the rules book and the code): not on every platform."""
    return "fork" in multiprocessing.get_all_start_methods()


def split_replay(
    log: BodySource,
    rules: RulesBook[Policy],
    *,
    workers: int,
    allowed_lateness: timedelta = timedelta(seconds=1),
    progress: Callable[[int], None] | None = None,
    batch_size: int = 20_000,
    stats: SplitStats | None = None,
) -> list[Signal]:
    """The signals the embedded engine derives from `log`, in its order but for the ties the
    module docstring names, with the account-keyed processors on `workers` processes. Raises
    `NotSplittable` when the log does not split by account. `rules` should be fresh: it takes
    the log's published policies, as in the engine, once the replay is done (if it raises, it
    is as it was, for a replay on one process to start from)."""
    started = time.process_time()
    context = multiprocessing.get_context("fork")
    inboxes = [context.Queue() for _ in range(workers)]
    outbox = context.Queue()
    processes = [
        context.Process(
            target=_work, args=(k, workers, rules, log.decode_body, inboxes[k], outbox), daemon=True
        )
        for k in range(workers)
    ]
    for process in processes:
        process.start()
    reports = _Reports(outbox, processes)
    router = Router(workers, allowed_lateness, log.decode_body)
    try:
        merged = _Merger(copy.deepcopy(rules), workers, reports, progress)
        position = 1
        while records := log.read_bodies(position, batch_size):
            batch = router.route(records)
            for worker, inbox in enumerate(inboxes):
                inbox.put(batch.share(worker))
            batch.rows = []  # sent; what is left of the batch is this process's share
            merged.expect(batch)
            position = records[-1][0] + 1
        for inbox in inboxes:
            inbox.put(None)
        signals = merged.all()
        while len(reports.cpu) < workers:
            reports.receive(block=True)
    finally:
        for inbox in inboxes:
            inbox.cancel_join_thread()  # what a killed worker did not take is dropped
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    for policy in router.policies:  # in log order, as the engine's processors publish them
        rules.publish(policy)
    if stats is not None:
        stats.workers = [reports.cpu[k] for k in range(workers)]
        stats.this_process = time.process_time() - started
    return signals


class _Merger:
    """Merges each batch once every worker has reported it, in batch order."""

    def __init__(
        self,
        rules: RulesBook[Policy],
        workers: int,
        reports: _Reports,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.tenant_wide = TenantWide(rules)
        self.workers = workers
        self.reports = reports
        self.progress = progress
        self.waiting: deque[Batch] = deque()  # sent, not yet merged
        self.signals: list[Signal] = []

    def expect(self, batch: Batch) -> None:
        """Notes a batch sent to the workers; merges whatever has come back meanwhile, and
        waits for the workers when `IN_FLIGHT` batches are theirs (this process reads faster
        than they fold, and would otherwise hold the whole log in memory)."""
        self.waiting.append(batch)
        self._merge(block=False)
        while len(self.waiting) > IN_FLIGHT:
            self.reports.receive(block=True)
            self._merge(block=False)

    def all(self) -> list[Signal]:
        self._merge(block=True)
        return self.signals

    def _merge(self, block: bool) -> None:
        received = self.reports.signals
        while self.waiting:
            batch = self.waiting[0]
            if len(received.get(batch.number, ())) < self.workers:
                if not self.reports.receive(block):
                    return
                continue
            self.waiting.popleft()
            by_worker = received.pop(batch.number)
            tagged = merge(batch, [by_worker[k] for k in range(self.workers)], self.tenant_wide)
            self.signals.extend(t[4] for t in tagged)
            if self.progress is not None:
                self.progress(batch.size)


class _Reports:
    """What the workers sent: tagged signals per batch and worker, CPU time when done."""

    def __init__(self, outbox: Any, processes: list[Any]) -> None:
        self.outbox = outbox
        self.processes = processes
        self.signals: dict[int, dict[int, list[Tagged]]] = {}
        self.cpu: dict[int, float] = {}

    def receive(self, block: bool) -> bool:
        """Takes one report; False if none was there (without `block`)."""
        while True:
            try:
                report = self.outbox.get(timeout=1.0) if block else self.outbox.get_nowait()
                break
            except queue.Empty:
                if not block:
                    return False
                if any(p.exitcode not in (None, 0) for p in self.processes):
                    raise RuntimeError("a replay worker died") from None
        kind, worker, number, payload = report
        if kind == "unsplittable":
            raise NotSplittable(payload)
        if kind == "failed":
            raise RuntimeError(f"replay worker {worker} failed:\n{payload}")
        if kind == "done":
            self.cpu[worker] = payload
        else:
            self.signals.setdefault(number, {})[worker] = payload
        return True
