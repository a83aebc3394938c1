"""The projection store: versioned view tables, tracked positions, one commit per batch.

Each projection `name` owns, per version `n`, two tables:

- `proj_{name}_docs_v{n}`: one JSON document per (kind, tenant, key), with the account it
  belongs to and a sort key for listings;
- `proj_{name}_timeline_v{n}`: append-only timeline entries per (tenant, key), ordered by
  event time, then log, then position.

Positions are tracked with eventsourcing's `SQLiteTrackingRecorder` (its single-row `tracking`
table, one row per `{name}.v{n}.{log}`): a batch's document upserts, timeline inserts and its
`_insert_tracking(cursor, Tracking(...))` calls run in ONE transaction of the same datastore, so
the view and the positions it has consumed never disagree, even after a SIGKILL. The recorder's
upsert only moves a position forward (`WHERE notification_id < new`), so re-applying a batch
already committed fails the whole transaction instead of counting twice.

`proj_versions` holds the version reads use; a rebuild fills version n+1 beside it and its last
batch flips the row in the same transaction (see `projections.runner`).

A batch's rows go in row by row, or in bulk from `bulk_rows` rows of a table on: on SQLite as
one statement over a JSON array of them (run by SQLite without Python's lock, so a rebuild's
writer thread and its folding thread share no lock), on PostgreSQL with COPY. Both store the
same bytes (tests/test_projections.py holds them to it).

`ProjectionStore` holds all of that once; a backend supplies its transactions, its table DDL,
its bulk writes and its tracking recorder: `SQLiteProjectionStore` here, and
`PostgresProjectionStore` (`projections.postgres_store`, eventsourcing's
`PostgresTrackingRecorder`, psycopg 3) beside it. SQL is written once with `?` placeholders;
text sorts by code point on both (SQLite's BINARY collation, PostgreSQL's "C"), so a view has
the same checksum on either backend.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from eventsourcing.persistence import Tracking
from eventsourcing.sqlite import SQLiteCursor, SQLiteDatastore, SQLiteTrackingRecorder

Doc = dict[str, Any]
DocKey = tuple[str, str, str]  # kind, tenant_id, key
# The JSON texts (`doc`, `entry`) are stored as UTF-8 BLOBs; the rows hold them as `str`.
DocRow = tuple[str, str, str, str, str, str]  # kind, tenant_id, key, account_id, sort, doc
TimelineRow = tuple[str, str, str, str, int, str]  # tenant_id, key, at, log, position, entry

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def dump(value: Any) -> str:
    """The canonical JSON text of a document or entry: sorted keys, no spaces.

    As `str`: orjson's output buffer, shrunk to fit and kept among thousands of others until
    a batch commits, cost the allocator several times what copying it into a string costs."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


class StaleVersion(RuntimeError):
    """The version a batch was built for is no longer current (a rebuild switched over)."""


@dataclass(frozen=True)
class Changes:
    """What a batch writes: the changed documents (sorted by key) and new timeline rows."""

    docs: list[DocRow]
    rows: list[TimelineRow]


@dataclass(slots=True)
class _Cached:
    account_id: str
    sort: str
    doc: Doc


