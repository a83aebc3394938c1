"""`loopservice bench projections`: rebuild rate on SQLite and PostgreSQL, context read latency.

The log holds EVENTS synthetic case events (opened, messages, replies, notes, resolutions)
spread over ACCOUNTS accounts. Each store rebuilds the `context` and `cases` projections from
position 1 (`ProjectionRunner.rebuild`, the same code as `loopservice projections rebuild`);
the rate is printed per wall-clock second and per CPU second of this process, every thread
of it, over the same span (on a shared, loaded machine the second says more about the code;
PostgreSQL's own CPU is not in it, nor the checksum computed after the switch). Then
`GET /v1/accounts/{id}/context` is called for random accounts over HTTP, one keep-alive
connection to the real app served by uvicorn on loopback (routing, token check, query,
JSON), and p50/p99 are printed. Starlette's `TestClient` is not used for this: it hands every
request and response between two threads several times, and on a busy two-core machine that
hand-off, not the endpoint, made most of the tail. PostgreSQL is the
one `--postgres-url` names, else a private cluster started with `infra/postgres/pg.sh` (and
stopped afterwards); without either it is skipped, saying why.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import httpx
import psycopg
import uvicorn
from fastapi import FastAPI
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from loopservice.domain.events import EVENT_ADAPTER, Event
from loopservice.domain.signals import Signal
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.projections_api import projections_router
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.projections.cases import CasesFold
from loopservice.projections.context import ContextFold
from loopservice.projections.queries import ProjectionQueries
from loopservice.projections.runner import ProjectionRunner
from loopservice.projections.store import ProjectionStore, open_projection_store

console = Console(stderr=True)
PG_SCRIPT = Path(__file__).resolve().parent.parent / "infra" / "postgres" / "pg.sh"
TOKEN = "bench-read-token-0000000001"
KINDS = ("case.opened", "case.customer_message", "case.agent_replied", "case.note_added",
         "case.customer_message", "case.agent_replied", "case.resolved")  # fmt: skip


def case_events(n: int, accounts: int) -> Iterator[Event]:
    """N events, seven per case, cases spread round-robin over `accounts` accounts."""
    t0 = datetime(2026, 1, 5, 9, tzinfo=UTC)
    for i in range(n):
        kind, case = KINDS[i % len(KINDS)], i // len(KINDS)
        raw: dict[str, object] = {
            "event_id": f"bp-{i}",
            "type": kind,
            "occurred_at": (t0 + timedelta(seconds=i)).isoformat(),
            "tenant_id": "acme",
            "account_id": f"acct-{case % accounts}",
            "case_id": f"case-{case}",
            "source": {"platform": "zendesk", "channel": "email"},
            "actor": {"kind": "agent" if "agent" in kind or "note" in kind else "customer",
                      "id": "u-1", "team": "support"},
        }  # fmt: skip
        if kind == "case.opened":
            raw |= {"subject": "Cannot export", "topic": f"topic-{case % 40}",
                    "impact": "high", "urgency": "medium"}  # fmt: skip
        elif kind == "case.resolved":
            raw |= {"resolution_code": "export-timeout", "summary": "raised the timeout"}
        else:
            raw["body"] = "the export still times out"
        yield EVENT_ADAPTER.validate_python(raw)


def fill_log(log: SQLiteLog[Event], n: int, accounts: int) -> None:
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"writing {n:,} events to the log", total=n)
        batch: list[Event] = []
        for event in case_events(n, accounts):
            batch.append(event)
            if len(batch) == 20_000:
                log.append(batch)
                progress.advance(task, len(batch))
                batch = []
        if batch:
            log.append(batch)
            progress.advance(task, len(batch))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def measure(
    label: str, store: ProjectionStore, log: SQLiteLog[Event], signals: SQLiteLog[Signal],
    accounts: int, requests: int,
) -> list[str]:  # fmt: skip
    policy = default_policy()
    folds = {"context": lambda: ContextFold(policy), "cases": lambda: CasesFold(policy)}
    runner = ProjectionRunner(store, log, signals, folds)  # type: ignore[arg-type]
    rates = []
    for name in folds:
        with Progress(console=console, transient=True) as progress:
            total = sum(runner.heads().values())
            task = progress.add_task(f"{label}: rebuild {name}", total=total)

            def advance(k: int, task: TaskID = task, progress: Progress = progress) -> None:
                progress.advance(task, k)

            result = runner.rebuild(name, advance)
        cpu = result.cpu_seconds
        console.print(
            f"{label}: {name} rebuilt, {result.events:,} records in {result.seconds:.1f} s "
            f"= {result.rate:,.0f} events/s ({cpu:.1f} CPU s = "
            f"{result.events / cpu:,.0f} events per CPU second), checksum {result.checksum[:16]}"
            f", load average {_load()}"
        )
        rates.append(f"{result.rate:,.0f} ({result.events / cpu:,.0f})")
    queries = ProjectionQueries(store, log, signals, policy)
    grant = TokenGrant.model_validate({"token": TOKEN, "tenant": "acme", "scopes": ["read"]})
    app = create_app(
        Settings(data_dir=Path(tempfile.gettempdir())), log, tokens=TokenRegistry([grant]),
        routers=[projections_router(queries)],
    )  # fmt: skip
    picks = random.Random(7)
    latencies = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with serving(app) as base, httpx.Client(base_url=base, headers=headers) as client:
        for i in range(requests + 100):
            account = f"acct-{picks.randrange(accounts)}"
            started = time.perf_counter()
            r = client.get(f"/v1/accounts/{account}/context")
            elapsed = time.perf_counter() - started
            assert r.status_code == 200, r.text
            if i >= 100:  # the first hundred warm the caches
                latencies.append(elapsed * 1000)
    q = statistics.quantiles(latencies, n=100)
    console.print(f"{label}: {requests:,} context reads timed, load average {_load()}")
    return [label, rates[0], rates[1], f"{q[49]:.2f}", f"{q[98]:.2f}"]


def _load() -> str:
    """The machine's load averages over 1, 5 and 15 minutes: on a shared machine the rates
    and latencies depend on them."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


