"""The embedded log: the `eventsourcing` library's SQLite application recorder, one file.

Each log is one recorder table (`stored_interactions`, `stored_signals`). A record is stored as
an eventsourcing `StoredEvent` whose `originator_id` is the record's identity (event id or
signal id) at `originator_version` 0: the recorder's primary key therefore makes a repeated
identity impossible to store twice, and the table's rowid is the gapless log position.
The state column holds the append time as a fixed-width 32-byte UTC ISO timestamp followed by
the record's JSON; the topic column holds its type, so decoding picks the model directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic

import orjson
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
)
from pydantic import BaseModel, ValidationError

from loopservice.domain.events import EVENT_ADAPTER, EVENT_MODELS, Event
from loopservice.domain.signals import Signal, signal_models
from loopservice.domain.upcasting import upcast
from loopservice.streams.clock import Clock, WallClock
from loopservice.streams.log import Appended, LogRecord, T


class _DurablePool(SQLiteConnectionPool):
    """synchronous=FULL: an acknowledged append survives power loss, not only a killed process."""

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        if not self.is_sqlite_memory_mode:
            conn._sqlite_conn.execute("PRAGMA synchronous=FULL")
        return conn


def open_datastore(path: str | Path) -> SQLiteDatastore:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    datastore = SQLiteDatastore(str(path), originator_id_type="text", lock_timeout=30)
    datastore.pool = _DurablePool(db_name=str(path), lock_timeout=30)
    return datastore


class SQLiteLog(Generic[T]):
    def __init__(
        self,
        datastore: SQLiteDatastore,
        table: str,
        identity: Callable[[T], str],
        topic: Callable[[T], str],
        decode: Callable[[str, bytes], T],
        clock: Clock | None = None,
    ) -> None:
        self.datastore = datastore
        self.recorder = SQLiteApplicationRecorder(datastore, events_table_name=table)
        self.recorder.create_table()
        self._table = table
        self._select = (
            f"SELECT rowid, topic, state FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT ?"
        )
        self._identity: Callable[[T], str] = identity
        self._topic: Callable[[T], str] = topic
        self._decode: Callable[[str, bytes], T] = decode
        self.clock: Clock = clock or WallClock()

    def append(self, values: Sequence[T]) -> list[Appended]:
        if not values:
            return []
        stamp = self.clock.now().astimezone(UTC).strftime(_STAMP).encode()
        ids = [self._identity(v) for v in values]
        with self.datastore.transaction(commit=True) as cursor:
            existing = self._existing_positions(cursor, ids)
            rows: list[tuple[str, int, str, bytes]] = []
            fresh_ids: list[str] = []
            new_ids: set[str] = set()
            for record_id, value in zip(ids, values, strict=True):
                if record_id in existing or record_id in new_ids:
                    continue
                new_ids.add(record_id)
                fresh_ids.append(record_id)
                body = value.model_dump_json().encode()
                rows.append((record_id, 0, self._topic(value), stamp + body))
            positions = self._insert(cursor, rows)
        new_positions = dict(zip(fresh_ids, positions, strict=True))
        outcomes: list[Appended] = []
        seen: set[str] = set()
        for record_id in ids:
            if record_id in new_positions and record_id not in seen:
                outcomes.append(Appended(record_id, new_positions[record_id], duplicate=False))
            else:
                position = existing.get(record_id) or new_positions[record_id]
                outcomes.append(Appended(record_id, position, duplicate=True))
            seen.add(record_id)
        return outcomes

    def _insert(self, cursor: Any, rows: list[tuple[str, int, str, bytes]]) -> list[int]:
        """Inserts rows as the recorder's `StoredEvent` tuples in one statement.

        Inside the write transaction nobody else inserts, and SQLite gives each new row the
        largest rowid plus one, so the batch occupies the positions just below the new maximum.
        """
        if not rows:
            return []
        cursor.executemany(self.recorder.insert_events_statement, rows)
        cursor.execute(f"SELECT MAX(rowid) FROM {self._table}")
        last = int(cursor.fetchone()[0])
        return list(range(last - len(rows) + 1, last + 1))

    def read(self, start: int, limit: int) -> list[LogRecord[T]]:
        # The recorder's select_notifications builds an sqlite3.Row and a Notification per
        # record, which costs more than the read itself: select plain tuples from its table.
        with self.datastore.transaction(commit=False) as cursor:
            raw = cursor.sqlite_cursor
            raw.row_factory = None
            raw.execute(self._select, (start, limit))
            rows = raw.fetchall()
        decode = self._decode
        parse_time = datetime.fromisoformat
        return [
            LogRecord(position, parse_time(state[:32].decode()), decode(topic, state[32:]))
            for position, topic, state in rows
        ]

    def values(self, start: int = 1, topics: Sequence[str] = ()) -> Iterator[T]:
        """Every record's value from `start` on, of the given types only (all if none)."""
        position = start
        while notifications := self.recorder.select_notifications(position, 5000, topics=topics):
            for n in notifications:
                yield self._decode(n.topic, n.state[32:])
            position = notifications[-1].id + 1

    def head(self) -> int:
        return self.recorder.max_notification_id() or 0

    def position_of(self, record_id: str) -> int | None:
        with self.datastore.transaction(commit=False) as cursor:
            return self._existing_positions(cursor, [record_id]).get(record_id)

    def _existing_positions(self, cursor: Any, ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            cursor.execute(
                f"SELECT rowid, originator_id FROM {self._table} "
                f"WHERE originator_id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for row in cursor.fetchall():
                found[row[1]] = row[0]
        return found


_STAMP = "%Y-%m-%dT%H:%M:%S.%f+00:00"  # always 32 bytes

_SIGNAL_MODELS: dict[str, type[BaseModel]] = {
    cls.model_fields["type"].default: cls for cls in signal_models()
}


def decode_interaction(topic: str, body: bytes) -> Event:
    model = EVENT_MODELS[topic]
    try:
        return model.model_validate_json(body)  # type: ignore[return-value]
    except ValidationError:
        # Written under an older schema: upcast the raw mapping, then validate.
        return EVENT_ADAPTER.validate_python(upcast(orjson.loads(body)))


def decode_signal(topic: str, body: bytes) -> Signal:
    return _SIGNAL_MODELS[topic].model_validate_json(body)  # type: ignore[return-value]


def interaction_log(datastore: SQLiteDatastore, clock: Clock | None = None) -> SQLiteLog[Event]:
    return SQLiteLog(
        datastore,
        "stored_interactions",
        identity=lambda e: e.event_id,
        topic=lambda e: e.type,
        decode=decode_interaction,
        clock=clock,
    )


def signal_log(datastore: SQLiteDatastore, clock: Clock | None = None) -> SQLiteLog[Signal]:
    return SQLiteLog(
        datastore,
        "stored_signals",
        identity=lambda s: s.signal_id,
        topic=lambda s: s.type,
        decode=decode_signal,
        clock=clock,
    )
