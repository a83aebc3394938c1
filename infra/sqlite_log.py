"""The embedded log: the `eventsourcing` library's SQLite application recorder, one file.

Each log is one recorder table (`stored_interactions`, `stored_signals`). A record is stored as
an eventsourcing `StoredEvent` whose `originator_id` is the record's identity (event id or
signal id) at `originator_version` 0: the recorder's primary key therefore makes a repeated
identity impossible to store twice, and the table's rowid is the gapless log position.
The state column holds the append time as a fixed-width 32-byte UTC ISO timestamp followed by
the record's JSON; the topic column holds its type (`values` filters on it; `read` of
interactions takes the type from the JSON and leaves the column unread, which is faster).
Interactions are encoded and decoded by `infra.event_codec` (orjson, the same bytes as
pydantic's JSON, without validating again what was validated on the way in).
"""

from __future__ import annotations

import gc
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from itertools import repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any, Generic

from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteDatastore,
)
from pydantic import BaseModel

from loopservice.domain.events import Event
from loopservice.domain.signals import Signal, signal_models
from loopservice.infra.event_codec import (
    decode_event,
    decode_event_json,
    decode_events_json,
    encode_event,
    encode_events,
)
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
        encode: Callable[[T], bytes] | None = None,
        decode_body: Callable[[bytes], T] | None = None,
        decode_bodies: Callable[[list[bytes]], list[T]] | None = None,
        encode_all: Callable[[Sequence[T]], list[bytes]] | None = None,
    ) -> None:
        """`decode` takes a record's topic and JSON; `decode_body`, when given, the JSON alone
        (the type read from it), which lets `read` leave the topic column alone;
        `decode_bodies` several of them at once (`read` uses it when given); `encode_all`
        encodes a batch as `encode` does each (`append` uses it when given)."""
        self.datastore = datastore
        self.recorder = SQLiteApplicationRecorder(datastore, events_table_name=table)
        self.recorder.create_table()
        self._table = table
        columns = "rowid, topic, state" if decode_body is None else "rowid, state"
        self._select = f"SELECT {columns} FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT ?"
        self._select_bodies = (
            f"SELECT rowid, state FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT ?"
        )
        # The recorder's own insert statement, but a repeated identity (the primary key) is
        # skipped instead of failing the batch: see `append`.
        self._insert = self.recorder.insert_events_statement.replace(
            "INSERT INTO", "INSERT OR IGNORE INTO", 1
        )
        self._identity: Callable[[T], str] = identity
        self._topic: Callable[[T], str] = topic
        self._encode: Callable[[T], bytes] = encode or _pydantic_json
        encode_each = self._encode
        self._encode_all: Callable[[Sequence[T]], list[bytes]] = encode_all or (
            lambda values: list(map(encode_each, values))
        )
        self._decode: Callable[[str, bytes], T] = decode
        self._decode_body: Callable[[bytes], T] | None = decode_body
        self._decode_bodies: Callable[[list[bytes]], list[T]] | None = decode_bodies or (
            None if decode_body is None else lambda bodies: [decode_body(b) for b in bodies]
        )
        self.clock: Clock = clock or WallClock()

    def append(self, values: Sequence[T]) -> list[Appended]:
        """Appends in one transaction; a record whose identity is already stored (or repeated in
        the batch) is not stored again and is reported as a duplicate at its first position.

        Duplicates are rare, so rather than look every identity up first, the batch is inserted
        with OR IGNORE: when SQLite reports every row stored, the batch holds the positions just
        below the new maximum (inside the write transaction nobody else inserts, and SQLite
        gives each new row the largest rowid plus one); only otherwise are the identities looked
        up.
        """
        if not values:
            return []
        stamp = self.clock.now().astimezone(UTC).strftime(_STAMP).encode()
        ids = list(map(self._identity, values))
        # Everything per record is done by C-level iterators (a batch holds thousands): the
        # rows are zipped as executemany takes them, each state the stamp and the JSON.
        states = map(stamp.__add__, self._encode_all(values))
        rows = zip(ids, repeat(0), map(self._topic, values), states)
        with self.datastore.transaction(commit=True) as cursor:
            cursor.executemany(self._insert, rows)
            stored = cursor.sqlite_cursor.rowcount
            cursor.execute(f"SELECT MAX(rowid) FROM {self._table}")
            last = int(cursor.fetchone()[0] or 0)
            if stored == len(ids):
                return _fresh(ids, range(last - stored + 1, last + 1))
            positions = self._existing_positions(cursor, ids)
        first_new = last - stored + 1
        outcomes: list[Appended] = []
        seen: set[str] = set()
        for record_id in ids:
            position = positions[record_id]
            fresh = position >= first_new and record_id not in seen
            outcomes.append(Appended(record_id, position, duplicate=not fresh))
            seen.add(record_id)
        return outcomes

    def read(self, start: int, limit: int) -> list[LogRecord[T]]:
        # The recorder's select_notifications builds an sqlite3.Row and a Notification per
        # record, which costs more than the read itself: select plain tuples from its table.
        with self.datastore.transaction(commit=False) as cursor:
            raw = cursor.sqlite_cursor
            raw.row_factory = None
            raw.execute(self._select, (start, limit))
            if self._decode_bodies is not None:
                return self._records(raw, self._decode_bodies)
            rows = raw.fetchall()
        # A record per row, so the loop is kept lean: tuple.__new__ is what the named tuple's
        # own (Python) __new__ calls, and a batch shares one append time, parsed once.
        new, record = tuple.__new__, LogRecord
        out: list[LogRecord[T]] = []
        append = out.append
        stamp, recorded_at = _NO_STAMP, _EPOCH
        decode = self._decode
        for position, topic, state in rows:
            if not state.startswith(stamp):
                stamp, recorded_at = _stamp(state)
            append(new(record, (position, recorded_at, decode(topic, state[32:]))))
        return out

    @staticmethod
    def _records(
        cursor: sqlite3.Cursor, decode_bodies: Callable[[list[bytes]], list[T]]
    ) -> list[LogRecord[T]]:
        """The records of the selected rows, fetched and decoded some tens at a time: the
        bodies of a part together, and the memory of one part reused for the next while
        still in the CPU cache. (Inside the read transaction, which keeps no writer waiting:
        the log's file is in WAL mode.)

        The collector is held off while they are built (process-wide, for the milliseconds of
        one read): they form no cycles, so a collection meanwhile only rescans them (a tenth of
        the read's instructions). A part whose records share one append time (nearly all: an
        append stamps its whole batch) is put together by C-level iterators, with no Python
        step per record."""
        new, record = tuple.__new__, LogRecord  # as in `read`
        out: list[LogRecord[T]] = []
        stamp, recorded_at = _NO_STAMP, _EPOCH
        collecting = gc.isenabled()
        gc.disable()
        try:
            while rows := cursor.fetchmany(_DECODE_ROWS):
                positions, states = zip(*rows, strict=True)
                values = decode_bodies(list(map(_BODY, states)))
                if not states[0].startswith(stamp):  # parsed once per append, not per part
                    stamp, recorded_at = _stamp(states[0])
                if all(map(bytes.startswith, states, repeat(stamp))):
                    at = repeat(recorded_at)
                    out += map(new, repeat(record), zip(positions, at, values, strict=False))
                    continue
                for position, state, value in zip(positions, states, values, strict=True):
                    if not state.startswith(stamp):
                        stamp, recorded_at = _stamp(state)
                    out.append(new(record, (position, recorded_at, value)))
        finally:
            if collecting:
                gc.enable()
        return out

    def read_bodies(self, start: int, limit: int) -> list[tuple[int, bytes]]:
        """Records with position >= start, at most `limit`, undecoded: position and JSON (a
        split replay parses envelopes in one process and decodes in others)."""
        with self.datastore.transaction(commit=False) as cursor:
            raw = cursor.sqlite_cursor
            raw.row_factory = None
            raw.execute(self._select_bodies, (start, limit))
            rows: list[tuple[int, bytes]] = raw.fetchall()
        return [(position, state[32:]) for position, state in rows]

    def decode_body(self, body: bytes) -> T:
        """A record's value from its JSON (`read_bodies`), as `read` decodes it."""
        if self._decode_body is None:
            raise TypeError(f"{self._table} records are decoded with their topic")
        return self._decode_body(body)

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