@dataclass
class View:
    """A projection's working set: documents loaded on first use, changes kept until commit.

    Folds call `doc(...)` (which marks the document changed) and `add(...)`; the runner
    `take()`s the changes and commits them, keeping the loaded documents as a cache.
    """

    load: Callable[[str, str, str], tuple[str, str, Doc] | None]
    docs: dict[DocKey, _Cached] = field(default_factory=dict)
    dirty: set[DocKey] = field(default_factory=set)
    rows: list[TimelineRow] = field(default_factory=list)
    # Keys looked up and not found: the view is its tables' only writer, so they stay absent
    # until `doc` creates them (a fold often asks `find` and then `doc` for a new key).
    missing: set[DocKey] = field(default_factory=set)
    # Every key the tables can hold, when the view filled them from empty (a rebuild): a key
    # outside it is new and not looked up, even after the cache was dropped.
    known: set[DocKey] | None = None

    def _load(self, k: DocKey) -> tuple[str, str, Doc] | None:
        if k in self.missing or (self.known is not None and k not in self.known):
            return None
        return self.load(*k)

    def doc(
        self, kind: str, tenant: str, key: str, account_id: str, sort: str,
        create: Callable[[], Doc],
    ) -> Doc:  # fmt: skip
        k = (kind, tenant, key)
        cached = self.docs.get(k)
        if cached is None:
            found = self._load(k)
            if found is None:
                self.missing.discard(k)
                if self.known is not None:
                    self.known.add(k)
                cached = _Cached(account_id, sort, create())
            else:
                cached = _Cached(*found)
            self.docs[k] = cached
        self.dirty.add(k)
        return cached.doc

    def find(self, kind: str, tenant: str, key: str) -> Doc | None:
        """A document if it exists, without creating or marking it."""
        k = (kind, tenant, key)
        cached = self.docs.get(k)
        if cached is None:
            found = self._load(k)
            if found is None:
                self.missing.add(k)
                return None
            cached = self.docs[k] = _Cached(*found)
        return cached.doc

    def loading(self) -> AbstractContextManager[object]:
        """Where the documents a batch looks up are read: one read transaction of the
        store's (see `Loader.session`), when the view reads a store."""
        session = getattr(self.load, "session", None)
        return session() if session is not None else nullcontext()

    def resort(self, kind: str, tenant: str, key: str, sort: str) -> None:
        self.docs[(kind, tenant, key)].sort = sort

    def add(self, tenant: str, key: str, at: str, log: str, position: int, entry: Doc) -> None:
        self.rows.append((tenant, key, at, log, position, dump(entry)))

    def take(self) -> Changes:
        """The changes since the last `take`, ready to write (the documents as JSON text)."""
        docs = self.docs
        changed = [
            (k[0], k[1], k[2], d.account_id, d.sort, dump(d.doc))
            for k in sorted(self.dirty)
            for d in (docs[k],)
        ]
        rows, self.rows = self.rows, []
        self.dirty.clear()
        return Changes(changed, rows)

    def clear(self) -> None:
        self.dirty.clear()
        self.rows.clear()

    def forget(self, keep: Iterable[DocKey] = ()) -> None:
        """Drops the cached documents but those in `keep` (which must be committed)."""
        kept = {k: self.docs[k] for k in keep if k in self.docs}
        self.docs.clear()
        self.docs.update(kept)
        self.missing.clear()
        self.clear()


def _no_docs(kind: str, tenant: str, key: str) -> None:
    return None


def memory_view() -> View:
    """A view that starts empty and never touches a database (for `as_of`)."""
    return View(_no_docs)


def fresh_view() -> View:
    """A view of tables it fills from empty (a rebuild): nothing to look up until the runner
    drops cached documents, and then only the keys it has written."""
    return View(_no_docs, known=set())


class Loader:
    """Reads documents of a version's table for a `View`: each in a read transaction of its
    own, or, within a `session` (a batch), all in one opened by the first of them.

    A session's snapshot may predate commits still under way; what it reads is not among
    them: the view keeps every document it changed cached until those changes are committed.
    """

    def __init__(self, store: ProjectionStore, docs: str) -> None:
        self.store = store
        self.statement = (
            f"SELECT account_id, sort, doc FROM {docs} WHERE kind=? AND tenant_id=? AND key=?"
        )
        self._session: ExitStack | None = None
        self._cursor: Cursor | None = None

    def __call__(self, kind: str, tenant: str, key: str) -> tuple[str, str, Doc] | None:
        if self._session is None:
            with self.store._transaction(commit=False) as c:
                return self._read(c, kind, tenant, key)
        if self._cursor is None:
            self._cursor = self._session.enter_context(self.store._transaction(commit=False))
        return self._read(self._cursor, kind, tenant, key)

    def _read(self, c: Cursor, kind: str, tenant: str, key: str) -> tuple[str, str, Doc] | None:
        c.execute(self.statement, (kind, tenant, key))
        row = c.fetchone()
        return None if row is None else (row[0], row[1], orjson.loads(row[2]))

    @contextmanager
    def session(self) -> Iterator[None]:
        with ExitStack() as stack:
            self._session = stack
            try:
                yield
            finally:
                self._session = self._cursor = None


