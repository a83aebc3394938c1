"""Read functions over the outer-loop views: knowledge, weekly trends, the maturity scorecard.

Each query reads the current version of its views in one read transaction, per tenant; the
ratings and comparisons are computed by the pure functions in `domain/`.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from typing import Any

import orjson

from loopservice.domain import knowledge as kn
from loopservice.domain import maturity as mt
from loopservice.domain import trends as tr
from loopservice.domain.policy import Policy
from loopservice.projections.maturity import maturity_counts
from loopservice.projections.store import ProjectionStore

CO_OCCURRING = 5


class LoopQueries:
    def __init__(
        self,
        store: ProjectionStore,
        policy: Policy,
        thresholds: mt.MaturityThresholds = mt.THRESHOLDS,
    ) -> None:
        self.store = store
        self.policy = policy
        self.thresholds = thresholds

    def _docs(self, c: Any, name: str, kind: str, tenant: str) -> list[Any]:
        c.execute("SELECT version FROM proj_versions WHERE name=?", (name,))
        row = c.fetchone()
        if row is None:
            return []
        docs, _ = self.store.tables(name, int(row[0]))
        c.execute(
            f"SELECT doc FROM {docs} WHERE kind=? AND tenant_id=? ORDER BY sort, key",
            (kind, tenant),
        )
        return [orjson.loads(r[0]) for r in c.fetchall()]

    # --- knowledge -------------------------------------------------------------------------

    def knowledge(self, tenant: str, limit: int = 20) -> dict[str, Any]:
        """Candidates (biggest saving first), articles with their use, deflection, coverage."""
        with self.store.reading() as c:
            groups = self._docs(c, "knowledge", "group", tenant)
            articles = self._docs(c, "knowledge", "article", tenant)
            found = self._docs(c, "knowledge", "summary", tenant)
        summary = found[0] if found else None
        rows = []
        for g in groups:
            rows.append({
                "topic": g["topic"], "resolution_code": g["resolution_code"],
                "summary": g["summary"], "resolutions": g["resolutions"],
                "candidate_since": g["candidate_since"], "covered_by": g["covered_by"],
                "covered_resolutions": g["covered_resolutions"], "last_at": g["last_at"],
                "would_save": kn.would_save(g),
            })  # fmt: skip
        rows.sort(
            key=lambda r: (-r["would_save"]["handling_hours_in_window"], -r["resolutions"],
                           r["topic"], r["resolution_code"], r["summary"])
        )  # fmt: skip
        candidates = [r for r in rows if r["candidate_since"] is not None]
        uncovered = [r for r in candidates if not r["covered_by"]]
        articles.sort(key=lambda a: (-a["used_in_resolutions"] - a["deflected"], a["article_id"]))
        sessions = (summary or {}).get("sessions", {})
        return {
            "policy": self.policy.knowledge.model_dump(),
            "resolutions": (summary or {}).get("resolutions", 0),
            "covered_resolutions": (summary or {}).get("covered_resolutions", 0),
            "coverage": kn.rate(
                (summary or {}).get("covered_resolutions", 0), (summary or {}).get("resolutions", 0)
            ),
            "sessions": sessions,
            "deflection_rate": kn.rate(sessions.get("deflected", 0), sessions.get("settled", 0)),
            "deflection_by_topic": {
                t: {**v, "rate": kn.rate(v["deflected"], v["settled"])}
                for t, v in sorted((summary or {}).get("topics", {}).items())
            },
            "groups": len(rows),
            "candidates": candidates[:limit],
            "candidates_total": len(candidates),
            "uncovered_candidates": len(uncovered),
            "articles": [
                {
                    k: a[k]
                    for k in (
                        "article_id",
                        "title",
                        "topic",
                        "resolution_code",
                        "published_at",
                        "views",
                        "used_in_resolutions",
                        "sessions",
                        "deflected",
                        "became_case",
                    )
                }
                | {"deflection_rate": kn.rate(a["deflected"], a["sessions"])}
                for a in articles[:limit]
            ],
            "articles_total": len(articles),
        }

    # --- trends ----------------------------------------------------------------------------

    def trends(
        self, tenant: str, dimension: str = "topic", weeks: int = 8, week: str | None = None
    ) -> dict[str, Any]:
        """Weekly metrics per value of `dimension`, rising topics in `week` (default: the
        latest week with data) with their co-occurring signals, and improvement effects."""
        if dimension not in tr.DIMENSIONS:
            raise ValueError(f"dimension must be one of {', '.join(tr.DIMENSIONS)}")
        with self.store.reading() as c:
            buckets = self._docs(c, "trends", "week", tenant)
            improvements = self._docs(c, "trends", "improvement", tenant)
        by: dict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
        for b in buckets:
            by[(b["dimension"], b["value"])][b["week"]] = b
        weeks_with_data = sorted({b["week"] for b in buckets if b["opened"]})
        last = weeks_with_data[-1] if weeks_with_data else None
        current = tr.week_of(date.fromisoformat(week)) if week else last
        shown = [tr.shift_week(current, -k) for k in range(weeks - 1, -1, -1)] if current else []
        series = []
        for (dim, value), per_week in sorted(by.items()):
            if dim != dimension:
                continue
            empty = tr.new_bucket(dim, value, "")
            points = [{"week": w, **tr.metrics(per_week.get(w, empty))} for w in shown]
            if any(p["volume"] for p in points):
                series.append({"value": value, "weeks": points})
        volumes = {
            value: {w: b["opened"] for w, b in per_week.items()}
            for (dim, value), per_week in by.items()
            if dim == "topic"
        }
        top = (
            tr.rising(volumes, current, self.policy.outer_loop.baseline_weeks, weeks_with_data[0])
            if current and weeks_with_data
            else []
        )
        for r in top:
            signals = by[("topic", r["topic"])].get(r["week"], {}).get("signals", {})
            r["signals"] = [
                {"signal": label, "count": n}
                for label, n in sorted(signals.items(), key=lambda kv: (-kv[1], kv[0]))
            ][:CO_OCCURRING]
        effects = []
        for imp in improvements:
            dim, value = ("topic", imp["topic"]) if imp["topic"] else ("area", imp["product_area"])
            measured = tr.effect(
                by.get((dim, value), {}), date.fromisoformat(imp["effective_date"]),
                imp["effect_weeks"], last,
            )  # fmt: skip
            effects.append({**imp, "measured_on": {"dimension": dim, "value": value}, **measured})
        return {
            "dimension": dimension,
            "week": current,
            "weeks": shown,
            "series": series,
            "rising": top,
            "improvements": effects,
        }

    # --- maturity --------------------------------------------------------------------------

    def maturity(self, tenant: str) -> dict[str, Any]:
        """The four stages rated from the maturity and knowledge views."""
        with self.store.reading() as c:
            found = self._docs(c, "maturity", "summary", tenant)
            knowledge = self._docs(c, "knowledge", "summary", tenant)
        counts = maturity_counts(found[0] if found else None, knowledge[0] if knowledge else None)
        card = mt.score(counts, self.thresholds)
        card["thresholds"] = self.thresholds.model_dump()
        return card