_consume = deque[object](maxlen=0).extend  # runs an iterator to its end, keeping nothing
_SET_ID, _SET_POSITION, _SET_DUPLICATE = (
    Appended.__dict__[name].__set__ for name in ("record_id", "position", "duplicate")
)


def _fresh(ids: list[str], positions: range) -> list[Appended]:
    """`[Appended(i, p, duplicate=False) for i, p in zip(ids, positions)]`, set up field by
    field by C-level iterators: the frozen dataclass's `__init__` (a Python function setting
    each field through `object.__setattr__`) cost nearly as much as encoding the record."""
    out: list[Appended] = list(map(object.__new__, repeat(Appended, len(ids))))
    _consume(map(_SET_ID, out, ids))
    _consume(map(_SET_POSITION, out, positions))
    _consume(map(_SET_DUPLICATE, out, repeat(False)))
    return out


_BODY = itemgetter(slice(32, None))  # a state without its append stamp
_DECODE_ROWS = 50  # fewer: more calls; more: the part falls out of the cache
_STAMP = "%Y-%m-%dT%H:%M:%S.%f+00:00"  # always 32 bytes
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_STAMP = b"no stamp"  # the prefix of no state: a stamp starts with the year


def _stamp(state: bytes) -> tuple[bytes, datetime]:
    stamp = state[:32]
    return stamp, datetime.fromisoformat(stamp.decode())


def _pydantic_json(value: BaseModel) -> bytes:
    return value.model_dump_json().encode()


_SIGNAL_MODELS: dict[str, type[BaseModel]] = {
    cls.model_fields["type"].default: cls for cls in signal_models()
}


def decode_interaction(topic: str, body: bytes) -> Event:
    """The event of a stored record; one written under an older schema is upcast first."""
    return decode_event(topic, body)


def decode_signal(topic: str, body: bytes) -> Signal:
    return _SIGNAL_MODELS[topic].model_validate_json(body)  # type: ignore[return-value]


def interaction_log(datastore: SQLiteDatastore, clock: Clock | None = None) -> SQLiteLog[Event]:
    return SQLiteLog(
        datastore,
        "stored_interactions",
        identity=attrgetter("event_id"),
        topic=attrgetter("type"),
        decode=decode_interaction,
        clock=clock,
        encode=encode_event,
        decode_body=decode_event_json,
        decode_bodies=decode_events_json,
        encode_all=encode_events,
    )


def signal_log(datastore: SQLiteDatastore, clock: Clock | None = None) -> SQLiteLog[Signal]:
    return SQLiteLog(
        datastore,
        "stored_signals",
        identity=attrgetter("signal_id"),
        topic=attrgetter("type"),
        decode=decode_signal,
        clock=clock,
    )
