"""Clusters of SLA breaches in one team: counted across accounts in due-instant order, once per
episode, thresholds from the policy in force, same signals on replay and in any arrival order."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from factories import T0, opened
from loopservice.domain.events import Event, Priority, Team, clock_tick
from loopservice.domain.patterns import TENANT_WIDE
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import PatternDetected, Signal, SlaBreached, SlaBreachRetracted
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.pattern_processors import BreachClusterProcessor
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import build_topology


def book(policy: Policy | None = None) -> RulesBook[Policy]:
    return RulesBook(policy or default_policy(), policy_from_mapping)


def breach(
    n: int, minutes: float, *, team: Team = Team.SUPPORT, tenant: str = "acme"
) -> SlaBreached:
    due = T0 + timedelta(minutes=minutes)
    return SlaBreached(
        signal_id=f"sla.breached/{tenant}/case-{n}/first_response/0/{due.isoformat()}/2026.1",
        tenant_id=tenant,
        account_id=f"acct-{n}",
        case_id=f"case-{n}",
        detected_at=due,
        caused_by=(f"ev-{n}",),
        metric="first_response",
        cycle=0,
        due_at=due,
        priority=Priority.P2,
        team=team,
    )


def clusters(signals: list[Signal]) -> list[PatternDetected]:
    return [s for s in signals if isinstance(s, PatternDetected) and s.pattern == "breach_cluster"]


def run(proc: BreachClusterProcessor, breaches: list[Signal], until: float) -> list[Signal]:
    """Hands the breaches over as the SLA tap does, then moves the watermark past them."""
    proc.observe(breaches)
    return proc.advance(T0 + timedelta(minutes=until))


# --- the detector ----------------------------------------------------------------------


def test_five_breaches_of_one_team_within_the_window_are_a_cluster_once() -> None:
    proc = BreachClusterProcessor(book())  # default: 5 breaches within 240 minutes
    assert clusters(run(proc, [breach(n, 50 * n) for n in range(4)], 200)) == []
    [found] = clusters(run(proc, [breach(4, 230), breach(5, 235)], 240))
    assert found.key == "acme/support" and found.account_id == TENANT_WIDE
    assert found.case_id is None and found.detected_at == T0 + timedelta(minutes=230)
    assert found.evidence == tuple(
        breach(n, m).signal_id for n, m in enumerate((0, 50, 100, 150, 230))
    )
    assert found.caused_by == ("ev-0", "ev-1", "ev-2", "ev-3", "ev-4")
    assert found.signal_id == f"pattern/breach_cluster/acme/support/{T0.isoformat()}"
    assert "team support" in found.detail and "case-4" in found.detail
    assert found.policy_version == default_policy().version
    # still the same episode while the window stays busy; a new one after a quiet spell
    assert clusters(run(proc, [breach(6, 300), breach(7, 320)], 330)) == []
    later = [breach(10 + n, 2000 + 10 * n) for n in range(5)]
    [second] = clusters(run(proc, later, 2100))
    assert second.signal_id != found.signal_id and second.evidence[0] == later[0].signal_id


def test_breaches_spread_out_or_split_across_teams_and_tenants_are_no_cluster() -> None:
    proc = BreachClusterProcessor(book())
    spread = [breach(n, 61 * n) for n in range(8)]  # never five within 240 minutes
    split = [breach(20 + n, 5 * n, team=Team.ONBOARDING) for n in range(3)]
    split += [breach(30 + n, 5 * n, tenant="globex") for n in range(3)]
    assert clusters(run(proc, [*spread, *split], 10_000)) == []


def test_the_threshold_and_window_come_from_the_policy_in_force() -> None:
    tight = default_policy().model_copy(
        update={"breach_cluster": default_policy().breach_cluster.model_copy(
            update={"min_breaches": 3, "window_minutes": 30})}
    )  # fmt: skip
    proc = BreachClusterProcessor(book(tight))
    assert clusters(run(proc, [breach(0, 0), breach(1, 20), breach(2, 40)], 60)) == []
    [found] = clusters(run(proc, [breach(3, 45), breach(4, 50)], 60))
    # the window (09:15, 09:45] holds the breaches due at 09:20, 09:40 and 09:45
    assert found.evidence == (
        breach(1, 20).signal_id,
        breach(2, 40).signal_id,
        breach(3, 45).signal_id,
    )


def test_arrival_order_does_not_change_the_clusters() -> None:
    """Under Kafka the accounts' breaches arrive interleaved differently on every run."""
    breaches: list[Signal] = [breach(n, 37 * n % 400) for n in range(12)]
    a, b = BreachClusterProcessor(book()), BreachClusterProcessor(book())
    first = run(a, breaches, 500)
    second = run(b, list(reversed(breaches[:6])), 100) + run(b, breaches[6:], 500)
    assert clusters(first) and first == second


