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
batch flips the row in the same transaction (see `projections.runner`). A read of one
statement (`query`) may name the tables of the version it last saw current and read the
current version in the same statement, to learn when it must look again.

A batch's rows go in on SQLite as statements of many rows each (bound in C and run without
Python's lock, so a rebuild's writer thread and its folding thread hardly share it), on
PostgreSQL row by row or, from `bulk_rows` rows of a table on, with COPY. Both store the same
bytes (tests/test_projections.py holds them to it).

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, islice
from operator import itemgetter
from typing import Any, Protocol

import orjson
from eventsourcing.persistence import OperationalError, Tracking
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
    `take()`s the changes and commits them, keeping the loaded documents as a cache, and
    `evict`s the ones cached longest when it grows too large.

    A view that fills a new version (`write_back`, a rebuild) writes each changed document
    once, at `take(everything=True)`, instead of after every batch that changed it. A
    document it evicts goes to `cold` as the row that will be written: its JSON text, a third
    of the memory, and reading it back costs a parse instead of a query (on PostgreSQL, a
    round trip). The runner writes the oldest cold rows out when there are too many of them
    (`drop_cold`); from then on those documents are read from the tables.
    """

    load: Callable[[str, str, str], tuple[str, str, Doc] | None]
    write_back: bool = False
    docs: dict[DocKey, _Cached] = field(default_factory=dict)  # first cached first
    touched: set[DocKey] = field(default_factory=set)  # changed since the last `take`
    recent: set[DocKey] = field(default_factory=set)  # changed before the last `take`
    unwritten: set[DocKey] = field(default_factory=set)  # write_back: changed, not yet taken
    cold: dict[DocKey, DocRow] = field(default_factory=dict)  # write_back: evicted, not taken
    # The cold rows the last `take(everything=True)` returned: their commit may still be
    # under way, so a document among them is read from here.
    taken: dict[DocKey, DocRow] = field(default_factory=dict)
    rows: list[TimelineRow] = field(default_factory=list)
    # Keys looked up and not found: the view is its tables' only writer, so they stay absent
    # until `doc` creates them (a fold often asks `find` and then `doc` for a new key).
    missing: set[DocKey] = field(default_factory=set)
    # Every key the tables can hold, when the view filled them from empty (a rebuild): a key
    # outside it is new and not looked up, even after the cache was dropped.
    known: set[DocKey] | None = None

    def _load(self, k: DocKey) -> tuple[str, str, Doc] | None:
        row = self.cold.pop(k, None) or self.taken.pop(k, None)
        if row is not None:
            self.unwritten.add(k)  # back in the cache: written again, like any change
            return row[3], row[4], orjson.loads(row[5])
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
        self.touched.add(k)
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

    def mark(self, kind: str, tenant: str, key: str) -> None:
        """Marks a document `find` returned as changed (as `doc` would, with one lookup less)."""
        self.touched.add((kind, tenant, key))

    def loading(self) -> AbstractContextManager[object]:
        """Where the documents a batch looks up are read: one read transaction of the
        store's (see `Loader.session`), when the view reads a store."""
        session = getattr(self.load, "session", None)
        return session() if session is not None else nullcontext()

    def resort(self, kind: str, tenant: str, key: str, sort: str) -> None:
        self.docs[(kind, tenant, key)].sort = sort

    def add(self, tenant: str, key: str, at: str, log: str, position: int, entry: Doc) -> None:
        self.rows.append((tenant, key, at, log, position, dump(entry)))

    def take(self, *, everything: bool = False) -> Changes:
        """The changes since the last `take`, ready to write (the documents as JSON text).

        With `write_back`, only the timeline rows, unless `everything`: then also every
        document changed since the last such `take`, cached or cold."""
        docs, touched = self.docs, self.touched
        self.recent, self.touched = touched, set()
        changed: list[DocRow] = []
        if self.write_back and not everything:
            self.unwritten |= touched
        else:
            write, self.unwritten = self.unwritten | touched, set()
            # Most of the cache (a rebuild's flush): in its order, roughly that in memory.
            found = (
                ((k, d) for k, d in docs.items() if k in write)
                if 2 * len(write) > len(docs)
                else ((k, docs[k]) for k in write)
            )
            changed = [(*k, d.account_id, d.sort, dump(d.doc)) for k, d in found]
            changed += self.cold.values()
            self.taken, self.cold = self.cold, {}
        rows, self.rows = self.rows, []
        return Changes(in_key_order(changed), rows)

    def evict(self, keep: int) -> None:
        """Drops the documents cached longest until `keep` are left; with `write_back`, to
        `cold`. Call it after a `take` whose changes are committed (or, with `write_back`,
        submitted)."""
        excess = len(self.docs) - keep
        if excess <= 0:
            return
        # The last batch's documents are the likeliest to be needed next (open cases, active
        # accounts): they stay, unless they alone would fill half the cache.
        recent = self.recent if len(self.recent) <= keep // 2 else set()
        victims = list(islice((k for k in self.docs if k not in recent), excess))
        for k in victims:
            cached = self.docs.pop(k)
            if self.write_back:
                self.cold[k] = (*k, cached.account_id, cached.sort, dump(cached.doc))
                self.unwritten.discard(k)

    def drop_cold(self, keep: int) -> list[DocRow]:
        """The oldest `cold` rows beyond `keep`, dropped: the caller writes them and lets
        the commit finish before the view looks anything up, since the tables are where
        they are read from now on."""
        excess = list(islice(self.cold, max(0, len(self.cold) - keep)))
        return in_key_order([self.cold.pop(k) for k in excess])

    def forget(self) -> None:
        """Drops every cached document and change (after a failed commit)."""
        for tier in (self.docs, self.cold, self.taken, self.unwritten, self.touched,
                     self.recent, self.missing, self.rows):  # fmt: skip
            tier.clear()


