"""Read functions over the projections, per tenant, from the current version of each view.

Each query runs in one read transaction, so a rebuild switching versions mid-query cannot mix
two versions. `as_of` does not read the views: it folds the log up to an instant with the
same fold, in memory, so the answer is what the context was at that event time.
"""

from __future__ import annotations

from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson

from loopservice.domain.events import Event
from loopservice.domain.policy import Policy
from loopservice.domain.signals import Signal
from loopservice.infra.sqlite_log import SQLiteLog, decode_signal
from loopservice.projections.cases import render_case
from loopservice.projections.context import (
    INTERACTIONS,
    SIGNALS,
    ContextFold,
    render_context,
)
from loopservice.projections.records import utc
from loopservice.projections.store import Cursor, ProjectionStore, StaleVersion, memory_view

CONTEXT_TIMELINE = 50
CASE_TIMELINE = 100
_LINK_FIELDS = ("case_id", "topic", "opened_at", "lifecycle", "resolution_code", "priority")

# An account's context in one statement: the current version's number with the document of the
# version named (absent: NULL), and that version's latest timeline entries (rows whose first
# column is NULL). The caller orders the entries: a UNION's order is not promised.
_CONTEXT = (
    "SELECT v.version, d.doc, NULL, NULL, NULL FROM proj_versions v "
    "LEFT JOIN {docs} d ON d.kind = 'account' AND d.tenant_id = ? AND d.key = ? "
    "WHERE v.name = 'context' "
    "UNION ALL SELECT * FROM (SELECT CAST(NULL AS INTEGER), entry, at, log, position "
    "FROM {timeline} WHERE tenant_id = ? AND key = ? "
    "ORDER BY at DESC, log DESC, position DESC LIMIT ?) t"
)