class Cursor(Protocol):
    """What queries get from `ProjectionStore.reading()`: `?` placeholders, tuple-like rows."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int = ..., /) -> list[Any]: ...


class ProjectionStore:
    """Versioned projection tables and their tracked log positions in one datastore.

    Subclasses provide `_transaction`, `_track`, the DDL in `_create`, the catalog query in
    `versions` and the bulk writes in `_write`.
    """

    tracking_table = "tracking"
    lock_current = ""  # appended to the version read of a commit (row lock where supported)
    table_options = ""
    text = "CAST(%s AS TEXT)"  # a stored JSON document (a BLOB) read as text
    bulk_rows = 1000  # rows of one table in a batch from which `_write` goes in bulk

    def _transaction(self, *, commit: bool) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _track(self, c: Cursor, tracking: Tracking) -> None:
        """Moves a tracked position forward in the transaction of `c` (IntegrityError if not)."""
        raise NotImplementedError

    def _create(self, c: Cursor, name: str, version: int, *, building: bool = False) -> None:
        """The version's tables; `building` (a rebuild's target) may leave out what `_finish`
        adds when the rebuild switches over."""
        raise NotImplementedError

    def _finish(self, c: Cursor, name: str, version: int) -> None:
        """Completes a rebuilt version's tables, in the transaction that makes it current: the
        listing indexes of its documents, built once from the whole table rather than kept up
        through every batch (the lookups of a rebuild use only the primary key)."""
        self._index_docs(c, self.tables(name, version)[0])

    @staticmethod
    def _index_docs(c: Cursor, docs: str) -> None:
        c.execute(
            f"CREATE INDEX IF NOT EXISTS {docs}_account ON {docs} "
            "(kind, tenant_id, account_id, sort)"
        )
        c.execute(f"CREATE INDEX IF NOT EXISTS {docs}_sort ON {docs} (kind, tenant_id, sort)")

    def _write(self, c: Cursor, docs: str, timeline: str, changes: Changes) -> None:
        raise NotImplementedError

    def versions(self, name: str) -> list[int]:
        """Every version with tables on disk (the current one and any unfinished rebuild)."""
        raise NotImplementedError

    def position(self, name: str, version: int, log: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Releases connections (a no-op where there is nothing to release)."""

    def _setup(self) -> None:
        with self._transaction(commit=True) as c:
            c.execute(
                "CREATE TABLE IF NOT EXISTS proj_versions "
                "(name TEXT PRIMARY KEY, version INTEGER NOT NULL)" + self.table_options
            )

    # --- versions and tables ---------------------------------------------------------------

    @staticmethod
    def tables(name: str, version: int) -> tuple[str, str]:
        if not _NAME.match(name):
            raise ValueError(f"bad projection name {name!r}")
        return f"proj_{name}_docs_v{version}", f"proj_{name}_timeline_v{version}"

    @staticmethod
    def tracker(name: str, version: int, log: str) -> str:
        return f"{name}.v{version}.{log}"

    def current_version(self, name: str) -> int | None:
        with self._transaction(commit=False) as c:
            return self._current(c, name)

    def _current(self, c: Cursor, name: str, lock: str = "") -> int | None:
        c.execute("SELECT version FROM proj_versions WHERE name=?" + lock, (name,))
        row = c.fetchone()
        return None if row is None else int(row[0])

    def ensure(self, name: str) -> int:
        """The current version of `name`, creating version 1 on first use."""
        with self._transaction(commit=True) as c:
            version = self._current(c, name)
            if version is None:
                version = 1
                self._create(c, name, version)
                c.execute("INSERT INTO proj_versions VALUES (?, ?)", (name, version))
            return version

    def prepare(self, name: str, version: int) -> None:
        """Empty tables and no tracked positions for `version` (a fresh rebuild target)."""
        with self._transaction(commit=True) as c:
            self._drop(c, name, version)
            self._create(c, name, version, building=True)

    def drop(self, name: str, version: int) -> None:
        with self._transaction(commit=True) as c:
            self._drop(c, name, version)

    def _drop(self, c: Cursor, name: str, version: int) -> None:
        for table in self.tables(name, version):
            c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(
            f"DELETE FROM {self.tracking_table} WHERE application_name LIKE ?",
            (self.tracker(name, version, "%"),),
        )

    # --- reading and writing documents ---------------------------------------------------

    def loader(self, name: str, version: int) -> Loader:
        return Loader(self, self.tables(name, version)[0])

    def commit(
        self,
        name: str,
        version: int,
        changes: Changes,
        positions: Mapping[str, int],
        *,
        mode: str = "live",
    ) -> None:
        """Writes a batch's changes and the new positions in one transaction.

        `mode` "live" raises `StaleVersion` (nothing written) unless `version` is current;
        "build" writes a version that is not current yet (a rebuild); "switch" also makes
        `version` current in the same transaction.
        """
        docs, timeline = self.tables(name, version)
        with self._transaction(commit=True) as c:
            current = self._current(c, name, self.lock_current)
            if mode == "switch":
                self._finish(c, name, version)
                c.execute(
                    "INSERT INTO proj_versions VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET version=excluded.version",
                    (name, version),
                )
            elif mode == "live" and current is not None and current != version:
                raise StaleVersion(f"{name} v{version} is no longer current (v{current} is)")
            self._write(c, docs, timeline, changes)
            for log, position in positions.items():
                self._track(c, Tracking(self.tracker(name, version, log), position))

    @contextmanager
    def reading(self) -> Iterator[Cursor]:
        """One read transaction: a consistent snapshot for a query."""
        with self._transaction(commit=False) as c:
            yield c

    def checksum(self, name: str, version: int | None = None) -> str:
        """sha256 over a canonical dump of a version's tables (the current one by default)."""
        version = version if version is not None else self.current_version(name)
        if version is None:
            raise KeyError(f"no projection {name!r}")
        docs, timeline = self.tables(name, version)
        digest = hashlib.sha256()
        dumps = orjson.dumps
        with self.reading() as c:
            for table, columns, order in (
                (docs, f"kind, tenant_id, key, account_id, sort, {self.text % 'doc'}",
                 "kind, tenant_id, key"),
                (timeline, f"tenant_id, key, at, log, position, {self.text % 'entry'}",
                 "tenant_id, key, at, log, position"),
            ):  # fmt: skip
                digest.update(table.rsplit("_v", 1)[0].encode() + b"\n")
                c.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
                # Each row as a JSON array (the JSON documents as strings), a line each.
                while rows := c.fetchmany(5000):
                    digest.update(b"\n".join(map(dumps, rows)) + b"\n")
        return digest.hexdigest()


