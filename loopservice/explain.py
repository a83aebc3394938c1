"""`loopservice explain case ID`: why a case has its priority and deadlines.

The explanation is re-derived from the log with the same domain functions the engine runs,
so it cannot disagree with the signals: the priority rule and its inputs, every manual
change with its reason, and each SLA clock step by step with the policy version, the target,
pauses and the business-calendar segments counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.markup import escape

from loopservice.domain import sla
from loopservice.domain.events import (
    AccountUpdated,
    CaseOpened,
    Event,
    PolicyPublished,
    PriorityChanged,
    Tier,
)
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import interaction_log, open_datastore
from loopservice.policy_cli import default_policy
from loopservice.streams.rules import RulesBook


@dataclass
class Explanation:
    case_id: str
    tenant_id: str
    priority: str = ""
    priority_rule: str = ""
    policy_version: str = ""
    manual_changes: list[dict[str, str]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    clocks: list[dict[str, Any]] = field(default_factory=list)


def explain_case(events: list[Event], tenant_id: str, case_id: str) -> Explanation | None:
    """Replays one case's events (and its account's tier, and the policies) step by step."""
    rules: RulesBook[Policy] = RulesBook(default_policy(), policy_from_mapping)
    tiers: dict[str, Tier] = {}
    case: sla.CaseClocks | None = None
    out = Explanation(case_id, tenant_id)
    for event in events:
        if isinstance(event, PolicyPublished):
            rules.publish(event)
            continue
        if isinstance(event, AccountUpdated) and event.tier is not None:
            tiers[event.account_id] = event.tier
            continue
        if event.tenant_id != tenant_id or event.case_id != case_id:
            continue
        policy = rules.in_force(event.occurred_at)
        if isinstance(event, CaseOpened):
            if case is not None:
                continue
            tier = tiers.get(event.account_id)
            decision = policy.decide_priority(event.impact, event.urgency, tier)
            out.priority, out.priority_rule = decision.priority.value, decision.rule
            out.policy_version = policy.version
            case = sla.open_case(event, tier, policy)
        elif case is None:
            continue
        else:
            sla.apply(case, event, policy)
        if isinstance(event, PriorityChanged):
            out.manual_changes.append(
                {
                    "at": event.occurred_at.isoformat(),
                    "priority": event.priority.value,
                    "reason": event.reason,
                    "by": event.actor.id,
                }
            )
        out.steps.append(
            {
                "at": event.occurred_at.isoformat(),
                "event": event.type,
                "event_id": event.event_id,
                "clocks": {m: _clock_state(c, event.occurred_at) for m, c in case.clocks.items()},
            }
        )
    if case is None:
        return None
    out.priority = case.priority.value
    for clock in case.clocks.values():
        state = _clock_state(clock, None)
        if clock.running_since is not None and clock.due_at is not None:
            state["segments"] = [
                [a.isoformat(), b.isoformat()]
                for a, b in clock.calendar.segments(clock.running_since, clock.due_at)
            ]
        out.clocks.append(state)
    return out


def _clock_state(clock: sla.Clock, at: datetime | None) -> dict[str, Any]:
    counted = clock.consumed
    if at is not None and clock.running_since is not None and at > clock.running_since:
        counted += clock.calendar.elapsed(clock.running_since, at)
    return {
        "metric": clock.metric,
        "cycle": clock.cycle,
        "target_business_minutes": round(clock.target / 60, 2),
        "counted_business_minutes": round(counted / 60, 2),
        "state": "running" if clock.running_since is not None else "paused",
        "due_at": clock.due_at.isoformat() if clock.due_at else None,
        "policy_version": clock.policy_version,
        "breached": "breach" in clock.fired,
    }


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
    log = interaction_log(open_datastore(path))
    events: list[Event] = []
    position = 1
    while records := log.read(position, 10_000):
        events += [r.value for r in records]
        position = records[-1].position + 1
    found = explain_case(events, tenant or settings.dev_tenant, case_id)
    if found is None:
        raise click.ClickException(
            f"no case {case_id!r} for tenant {tenant or settings.dev_tenant}"
        )
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