def in_key_order(docs: list[DocRow]) -> list[DocRow]:
    """`docs` sorted by kind, tenant and key, in place: SQLite writes rows in key order
    several times faster. Two stable passes, by key, then by kind and tenant: comparing
    whole rows took twice as long (0.7 s for a rebuild's 243k documents)."""
    docs.sort(key=itemgetter(2))
    docs.sort(key=itemgetter(0, 1))
    return docs


def _no_docs(kind: str, tenant: str, key: str) -> None:
    return None


def memory_view() -> View:
    """A view that starts empty and never touches a database (for `as_of`)."""
    return View(_no_docs)


def building_view(load: Callable[[str, str, str], tuple[str, str, Doc] | None]) -> View:
    """A view of tables it fills from empty (a rebuild), writing back: nothing to look up
    but the keys it has written and dropped from its cache and `cold` (`load` reads them)."""
    return View(load, write_back=True, known=set())


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
    bulk_rows = 1000  # rows of one table in a batch from which `_write` goes in bulk (PG)

    def _transaction(self, *, commit: bool, durable: bool = True) -> AbstractContextManager[Cursor]:
        """A transaction; one not `durable` commits without waiting for the disk (it may be
        lost in a power cut, never half applied: a later durable commit makes it durable)."""
        raise NotImplementedError

    def _track(self, c: Cursor, tracking: Tracking) -> None:
        """Moves a tracked position forward in the transaction of `c` (IntegrityError if not)."""
        raise NotImplementedError

    def _create(self, c: Cursor, name: str, version: int, *, building: bool = False) -> None:
        """The version's tables; `building` (a rebuild's target) may leave out what `_finish`
        adds when the rebuild switches over."""
        raise NotImplementedError

    def _finish(self, c: Cursor, name: str, version: int) -> None:
        """Completes a rebuilt version's tables before its last batch: the listing indexes of
        its documents and the key of its timeline, built once from the whole table rather
        than kept up through every batch (the lookups of a rebuild use only the documents'
        primary key)."""
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
        "build" writes a version that is not current yet (a rebuild); "finish" also completes
        its tables (`_finish`), before its last batch; "switch" also makes `version` current
        in the same transaction.
        """
        docs, timeline = self.tables(name, version)
        # A version being built is nobody's until the switch, which is durable: a batch
        # before it need not wait for the disk (a power cut leaves a rebuild to do again).
        durable = mode not in ("build", "finish")
        with self._transaction(commit=True, durable=durable) as c:
            current = self._current(c, name, self.lock_current)
            if mode == "switch":
                c.execute(
                    "INSERT INTO proj_versions VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET version=excluded.version",
                    (name, version),
                )
            elif mode == "live" and current is not None and current != version:
                raise StaleVersion(f"{name} v{version} is no longer current (v{current} is)")
            self._write(c, docs, timeline, changes)
            if mode == "finish":  # after the rows it indexes: built once, not kept up
                self._finish(c, name, version)
            for log, position in positions.items():
                self._track(c, Tracking(self.tracker(name, version, log), position))

    @contextmanager
    def reading(self) -> Iterator[Cursor]:
        """One read transaction: a consistent snapshot for a query."""
        with self._transaction(commit=False) as c:
            yield c

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one statement, which reads one snapshot on either backend (on
        PostgreSQL without a transaction block around it: one round trip). Raises
        `StaleVersion` when a table it names is gone (a rebuild dropped it)."""
        raise NotImplementedError

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


