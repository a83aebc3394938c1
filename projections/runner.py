"""The projection runner: reads the interactions and signals logs from tracked positions, folds
them into views, and commits each batch together with the positions it consumed.

Each projection has two trackers (`interactions`, `signals`) per table version. A step reads the
next range of positions of each log, decodes only the types the projection folds (the rest is
skipped inside SQLite by topic) the way the fold reads them (`Fold.decode`: event models, or
the records' JSON objects for the context and cases folds), applies the folds and commits the
view changes and both positions in one transaction (`ProjectionStore.commit`). A restart
resumes at the tracked positions; the policy events before them are re-read so priorities use
the policy in force.

`rebuild(name)` folds the whole log into version n+1 of the tables while reads keep answering
from version n, and flips the current version in the transaction of its last batch. It runs
the same steps, with larger batches, and commits each one on a writer thread while the next
one folds (`_Writer`); live steps commit in place. A rebuild's batches write timeline rows
only: its documents stay cached (or `cold`, see `store.View`) and go out once, with the
tables' indexes, while the last batch folds (`_finish`). Its positions are recorded by that
last batch: a rebuild killed before it leaves tables that claim nothing, never resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from loopservice.domain.events import Event, PolicyPublished
from loopservice.domain.policy import Policy
from loopservice.domain.signals import Signal
from loopservice.infra.sqlite_log import SQLiteLog, decode_interaction, decode_signal
from loopservice.projections.cases import CasesFold
from loopservice.projections.context import INTERACTIONS, SIGNALS, ContextFold
from loopservice.projections.knowledge import KnowledgeFold
from loopservice.projections.maturity import MaturityFold
from loopservice.projections.store import (
    Changes,
    ProjectionStore,
    StaleVersion,
    View,
    building_view,
)
from loopservice.projections.trends import TrendsFold

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]


class Fold(Protocol):
    """A projection's fold. `decode(topic, body)` turns a stored interaction into what
    `apply_event` takes: the event model (`decode_interaction`) or, for folds that copy a few
    fields, its JSON object (`projections.records.event_json`)."""

    name: str
    interaction_topics: tuple[str, ...]

    @property
    def decode(self) -> Callable[[str, bytes], Any]: ...

    def remember_policy(self, event: PolicyPublished) -> None: ...

    def apply_event(self, view: View, position: int, event: Any) -> None: ...

    def apply_signal(self, view: View, position: int, signal: Signal) -> None: ...


FoldFactory = Callable[[], Fold]


@dataclass
class _Live:
    fold: Fold
    version: int
    view: View
    positions: dict[str, int]


@dataclass(frozen=True)
class RebuildResult:
    name: str
    version: int
    events: int
    seconds: float
    checksum: str
    cpu_seconds: float = 0.0  # of this process (every thread), over the same span as `seconds`

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Step:
    """What one batch consumed: positions scanned per log and records folded."""

    scanned: dict[str, int] = field(default_factory=dict)
    folded: int = 0


def _records(
    source: SQLiteLog[Any], start: int, stop: int, topics: Sequence[str], chunk: int = 5000
) -> Iterator[list[tuple[int, str, bytes]]]:
    """(position, topic, body) of the records in [start, stop] of the given types (all if
    none), a chunk at a time; the body is the record's state after its 32-byte time stamp.

    Plain tuples from the recorder's table: `select_notifications` builds an `sqlite3.Row`
    and a `Notification` per record, which cost more than reading it.
    """
    statement = (
        f"SELECT rowid, topic, substr(state, 33) FROM {source.recorder.events_table_name} "
        "WHERE rowid >= ? AND rowid <= ? "
        + (f"AND topic IN ({','.join('?' * len(topics))}) " if topics else "")
        + "ORDER BY rowid LIMIT ?"
    )
    position = start
    while position <= stop:
        with source.datastore.transaction(commit=False) as cursor:
            raw = cursor.sqlite_cursor
            raw.row_factory = None
            raw.execute(statement, (position, stop, *topics, chunk))
            rows = raw.fetchall()
        if not rows:
            return
        yield rows
        position = rows[-1][0] + 1


class _Writer:
    """Commits a rebuild's batches on a thread of its own, in order, while the next batch
    folds; at most one commit is outstanding, and a failed one raises at the next `submit`
    or `wait`.

    A batch's commit is a few statements (`ProjectionStore._write`), each run by SQLite or
    PostgreSQL without Python's lock, so the two threads use two cores. Row by row
    (`executemany`), the writer would wait for the lock after every row instead.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="projection-commit")
        self._pending: Future[None] | None = None

    def submit(self, commit: Callable[[], None]) -> None:
        self.wait()
        self._pending = self._pool.submit(commit)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Waits for the outstanding commit, if any, without raising its error."""
        self._pool.shutdown(wait=True)


class ProjectionRunner:
    def __init__(
        self,
        store: ProjectionStore,
        interactions: SQLiteLog[Event],
        signals: SQLiteLog[Signal],
        folds: dict[str, FoldFactory],
        *,
        batch: int = 5000,
        rebuild_batch: int = 50_000,
        max_cached: int = 200_000,
        max_cold: int | None = None,
    ) -> None:
        self.store = store
        self.interactions = interactions
        self.signals = signals
        self.factories = folds
        self.batch = batch
        self.rebuild_batch = rebuild_batch
        self.max_cached = max_cached
        # A rebuild's documents dropped from the cache, kept as their JSON text (a third of
        # the memory) so that reading one back costs no query: see `View`.
        self.max_cold = max_cached if max_cold is None else max_cold
        self._live: dict[str, _Live] = {}

    # --- following the logs --------------------------------------------------------------

    def _open(self, name: str) -> _Live:
        live = self._live.get(name)
        current = self.store.current_version(name)
        if live is not None and live.version == current:
            return live
        version = self.store.ensure(name)
        live = self._start(name, version)
        self._live[name] = live
        return live

    def _start(self, name: str, version: int) -> _Live:
        fold = self.factories[name]()
        positions = {
            INTERACTIONS: self.store.position(name, version, INTERACTIONS),
            SIGNALS: self.store.position(name, version, SIGNALS),
        }
        if positions[INTERACTIONS]:
            for n in self.interactions.recorder.select_notifications(
                1, 1_000_000, stop=positions[INTERACTIONS], topics=("policy.published",)
            ):
                event = decode_interaction(n.topic, n.state[32:])
                assert isinstance(event, PolicyPublished)
                fold.remember_policy(event)
        return _Live(fold, version, View(self.store.loader(name, version)), positions)

    def _step(
        self, name: str, live: _Live, heads: dict[str, int], *, mode: str = "live",
        batch: int | None = None, writer: _Writer | None = None,
    ) -> Step:  # fmt: skip
        """Folds the next range of each log (to the heads if `mode` is "switch") and commits it
        with the positions, here or on `writer`; a failed commit drops the cached documents."""
        step = Step()
        batch = batch or self.batch
        fold, view, positions = live.fold, live.view, live.positions
        for log, source, topics in (
            (INTERACTIONS, self.interactions, fold.interaction_topics),
            (SIGNALS, self.signals, ()),
        ):
            start = positions[log] + 1
            stop = heads[log] if mode == "switch" else min(start + batch - 1, heads[log])
            if stop < start:
                continue
            with view.loading():
                for rows in _records(source, start, stop, topics):
                    if log == INTERACTIONS:
                        apply, decode = fold.apply_event, fold.decode
                        for position, topic, body in rows:
                            apply(view, position, decode(topic, body))
                    else:
                        for position, topic, body in rows:
                            fold.apply_signal(view, position, decode_signal(topic, body))
                    step.folded += len(rows)
            step.scanned[log] = stop - start + 1
        changed = {log: positions[log] + n for log, n in step.scanned.items()}
        if changed or mode == "switch":
            changes, version = view.take(everything=mode != "build"), live.version
            # A version being built records its positions with its last batch only.
            tracked = changed
            if mode == "switch":
                tracked = {log: n for log, n in (positions | changed).items() if n}
            elif mode == "build":
                tracked = {}

            def commit() -> None:
                self.store.commit(fold.name, version, changes, tracked, mode=mode)

            try:
                if writer is None:
                    commit()
                else:
                    writer.submit(commit)
            except BaseException:
                view.forget()  # the cache may hold changes that were never committed
                self._live.pop(name, None)
                raise
            positions.update(changed)
            self._trim(live, writer)
        return step

    def _trim(self, live: _Live, writer: _Writer | None) -> None:
        """Keeps the cache within `max_cached` documents and a rebuild's cold ones within
        `max_cold`, dropping the ones cached longest first."""
        view = live.view
        if len(view.docs) > self.max_cached:
            if writer is not None and not view.write_back:
                writer.wait()  # the documents dropped are read back from the tables
            view.evict(self.max_cached)
        if len(view.cold) > self.max_cold:
            rows = view.drop_cold(self.max_cold)
            if writer is not None:
                writer.wait()  # in order, and before the view reads them back
            self.store.commit(live.fold.name, live.version, Changes(rows, []), {}, mode="build")

    def _finish(self, name: str, live: _Live, writer: _Writer) -> None:
        """Writes back every document a rebuild has changed so far and completes its tables
        (indexes), in a commit of its own while the last batch folds: the transaction that
        switches over then holds one batch, and keeps the log's writers waiting no longer."""
        changes, version = live.view.take(everything=True), live.version
        writer.submit(lambda: self.store.commit(name, version, changes, {}, mode="finish"))

    def heads(self) -> dict[str, int]:
        return {INTERACTIONS: self.interactions.head(), SIGNALS: self.signals.head()}

    def step(self, name: str, heads: dict[str, int] | None = None) -> Step:
        """One batch of `name` (at most `batch` positions of each log)."""
        try:
            return self._step(name, self._open(name), heads or self.heads())
        except StaleVersion:
            return self._step(name, self._open(name), heads or self.heads())

    def catch_up(self, progress: Progress | None = None) -> int:
        """Folds every projection up to the current log heads; returns records folded."""
        heads = self.heads()
        folded = 0
        for name in self.factories:
            while True:
                step = self.step(name, heads)
                folded += step.folded
                if progress is not None:
                    progress(sum(step.scanned.values()))
                if not step.scanned:
                    break
        return folded

    async def follow(self, stop: asyncio.Event, poll: float = 0.2) -> None:
        """Keeps every projection caught up until `stop` is set (the folds run in a thread)."""
        while not stop.is_set():
            try:
                if await asyncio.to_thread(self.catch_up):
                    continue
            except Exception:  # a locked or failing database: log it, retry after `poll`
                logger.exception("projections: catching up failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)

    def positions(self, name: str) -> dict[str, int]:
        version = self.store.current_version(name)
        if version is None:
            return {INTERACTIONS: 0, SIGNALS: 0}
        return {log: self.store.position(name, version, log) for log in (INTERACTIONS, SIGNALS)}

    # --- rebuilding ----------------------------------------------------------------------

    def rebuild(self, name: str, progress: Progress | None = None) -> RebuildResult:
        """Builds a new version from position 1 beside the current one, then switches over.

        Reads answer from the current version throughout. The last batch, which reaches the
        heads read at its start, flips `proj_versions` in its own transaction; the old
        version's tables and positions are then dropped.
        """
        old = self.store.current_version(name)
        version = max([*self.store.versions(name), old or 0]) + 1
        self.store.prepare(name, version)
        # The new tables start empty and this view is their only writer: it writes each
        # document once, before the last batch, and looks up only those it has written out
        # early to keep its memory bounded (see `View`, `_trim`).
        view = building_view(self.store.loader(name, version))
        live = _Live(self.factories[name](), version, view, {INTERACTIONS: 0, SIGNALS: 0})
        started, cpu_started = time.perf_counter(), time.process_time()
        scanned = 0
        # The cached documents are long-lived, and the collector's passes would walk them
        # over and over (a quarter of a rebuild's time at 200k events). The fold makes no
        # reference cycles: reference counting frees what it discards, so the cyclic
        # collector pauses for the rebuild (every thread's, hence only for its length).
        collecting = gc.isenabled()
        gc.disable()
        writer = _Writer()
        try:
            while True:
                heads = self.heads()
                remaining = sum(heads[log] - live.positions[log] for log in heads)
                last = remaining <= self.rebuild_batch
                mode = "switch" if last else "build"
                if last:
                    self._finish(name, live, writer)
                step = self._step(
                    name, live, heads, mode=mode, batch=self.rebuild_batch, writer=writer
                )
                scanned += sum(step.scanned.values())
                if progress is not None:
                    progress(sum(step.scanned.values()))
                if last and all(live.positions[log] >= heads[log] for log in heads):
                    break
            writer.wait()
        finally:
            writer.close()
            if collecting:
                gc.enable()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        self._live.pop(name, None)
        if old is not None and old != version:
            self.store.drop(name, old)
        checksum = self.store.checksum(name, version)
        return RebuildResult(name, version, scanned, seconds, checksum, cpu)


def default_folds(policy: Policy) -> dict[str, FoldFactory]:
    """The shipped projections, each built fresh from the default policy."""
    return {
        "context": lambda: ContextFold(policy),
        "cases": lambda: CasesFold(policy),
        "knowledge": lambda: KnowledgeFold(policy),
        "trends": lambda: TrendsFold(policy),
        "maturity": lambda: MaturityFold(policy),
    }
