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
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from eventsourcing.persistence import Tracking
from eventsourcing.sqlite import SQLiteCursor, SQLiteDatastore, SQLiteTrackingRecorder

Doc = dict[str, Any]
DocKey = tuple[str, str, str]  # kind, tenant_id, key
DocRow = tuple[str, str, str, str, str, bytes]  # kind, tenant_id, key, account_id, sort, doc
TimelineRow = tuple[str, str, str, str, int, bytes]  # tenant_id, key, at, log, position, entry

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def dump(value: Any) -> bytes:
    """The canonical JSON of a document or entry: sorted keys, no spaces."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class StaleVersion(RuntimeError):
    """The version a batch was built for is no longer current (a rebuild switched over)."""


@dataclass
class _Cached:
    account_id: str
    sort: str
    doc: Doc


@dataclass
class View:
    """A projection's working set: documents loaded on first use, changes kept until commit.

    Folds call `doc(...)` (which marks the document changed) and `add(...)`; the runner commits
    the changes and then `clear()`s them, keeping the loaded documents as a cache.
    """

    load: Callable[[str, str, str], tuple[str, str, Doc] | None]
    docs: dict[DocKey, _Cached] = field(default_factory=dict)
    dirty: set[DocKey] = field(default_factory=set)
    rows: list[TimelineRow] = field(default_factory=list)
    # Keys looked up and not found: the view is its tables' only writer, so they stay absent
    # until `doc` creates them (a fold often asks `find` and then `doc` for a new key).
    missing: set[DocKey] = field(default_factory=set)

    def doc(
        self, kind: str, tenant: str, key: str, account_id: str, sort: str,
        create: Callable[[], Doc],
    ) -> Doc:  # fmt: skip
        k = (kind, tenant, key)
        cached = self.docs.get(k)
        if cached is None:
            found = None if k in self.missing else self.load(kind, tenant, key)
            if found is None:
                self.missing.discard(k)
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
            found = None if k in self.missing else self.load(kind, tenant, key)
            if found is None:
                self.missing.add(k)
                return None
            cached = self.docs[k] = _Cached(*found)
        return cached.doc

    def resort(self, kind: str, tenant: str, key: str, sort: str) -> None:
        self.docs[(kind, tenant, key)].sort = sort

    def add(self, tenant: str, key: str, at: str, log: str, position: int, entry: Doc) -> None:
        self.rows.append((tenant, key, at, log, position, dump(entry)))

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

    def _transaction(self, *, commit: bool) -> AbstractContextManager[Cursor]:
        raise NotImplementedError

    def _track(self, c: Cursor, tracking: Tracking) -> None:
        """Moves a tracked position forward in the transaction of `c` (IntegrityError if not)."""
        raise NotImplementedError

    def _create(self, c: Cursor, name: str, version: int) -> None:
        raise NotImplementedError

    def _write(self, c: Cursor, docs: str, timeline: str, dirty: list[DocRow],
               rows: list[TimelineRow]) -> None:  # fmt: skip
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
            self._create(c, name, version)

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

    def loader(self, name: str, version: int) -> Callable[[str, str, str], Any]:
        docs, _ = self.tables(name, version)
        statement = (
            f"SELECT account_id, sort, doc FROM {docs} WHERE kind=? AND tenant_id=? AND key=?"
        )

        def load(kind: str, tenant: str, key: str) -> tuple[str, str, Doc] | None:
            with self._transaction(commit=False) as c:
                c.execute(statement, (kind, tenant, key))
                row = c.fetchone()
            return None if row is None else (row[0], row[1], orjson.loads(row[2]))

        return load

    def commit(
        self,
        name: str,
        version: int,
        view: View,
        positions: Mapping[str, int],
        *,
        mode: str = "live",
    ) -> None:
        """Writes the view's changes and the new positions in one transaction.

        `mode` "live" raises `StaleVersion` (nothing written) unless `version` is current;
        "build" writes a version that is not current yet (a rebuild); "switch" also makes
        `version` current in the same transaction.
        """
        docs, timeline = self.tables(name, version)
        with self._transaction(commit=True) as c:
            current = self._current(c, name, self.lock_current)
            if mode == "switch":
                c.execute(
                    "INSERT INTO proj_versions VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET version=excluded.version",
                    (name, version),
                )
            elif mode == "live" and current is not None and current != version:
                raise StaleVersion(f"{name} v{version} is no longer current (v{current} is)")
            dirty = [
                (k[0], k[1], k[2], d.account_id, d.sort, dump(d.doc))
                for k in sorted(view.dirty)
                for d in (view.docs[k],)
            ]
            self._write(c, docs, timeline, dirty, view.rows)
            for log, position in positions.items():
                self._track(c, Tracking(self.tracker(name, version, log), position))
        view.clear()

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
        with self.reading() as c:
            for table, columns, order in (
                (docs, "kind, tenant_id, key, account_id, sort, doc", "kind, tenant_id, key"),
                (timeline, "tenant_id, key, at, log, position, entry",
                 "tenant_id, key, at, log, position"),
            ):  # fmt: skip
                digest.update(table.rsplit("_v", 1)[0].encode() + b"\n")
                c.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
                while rows := c.fetchmany(5000):
                    for row in rows:
                        digest.update(
                            dump([v if not isinstance(v, bytes) else v.decode() for v in row])
                        )
                        digest.update(b"\n")
        return digest.hexdigest()


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
            yield c.sqlite_cursor

    def _track(self, c: Cursor, tracking: Tracking) -> None:
        assert isinstance(c, sqlite3.Cursor)
        self.tracking._insert_tracking(SQLiteCursor(c), tracking)

    def _create(self, c: Cursor, name: str, version: int) -> None:
        docs, timeline = self.tables(name, version)
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {docs} (kind TEXT, tenant_id TEXT, key TEXT, "
            "account_id TEXT, sort TEXT, doc BLOB, PRIMARY KEY (kind, tenant_id, key)) "
            "WITHOUT ROWID"
        )
        c.execute(
            f"CREATE INDEX IF NOT EXISTS {docs}_account ON {docs} "
            "(kind, tenant_id, account_id, sort)"
        )
        c.execute(f"CREATE INDEX IF NOT EXISTS {docs}_sort ON {docs} (kind, tenant_id, sort)")
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {timeline} (tenant_id TEXT, key TEXT, at TEXT, "
            "log TEXT, position INTEGER, entry BLOB, "
            "PRIMARY KEY (tenant_id, key, at, log, position)) WITHOUT ROWID"
        )

    def _write(self, c: Cursor, docs: str, timeline: str, dirty: list[DocRow],
               rows: list[TimelineRow]) -> None:  # fmt: skip
        assert isinstance(c, sqlite3.Cursor)
        if dirty:
            c.executemany(f"INSERT OR REPLACE INTO {docs} VALUES (?, ?, ?, ?, ?, ?)", dirty)
        if rows:
            c.executemany(f"INSERT INTO {timeline} VALUES (?, ?, ?, ?, ?, ?)", rows)

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