_FROM_JSON = (
    " SELECT value->>0, value->>1, value->>2, value->>3, value->>4, CAST(value->>5 AS BLOB) "
    "FROM json_each(?)"
)


class SQLiteProjectionStore(ProjectionStore):
    """The store in an eventsourcing `SQLiteDatastore` (by default the log's own file)."""

    table_options = " WITHOUT ROWID"

    def __init__(self, datastore: SQLiteDatastore) -> None:
        self.datastore = datastore
        self.tracking = SQLiteTrackingRecorder(datastore)
        self.tracking.create_table()
        self._setup()

    @contextmanager
    def _transaction(self, *, commit: bool) -> Iterator[Cursor]:
        with self.datastore.transaction(commit=commit) as c:
            raw = c.sqlite_cursor
            raw.row_factory = None  # plain tuples, not the datastore's `sqlite3.Row`s
            yield raw

    def _track(self, c: Cursor, tracking: Tracking) -> None:
        assert isinstance(c, sqlite3.Cursor)
        self.tracking._insert_tracking(SQLiteCursor(c), tracking)

    def _create(self, c: Cursor, name: str, version: int, *, building: bool = False) -> None:
        docs, timeline = self.tables(name, version)
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {docs} (kind TEXT, tenant_id TEXT, key TEXT, "
            "account_id TEXT, sort TEXT, doc BLOB, PRIMARY KEY (kind, tenant_id, key)) "
            "WITHOUT ROWID"
        )
        if not building:
            self._index_docs(c, docs)
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {timeline} (tenant_id TEXT, key TEXT, at TEXT, "
            "log TEXT, position INTEGER, entry BLOB, "
            "PRIMARY KEY (tenant_id, key, at, log, position)) WITHOUT ROWID"
        )

    def _write(self, c: Cursor, docs: str, timeline: str, changes: Changes) -> None:
        assert isinstance(c, sqlite3.Cursor)
        for rows, insert in (
            (changes.docs, f"INSERT OR REPLACE INTO {docs}"),
            (changes.rows, f"INSERT INTO {timeline}"),
        ):
            if len(rows) >= self.bulk_rows:
                # One statement over the rows as a JSON array: SQLite does the whole batch
                # in C, without Python's lock (see `runner._Writer`). Not
                # for a NUL in a string, which SQLite's JSON functions cut short.
                payload = orjson.dumps(rows)
                if b"\\u0000" not in payload:
                    c.execute(insert + _FROM_JSON, (payload.decode(),))
                    continue
            if rows:
                c.executemany(insert + " VALUES (?, ?, ?, ?, ?, CAST(? AS BLOB))", rows)

    def versions(self, name: str) -> list[int]:
        with self._transaction(commit=False) as c:
            c.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE ?",
                (f"proj_{name}_docs_v%",),
            )
            names = [r[0] for r in c.fetchall()]
        return sorted(int(n.rsplit("_v", 1)[1]) for n in names)

    def position(self, name: str, version: int, log: str) -> int:
        return self.tracking.max_tracking_id(self.tracker(name, version, log)) or 0


def open_projection_store(
    url: str, log_datastore: SQLiteDatastore | None = None
) -> ProjectionStore:
    """The store a URL names: "" (the log's own SQLite datastore), `sqlite:///FILE` or
    `postgresql://user:password@host:port/dbname`."""
    if not url:
        if log_datastore is None:
            raise ValueError("no projections URL and no log datastore to share")
        return SQLiteProjectionStore(log_datastore)
    if url.startswith("sqlite:///"):
        from loopservice.infra.sqlite_log import open_datastore

        return SQLiteProjectionStore(open_datastore(url[len("sqlite:///") :]))
    if url.startswith(("postgresql://", "postgres://")):
        from loopservice.projections.postgres_store import PostgresProjectionStore

        return PostgresProjectionStore.from_url(url)
    raise ValueError(f"unsupported projections URL {url!r}: use sqlite:///FILE or postgresql://…")
