"""`loopservice knowledge`, `loopservice trends` and `loopservice maturity`: the outer loop.

Each command first folds the log into its views up to the current heads (the projections
are tracked, so this only reads what is new), then prints rich tables, or JSON with `--json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from loopservice.ingest_cli import _DB_HELP, _db_path
from loopservice.policy_cli import default_policy
from loopservice.projections.loop_queries import LoopQueries
from loopservice.projections.runner import ProjectionRunner
from loopservice.projections_cli import open_runner

out = Console()


def _queries(db: Path | None, names: tuple[str, ...]) -> LoopQueries:
    path = _db_path(db)
    if not path.exists():
        raise click.UsageError(f"no database at {path}")
    runner = open_runner(path)
    catch_up(runner, names)
    return LoopQueries(runner.store, default_policy())


def catch_up(runner: ProjectionRunner, names: tuple[str, ...]) -> None:
    heads = runner.heads()
    for name in names:
        while runner.step(name, heads).scanned:
            pass


def _tenant(tenant: str | None) -> str:
    return tenant or os.environ.get("LOOP_DEV_TENANT", "acme")


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")(f)
    f = click.option("--tenant", help="Tenant to report on (default: LOOP_DEV_TENANT or acme).")(f)
    return click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)(f)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@click.command("knowledge")
@click.option("--limit", default=20, show_default=True, help="Rows per table.")
@_options
def knowledge_command(db: Path | None, tenant: str | None, as_json: bool, limit: int) -> None:
    """Knowledge candidates from repeated resolutions, articles and self-service deflection."""
    found = _queries(db, ("knowledge",)).knowledge(_tenant(tenant), limit)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    rules = found["policy"]
    table = Table(
        title=f"knowledge candidates ({found['candidates_total']}, "
        f"{found['uncovered_candidates']} without an article; "
        f"{rules['min_repeats']}× within {rules['window_days']:g} days)"
    )
    for column in ("topic", "code", "summary", "resolutions", "in window", "hours in window",
                   "since", "articles"):  # fmt: skip
        table.add_column(column)
    for c in found["candidates"]:
        save = c["would_save"]
        table.add_row(
            c["topic"], c["resolution_code"], c["summary"] or "-", str(c["resolutions"]),
            str(save["cases_in_window"]), _num(save["handling_hours_in_window"], 1),
            c["candidate_since"][:10], str(len(c["covered_by"])),
        )  # fmt: skip
    out.print(table)
    articles = Table(title=f"articles ({found['articles_total']})")
    for column in ("article", "topic", "code", "views", "used in resolutions", "sessions",
                   "deflected", "deflection"):  # fmt: skip
        articles.add_column(column)
    for a in found["articles"]:
        articles.add_row(
            a["article_id"], a["topic"] or "-", a["resolution_code"] or "-", str(a["views"]),
            str(a["used_in_resolutions"]), str(a["sessions"]), str(a["deflected"]),
            _pct(a["deflection_rate"]),
        )  # fmt: skip
    out.print(articles)
    s = found["sessions"]
    out.print(
        f"resolutions covered by knowledge: {found['covered_resolutions']:,} of "
        f"{found['resolutions']:,} ({_pct(found['coverage'])}); self-service sessions settled: "
        f"{s.get('settled', 0):,}, deflected {s.get('deflected', 0):,} "
        f"({_pct(found['deflection_rate'])}), became a case {s.get('became_case', 0):,}"
    )


@click.command("trends")
@click.option(
    "--by", "dimension", type=click.Choice(["topic", "area", "channel"]), default="topic",
    show_default=True, help="What to break the weekly metrics down by.",
)  # fmt: skip
@click.option("--weeks", default=8, show_default=True, help="Weeks to show.")
@click.option("--week", help="The week (any date in it) to rank rising topics in; default latest.")
@_options
def trends_command(
    db: Path | None, tenant: str | None, as_json: bool, dimension: str, weeks: int,
    week: str | None,
) -> None:  # fmt: skip
    """Weekly volume, CSAT, breach and reopen rates; rising topics; improvement effects."""
    found = _queries(db, ("trends",)).trends(_tenant(tenant), dimension, weeks, week)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table(title=f"weekly volume by {dimension} (CSAT / breach rate / reopen rate)")
    table.add_column(dimension)
    for w in found["weeks"]:
        table.add_column(w[5:], justify="right")
    for s in found["series"]:
        table.add_row(
            s["value"],
            *(
                f"{p['volume']:g}\n{_num(p['csat'], 1)} {_pct(p['breach_rate'])} "
                f"{_pct(p['reopen_rate'])}"
                for p in s["weeks"]
            ),
        )
    out.print(table)
    rising = Table(title=f"fastest-rising topics, week of {found['week']}")
    for column in ("topic", "volume", "baseline", "rise", "co-occurring signals"):
        rising.add_column(column)
    for r in found["rising"]:
        signals = ", ".join(f"{s['signal']} ×{s['count']:g}" for s in r["signals"]) or "-"
        rising.add_row(r["topic"], str(r["volume"]), f"{r['baseline']:g}", f"+{r['rise']:g}",
                       signals)  # fmt: skip
    out.print(rising)
    if found["improvements"]:
        effects = Table(title="improvements: before → after (change)")
        for column in ("improvement", "on", "effective", "volume/week", "CSAT", "breach rate",
                       "reopen rate"):  # fmt: skip
            effects.add_column(column)
        for i in found["improvements"]:
            b, a, ch = i["before"], i["after"], i["change"]
            cells = [
                f"{_num(b[k])} → {_num(a[k])} ({_num(ch[k])})"
                for k in ("volume", "csat", "breach_rate", "reopen_rate")
            ]
            where = f"{i['measured_on']['dimension']} {i['measured_on']['value']}"
            complete = "" if i["complete"] else " (partial)"
            effects.add_row(f"{i['improvement_id']}: {i['description'][:40]}", where,
                            i["effective_date"] + complete, *cells)  # fmt: skip
        out.print(effects)


_STYLE = {"reactive": "red", "coordinated": "yellow", "predictive": "green"}


@click.command("maturity")
@_options
def maturity_command(db: Path | None, tenant: str | None, as_json: bool) -> None:
    """The loop maturity scorecard: Standardize, Contextualize, Anticipate, Scale."""
    found = _queries(db, ("maturity", "knowledge")).maturity(_tenant(tenant))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    table = Table(title="loop maturity")
    for column in ("stage", "rating", "metric", "value", "n", "coordinated at", "predictive at",
                   "metric rating"):  # fmt: skip
        table.add_column(column)
    for stage in found["stages"]:
        rating = stage["rating"] + ("" if stage["measured"] else " (no data)")
        for i, m in enumerate(stage["metrics"]):
            hours = m["metric"].endswith("_hours")
            show = _num if hours else _pct
            better = "≥" if m["higher_is_better"] else "≤"
            table.add_row(
                stage["stage"] if i == 0 else "",
                f"[{_STYLE[stage['rating']]}]{rating}[/]" if i == 0 else "",
                m["metric"], show(m["value"]), str(m["n"]),
                f"{better} {show(m['coordinated_at'])}", f"{better} {show(m['predictive_at'])}",
                m["rating"] or "not rated",
            )  # fmt: skip
    out.print(table)
