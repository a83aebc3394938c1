"""The projection store on PostgreSQL (psycopg 3): the same tables and guarantees as on SQLite.

Positions are tracked with eventsourcing's `PostgresTrackingRecorder` (single-row tracking in
`proj_tracking`); a batch's document upserts, timeline rows and `_insert_tracking` calls run in
one transaction of one connection, so a killed writer leaves nothing half-applied: PostgreSQL
rolls the open transaction back when its connection drops. Large batches (a rebuild) go in with
binary COPY: timeline rows straight into their table, documents into a per-connection staging
table and from there into theirs with one `INSERT … ON CONFLICT DO UPDATE`. A rebuild's
timeline table gets its primary key in the transaction that switches reads over to it.

Reads run in REPEATABLE READ, READ ONLY transactions (said in their BEGIN): one snapshot per
query, as on SQLite.
A live commit reads its version row `FOR SHARE`, so a rebuild's switch and a live batch of
the old version serialise instead of racing. Text columns use the "C" collation, whatever the
cluster's locale, so orderings (and checksums) match SQLite's byte order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import Cursor as PgCursor
from psycopg import IsolationLevel
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow, tuple_row

from loopservice.projections.store import Changes, Cursor, ProjectionStore

_TEXT = 'TEXT COLLATE "C"'
_TIMELINE_KEY = "PRIMARY KEY (tenant_id, key, at, log, position)"


@lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """`?` placeholders (the SQL the store and its queries share) in psycopg's `%s` form."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgSql:
    """A psycopg cursor that takes the store's `?` SQL (see `projections.store.Cursor`)."""

    def __init__(self, raw: PgCursor[TupleRow]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        if not params:
            return self.raw.execute(sql)
        return self.raw.execute(_pg(sql), params)

    def fetchone(self) -> Any:
        return self.raw.fetchone()

    def fetchall(self) -> list[Any]:
        return self.raw.fetchall()

    def fetchmany(self, size: int = 1000, /) -> list[Any]:
        return self.raw.fetchmany(size)


def postgres_datastore(
    url: str, *, pool_size: int = 2, max_overflow: int = 10
) -> PostgresDatastore:
    """A datastore for a `postgresql://user:password@host:port/dbname` URL."""
    params = conninfo_to_dict(url)
    return PostgresDatastore(
        dbname=str(params.get("dbname", "postgres")),
        host=str(params.get("host", "127.0.0.1")),
        port=str(params.get("port", "5432")),
        user=str(params.get("user", "postgres")),
        password=str(params.get("password", "")),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pre_ping=True,
    )


class PostgresProjectionStore(ProjectionStore):
    tracking_table = "proj_tracking"
    lock_current = " FOR SHARE"
    text = "convert_from(%s, 'UTF8')"
    bulk_rows = 200  # rows of a table in a batch that go in with COPY

    def __init__(self, datastore: PostgresDatastore) -> None:
        self.datastore = datastore
        self.tracking = PostgresTrackingRecorder(datastore, tracking_table_name=self.tracking_table)
        self.tracking.create_table()
        self._setup()

    @classmethod
    def from_url(cls, url: str) -> PostgresProjectionStore:
        return cls(postgres_datastore(url))

    def close(self) -> None:
        self.datastore.close()

    @contextmanager
    def _transaction(self, *, commit: bool) -> Iterator[Cursor]:
        with self.datastore.get_connection() as conn:
            # A read's snapshot mode goes in its BEGIN (one round trip fewer than SET
            # TRANSACTION after it); the pooled connection is put back as it was, since
            # eventsourcing's recorders use the same pool.
            if not commit:
                conn.isolation_level = IsolationLevel.REPEATABLE_READ
                conn.read_only = True
            try:
                with (
                    conn.transaction(force_rollback=not commit),
                    conn.cursor(row_factory=tuple_row) as raw,
                ):
                    yield _PgSql(raw)
            finally:
                if not commit and not conn.closed:
                    conn.isolation_level = None
                    conn.read_only = None

    def _track(self, c: Cursor, tracking: Tracking) -> None:
        assert isinstance(c, _PgSql)
        self.tracking._insert_tracking(c.raw, tracking)  # type: ignore[arg-type]

    def _create(self, c: Cursor, name: str, version: int, *, building: bool = False) -> None:
        docs, timeline = self.tables(name, version)
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {docs} (kind {_TEXT}, tenant_id {_TEXT}, key {_TEXT}, "
            f"account_id {_TEXT}, sort {_TEXT}, doc BYTEA, PRIMARY KEY (kind, tenant_id, key))"
        )
        if not building:
            self._index_docs(c, docs)
        # A rebuild's timeline gets its key when it switches over (`_finish`): built once from
        # the whole table, not kept up row by row, it costs a third less.
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {timeline} (tenant_id {_TEXT}, key {_TEXT}, "
            f"at {_TEXT}, log {_TEXT}, position BIGINT, entry BYTEA"
            + ("" if building else f", {_TIMELINE_KEY}")
            + ")"
        )

    def _finish(self, c: Cursor, name: str, version: int) -> None:
        super()._finish(c, name, version)
        _, timeline = self.tables(name, version)
        c.execute(
            "SELECT 1 FROM pg_constraint WHERE conrelid = ?::regclass AND contype = 'p'",
            (timeline,),
        )
        if c.fetchone() is None:
            c.execute(f"ALTER TABLE {timeline} ADD {_TIMELINE_KEY}")

    def _write(self, c: Cursor, docs: str, timeline: str, changes: Changes) -> None:
        assert isinstance(c, _PgSql)
        raw = c.raw
        dirty = [(*row[:5], row[5].encode()) for row in changes.docs]
        rows = [(*row[:5], row[5].encode()) for row in changes.rows]
        upsert = (
            f"INSERT INTO {docs} AS d {{}} ON CONFLICT (kind, tenant_id, key) DO UPDATE SET "
            "account_id=excluded.account_id, sort=excluded.sort, doc=excluded.doc"
        )
        if len(dirty) >= self.bulk_rows:
            raw.execute(
                "CREATE TEMP TABLE IF NOT EXISTS proj_stage (kind TEXT, tenant_id TEXT, "
                "key TEXT, account_id TEXT, sort TEXT, doc BYTEA) ON COMMIT DELETE ROWS"
            )
            with raw.copy("COPY proj_stage FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text"] * 5 + ["bytea"])
                for row in dirty:
                    copy.write_row(row)
            raw.execute(upsert.format("SELECT * FROM proj_stage"))
        elif dirty:
            raw.executemany(upsert.format("VALUES (%s, %s, %s, %s, %s, %s)"), dirty)
        if len(rows) >= self.bulk_rows:
            with raw.copy(f"COPY {timeline} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text"] * 4 + ["int8", "bytea"])
                for trow in rows:
                    copy.write_row(trow)
        elif rows:
            raw.executemany(f"INSERT INTO {timeline} VALUES (%s, %s, %s, %s, %s, %s)", rows)

    def versions(self, name: str) -> list[int]:
        with self._transaction(commit=False) as c:
            c.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename LIKE ?",
                (f"proj_{name}_docs_v%",),
            )
            names = [r[0] for r in c.fetchall()]
        return sorted(int(n.rsplit("_v", 1)[1]) for n in names)

    def position(self, name: str, version: int, log: str) -> int:
        return self.tracking.max_tracking_id(self.tracker(name, version, log)) or 0
