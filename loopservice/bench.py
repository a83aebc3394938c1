"""`loopservice bench …`: benchmarks that print numbers, each beside the limit it is judged by."""

from __future__ import annotations

import gc
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loopservice.domain.events import EVENT_ADAPTER, Event
from loopservice.infra.sqlite_log import interaction_log, open_datastore

console = Console(stderr=True)


@click.group()
def bench() -> None:
    """Benchmarks: each prints events/s beside the machine's own limit."""


def sample_events(n: int) -> list[Event]:
    """A realistic mix of case traffic: opened, messages, replies, notes, resolutions."""
    t0 = datetime(2026, 1, 5, 9, tzinfo=UTC)
    kinds = ["case.opened", "case.customer_message", "case.agent_replied", "case.note_added",
             "case.customer_message", "case.agent_replied", "case.resolved"]  # fmt: skip
    out: list[Event] = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        case = f"case-{i // len(kinds)}"
        raw: dict[str, object] = {
            "event_id": f"bench-{i}",
            "type": kind,
            "occurred_at": (t0 + timedelta(seconds=i)).isoformat(),
            "tenant_id": "acme",
            "account_id": f"acct-{(i // len(kinds)) % 5000}",
            "case_id": case,
            "source": {"platform": "zendesk", "channel": "email"},
            "actor": {
                "kind": "agent" if "agent" in kind or "note" in kind else "customer",
                "id": "u-1",
                "team": "support",
            },
        }
        if kind == "case.opened":
            raw |= {"subject": "Cannot export report", "topic": "export", "impact": "high",
                    "urgency": "medium"}  # fmt: skip
        elif kind == "case.resolved":
            raw |= {"resolution_code": "export-timeout", "summary": "raised the timeout"}
        else:
            raw["body"] = "Hello, the export still times out after ten minutes."
        out.append(EVENT_ADAPTER.validate_python(raw))
    return out


@contextmanager
def _timed() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    elapsed: list[float] = []
    yield lambda: elapsed[0] if elapsed else time.perf_counter() - start
    elapsed.append(time.perf_counter() - start)


def raw_sqlite_rates(payloads: list[bytes], path: Path, batch: int) -> tuple[float, float]:
    """Plain sqlite3 in WAL mode, the same synchronous setting: inserts/s, reads+JSON-decode/s."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE raw (id TEXT PRIMARY KEY, body BLOB)")
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO raw VALUES (?, ?)",
            ((f"r{i + j}", p) for j, p in enumerate(payloads[i : i + batch])),
        )
        db.execute("COMMIT")
    insert_rate = len(payloads) / (time.perf_counter() - start)
    start = time.perf_counter()
    n = 0
    last = 0
    while True:
        rows = db.execute(
            "SELECT rowid, body FROM raw WHERE rowid > ? ORDER BY rowid LIMIT 5000", (last,)
        ).fetchall()
        if not rows:
            break
        for _, body in rows:
            orjson.loads(body)
        n += len(rows)
        last = rows[-1][0]
    read_rate = n / (time.perf_counter() - start)
    db.close()
    return insert_rate, read_rate


@bench.command("log")
@click.option("--events", "-n", default=1_000_000, show_default=True, help="Events to append.")
@click.option("--batch", default=1000, show_default=True, help="Events per append call.")
def bench_log(events: int, batch: int) -> None:
    """Append EVENTS to the embedded log in batches, then read and decode them back.

    Prints events/s for both, with raw sqlite3 insert and read+JSON-decode rates measured in
    the same run as the limit.
    """
    console.print(f"building {events:,} sample events…")
    sample = sample_events(events)
    payloads = [e.model_dump_json().encode() for e in sample]
    gc.freeze()  # the sample is long-lived: keep the collector from rescanning it
    with tempfile.TemporaryDirectory() as tmp:
        raw_insert, raw_read = raw_sqlite_rates(payloads, Path(tmp) / "raw.db", batch)
        del payloads
        log = interaction_log(open_datastore(Path(tmp) / "log.db"))
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("append", total=events)
            start = time.perf_counter()
            for i in range(0, events, batch):
                log.append(sample[i : i + batch])
                progress.advance(task, batch)
            append_rate = events / (time.perf_counter() - start)
            task = progress.add_task("read + decode", total=events)
            start = time.perf_counter()
            position, n = 1, 0
            while records := log.read(position, 5000):
                position = records[-1].position + 1
                n += len(records)
                progress.advance(task, len(records))
                del records  # a consumer folds records and lets them go
            read_rate = n / (time.perf_counter() - start)
    table = Table(title=f"embedded log, {events:,} events, batches of {batch}")
    for col in ("measure", "events/s", "raw sqlite3 limit", "share of limit"):
        table.add_column(col, justify="right")
    table.add_row("append", f"{append_rate:,.0f}", f"{raw_insert:,.0f}",
                  f"{append_rate / raw_insert:.0%}")  # fmt: skip
    table.add_row("read + decode", f"{read_rate:,.0f}", f"{raw_read:,.0f}",
                  f"{read_rate / raw_read:.0%}")  # fmt: skip
    Console().print(table)
