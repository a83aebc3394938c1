"""Dead letters: records that could not be processed, kept with the reason, never dropped.

One SQLite table (`dead_letters`) in the embedded log's database file, written through the
datastore's own connection pool. `stage` says where the record failed: `"ingest"` for input
that failed validation on a bulk import, or the name of the processor that could not handle
an event already on the log (then `position` is its log position). `raw` is the record as
received (JSON text, or the undecodable line itself); it may hold message bodies, so it is
stored for repair and replay but never printed by the CLI.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import orjson
from eventsourcing.sqlite import SQLiteDatastore

from loopservice.streams.clock import Clock, WallClock
from loopservice.streams.ingest import Rejection

TABLE = "dead_letters"

_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    "id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "stage TEXT NOT NULL, "
    "event_id TEXT, "
    "reason TEXT NOT NULL, "
    "raw TEXT NOT NULL, "
    "recorded_at TEXT NOT NULL, "
    "position INTEGER)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_stage ON {TABLE} (stage, id)",
)
_INSERT = (
    f"INSERT INTO {TABLE} (stage, event_id, reason, raw, recorded_at, position) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    stage: str
    event_id: str | None
    reason: str
    raw: str
    recorded_at: datetime
    position: int | None

    def __repr__(self) -> str:  # raw may hold message bodies
        return (
            f"DeadLetter(id={self.id}, stage={self.stage!r}, event_id={self.event_id!r}, "
            f"reason={self.reason!r}, position={self.position})"
        )


def raw_text(raw: object) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return orjson.dumps(raw, default=str).decode()


class DeadLetterStore:
    def __init__(self, datastore: SQLiteDatastore, clock: Clock | None = None) -> None:
        self.datastore = datastore
        self.clock: Clock = clock or WallClock()
        with self.datastore.transaction(commit=True) as cursor:
            for statement in _SCHEMA:
                cursor.execute(statement)

    def add(
        self,
        stage: str,
        reason: str,
        raw: object,
        *,
        event_id: str | None = None,
        position: int | None = None,
    ) -> int:
        now = self.clock.now().isoformat()
        with self.datastore.transaction(commit=True) as cursor:
            cursor.execute(_INSERT, (stage, event_id, reason, raw_text(raw), now, position))
            return int(cursor.lastrowid)

    def add_rejections(self, stage: str, rejections: Sequence[Rejection]) -> int:
        if not rejections:
            return 0
        now = self.clock.now().isoformat()
        rows = [(stage, r.event_id, r.reason, raw_text(r.raw), now, None) for r in rejections]
        with self.datastore.transaction(commit=True) as cursor:
            cursor.executemany(_INSERT, rows)
        return len(rows)

    def list(self, limit: int = 100, stage: str | None = None) -> builtins.list[DeadLetter]:
        """The newest dead letters first, optionally of one stage."""
        sql = f"SELECT id, stage, event_id, reason, raw, recorded_at, position FROM {TABLE}"
        params: tuple[object, ...] = ()
        if stage is not None:
            sql += " WHERE stage = ?"
            params = (stage,)
        sql += " ORDER BY id DESC LIMIT ?"
        with self.datastore.transaction(commit=False) as cursor:
            cursor.execute(sql, (*params, limit))
            rows = cursor.fetchall()
        return [
            DeadLetter(
                id=row[0],
                stage=row[1],
                event_id=row[2],
                reason=row[3],
                raw=row[4],
                recorded_at=datetime.fromisoformat(row[5]),
                position=row[6],
            )
            for row in rows
        ]

    def count(self, stage: str | None = None) -> int:
        with self.datastore.transaction(commit=False) as cursor:
            if stage is None:
                cursor.execute(f"SELECT COUNT(*) FROM {TABLE}")
            else:
                cursor.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE stage = ?", (stage,))
            return int(cursor.fetchone()[0])
