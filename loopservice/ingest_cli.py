"""`loopservice ingest` and `loopservice dead-letters`: bulk import into the embedded log.

The import is per event (see `streams.ingest`): valid lines are appended in batches, invalid
ones (bad JSON, failed validation, from the future) go to the dead-letter store with stage
`ingest`, duplicates are counted. Progress and the summary go to the terminal; message bodies
never do.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from datetime import UTC
from pathlib import Path
from typing import BinaryIO

import click
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from loopservice.infra.dead_letters import DeadLetterStore
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import interaction_log, open_datastore
from loopservice.streams.clock import WallClock
from loopservice.streams.ingest import FieldError, IngestService, Outcome, Rejection

_DB_HELP = "SQLite log file (default: the path of LOOP_LOG_URL, sqlite:///var/loop.db)."


def _db_path(db: Path | None) -> Path:
    if db is not None:
        return db
    try:
        return Settings.from_env().sqlite_path()
    except ValueError as exc:
        raise click.UsageError(f"{exc}; pass --db PATH") from None


class _Tally:
    def __init__(self) -> None:
        self.lines = 0
        self.accepted = 0
        self.duplicates = 0
        self.rejected = 0
        self.reasons: Counter[str] = Counter()

    def add(self, outcome: Outcome) -> None:
        self.accepted += outcome.appended
        self.duplicates += outcome.duplicates
        self.rejected += len(outcome.rejections)
        for rejection in outcome.rejections:
            for error in rejection.errors:
                reason = re.sub(r"in the future by \d+ s", "in the future", error.reason)
                self.reasons[f"{error.field}: {reason}" if error.field else reason] += 1


def _progress(console: Console, total: int | None) -> Progress:
    columns: tuple[ProgressColumn, ...]
    if total is not None:
        columns = (
            TextColumn("ingest"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[lines]} lines"),
        )
    else:
        columns = (
            TextColumn("ingest"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("lines"),
            TimeElapsedColumn(),
        )
    return Progress(*columns, console=console, transient=False)


def _size_of(stream: BinaryIO) -> int | None:
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return info.st_size if info.st_size > 0 and os.path.isfile(stream.name) else None


@click.command("ingest")
@click.argument("source", type=click.File("rb"), metavar="FILE|-")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Events appended per transaction (each one durable before the next).",
)
def ingest_command(source: BinaryIO, db: Path | None, batch_size: int) -> None:
    """Append NDJSON events from FILE (or stdin with -) to the embedded log.

    Valid events are appended; invalid lines are counted and kept in the dead-letter store
    (see `loopservice dead-letters`); an event id already on the log counts as a duplicate.
    """
    settings = Settings.from_env()
    datastore = open_datastore(_db_path(db))
    clock = WallClock()
    service = IngestService(
        interaction_log(datastore, clock),
        clock,
        settings.clock_skew_tolerance,
        DeadLetterStore(datastore, clock),
    )
    err = Console(stderr=True)
    tally = _Tally()
    total = _size_of(source)

    items: list[object] = []
    numbers: list[int] = []
    unreadable: list[Rejection] = []

    def flush() -> None:
        outcome = service.submit_each(items, numbers)
        service.reject(unreadable)
        outcome.rejections.extend(unreadable)
        tally.add(outcome)
        items.clear()
        numbers.clear()
        unreadable.clear()

    with _progress(err, total) as progress:
        task = progress.add_task("ingest", total=total, lines=0)
        for number, line in enumerate(source, start=1):
            tally.lines = number
            if line.strip():
                try:
                    items.append(orjson.loads(line))
                    numbers.append(number)
                except orjson.JSONDecodeError as exc:
                    text = line.decode("utf-8", errors="replace").rstrip("\n")
                    error = FieldError("", f"invalid JSON: {exc.msg}")
                    unreadable.append(Rejection(number, None, (error,), text))
            if len(items) + len(unreadable) >= batch_size:
                flush()
                progress.update(task, completed=_done(source, number, total), lines=number)
        flush()
        progress.update(task, completed=_done(source, tally.lines, total), lines=tally.lines)

    _summary(Console(), tally)


def _done(source: BinaryIO, lines: int, total: int | None) -> int:
    return source.tell() if total is not None else lines


def _summary(console: Console, tally: _Tally) -> None:
    table = Table(title="ingest summary")
    table.add_column("result")
    table.add_column("events", justify="right")
    table.add_row("accepted", str(tally.accepted))
    table.add_row("duplicates", str(tally.duplicates))
    table.add_row("rejected", str(tally.rejected))
    console.print(table)
    if tally.reasons:
        reasons = Table(title="top rejection reasons")
        reasons.add_column("field: reason")
        reasons.add_column("count", justify="right")
        for reason, count in tally.reasons.most_common(10):
            reasons.add_row(reason, str(count))
        console.print(reasons)
        console.print("Rejected lines are in the dead-letter store: loopservice dead-letters")


@click.command("dead-letters")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--stage", help='Only this stage: "ingest" or a processor name.')
def dead_letters_command(db: Path | None, limit: int, stage: str | None) -> None:
    """List the newest dead letters (records that could not be ingested or processed)."""
    path = _db_path(db)
    if not path.exists():
        raise click.UsageError(f"no database at {path}")
    store = DeadLetterStore(open_datastore(path))
    letters = store.list(limit, stage)
    console = Console()
    table = Table(title=f"dead letters ({len(letters)} of {store.count(stage)})")
    for column in ("id", "recorded at (UTC)", "stage", "event id", "position", "reason"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        table.add_row(
            str(letter.id),
            letter.recorded_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            letter.stage,
            letter.event_id or "-",
            "-" if letter.position is None else str(letter.position),
            letter.reason,
        )
    console.print(table)
