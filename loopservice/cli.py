"""The `loopservice` command line: one group, each command defined beside what it drives."""

from __future__ import annotations

import click

from loopservice.alerts_cli import alerts
from loopservice.audit_cli import audit
from loopservice.bench import bench
from loopservice.evaluate import evaluate_command
from loopservice.explain import explain
from loopservice.ingest_cli import dead_letters_command, ingest_command
from loopservice.loop_cli import knowledge_command, maturity_command, trends_command
from loopservice.policy_cli import policy
from loopservice.projections_cli import projections
from loopservice.runtime import demo_command, run_command
from loopservice.simulator import simulate_command
from loopservice.worker import worker_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Loop Service: customer service run as one event-sourced loop.

    Every interaction is an immutable event on a log; stream processors derive live SLA
    timers, risk and patterns; projections rebuild customer context from the log.
    """


for command in (
    run_command,
    worker_command,
    demo_command,
    simulate_command,
    evaluate_command,
    ingest_command,
    dead_letters_command,
    policy,
    explain,
    alerts,
    projections,
    knowledge_command,
    trends_command,
    maturity_command,
    audit,
    bench,
):
    main.add_command(command)
