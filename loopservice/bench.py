"""`loopservice bench …`: benchmarks that print numbers, each beside the limit it is judged by."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import click
import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from loopservice.bench_alerts import measure_delivery
from loopservice.bench_kafka import bench_kafka
from loopservice.bench_projections import bench_projections
from loopservice.bench_replay import bench_replay
from loopservice.domain.events import EVENT_ADAPTER, Event
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore
from loopservice.policy_cli import default_policy
from loopservice.streams.processors import SlaProcessor
from loopservice.streams.rules import RulesBook

console = Console(stderr=True)


@click.group()
def bench() -> None:
    """Benchmarks: each prints events/s beside the machine's own limit."""


bench.add_command(bench_projections)
bench.add_command(bench_kafka)
bench.add_command(bench_replay)


def sample_events(n: int) -> list[Event]:
    """A realistic mix of case traffic: opened, messages, replies, notes, resolutions."""
    t0 = datetime(2026, 1, 5, 9, tzinfo=UTC)
    kinds = [
        "case.opened",
        "case.customer_message",
        "case.agent_replied",
        "case.note_added",
        "case.customer_message",
        "case.agent_replied",
        "case.resolved",
    ]
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
            raw |= {
                "subject": "Cannot export report",
                "topic": "export",
                "impact": "high",
                "urgency": "medium",
            }
        elif kind == "case.resolved":
            raw |= {"resolution_code": "export-timeout", "summary": "raised the timeout"}
        else:
            raw["body"] = "Hello, the export still times out after ten minutes."
        out.append(EVENT_ADAPTER.validate_python(raw))
    return out


class Rates(NamedTuple):
    """Rows per second of wall-clock time and per second of this process's CPU time: on a
    machine shared with other work the first counts the wait for a core too."""

    wall: float
    cpu: float


def raw_sqlite_rates(payloads: list[bytes], path: Path, batch: int) -> tuple[Rates, Rates, Rates]:
    """Plain sqlite3 in WAL mode, the same synchronous setting: inserts/s, reads+JSON-decode/s,
    and reads+JSON-decode/s keeping each batch's decoded rows until the next read."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE raw (id TEXT PRIMARY KEY, body BLOB)")
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(payloads), batch):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO raw VALUES (?, ?)",
            ((f"r{i + j}", p) for j, p in enumerate(payloads[i : i + batch])),
        )
        db.execute("COMMIT")
    n = len(payloads)
    insert_rate = Rates(n / (time.perf_counter() - start), n / (time.process_time() - cpu))
    read_rates = _raw_read_rates(db, keep=False)
    kept_rates = _raw_read_rates(db, keep=True)
    db.close()
    return insert_rate, read_rates, kept_rates


def _raw_read_rates(db: sqlite3.Connection, *, keep: bool) -> Rates:
    """Rows read in batches of 5000 and decoded with orjson. Without `keep` each decoded row
    is dropped at once, so its memory is reused while still in the CPU cache and the collector
    never runs; a reader that hands back a decoded batch (as `Log.read` does) holds it."""
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    last = 0
    while True:
        rows = db.execute(
            "SELECT rowid, body FROM raw WHERE rowid > ? ORDER BY rowid LIMIT 5000", (last,)
        ).fetchall()
        if not rows:
            break
        if keep:
            decoded = [orjson.loads(body) for _, body in rows]
            del decoded
        else:
            for _, body in rows:
                orjson.loads(body)
        n += len(rows)
        last = rows[-1][0]
    return Rates(n / (time.perf_counter() - start), n / (time.process_time() - cpu))


def _log_append_rates(log: SQLiteLog[Event], sample: list[Event], batch: int) -> Rates:
    """Events appended to the log in batches, as the raw inserts are."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(sample), batch):
        log.append(sample[i : i + batch])
    n = len(sample)
    return Rates(n / (time.perf_counter() - start), n / (time.process_time() - cpu))


