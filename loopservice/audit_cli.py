"""`loopservice audit …`: replay the log and hold the recorded signals to it; what-if a policy.

* `audit replay` re-derives every signal from the interaction log with a fresh engine and
  compares those detected in the window with the signal log (exit 0 identical, 1 different).
* `audit case ID` lists every decision about a case with the policy version and its causes.
* `audit what-if POLICY_FILE` replays under a proposed policy and shows what would change.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from loopservice.domain.policy import Policy, PolicyError, policy_from_mapping
from loopservice.domain.signals import (
    HandoffRuleViolated,
    PatternDetected,
    RiskSignal,
    SlaSignal,
)
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy, load_policy
from loopservice.streams.audit import compare, real_rules, recorded_signals, replay_signals
from loopservice.streams.audit import what_if as run_what_if
from loopservice.streams.explain import EXPLAIN_TOPICS, explain_case
from loopservice.streams.rules import RulesBook

SPLIT_FROM = 100_000  # records: below, starting worker processes costs more than it saves
_DB = click.option(
    "--db",
    type=click.Path(path_type=Path),
    default=None,
    help="Embedded log file [default: from LOOP_LOG_URL].",
)
_ISO = click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"])
_WORKERS = click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Processes folding the accounts' share of the replay (0: one per CPU for a log of "
    f"{SPLIT_FROM:,} records or more, else 1).",
)


def _utc(at: datetime | None) -> datetime | None:
    if at is None:
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _workers(asked: int, records: int) -> int:
    """The replay's worker processes: as asked, or by the log's size and the CPUs there are."""
    if asked:
        return asked
    return _cpus() if records >= SPLIT_FROM else 1


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _path(db: Path | None) -> Path:
    path = db or Settings.from_env().sqlite_path()
    if not path.exists():
        raise click.ClickException(f"no log at {path}")
    return path


class _Progress:
    """A progress bar on stderr over the interaction log's positions."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def __call__(self, n: int) -> None:
        self.bar.update(n)


@click.group()
def audit() -> None:
    """Audit replay, per-case decision trails and what-if policy replays."""


@audit.command("replay")
@click.option("--from", "start_at", type=_ISO, default=None, help="Window start (UTC).")
@click.option("--until", type=_ISO, default=None, help="Window end, exclusive (UTC).")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Differences listed one by one, earliest first (0: all of them).",
)
@_WORKERS
@_DB
def replay_command(
    start_at: datetime | None, until: datetime | None, limit: int, workers: int, db: Path | None
) -> None:
    """Re-derive the signals from the log and compare them with the recorded ones."""
    datastore = open_datastore(_path(db))
    log, signals = interaction_log(datastore), signal_log(datastore)
    start, end = _utc(start_at), _utc(until)
    rules = real_rules(default_policy())
    head = log.head()
    with _Progress(head, "replaying") as progress:
        derived = replay_signals(
            log,
            rules=rules,
            start_at=start,
            until=end,
            progress=progress,
            workers=_workers(workers, head),
        )
    report = compare(recorded_signals(signals.values(), start, end), derived, rules)
    console = Console(highlight=False)
    if report.ok:
        console.print(f"identical: {report.identical} signals")
        return
    differences = report.differences()
    title = (
        f"{report.identical} identical, {len(report.missing)} missing, "
        f"{len(report.extra)} extra, {len(report.changed)} changed"
    )
    shown = differences if limit == 0 else differences[:limit]
    if len(shown) < len(differences):
        counts = Table(title=title)
        for column in ("difference", "signal type", "signals"):
            counts.add_column(column)
        for (kind, kind_of_signal), n in sorted(
            Counter((d.kind, d.signal_type) for d in differences).items()
        ):
            counts.add_row(kind, kind_of_signal, str(n))
        console.print(counts)
        title = f"the first {len(shown)} of {len(differences)} differences"
    table = Table(title=title)
    for column in ("difference", "detected at", "signal", "case", "reason"):
        table.add_column(column)
    for d in shown:
        table.add_row(d.kind, d.detected_at, d.signal_id, d.case_id or "", d.reason)
    console.print(table)
    if len(shown) < len(differences):
        console.print(f"{len(differences) - len(shown)} more: --limit 0 lists them all")
    raise SystemExit(1)


