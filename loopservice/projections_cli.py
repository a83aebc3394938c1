"""`loopservice projections rebuild [NAME]` and `loopservice projections status`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.ingest_cli import _DB_HELP, _db_path
from loopservice.policy_cli import default_policy
from loopservice.projections.runner import ProjectionRunner, default_folds
from loopservice.projections.store import open_projection_store

console = Console(stderr=True)


def open_runner(path: Path) -> ProjectionRunner:
    datastore = open_datastore(path)
    return ProjectionRunner(
        open_projection_store(Settings.from_env().projections_url, datastore),
        interaction_log(datastore),
        signal_log(datastore),
        default_folds(default_policy()),
    )


def _open(db: Path | None) -> ProjectionRunner:
    path = _db_path(db)
    if not path.exists():
        raise click.UsageError(f"no database at {path}")
    return open_runner(path)


@click.group("projections")
def projections() -> None:
    """Read models folded from the log: customer context and cases."""


@projections.command("rebuild")
@click.argument("name", required=False)
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
def rebuild_command(name: str | None, db: Path | None) -> None:
    """Rebuild NAME (default: every projection) from position 1 beside the current version,
    then switch reads over in one transaction."""
    runner = _open(db)
    names = [name] if name else list(runner.factories)
    unknown = [n for n in names if n not in runner.factories]
    if unknown:
        raise click.BadParameter(
            f"unknown projection {unknown[0]!r}; known: {', '.join(runner.factories)}"
        )
    heads = runner.heads()
    for n in names:
        with Progress(
            TextColumn(f"rebuild {n}"),
            BarColumn(),
            TaskProgressColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(n, total=sum(heads.values()))

            def advance(k: int, task: TaskID = task, progress: Progress = progress) -> None:
                progress.advance(task, k)

            result = runner.rebuild(n, advance)
        click.echo(
            f"{n}: v{result.version}, {result.events:,} log records in {result.seconds:.2f} s "
            f"({result.rate:,.0f} events/s), checksum {result.checksum}"
        )


@projections.command("status")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
def status_command(db: Path | None) -> None:
    """Tracked positions of every projection against the log heads."""
    runner = _open(db)
    heads = runner.heads()
    table = Table(title="projections")
    for column in ("projection", "version", "interactions", "signals", "behind"):
        table.add_column(column)
    for name in runner.factories:
        version = runner.store.current_version(name)
        positions = runner.positions(name)
        behind = sum(heads[log] - positions[log] for log in heads)
        table.add_row(
            name,
            "-" if version is None else f"v{version}",
            f"{positions['interactions']:,} / {heads['interactions']:,}",
            f"{positions['signals']:,} / {heads['signals']:,}",
            f"{behind:,}",
        )
    Console().print(table)