def _log_read_rates(log: SQLiteLog[Event]) -> Rates:
    """Events read and decoded from the log, in batches of 5000 as the raw reads."""
    start, cpu = time.perf_counter(), time.process_time()
    position, n = 1, 0
    while records := log.read(position, 5000):
        position = records[-1].position + 1
        n += len(records)
        del records  # a consumer folds records and lets them go
    return Rates(n / (time.perf_counter() - start), n / (time.process_time() - cpu))


@bench.command("log")
@click.option("--events", "-n", default=1_000_000, show_default=True, help="Events to append.")
@click.option("--batch", default=1000, show_default=True, help="Events per append call.")
def bench_log(events: int, batch: int) -> None:
    """Append EVENTS to the embedded log in batches, then read and decode them back.

    Prints events/s for both, with raw sqlite3 insert and read+JSON-decode rates measured in
    the same run as the limit; both also per CPU second of this process.
    """
    console.print(f"building {events:,} sample events…")
    sample = sample_events(events)
    payloads = [e.model_dump_json().encode() for e in sample]
    gc.freeze()  # the sample is long-lived: keep the collector from rescanning it
    with tempfile.TemporaryDirectory() as tmp:
        raw_insert, raw_read, raw_read_kept = raw_sqlite_rates(
            payloads, Path(tmp) / "raw.db", batch
        )
        # `payloads` is kept until both reads are done: freeing a million objects here left
        # the heap full of holes that the log's read then allocated into, ~10 % slower than
        # the raw read it is compared with, which ran before they were freed.
        log = interaction_log(open_datastore(Path(tmp) / "log.db"))
        # Both timed without a live display, as the raw inserts and reads are: its refresh
        # thread would count (it cost the timed read 2-5 % of its CPU).
        console.print("appending…")
        append = _log_append_rates(log, sample, batch)
        console.print("reading back…")
        read = _log_read_rates(log)
    table = Table(title=f"embedded log, {events:,} events, batches of {batch}")
    for col in ("measure", "events/s", "raw sqlite3 limit", "share of limit"):
        table.add_column(col, justify="right")
    for label, ours, raw in (
        ("append", append, raw_insert),
        ("read + decode", read, raw_read),
        ("read + decode *", read, raw_read_kept),
    ):
        for clock, rate, limit in (("", ours.wall, raw.wall), (" (CPU)", ours.cpu, raw.cpu)):
            table.add_row(label + clock, f"{rate:,.0f}", f"{limit:,.0f}", f"{rate / limit:.0%}")
    table.caption = (
        "* against raw reads that keep each decoded batch until the next read, as a reader "
        "returning its batch must (the limit above drops each decoded row at once). "
        "(CPU): per second of this process's CPU time, which leaves out the wait for a core "
        "while other work shares the machine (and, for inserts, the wait for the disk)"
    )
    Console().print(table)


