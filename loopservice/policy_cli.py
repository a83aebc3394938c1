"""`loopservice policy …`: the shipped default policy and the policy file checker."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from loopservice.domain.events import (
    Actor,
    ActorKind,
    Channel,
    PolicyPublished,
    Priority,
    Source,
    Team,
    Tier,
)
from loopservice.domain.policy import METRICS, Policy, PolicyError, policy_from_toml
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import interaction_log, open_datastore


def default_policy_text() -> str:
    return files("loopservice").joinpath("default_policy.toml").read_text(encoding="utf-8")


@cache
def default_policy() -> Policy:
    """The policy shipped with Loop Service (`loopservice/default_policy.toml`)."""
    return policy_from_toml(default_policy_text())


def load_policy(path: Path) -> Policy:
    return policy_from_toml(path.read_text(encoding="utf-8"))


def _summary(policy: Policy, console: Console) -> None:
    console.print(f"[bold green]policy {policy.version} is valid[/]")
    targets = Table(title="SLA targets (business minutes: first / next / resolution)")
    targets.add_column("priority")
    for tier in (None, *Tier):
        targets.add_column(tier.value if tier else "default")
    for p in Priority:
        row = [p.value]
        for tier in (None, *Tier):
            row.append(" / ".join(f"{policy.target_seconds(m, p, tier) / 60:g}" for m in METRICS))
        targets.add_row(*row)
    console.print(targets)
    calendars = Table(title="calendars (team × tier)")
    calendars.add_column("team")
    for tier in (None, *Tier):
        calendars.add_column(tier.value if tier else "no tier")
    for team in Team:
        calendars.add_row(
            team.value, *(policy.calendar_name_for(team, tier) for tier in (None, *Tier))
        )
    console.print(calendars)
    for name, spec in policy.calendars.named.items():
        console.print(f"  {name}: {spec.calendar.describe()}")
    console.print(
        f"warnings at {', '.join(f'{p}%' for p in policy.warning_percents())}; "
        f"handoff routes {len(policy.handoffs.routes)}, max {policy.handoffs.max_per_case} "
        f"per case; on-call routes {len(policy.oncall.routes)}; allowed lateness "
        f"{policy.allowed_lateness_seconds:g}s; clock skew tolerance "
        f"{policy.clock_skew_tolerance_seconds:g}s"
    )


@click.group()
def policy() -> None:
    """Service policies: priority matrix, SLA targets, calendars, handoffs, on-call."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Validate a policy TOML FILE and summarize it."""
    console = Console()
    err = Console(stderr=True)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        err.print(f"[red]cannot read {file}: {exc.strerror or exc}[/]")
        raise SystemExit(2) from None
    try:
        parsed = policy_from_toml(text)
    except PolicyError as exc:
        err.print(f"[red]{file}: invalid policy[/]")
        for path, reason in exc.problems:
            err.print(f"  {path or '(document)'}: {reason}", markup=False, highlight=False)
        raise SystemExit(1) from None
    _summary(parsed, console)


@policy.command("publish")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--effective",
    type=click.DateTime(),
    default=None,
    help="When it takes effect (UTC) [default: now].",
)
@click.option("--tenant", default=None, help="Publishing tenant [default: LOOP_DEV_TENANT].")
@click.option(
    "--db",
    type=click.Path(path_type=Path),
    default=None,
    help="Embedded log file [default: from LOOP_LOG_URL].",
)
def publish(file: Path, effective: datetime | None, tenant: str | None, db: Path | None) -> None:
    """Validate FILE and append it to the log as a `policy.published` event.

    From its effective time on, every decision uses it; replays of earlier history keep
    using the version that was in force then.
    """
    try:
        parsed = load_policy(file)
    except PolicyError as exc:
        raise click.ClickException(f"{file}: invalid policy\n{exc}") from None
    settings = Settings.from_env()
    path = db or settings.sqlite_path()
    log = interaction_log(open_datastore(path))
    at = effective.replace(tzinfo=UTC) if effective else log.clock.now()
    event = PolicyPublished(
        event_id=f"policy:{parsed.version}",
        occurred_at=at,
        tenant_id=tenant or settings.dev_tenant,
        account_id="_policy",
        source=Source(platform="loopservice", channel=Channel.WEB),
        actor=Actor(kind=ActorKind.SYSTEM, id="policy-cli"),
        version=parsed.version,
        policy=parsed.model_dump(mode="json", by_alias=True),
    )
    (appended,) = log.append([event])
    if appended.duplicate:
        raise click.ClickException(
            f"version {parsed.version} was already published (position {appended.position}); "
            "give the new policy a new version"
        )
    Console().print(
        f"published policy {parsed.version} at position {appended.position}, "
        f"effective {at.isoformat()}"
    )