@click.command("projections")
@click.option("--events", "-n", default=1_000_000, show_default=True, help="Events in the log.")
@click.option("--accounts", default=100_000, show_default=True, help="Accounts they belong to.")
@click.option("--requests", default=2000, show_default=True, help="Context reads to time.")
@click.option("--postgres-url", default=None,
              help="A PostgreSQL server to use (a new database is made in it) "
                   "[default: start one with infra/postgres/pg.sh].")  # fmt: skip
@click.option("--sqlite-only", is_flag=True, help="Skip PostgreSQL.")
def bench_projections(
    events: int, accounts: int, requests: int, postgres_url: str | None, sqlite_only: bool
) -> None:
    """Rebuild rate (events/s) of the context and cases projections on SQLite and PostgreSQL,
    and p50/p99 latency of GET /v1/accounts/{id}/context. Aim: ≥ 50k events/s on SQLite,
    p99 ≤ 20 ms."""
    accounts = min(accounts, max(1, events // len(KINDS)))
    work = Path(tempfile.mkdtemp(prefix="loop-bench-proj-"))
    started_pg: Path | None = None
    rows = []
    try:
        datastore = open_datastore(work / "loop.db")
        log = interaction_log(datastore)
        signals = signal_log(datastore)
        fill_log(log, events, accounts)
        sqlite = open_projection_store("", datastore)
        rows.append(measure("sqlite", sqlite, log, signals, accounts, requests))
        if not sqlite_only:
            if postgres_url is None and PG_SCRIPT.exists():
                started_pg = Path(tempfile.mkdtemp(prefix="loop-bench-pg-"))
                port = _free_port()
                up = [str(PG_SCRIPT), "up", "--dir", str(started_pg), "--port", str(port)]
                done = subprocess.run(up, capture_output=True, text=True)
                if done.returncode == 0:
                    postgres_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
                else:
                    console.print(f"[yellow]PostgreSQL skipped: pg.sh failed[/]\n{done.stderr}")
            if postgres_url is None:
                console.print("[yellow]PostgreSQL skipped: no --postgres-url and no pg.sh[/]")
            else:
                name = f"loop_bench_{int(time.time())}"
                with psycopg.connect(postgres_url, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}")
                url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
                store = open_projection_store(url)
                try:
                    rows.append(measure("postgresql", store, log, signals, accounts, requests))
                finally:
                    store.close()
                    with psycopg.connect(postgres_url, autocommit=True) as conn:
                        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        if started_pg is not None:
            subprocess.run([str(PG_SCRIPT), "down", "--dir", str(started_pg)], capture_output=True)
            shutil.rmtree(started_pg, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title=f"projections: {events:,} events, {accounts:,} accounts, "
                        f"{requests:,} context reads")  # fmt: skip
    for column in ("store", "rebuild context: ev/s (per CPU s)",
                   "rebuild cases: ev/s (per CPU s)", "context p50 (ms)",
                   "context p99 (ms)"):  # fmt: skip
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    console.print("aim: ≥ 50,000 events/s rebuild on SQLite, p99 ≤ 20 ms")
