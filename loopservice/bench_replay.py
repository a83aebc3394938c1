"""`loopservice bench replay`: audit replay of a log on one process and split across workers.

Replays the log at `--db` (made with `loopservice simulate` and `loopservice ingest`, say) as
`loopservice audit replay` does: once on one process (unless `--no-one-process`), then split by
account across each `--workers` count. For each it prints the records per wall-clock second
and per CPU second (this process and its workers, over the same span: on a shared, loaded
machine the second says more about the code), the load average at the end, each worker's CPU
seconds, and a checksum of the signals (SHA-256 over each signal's JSON, sorted): every row
must show the same one.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.table import Table

from loopservice.domain.signals import Signal
from loopservice.infra.sqlite_log import interaction_log, open_datastore
from loopservice.policy_cli import default_policy
from loopservice.streams.audit import MemorySignalLog, real_rules, replay_signals
from loopservice.streams.split_replay import SplitStats, split_replay

console = Console(stderr=True)


def signals_checksum(signals: list[Signal]) -> str:
    lines = sorted(orjson.dumps(s.model_dump(mode="json")) for s in signals)
    return hashlib.sha256(b"\n".join(lines)).hexdigest()[:16]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@click.command("replay")
@click.option(
    "--db",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Embedded log file to replay.",
)
@click.option(
    "--workers",
    "-w",
    type=click.IntRange(min=2),
    multiple=True,
    help="Worker processes of a split replay (repeatable) [default: the CPUs there are].",
)
@click.option(
    "--one-process/--no-one-process",
    default=True,
    show_default=True,
    help="Also time the replay on one process, the baseline the split is compared with.",
)
def bench_replay(db: Path, workers: tuple[int, ...], one_process: bool) -> None:
    """Audit replay rate of a log: records/s on one process and split across workers."""
    log = interaction_log(open_datastore(db))
    records = log.head()
    counts = list(workers) or [max(2, len(os.sched_getaffinity(0)))]
    table = Table(title=f"audit replay of {records:,} records ({db.name})")
    for column in ("processes", "wall s", "CPU s", "rec/s wall", "rec/s CPU", "load", "workers"):
        table.add_column(column, justify="right")
    table.add_column("signals")
    runs: list[int] = [1] if one_process else []
    for n in [*runs, *counts]:
        stats = SplitStats()
        wall, cpu = time.perf_counter(), _cpu()
        if n == 1:
            signals = replay_signals(log, rules=real_rules(default_policy()))
        else:
            deduplicated = MemorySignalLog()  # as `replay_signals` keeps them
            deduplicated.append(
                split_replay(log, real_rules(default_policy()), workers=n, stats=stats)
            )
            signals = deduplicated.values()
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
        table.add_row(
            "1" if n == 1 else f"1 + {n}",
            f"{wall:.1f}",
            f"{cpu:.1f}",
            f"{records / wall:,.0f}",
            f"{records / cpu:,.0f}",
            " ".join(f"{x:.1f}" for x in os.getloadavg()),
            " ".join(f"{s:.1f}" for s in stats.workers) or "-",
            f"{len(signals)} {signals_checksum(signals)}",
        )
        console.print(f"{n} done in {wall:.1f} s")
    Console().print(table)
