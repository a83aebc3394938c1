"""`loopservice explain case ID`: why a case has its priority and deadlines.

The explanation is re-derived from the log with the same domain functions the engine runs,
so it cannot disagree with the signals: the priority rule and its inputs, every manual
change with its reason, and each SLA clock step by step with the policy version, the target,
pauses and the business-calendar segments counted.
"""

from __future__ import annotations

from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.markup import escape

from loopservice.domain.policy import policy_from_mapping
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import interaction_log, open_datastore
from loopservice.policy_cli import default_policy
from loopservice.streams.explain import EXPLAIN_TOPICS, explain_case
from loopservice.streams.rules import RulesBook


@click.group()
def explain() -> None:
    """Explain decisions: priorities, deadlines and the rules behind them."""


@explain.command("case")
@click.argument("case_id")
@click.option("--tenant", default=None, help="Tenant of the case [default: LOOP_DEV_TENANT].")
@click.option("--db", type=click.Path(path_type=Path, exists=True), default=None,
              help="Embedded log file [default: from LOOP_LOG_URL].")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def explain_case_command(case_id: str, tenant: str | None, db: Path | None, as_json: bool) -> None:
    """Priority, SLA deadlines, pauses and calendar segments of CASE_ID, with their rules."""
    settings = Settings.from_env()
    path = db or settings.sqlite_path()
    if not path.exists():
        raise click.ClickException(f"no log at {path}")
    tenant = tenant or settings.dev_tenant
    log = interaction_log(open_datastore(path))
    found = explain_case(
        log.values(topics=EXPLAIN_TOPICS),
        tenant,
        case_id,
        RulesBook(default_policy(), policy_from_mapping),
    )
    if found is None:
        raise click.ClickException(f"no case {case_id!r} for tenant {tenant}")
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    console = Console(highlight=False)
    console.print(f"[bold]case {found.case_id}[/] (tenant {found.tenant_id})")
    console.print(
        f"priority {found.priority}: {escape(found.priority_rule)} (policy {found.policy_version})"
    )
    for change in found.manual_changes:
        console.print(
            f"  manual change at {change['at']}: {change['priority']} — {change['reason']}"
        )
    console.print("[bold]steps[/]")
    for step in found.steps:
        clocks = ", ".join(
            f"{m} {c['state']} "
            f"{c['counted_business_minutes']:g}/{c['target_business_minutes']:g} min"
            + (f" due {c['due_at']}" if c["due_at"] else "")
            for m, c in step["clocks"].items()
        )
        console.print(f"  {step['at']} {step['event']}: {clocks or 'no clock running'}")
    console.print("[bold]clocks now[/]")
    for c in found.clocks:
        console.print(
            f"  {c['metric']} cycle {c['cycle']}: {c['state']}, due {c['due_at']}, "
            f"policy {c['policy_version']}, breached={c['breached']}"
        )
        for a, b in c.get("segments", []):
            console.print(f"    counts {a} → {b}")