class ProjectionQueries:
    def __init__(
        self,
        store: ProjectionStore,
        interactions: SQLiteLog[Event],
        signals: SQLiteLog[Signal],
        default_policy: Policy,
    ) -> None:
        self.store = store
        self.interactions = interactions
        self.signals = signals
        self.default_policy = default_policy
        self._versions: dict[str, int] = {}  # the version of a view last seen current

    def _tables(self, c: Cursor, name: str) -> tuple[str, str] | None:
        c.execute("SELECT version FROM proj_versions WHERE name=?", (name,))
        row = c.fetchone()
        return None if row is None else self.store.tables(name, int(row[0]))

    @staticmethod
    def _doc(c: Cursor, docs: str, kind: str, tenant: str, key: str) -> Any:
        c.execute(f"SELECT doc FROM {docs} WHERE kind=? AND tenant_id=? AND key=?",
                  (kind, tenant, key))  # fmt: skip
        row = c.fetchone()
        return None if row is None else orjson.loads(row[0])

    @staticmethod
    def _timeline(
        c: Cursor, table: str, tenant: str, key: str, limit: int, offset: int, newest: bool
    ) -> list[Any]:
        order = "DESC" if newest else "ASC"
        c.execute(
            f"SELECT entry FROM {table} WHERE tenant_id=? AND key=? "
            f"ORDER BY at {order}, log {order}, position {order} LIMIT ? OFFSET ?",
            (tenant, key, limit, offset),
        )
        return [orjson.loads(r[0]) for r in c.fetchall()]

    @staticmethod
    def _count(c: Cursor, sql: str, params: tuple[Any, ...]) -> int:
        c.execute(sql, params)
        return int(c.fetchone()[0])

    # --- customer context ------------------------------------------------------------------

    def account_context(
        self, tenant: str, account_id: str, timeline_limit: int = CONTEXT_TIMELINE
    ) -> dict[str, Any] | None:
        """The account's context and its latest timeline entries, newest first.

        One statement (`ProjectionStore.query`: one snapshot, on PostgreSQL one round trip)
        reads the document and the entries of the version last seen current, and the version
        that is current now; when a rebuild has switched since, it reads the new one.
        """
        for _ in range(3):
            version = self._versions.get("context") or self._current("context")
            if version is None:
                return None
            docs, timeline = self.store.tables("context", version)
            try:
                rows = self.store.query(
                    _CONTEXT.format(docs=docs, timeline=timeline),
                    (tenant, account_id, tenant, account_id, timeline_limit),
                )
            except StaleVersion:  # its tables are gone
                rows = []
            current = next((r[0] for r in rows if r[0] is not None), None)
            if current != version:
                self._versions.pop("context", None)
                continue
            doc = next(r[1] for r in rows if r[0] is not None)
            if doc is None:
                return None
            latest = sorted((r for r in rows if r[0] is None), key=itemgetter(2, 3, 4))
            entries = [orjson.loads(r[1]) for r in reversed(latest)]
            return {
                "context": render_context(orjson.loads(doc)),
                "timeline": entries,
                "as_of": None,
            }
        raise StaleVersion("the context projection keeps switching versions")

    def _current(self, name: str) -> int | None:
        """The current version of `name`, remembered for the next read."""
        version = self.store.current_version(name)
        if version is not None:
            self._versions[name] = version
        return version

    def accounts(self, tenant: str, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        with self.store.reading() as c:
            tables = self._tables(c, "context")
            if tables is None:
                return {"total": 0, "items": []}
            docs = tables[0]
            total = self._count(
                c, f"SELECT COUNT(*) FROM {docs} WHERE kind='account' AND tenant_id=?", (tenant,)
            )
            c.execute(
                f"SELECT doc FROM {docs} WHERE kind='account' AND tenant_id=? "
                "ORDER BY sort, key LIMIT ? OFFSET ?",
                (tenant, limit, offset),
            )
            rows = [orjson.loads(r[0]) for r in c.fetchall()]
        items = [
            {
                "account_id": d["account_id"],
                "name": d["profile"]["name"],
                "tier": d["profile"]["tier"],
                "stage": d["lifecycle"]["stage"],
                "owner_id": d["profile"]["owner_id"],
                "open_cases": len(d["open_cases"]),
                "last_interaction_at": d["last_interaction_at"],
                "risk": (d["signals"]["latest_risk"] or {}).get("level"),
            }
            for d in rows
        ]
        return {"total": total, "items": items}

    def as_of(self, tenant: str, account_id: str, at: datetime) -> dict[str, Any] | None:
        """The context as it stood at `at`: the log folded up to that event time.

        Interactions count when they occurred at or before `at`, signals when they were
        detected at or before it; the timeline is the latest entries then, newest first.
        """
        fold = ContextFold(self.default_policy)
        view = memory_view()
        needle = b'"account_id":' + orjson.dumps(account_id)
        for log, topics in ((INTERACTIONS, fold.interaction_topics), (SIGNALS, ())):
            source = self.interactions if log == INTERACTIONS else self.signals
            position = 1
            while rows := source.recorder.select_notifications(position, 5000, topics=topics):
                position = rows[-1].id + 1
                for n in rows:
                    body = n.state[32:]
                    if log == INTERACTIONS:
                        if n.topic != "policy.published" and needle not in body:
                            continue
                        event = fold.decode(n.topic, body)
                        if utc(event["occurred_at"]) > at:
                            continue
                        if event["type"] == "policy.published" or (
                            event["tenant_id"] == tenant and event["account_id"] == account_id
                        ):
                            fold.apply_event(view, n.id, event)
                    elif needle in body:
                        signal = decode_signal(n.topic, body)
                        if (
                            signal.detected_at <= at
                            and signal.tenant_id == tenant
                            and signal.account_id == account_id
                        ):
                            fold.apply_signal(view, n.id, signal)
        doc = view.find("account", tenant, account_id)
        if doc is None:
            return None
        latest = sorted(view.rows, key=lambda r: (r[2], r[3], r[4]), reverse=True)
        timeline = [orjson.loads(r[5]) for r in latest[:CONTEXT_TIMELINE]]
        return {"context": render_context(doc), "timeline": timeline, "as_of": at.isoformat()}

    # --- cases -----------------------------------------------------------------------------

    def case_view(
        self, tenant: str, case_id: str, timeline_limit: int = CASE_TIMELINE
    ) -> dict[str, Any] | None:
        """The case, links to its customer's earlier cases on the topic, its first entries."""
        with self.store.reading() as c:
            tables = self._tables(c, "cases")
            if tables is None:
                return None
            doc = self._doc(c, tables[0], "case", tenant, case_id)
            if doc is None or doc["opened_at"] is None:
                return None
            earlier = []
            for other_id in doc["earlier_cases"]:
                other = self._doc(c, tables[0], "case", tenant, other_id)
                if other is not None:
                    earlier.append({k: other[k] for k in _LINK_FIELDS})
            timeline = self._timeline(c, tables[1], tenant, case_id, timeline_limit, 0, False)
            entries = self._count(
                c,
                f"SELECT COUNT(*) FROM {tables[1]} WHERE tenant_id=? AND key=?",
                (tenant, case_id),
            )
        case = render_case(doc)
        case["earlier_cases"] = earlier
        return {"case": case, "timeline": timeline, "timeline_total": entries}

    def cases(
        self, tenant: str, account_id: str | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any]:
        """Cases newest first, of one account or of the whole tenant."""
        where = "kind='case' AND tenant_id=? AND sort != ''"
        params: tuple[Any, ...] = (tenant,)
        if account_id is not None:
            where += " AND account_id=?"
            params += (account_id,)
        with self.store.reading() as c:
            tables = self._tables(c, "cases")
            if tables is None:
                return {"total": 0, "items": []}
            docs = tables[0]
            total = self._count(c, f"SELECT COUNT(*) FROM {docs} WHERE {where}", params)
            c.execute(
                f"SELECT doc FROM {docs} WHERE {where} ORDER BY sort DESC, key LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
            rows = [orjson.loads(r[0]) for r in c.fetchall()]
        keys = ("case_id", "account_id", "subject", "topic", "opened_at", "lifecycle", "status",
                "priority", "team", "assignee_id", "last_event_at")  # fmt: skip
        items = [{k: d.get(k) for k in keys} | {"sla_breaches": d["sla"]["breached"]}
                 for d in rows]  # fmt: skip
        return {"total": total, "items": items}

    def case_timeline(
        self, tenant: str, case_id: str, limit: int = 100, offset: int = 0
    ) -> dict[str, Any] | None:
        """The case's timeline, oldest first, a page at a time."""
        with self.store.reading() as c:
            tables = self._tables(c, "cases")
            if tables is None:
                return None
            doc = self._doc(c, tables[0], "case", tenant, case_id)
            if doc is None or doc["opened_at"] is None:
                return None
            total = self._count(
                c,
                f"SELECT COUNT(*) FROM {tables[1]} WHERE tenant_id=? AND key=?",
                (tenant, case_id),
            )
            entries = self._timeline(c, tables[1], tenant, case_id, limit, offset, False)
        return {"total": total, "limit": limit, "offset": offset, "entries": entries}

    def checksum(self, name: str) -> str:
        return self.store.checksum(name)
