"""`loopservice evaluate`: scoring rules on hand-made truth, and a small simulation end to end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from loopservice.cli import main
from loopservice.domain.patterns import TENANT_WIDE
from loopservice.domain.signals import PatternDetected, RiskFactor, RiskRaised, Signal
from loopservice.evaluate import score_churn, score_surges
from loopservice.simulator import SimulationConfig, generate, ground_truth

START = datetime(2026, 1, 5, tzinfo=UTC)


def at(days: float) -> datetime:
    return START + timedelta(days=days)


def truth() -> dict[str, Any]:
    accounts = [
        {"tenant_id": "acme", "account_id": a} for a in ("early", "late", "missed", "r1", "r2", "x")
    ]
    return {
        "config": {"start": START.isoformat(), "end": at(120).isoformat()},
        "accounts": accounts,
        "churns": [
            {"tenant_id": "acme", "account_id": a, "churned_at": at(d).isoformat()}
            for a, d in (("early", 90), ("late", 90), ("missed", 90))
        ],
        "renewals": [
            {"tenant_id": "acme", "account_id": a, "renewed_on": at(60).date().isoformat()}
            for a in ("r1", "r2")
        ],
        "surges": [
            {
                "tenant_id": "acme",
                "topic": "login",
                "onset": at(10).isoformat(),
                "end": (at(10) + timedelta(hours=3)).isoformat(),
            },
            {
                "tenant_id": "acme",
                "topic": "billing",
                "onset": at(20).isoformat(),
                "end": (at(20) + timedelta(hours=3)).isoformat(),
            },
        ],
    }


def raised(account: str, when: datetime, level: str = "medium") -> RiskRaised:
    return RiskRaised(
        signal_id=f"risk.raised/acme/{account}/{level}/{when.isoformat()}",
        tenant_id="acme",
        account_id=account,
        detected_at=when,
        caused_by=("ev-1",),
        score=50,
        level="high" if level == "high" else "medium",
        previous_level="low",
        factors=(RiskFactor(factor="nps", points=20, detail="d", caused_by=("ev-1",)),),
    )


def surge(topic: str, when: datetime) -> PatternDetected:
    return PatternDetected(
        signal_id=f"pattern/topic_surge/acme/{topic}/{when.isoformat()}",
        tenant_id="acme",
        account_id=TENANT_WIDE,
        detected_at=when,
        caused_by=("ev-1",),
        pattern="topic_surge",
        key=f"acme/{topic}",
    )


def test_churn_recall_counts_only_flags_early_enough_and_renewers_flagged_are_false_alarms() -> (
    None
):
    signals: list[Signal] = [
        raised("early", at(60)),  # 30 days ahead
        raised("late", at(85)),  # 5 days ahead: flagged, not early enough
        raised("r1", at(40)),  # a renewing account flagged before its renewal
        raised("r2", at(70)),  # after its renewal: not a false alarm
        raised("x", at(5)),
    ]
    found = score_churn(truth(), signals)
    assert (found.churners, found.flagged_early, found.flagged_any) == (3, 1, 2)
    assert found.recall == pytest.approx(1 / 3)
    assert found.false_alarm_rate == pytest.approx(1 / 2)
    assert found.median_lead_days == pytest.approx((30 + 5) / 2)
    assert (found.others, found.others_flagged) == (1, 1)
    high_only = score_churn(truth(), signals, level="high")
    assert high_only.flagged_any == 0 and high_only.false_alarm_rate == 0


def test_surge_precision_recall_and_delay() -> None:
    signals: list[Signal] = [
        surge("login", at(10) + timedelta(minutes=20)),
        surge("login", at(10) + timedelta(hours=2)),  # a second detection of the same surge
        surge("billing", at(20) + timedelta(minutes=90)),  # late: not within the hour
        surge("export", at(30)),  # nothing injected there
    ]
    found = score_surges(truth(), signals)
    assert (found.detections, found.true_detections) == (4, 3)
    assert found.precision == pytest.approx(3 / 4)
    assert found.recall == pytest.approx(1 / 2)
    assert found.detected_any == 2
    assert found.median_delay_minutes == pytest.approx((20 + 90) / 2)


def test_evaluate_runs_the_processors_over_a_small_simulation(tmp_path: Path) -> None:
    config = SimulationConfig(accounts=60, days=45, seed=5, history_days=56)
    events = tmp_path / "events.ndjson"
    events.write_bytes(b"".join(orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE)
                                for e in generate(config)))  # fmt: skip
    truth_file = tmp_path / "truth.json"
    truth_file.write_bytes(orjson.dumps(ground_truth(config)))
    runner = CliRunner()
    args = ["evaluate", "--truth", str(truth_file), "--events", str(events)]
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    figures = orjson.loads(result.output[result.output.index("{") :])
    churn, surges = figures["churn"], figures["surges"]
    assert churn["churners"] == 1 and churn["recall"] == 1.0
    assert churn["median_lead_days"] >= 14
    assert surges["surges"] == 2 and surges["precision"] == 1.0
    text = runner.invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "false alarms among renewing" in text.output
    assert "median delay from onset" in text.output
