"""Audit replay, tamper detection and what-if, over the real engine and a simulated log."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from factories import T0, opened
from loopservice.audit_cli import audit
from loopservice.bootstrap import System, build_system
from loopservice.domain.events import EVENT_ADAPTER, clock_tick
from loopservice.domain.policy import policy_from_toml
from loopservice.domain.signals import SlaBreached, SlaSignal
from loopservice.infra.settings import Settings
from loopservice.policy_cli import default_policy, default_policy_text
from loopservice.simulator import SimulationConfig, generate
from loopservice.streams.audit import (
    FrozenRulesBook,
    compare,
    real_rules,
    recorded_signals,
    replay_signals,
    what_if,
)
from loopservice.streams.clock import FixedClock
from loopservice.streams.topology import derive_processors

END = datetime(2026, 1, 16, tzinfo=UTC)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> System:
    tmp = tmp_path_factory.mktemp("audit")
    settings = Settings(data_dir=tmp, log_url=f"sqlite:///{tmp / 'loop.db'}")
    built = build_system(settings, FixedClock(END))
    raw = list(generate(SimulationConfig(accounts=60, days=10, seed=3)))
    built.log.append([EVENT_ADAPTER.validate_python(r) for r in raw])
    built.engine.catch_up()
    return built


def db_of(system: System) -> str:
    return str(system.settings.sqlite_path())


def test_topology_matches_the_engine(system: System) -> None:
    names = [p.name for p in derive_processors(real_rules(default_policy()))]
    assert names == [p.name for p in system.engine.processors][: len(names)]


def test_replay_of_the_recorded_log_is_identical(system: System) -> None:
    recorded = list(system.signals.values())
    assert any(isinstance(s, SlaBreached) for s in recorded)  # the fixture is not trivial
    seen: list[int] = []
    rules = real_rules(default_policy())
    derived = replay_signals(system.log, rules=rules, progress=seen.append)
    assert sum(seen) == system.log.head()
    report = compare(recorded, derived, rules)
    assert report.ok, report.differences()[:3]
    assert report.identical == len(recorded)


def test_window_keeps_only_signals_detected_in_it(system: System) -> None:
    start, until = datetime(2026, 1, 8, tzinfo=UTC), datetime(2026, 1, 11, tzinfo=UTC)
    derived = replay_signals(
        system.log, rules=real_rules(default_policy()), start_at=start, until=until
    )
    assert derived and all(start <= s.detected_at < until for s in derived)
    recorded = recorded_signals(system.signals.values(), start, until)
    assert compare(recorded, derived).identical == len(recorded) == len(derived)


def test_tampered_signals_are_reported_with_reasons(system: System) -> None:
    recorded = list(system.signals.values())
    derived = replay_signals(system.log, rules=real_rules(default_policy()))
    sla = next(s for s in recorded if isinstance(s, SlaSignal))
    forged = sla.model_copy(update={"signal_id": sla.signal_id + "/forged"})
    altered = sla.model_copy(update={"caused_by": ("ev-nope",)})
    dropped = recorded[-1]
    tampered = [altered if s.signal_id == sla.signal_id else s for s in recorded[:-1]]
    report = compare([*tampered, forged], derived, real_rules(default_policy()))
    assert not report.ok
    assert [d.signal_id for d in report.missing] == [forged.signal_id]
    assert "not re-derived" in report.missing[0].reason
    assert [d.signal_id for d in report.extra] == [dropped.signal_id]
    assert "not on the signal log" in report.extra[0].reason
    assert [d.signal_id for d in report.changed] == [sla.signal_id]
    assert report.changed[0].reason == "content differs in field caused_by"
    assert report.changed[0].fields["caused_by"][0] == ["ev-nope"]
    assert report.identical == len(recorded) - 2


def test_a_signal_under_another_policy_names_the_version_in_force(system: System) -> None:
    derived = replay_signals(system.log, rules=real_rules(default_policy()))
    sla = next(s for s in derived if isinstance(s, SlaSignal))
    old = sla.model_copy(update={"signal_id": sla.signal_id + "/v0", "policy_version": "2025.9"})
    report = compare([*derived, old], derived, real_rules(default_policy()))
    (missing,) = report.missing
    assert missing.reason.startswith("recorded under policy 2025.9 but 2026.1 is in force at ")


def stricter_policy_text() -> str:
    text = default_policy_text().replace('version = "2026.1"', 'version = "2026.9-strict"')
    # every first_response target to 5 business minutes
    return re.sub(r"first_response = \d+", "first_response = 5", text)


def test_what_if_a_stricter_policy_breaches_more(system: System) -> None:
    strict = policy_from_toml(stricter_policy_text())
    result = what_if(system.log, strict, default=default_policy())
    before, after = result.breaches_total
    assert after > before
    fr_before = sum(b for k, (b, _) in result.breaches.items() if k.startswith("first_response"))
    fr_after = sum(a for k, (_, a) in result.breaches.items() if k.startswith("first_response"))
    assert fr_after > fr_before
    assert result.proposed_version == "2026.9-strict"
    assert sum(a for _, a in result.pages.values()) >= sum(b for b, _ in result.pages.values())


def test_what_if_the_same_policy_changes_nothing(system: System) -> None:
    result = what_if(system.log, default_policy(), default=default_policy())
    assert result.before_signals == result.after_signals
    assert all(b == a for b, a in result.breaches.values())
    assert result.priorities == {}


def test_frozen_book_ignores_published_policies(system: System) -> None:
    from loopservice.domain.events import PolicyPublished
    from loopservice.domain.policy import policy_from_mapping

    strict = policy_from_toml(stricter_policy_text())
    book = FrozenRulesBook(default_policy(), policy_from_mapping)
    book.publish(
        PolicyPublished.model_validate(
            {
                "event_id": "policy:x",
                "type": "policy.published",
                "occurred_at": "2026-01-01T00:00:00+00:00",
                "tenant_id": "acme",
                "account_id": "_policy",
                "source": {"platform": "loopservice", "channel": "web"},
                "actor": {"kind": "system", "id": "t"},
                "version": strict.version,
                "policy": strict.model_dump(mode="json", by_alias=True),
            }
        )
    )
    assert book.in_force(END).version == "2026.1"


# -- CLI -------------------------------------------------------------------------------------


def test_cli_replay_identical_then_different(system: System, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(audit, ["replay", "--db", db_of(system)])
    assert ok.exit_code == 0, ok.output
    assert re.search(r"identical: \d+ signals", ok.output)
    windowed = runner.invoke(
        audit, ["replay", "--from", "2026-01-08", "--until", "2026-01-10", "--db", db_of(system)]
    )
    assert windowed.exit_code == 0, windowed.output

    # a second database: the same interactions, one forged signal on its signal log
    other = build_system(
        Settings(data_dir=tmp_path, log_url=f"sqlite:///{tmp_path / 'loop.db'}"), FixedClock(END)
    )
    other.log.append([r.value for r in system.log.read(1, system.log.head())])
    other.engine.catch_up()
    sla = next(s for s in other.signals.values() if isinstance(s, SlaSignal))
    other.signals.append([sla.model_copy(update={"signal_id": "forged/" + sla.signal_id})])
    bad = runner.invoke(
        audit, ["replay", "--db", str(tmp_path / "loop.db")], env={"COLUMNS": "300"}
    )
    assert bad.exit_code == 1, bad.output
    assert "missing" in bad.output and "not re-derived" in bad.output


def test_cli_replay_and_what_if_split_across_workers_report_as_one_process(
    system: System, tmp_path: Path
) -> None:
    runner = CliRunner()
    one = runner.invoke(audit, ["replay", "--workers", "1", "--db", db_of(system)])
    split = runner.invoke(audit, ["replay", "--workers", "2", "--db", db_of(system)])
    assert split.exit_code == 0, split.output
    assert split.output == one.output and "identical" in split.output
    policy = tmp_path / "strict.toml"
    policy.write_text(stricter_policy_text(), encoding="utf-8")
    outputs = [
        runner.invoke(audit, ["what-if", str(policy), "--workers", n, "--db", db_of(system)])
        for n in ("1", "2")
    ]
    assert outputs[0].exit_code == 0 and outputs[1].output == outputs[0].output


def test_cli_replay_lists_the_first_differences_and_counts_them_all(
    system: System, tmp_path: Path
) -> None:
    """A log ingested without its signals: every re-derived signal is extra. The counts by
    type cover them all; the table lists the first `--limit`."""
    bare = build_system(
        Settings(data_dir=tmp_path, log_url=f"sqlite:///{tmp_path / 'bare.db'}"), FixedClock(END)
    )
    bare.log.append([r.value for r in system.log.read(1, system.log.head())])
    derived = len(list(system.signals.values()))
    runner = CliRunner()
    args = ["replay", "--db", str(tmp_path / "bare.db")]
    out = runner.invoke(audit, [*args, "--limit", "5"], env={"COLUMNS": "300"})
    assert out.exit_code == 1, out.output
    assert f"0 identical, 0 missing, {derived} extra, 0 changed" in out.output
    assert f"the first 5 of {derived} differences" in out.output
    assert f"{derived - 5} more: --limit 0 lists them all" in out.output
    counted = re.findall(r"│ extra\s+│ [a-z_.]+\s+│ (\d+)", out.output)
    assert sum(int(n) for n in counted) == derived
    every = runner.invoke(audit, [*args, "--limit", "0"], env={"COLUMNS": "300"})
    assert every.exit_code == 1
    assert "more: --limit 0" not in every.output
    assert every.output.count("re-derived from the log but not on the signal log") == derived


def a_case_with_signals(system: System) -> tuple[str, str]:
    s = next(s for s in system.signals.values() if isinstance(s, SlaSignal))
    assert s.case_id is not None
    return s.tenant_id, s.case_id


def test_cli_case_lists_every_decision(system: System) -> None:
    tenant, case_id = a_case_with_signals(system)
    runner = CliRunner()
    out = runner.invoke(
        audit, ["case", case_id, "--tenant", tenant, "--json", "--db", db_of(system)]
    )
    assert out.exit_code == 0, out.output
    rows: list[dict[str, Any]] = orjson.loads(out.output)
    kinds = {r["kind"] for r in rows}
    assert {"priority", "sla"} <= kinds
    assert rows[0]["kind"] == "priority" and rows[0]["policy_version"] == "2026.1"
    assert all(r["caused_by"] for r in rows if r["kind"] == "sla")
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    as_csv = runner.invoke(
        audit, ["case", case_id, "--tenant", tenant, "--csv", "--db", db_of(system)]
    )
    assert as_csv.exit_code == 0
    assert as_csv.output.splitlines()[0] == "time,kind,what,policy_version,caused_by"
    assert len(as_csv.output.splitlines()) == len(rows) + 1
    table = runner.invoke(audit, ["case", case_id, "--tenant", tenant, "--db", db_of(system)])
    assert table.exit_code == 0 and case_id in table.output
    missing = runner.invoke(audit, ["case", "nope", "--tenant", tenant, "--db", db_of(system)])
    assert missing.exit_code != 0


def test_cli_what_if(system: System, tmp_path: Path) -> None:
    policy = tmp_path / "strict.toml"
    policy.write_text(stricter_policy_text(), encoding="utf-8")
    out = CliRunner().invoke(audit, ["what-if", str(policy), "--db", db_of(system)])
    assert out.exit_code == 0, out.output
    assert "what if policy 2026.9-strict" in out.output
    total = next(line for line in out.output.splitlines() if "total" in line)
    before, after = (int(n) for n in re.findall(r"\d+", total)[:2])
    assert after > before


def test_breaches_fired_by_clock_ticks_replay_identically(tmp_path: Path) -> None:
    # only the tick moves the watermark past the deadline: the replay must fold ticks too
    system = build_system(
        Settings(data_dir=tmp_path, log_url=f"sqlite:///{tmp_path / 'loop.db'}"),
        FixedClock(T0 + timedelta(days=2)),
    )
    system.log.append([opened(0, impact="critical", urgency="critical")])
    system.engine.catch_up()
    system.log.append([clock_tick(T0 + timedelta(days=1))])
    system.engine.catch_up()
    recorded = list(system.signals.values())
    assert any(isinstance(s, SlaBreached) for s in recorded)
    rules = real_rules(default_policy())
    report = compare(recorded, replay_signals(system.log, rules=rules), rules)
    assert report.ok and report.identical == len(recorded)
