"""`loopservice alerts list` and `loopservice alerts ack ID`: on-call alerts in the embedded log.

`ack` appends an `alert.acknowledged` event to the log (the log stays the source of truth; a
running engine folds it) and records it in the outbox's ack table at once, so escalation
stops even before the engine has read it.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from loopservice.infra.alerts import Alert, Outbox, ack_event
from loopservice.infra.sqlite_log import interaction_log, open_datastore
from loopservice.ingest_cli import _DB_HELP, _db_path
from loopservice.policy_cli import default_policy
from loopservice.streams.clock import WallClock


def _open(db: Path | None) -> tuple[Path, Outbox]:
    path = _db_path(db)
    if not path.exists():
        raise click.UsageError(f"no database at {path}")
    policy = default_policy()
    return path, Outbox(open_datastore(path), lambda _: policy, WallClock())


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _routes(alert: Alert) -> str:
    parts = []
    for d in alert.deliveries:
        level = f" ↑{d.escalation_level}" if d.escalation_level else ""
        error = f" ({d.last_error})" if d.last_error and d.status != "delivered" else ""
        parts.append(f"{d.route}{level}: {d.status} ×{d.attempts}{error}")
    return "\n".join(parts)


@click.group("alerts")
def alerts() -> None:
    """On-call alerts: what was sent where, and acknowledgements."""


@alerts.command("list")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
@click.option("--tenant", help="Only this tenant's alerts.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
def list_command(db: Path | None, tenant: str | None, limit: int) -> None:
    """List the newest alerts with their delivery per route and acknowledgement."""
    _, outbox = _open(db)
    found = outbox.alerts(tenant, limit)
    table = Table(title=f"alerts ({len(found)})")
    for column in ("alert id", "type", "tenant/case", "due (UTC)", "routes", "acked"):
        table.add_column(column, overflow="fold")
    for a in found:
        where = f"{a.tenant_id}/{a.signal.get('case_id') or a.signal.get('account_id')}"
        acked = "-" if a.ack is None else f"{_when(a.ack.acked_at)} {a.ack.note}".strip()
        table.add_row(a.alert_id, a.signal_type, where, _when(a.due_at), _routes(a), acked)
    Console(width=200).print(table)


@alerts.command("ack")
@click.argument("alert_id")
@click.option("--note", default="", help="Why, or what is being done.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
def ack_command(alert_id: str, note: str, db: Path | None) -> None:
    """Acknowledge an alert (recorded as an alert.acknowledged event); stops its escalation."""
    path, outbox = _open(db)
    alert = outbox.alert(alert_id)
    if alert is None:
        raise click.UsageError(f"no alert {alert_id!r}")
    clock = WallClock()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    event = ack_event(alert, note, f"cli:{user}", clock.now())
    [appended] = interaction_log(open_datastore(path), clock).append([event])
    if appended.duplicate:
        click.echo(f"{alert_id} was already acknowledged (event {event.event_id})")
        return
    outbox.record_ack(event)
    click.echo(f"acknowledged {alert_id} (event {event.event_id} at position {appended.position})")