def test_a_retracted_breach_does_not_count() -> None:
    proc = BreachClusterProcessor(book())
    five = [breach(n, 10 * n) for n in range(5)]
    late = SlaBreachRetracted(
        **{**five[2].model_dump(exclude={"type"}), "signal_id": "retract/2"},
        retracts=five[2].signal_id,
        reason="the reply occurred before the deadline",
    )
    proc.observe(five[:3])
    proc.observe([late])
    assert clusters(run(proc, five[3:], 100)) == []
    [found] = clusters(run(proc, [breach(5, 110)], 120))
    assert five[2].signal_id not in found.evidence


# --- wired to the SLA processor in the embedded engine -----------------------------------


def derive(events: list[Event], tmp_path: Path, name: str) -> list[dict[str, Any]]:
    ds = open_datastore(tmp_path / f"{name}.db")
    log, signals = interaction_log(ds), signal_log(ds)
    log.append(events)
    topology = build_topology(book())
    EmbeddedEngine(log, signals, topology.processors).catch_up()
    return [r.value.model_dump(mode="json") for r in signals.read(1, 10**6)]


def unanswered(accounts: int) -> list[Event]:
    """Cases opened by `accounts` accounts before support opens (Monday 08:00 New York):
    their first-response deadlines all fall at 12:00 New York, 17:00 UTC."""
    return [
        opened(n, at=T0 + timedelta(minutes=n), case=f"case-{n}", account_id=f"acct-{n}")
        for n in range(1, accounts + 1)
    ]


def test_the_sla_processors_breaches_form_a_cluster_on_replay_alike(tmp_path: Path) -> None:
    events = [*unanswered(6), clock_tick(T0 + timedelta(hours=9))]
    signals = derive(events, tmp_path, "live")
    breaches = [s for s in signals if s["type"] == "sla.breached"]
    assert len(breaches) == 6 and {b["team"] for b in breaches} == {"support"}
    [found] = [s for s in signals if s.get("pattern") == "breach_cluster"]
    assert found["key"] == "acme/support"
    assert found["evidence"] == sorted(b["signal_id"] for b in breaches)[:5]
    assert set(found["caused_by"]) <= {e.event_id for e in events}
    assert datetime.fromisoformat(found["detected_at"]) == T0 + timedelta(hours=8)
    assert derive(events, tmp_path, "replay") == signals


def test_four_unanswered_cases_are_no_cluster(tmp_path: Path) -> None:
    events = [*unanswered(4), clock_tick(T0 + timedelta(hours=9))]
    signals = derive(events, tmp_path, "four")
    assert sum(s["type"] == "sla.breached" for s in signals) == 4
    assert not [s for s in signals if s.get("pattern") == "breach_cluster"]


def test_the_partitioned_fold_runs_no_breach_clusters() -> None:
    """The Kafka engine's per-account topologies do not count clusters (each would see one
    account): a task of its own reads the breaches off the signals topic."""
    topology = build_topology(book())
    assert topology.breach_clusters is not None
    assert topology.breach_clusters not in topology.by_account
    assert topology.breach_clusters not in topology.tenant_wide
    assert topology.breach_clusters in topology.processors