def case_decisions(
    log: SQLiteLog[Any], signals: SQLiteLog[Any], tenant: str, case_id: str
) -> list[dict[str, Any]]:
    """Every decision about a case, in time order: the priority (re-derived by explain), then
    each SLA, handoff, pattern and risk signal with its rule or metric, version and causes."""
    rows: list[dict[str, Any]] = []
    found = explain_case(
        log.values(topics=EXPLAIN_TOPICS),
        tenant,
        case_id,
        RulesBook(default_policy(), policy_from_mapping),
    )
    if found is not None and found.steps:
        rows.append(
            {
                "time": found.steps[0]["at"],
                "kind": "priority",
                "what": f"{found.priority}: {found.priority_rule}",
                "policy_version": found.policy_version,
                "caused_by": found.steps[0]["event_id"],
            }
        )
        for change in found.manual_changes:
            rows.append(
                {
                    "time": change["at"],
                    "kind": "priority",
                    "what": f"{change['priority']}: manual change by {change['by']} "
                    f"({change['reason']})",
                    "policy_version": found.policy_version,
                    "caused_by": "",
                }
            )
    for s in signals.values():
        if s.tenant_id != tenant or s.case_id != case_id:
            continue
        if isinstance(s, SlaSignal):
            kind = "sla"
            what = (
                f"{getattr(s, 'type', '')} {s.metric} cycle {s.cycle} "
                f"due {s.due_at.isoformat()} {s.priority}"
            )
            if pct := getattr(s, "threshold_pct", None):
                what += f" {pct}%"
        elif isinstance(s, HandoffRuleViolated):
            kind, what = "handoff", f"{s.rule}: {s.from_team} → {s.to_team} ({s.detail})"
        elif isinstance(s, PatternDetected):
            kind, what = "pattern", f"{s.pattern} {s.key}" + (f": {s.detail}" if s.detail else "")
        elif isinstance(s, RiskSignal):
            kind, what = "risk", f"{s.previous_level} → {s.level} ({s.score:g})"
        else:  # pragma: no cover - every signal type is handled above
            kind, what = s.type, ""
        rows.append(
            {
                "time": s.detected_at.isoformat(),
                "kind": kind,
                "what": what,
                "policy_version": s.policy_version or "",
                "caused_by": " ".join(s.caused_by),
            }
        )
    rows.sort(key=lambda r: r["time"])
    return rows


@audit.command("case")
@click.argument("case_id")
@click.option("--tenant", default=None, help="Tenant of the case [default: LOOP_DEV_TENANT].")
@click.option("--json", "as_json", is_flag=True, help="Print the decisions as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the decisions as CSV.")
@_DB
def case_command(
    case_id: str, tenant: str | None, as_json: bool, as_csv: bool, db: Path | None
) -> None:
    """Every decision about CASE_ID: priority, SLA, handoff and pattern, with causes."""
    datastore = open_datastore(_path(db))
    tenant = tenant or Settings.from_env().dev_tenant
    rows = case_decisions(interaction_log(datastore), signal_log(datastore), tenant, case_id)
    if not rows:
        raise click.ClickException(f"no case {case_id!r} for tenant {tenant}")
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
        return
    table = Table(title=f"case {case_id} (tenant {tenant})")
    for column in ("time", "kind", "rule / metric", "policy", "caused by"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["time"], r["kind"], r["what"], r["policy_version"], r["caused_by"])
    Console(highlight=False).print(table)


@audit.command("what-if")
@click.argument("policy_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--from", "start_at", type=_ISO, default=None, help="Window start (UTC).")
@click.option("--until", type=_ISO, default=None, help="Window end, exclusive (UTC).")
@_WORKERS
@_DB
def what_if_command(
    policy_file: Path,
    start_at: datetime | None,
    until: datetime | None,
    workers: int,
    db: Path | None,
) -> None:
    """Replay the log as if POLICY_FILE had been in force, and show what would change.

    The proposal replaces every policy for the replay (published versions are ignored); the
    baseline is a replay under the real rules.
    """
    try:
        proposed: Policy = load_policy(policy_file)
    except PolicyError as exc:
        raise click.ClickException(f"{policy_file}: invalid policy\n{exc}") from None
    log = interaction_log(open_datastore(_path(db)))
    head = log.head()
    with _Progress(2 * head, "replaying twice") as progress:
        result = run_what_if(
            log,
            proposed,
            _utc(start_at),
            _utc(until),
            default=default_policy(),
            progress=progress,
            workers=_workers(workers, head),
        )
    console = Console(highlight=False)
    console.print(
        f"[bold]what if policy {result.proposed_version}[/]: "
        f"{result.before_signals} → {result.after_signals} signals"
    )
    table = Table(title="breaches by metric and priority")
    for column in ("metric priority", "now", "proposed", "change"):
        table.add_column(column)
    for key, (b, a) in result.breaches.items():
        table.add_row(key, str(b), str(a), f"{a - b:+d}")
    b, a = result.breaches_total
    table.add_row("total", str(b), str(a), f"{a - b:+d}")
    console.print(table)
    console.print(f"warnings: {result.warnings[0]} → {result.warnings[1]}")
    console.print(
        f"handoff violations: {result.handoff_violations[0]} → {result.handoff_violations[1]}"
    )
    pages = Table(title="alerts that would page, per on-call route")
    for column in ("route", "now", "proposed"):
        pages.add_column(column)
    for route, (b, a) in result.pages.items():
        pages.add_row(route, str(b), str(a))
    console.print(pages)
    console.print(f"cases whose priority changes: {len(result.priorities)}")
    for case, (before, after) in list(result.priorities.items())[:50]:
        console.print(f"  {case}: {before} → {after}")
