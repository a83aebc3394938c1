"""The `loopservice` command line."""

from __future__ import annotations

import click

from loopservice.bench import bench
from loopservice.explain import explain
from loopservice.ingest_cli import dead_letters_command, ingest_command
from loopservice.runtime import demo_command, run_command
from loopservice.simulator import simulate_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Loop Service: customer service run as one event-sourced loop.

    Every interaction is an immutable event on a log; stream processors derive live SLA
    timers, risk and patterns; projections rebuild customer context from the log.
    """


main.add_command(simulate_command)

main.add_command(ingest_command)
main.add_command(dead_letters_command)
main.add_command(run_command)
main.add_command(demo_command)
main.add_command(bench)


from loopservice.policy_cli import policy  # noqa: E402

main.add_command(policy)
main.add_command(explain)

from loopservice.alerts_cli import alerts  # noqa: E402

main.add_command(alerts)

from loopservice.projections_cli import projections  # noqa: E402

main.add_command(projections)

from loopservice.audit_cli import audit  # noqa: E402

main.add_command(audit)