def _case_events(n_cases: int, t0: datetime) -> list[Event]:
    """n_cases opened by customers, then a reply, a customer message and a resolution each."""
    opened: list[Event] = []
    follow: list[Event] = []
    impacts = ["low", "medium", "high", "critical"]
    for i in range(n_cases):
        at = t0 + timedelta(seconds=i % 86_400)
        base: dict[str, object] = {
            "tenant_id": "acme",
            "account_id": f"acct-{i % 20_000}",
            "case_id": f"case-{i}",
            "source": {"platform": "zendesk", "channel": "email"},
        }
        customer = {"kind": "customer", "id": f"u-{i}"}
        agent = {"kind": "agent", "id": "ag-1", "team": "support"}
        opened.append(
            EVENT_ADAPTER.validate_python(
                base
                | {
                    "event_id": f"o-{i}",
                    "type": "case.opened",
                    "occurred_at": at,
                    "actor": customer,
                    "subject": "Export fails",
                    "topic": "export",
                    "impact": impacts[i % 4],
                    "urgency": impacts[(i // 4) % 4],
                }
            )
        )
        for k, (kind, who, extra) in enumerate(
            [
                ("case.agent_replied", agent, {}),
                ("case.customer_message", customer, {}),
                ("case.resolved", agent, {"resolution_code": "export-timeout"}),
            ]
        ):
            follow.append(
                EVENT_ADAPTER.validate_python(
                    base
                    | {
                        "event_id": f"f{k}-{i}",
                        "type": kind,
                        "actor": who,
                        "occurred_at": at + timedelta(hours=2 + k),
                    }
                    | extra
                )
            )
    return opened + follow


@bench.command("sla")
@click.option("--clocks", default=1_000_000, show_default=True, help="Open SLA clocks to hold.")
@click.option(
    "--events",
    "n_events",
    default=400_000,
    show_default=True,
    help="Events to push through the SLA processor for the rate.",
)
@click.option(
    "--deliveries",
    default=10_000,
    show_default=True,
    help="Breach alerts delivered in signed batches to a local webhook receiver (0: skip).",
)
@click.option(
    "--window",
    default=60.0,
    show_default=True,
    help="Seconds over which the alerts' deadlines fall due (0: all at once).",
)
def bench_sla(clocks: int, n_events: int, deliveries: int, window: float) -> None:
    """Memory per open SLA clock, and events/s through the SLA processor (one core).

    Uses the shipped default policy, so every deadline is computed on a real business
    calendar (time zone, hours, holidays).
    """
    t0 = datetime(2026, 3, 2, 8, tzinfo=UTC)
    n_cases = clocks // 2  # a customer-opened case runs first response and resolution
    console.print(f"building {n_cases:,} case openings…")
    openings = _case_events(n_cases, t0)[:n_cases]
    gc.collect()
    gc.freeze()
    rules: RulesBook[Policy] = RulesBook(default_policy(), policy_from_mapping)
    processor = SlaProcessor(rules)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("opening cases", total=n_cases)
        for i, event in enumerate(openings):
            processor.handle(event)
            if i % 10_000 == 0:
                progress.advance(task, 10_000)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    open_clocks = processor.open_clocks()
    del processor, openings
    gc.unfreeze()
    gc.collect()

    n_cases = n_events // 4
    console.print(f"building {n_events:,} events for the rate…")
    stream = _case_events(n_cases, t0)
    gc.freeze()
    processor = SlaProcessor(RulesBook(default_policy(), policy_from_mapping))
    derived = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    watermark = t0
    for i, event in enumerate(stream):
        derived += len(processor.handle(event))
        if i % 100 == 0 and event.occurred_at > watermark:
            watermark = event.occurred_at
            derived += len(processor.advance(watermark))
    rate = len(stream) / (time.perf_counter() - start)
    # The same loop per second of this process's CPU time: the wall-clock rate also counts
    # whatever else the machine's cores were doing meanwhile.
    cpu_rate = len(stream) / (time.process_time() - cpu_start)

    table = Table(title="SLA processor")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("aim", justify="right")
    table.add_row("open clocks held", f"{open_clocks:,}", "1,000,000")
    table.add_row(
        "memory per open clock (incl. queue)", f"{used / open_clocks:,.0f} B", "≤ 1,024 B"
    )
    table.add_row("events/s through the SLA processor", f"{rate:,.0f}", "≥ 50,000")
    table.add_row("  the same, per CPU second", f"{cpu_rate:,.0f}", "")
    table.add_row(f"  signals derived from the {len(stream):,} events", f"{derived:,}", "")
    if deliveries:
        console.print(f"delivering {deliveries:,} breach alerts falling due over {window:g} s…")
        d = asyncio.run(measure_delivery(deliveries, window_s=window))
        label = f"deadline → delivered, {deliveries:,} due over {window:g} s"
        table.add_row(f"{label}: p50", f"{d['p50_s']:.3f} s", "")
        table.add_row(f"{label}: p99", f"{d['p99_s']:.3f} s", "≤ 1 s")
        table.add_row(f"{label}: max", f"{d['max_s']:.3f} s", "")
        table.add_row("webhook deliveries/s", f"{d['per_s']:,.0f}", "")
    Console().print(table)
