"""The `loopservice` command line."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Loop Service: customer service run as one event-sourced loop.

    Every interaction is an immutable event on a log; stream processors derive live SLA
    timers, risk and patterns; projections rebuild customer context from the log.
    """