@lru_cache(maxsize=64)
def _values(insert: str, n: int) -> str:
    """`insert` of `n` rows of six values, the JSON text last (stored as a BLOB)."""
    return insert + ",".join(["(?, ?, ?, ?, ?, CAST(? AS BLOB))"] * n)


class SQLiteProjectionStore(ProjectionStore):
    """The store in an eventsourcing `SQLiteDatastore` (by default the log's own file)."""

    table_options = " WITHOUT ROWID"

    def __init__(self, datastore: SQLiteDatastore) -> None:
        self.datastore = datastore
        self.tracking = SQLiteTrackingRecorder(datastore)
        self.tracking.create_table()
        self._setup()

    @contextmanager
    def _transaction(self, *, commit: bool, durable: bool = True) -> Iterator[Cursor]:
        with self.datastore.get_connection(commit=commit) as conn, ExitStack() as stack:
            if not durable:
                # WAL mode: the commit is appended to the log file without an fsync; a
                # checkpoint syncs that file first, and so does any later commit at the
                # connection's own level (the log's appends: FULL), which it precedes.
                sqlite = conn._sqlite_conn
                level = sqlite.execute("PRAGMA synchronous").fetchone()[0]
                sqlite.execute("PRAGMA synchronous=NORMAL")
                stack.callback(sqlite.execute, f"PRAGMA synchronous={int(level)}")
            with conn.transaction(commit=commit) as c:
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
        # The timeline in rowid order with its key in an index: a rebuild appends its rows
        # and builds the index once (`_finish`), about half the work of inserting every
        # row into a table ordered by account and time (and of writing those pages again).
        c.execute(
            f"CREATE TABLE IF NOT EXISTS {timeline} (tenant_id TEXT, key TEXT, at TEXT, "
            "log TEXT, position INTEGER, entry BLOB)"
        )
        if not building:
            self._index_docs(c, docs)
            self._index_timeline(c, timeline)

    def _finish(self, c: Cursor, name: str, version: int) -> None:
        super()._finish(c, name, version)
        self._index_timeline(c, self.tables(name, version)[1])

    @staticmethod
    def _index_timeline(c: Cursor, timeline: str) -> None:
        c.execute(
            f"CREATE UNIQUE INDEX IF NOT EXISTS {timeline}_key ON {timeline} "
            "(tenant_id, key, at, log, position)"
        )

    def _write(self, c: Cursor, docs: str, timeline: str, changes: Changes) -> None:
        assert isinstance(c, sqlite3.Cursor)
        for rows, insert in (
            (changes.docs, f"INSERT OR REPLACE INTO {docs} VALUES "),
            (changes.rows, f"INSERT INTO {timeline} VALUES "),
        ):
            # Many rows per statement: their values are bound in C, and SQLite runs the
            # statement without Python's lock, so a rebuild's writer thread and its folding
            # thread hardly contend for it (see `runner._Writer`); `executemany` would take
            # the lock back after every row.
            per = self._rows_per_statement(c)
            for i in range(0, len(rows), per):
                part = rows[i : i + per]
                c.execute(_values(insert, len(part)), list(chain.from_iterable(part)))

    @staticmethod
    def _rows_per_statement(c: sqlite3.Cursor) -> int:
        limit = c.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        return max(1, min(1000, limit // 6))

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            with self.reading() as c:
                c.execute(sql, params)
                return c.fetchall()
        except OperationalError as e:
            if "no such table" in str(e):
                raise StaleVersion(str(e)) from e
            raise

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
