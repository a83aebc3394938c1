"""The projection store on PostgreSQL (psycopg 3): the same tables and guarantees as on SQLite.

Positions are tracked with eventsourcing's `PostgresTrackingRecorder` (single-row tracking in
`proj_tracking`); a batch's document upserts, timeline rows and `_insert_tracking` calls run in
one transaction of one connection, so a killed writer leaves nothing half-applied: PostgreSQL
rolls the open transaction back when its connection drops. Large batches (a rebuild) go in with
binary COPY: timeline rows straight into their table, documents into a per-connection staging
table and from there into theirs with one `INSERT … ON CONFLICT DO UPDATE`. A rebuild's
timeline table gets its primary key before its last batch.

Reads run in REPEATABLE READ, READ ONLY transactions (said in their BEGIN): one snapshot per
query, as on SQLite. A read of one statement (`query`, the context endpoint's) needs no
transaction block for that: it runs on an autocommit connection of its own, one round trip.
A rebuild's commits before its switch do not wait for the WAL flush (`synchronous_commit`
off); the switch's does, and that flushes them too.
A live commit reads its version row `FOR SHARE`, so a rebuild's switch and a live batch of
the old version serialise instead of racing. Text columns use the "C" collation, whatever the
cluster's locale, so orderings (and checksums) match SQLite's byte order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from threading import Lock
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from psycopg import Connection, IsolationLevel, OperationalError
from psycopg import Cursor as PgCursor
from psycopg.conninfo import conninfo_to_dict
from psycopg.errors import UndefinedTable
from psycopg.rows import TupleRow, tuple_row

from loopservice.projections.store import Changes, Cursor, ProjectionStore, StaleVersion

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


class _ReadConnections:
    """Autocommit connections for single-statement reads, kept idle between uses (at most
    `keep`), opened when none is idle. No threads, no checks: see `query`."""

    def __init__(self, conninfo: Any, kwargs: Any, keep: int = 4) -> None:
        self._idle: list[Connection[TupleRow]] = []
        self._lock = Lock()
        self.conninfo = conninfo() if callable(conninfo) else conninfo or ""
        given = kwargs() if callable(kwargs) else kwargs
        self.kwargs = {**(given or {}), "autocommit": True, "row_factory": tuple_row}
        self.keep = keep

    @contextmanager
    def connection(self) -> Iterator[Connection[TupleRow]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = Connection.connect(self.conninfo, **self.kwargs)
        try:
            yield conn
        finally:
            with self._lock:
                if conn.closed or conn.broken or len(self._idle) >= self.keep:
                    conn.close()
                else:
                    self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    __del__ = close


class PostgresProjectionStore(ProjectionStore):
    tracking_table = "proj_tracking"
    lock_current = " FOR SHARE"
    text = "convert_from(%s, 'UTF8')"
    bulk_rows = 200  # rows of a table in a batch that go in with COPY

    def __init__(self, datastore: PostgresDatastore) -> None:
        self.datastore = datastore
        self._reads = _ReadConnections(datastore.pool.conninfo, datastore.pool.kwargs)
        self.tracking = PostgresTrackingRecorder(datastore, tracking_table_name=self.tracking_table)
        self.tracking.create_table()
        self._setup()

    @classmethod
    def from_url(cls, url: str) -> PostgresProjectionStore:
        return cls(postgres_datastore(url))

    def close(self) -> None:
        self._reads.close()
        self.datastore.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # On connections of its own: the datastore's pool pings every connection it hands
        # out (one more round trip) and each use is a transaction (two more). A connection
        # that died meanwhile fails its statement and is dropped; the next one is new.
        for attempt in (1, 2):
            try:
                with self._reads.connection() as conn:
                    return conn.execute(_pg(sql), params).fetchall()
            except UndefinedTable as e:
                raise StaleVersion(str(e)) from e
            except OperationalError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @contextmanager
    def _transaction(self, *, commit: bool, durable: bool = True) -> Iterator[Cursor]:
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
                    if not durable:  # the next durable commit flushes it too
                        raw.execute("SET LOCAL synchronous_commit TO OFF")
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
        # A rebuild's timeline gets its key before its last batch (`_finish`): built once from
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
