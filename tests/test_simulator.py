"""The workload simulator: deterministic, valid, ordered, and carrying the truth it claims."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path
from statistics import mean
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from click.testing import CliRunner

from loopservice.cli import main
from loopservice.domain.events import EVENT_ADAPTER
from loopservice.simulator import SimulationConfig, generate, ground_truth

CONFIG = SimulationConfig(accounts=250, days=120, seed=11)
SMALL = SimulationConfig(accounts=30, days=21, seed=5)


def ndjson(config: SimulationConfig) -> bytes:
    return b"".join(orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE) for e in generate(config))


@pytest.fixture(scope="module")
def lines() -> list[bytes]:
    return ndjson(CONFIG).splitlines()


@pytest.fixture(scope="module")
def events(lines: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines]


@pytest.fixture(scope="module")
def truth() -> dict[str, Any]:
    return ground_truth(CONFIG)


def at(ev: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(ev["occurred_at"])


def test_same_seed_gives_identical_bytes() -> None:
    assert ndjson(SMALL) == ndjson(SMALL)
    assert ground_truth(SMALL) == ground_truth(SMALL)


def test_output_does_not_depend_on_string_hashing() -> None:
    code = (
        "import hashlib, orjson;"
        "from loopservice.simulator import SimulationConfig, generate;"
        "c = SimulationConfig(accounts=30, days=21, seed=5);"
        "print(hashlib.sha256(b''.join(orjson.dumps(e) for e in generate(c))).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = hashlib.sha256(b"".join(orjson.dumps(e) for e in generate(SMALL))).hexdigest()
    assert out.stdout.strip() == here


def test_different_seed_differs() -> None:
    other = SimulationConfig(accounts=SMALL.accounts, days=SMALL.days, seed=SMALL.seed + 1)
    assert ndjson(SMALL) != ndjson(other)


def test_start_date_moves_the_whole_run() -> None:
    moved = SimulationConfig(accounts=5, days=3, seed=1, start=date(2026, 6, 1))
    first = next(iter(generate(moved)))
    assert first["occurred_at"].startswith("2026-06-01T")


def test_every_line_is_a_valid_event(lines: list[bytes]) -> None:
    for line in lines:
        EVENT_ADAPTER.validate_json(line)


def test_size_is_in_the_expected_range(events: list[dict[str, Any]]) -> None:
    per_account_day = len(events) / (CONFIG.accounts * CONFIG.days)
    assert 0.5 <= per_account_day <= 1.5


def test_sorted_by_occurred_at_within_the_window(events: list[dict[str, Any]]) -> None:
    times = [at(e) for e in events]
    assert times == sorted(times)
    start = datetime.fromisoformat(ground_truth(CONFIG)["config"]["start"])
    assert times[0] >= start
    assert times[-1] < start + timedelta(days=CONFIG.days)
    assert all(t.utcoffset() == timedelta(0) for t in times[:100])


def test_event_ids_are_unique(events: list[dict[str, Any]]) -> None:
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)


def test_all_channels_and_many_event_types(events: list[dict[str, Any]]) -> None:
    channels = {e["source"]["channel"] for e in events if e["type"] == "case.opened"}
    assert channels == {"email", "chat", "phone", "web", "social", "in-app"}
    types = {e["type"] for e in events}
    expected = {
        "case.opened",
        "case.customer_message",
        "case.agent_replied",
        "case.note_added",
        "case.assigned",
        "case.handed_off",
        "case.status_changed",
        "case.priority_changed",
        "case.resolved",
        "case.reopened",
        "case.closed",
        "survey.answered",
        "account.updated",
        "usage.recorded",
        "onboarding.milestone_reached",
        "onboarding.milestone_missed",
        "account.renewed",
        "account.churned",
        "knowledge.article_published",
        "knowledge.article_viewed",
        "selfservice.session",
    }
    assert expected <= types
    assert len({e["tenant_id"] for e in events}) == 3


def test_topic_mix_is_skewed(events: list[dict[str, Any]]) -> None:
    topics = Counter(e["topic"] for e in events if e["type"] == "case.opened")
    top_share = topics.most_common(1)[0][1] / sum(topics.values())
    assert len(topics) >= 10
    assert top_share > 2.5 / len(topics)


def test_resolution_codes_repeat_per_topic(events: list[dict[str, Any]]) -> None:
    topic_of = {e["case_id"]: e["topic"] for e in events if e["type"] == "case.opened"}
    codes: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        if e["type"] == "case.resolved" and e["case_id"] in topic_of:
            codes[topic_of[e["case_id"]]][e["resolution_code"]] += 1
    login = codes["login"]
    assert login.most_common(1)[0][1] >= 0.4 * sum(login.values())


def test_agents_reply_within_business_hours(events: list[dict[str, Any]]) -> None:
    zones = {t["tenant_id"]: ZoneInfo(t["time_zone"]) for t in ground_truth(CONFIG)["tenants"]}
    replies = [e for e in events if e["type"] == "case.agent_replied"]
    inside = 0
    for e in replies:
        local = at(e).astimezone(zones[e["tenant_id"]])
        inside += local.weekday() < 5 and 8 <= local.hour < 18
    assert inside / len(replies) > 0.98


def test_some_first_replies_breach_their_target(events: list[dict[str, Any]]) -> None:
    opened: dict[str, datetime] = {}
    waits: list[timedelta] = []
    for e in events:
        if e["type"] == "case.opened":
            opened[e["case_id"]] = at(e)
        elif e["type"] == "case.agent_replied" and e["case_id"] in opened:
            waits.append(at(e) - opened.pop(e["case_id"]))
    late = sum(w > timedelta(hours=24) for w in waits) / len(waits)
    assert 0.02 < late < 0.5


def test_waits_on_customer_come_back_to_open(events: list[dict[str, Any]]) -> None:
    status: dict[str, str] = {}
    flips = 0
    for e in events:
        if e["type"] == "case.status_changed":
            if e["status"] == "open" and status.get(e["case_id"]) == "waiting_on_customer":
                flips += 1
            status[e["case_id"]] = e["status"]
    assert flips > 20


def daily_usage(events: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    start = date.fromisoformat(ground_truth(CONFIG)["config"]["start"][:10])
    usage: dict[str, dict[int, float]] = defaultdict(dict)
    for e in events:
        if e["type"] == "usage.recorded":
            day = (date.fromisoformat(e["period_start"]) - start).days
            usage[e["account_id"]][day] = e["value"]
    return usage


def decline_ratio(series: dict[int, float], until: int) -> float:
    early = [series[d] for d in range(0, 30) if d in series]
    late = [series[d] for d in range(until - 30, until) if d in series]
    return mean(late) / max(mean(early), 1e-9)


def test_churners_decline_and_renewers_do_not(
    events: list[dict[str, Any]], truth: dict[str, Any]
) -> None:
    usage = daily_usage(events)
    start = datetime.fromisoformat(truth["config"]["start"])
    churn_ratios = []
    for c in truth["churns"]:
        day = (datetime.fromisoformat(c["churned_at"]) - start).days
        if day >= 60:
            churn_ratios.append(decline_ratio(usage[c["account_id"]], day))
    renew_ratios = []
    for r in truth["renewals"]:
        day = (date.fromisoformat(r["renewed_on"]) - start.date()).days
        if day >= 60:
            renew_ratios.append(decline_ratio(usage[r["account_id"]], day))
    assert len(churn_ratios) >= 3 and len(renew_ratios) >= 5
    assert mean(churn_ratios) < 0.8
    assert mean(churn_ratios) < mean(renew_ratios) - 0.15
    assert min(renew_ratios) < 0.85  # noisy: some accounts decline and still renew

    churned = {c["account_id"] for c in truth["churns"]}
    assert all(e["account_id"] in churned for e in events if e["type"] == "account.churned")
    assert len([e for e in events if e["type"] == "account.churned"]) == len(churned)


def test_churners_answer_worse_surveys(events: list[dict[str, Any]], truth: dict[str, Any]) -> None:
    churned = {c["account_id"] for c in truth["churns"]}
    nps = [e for e in events if e["type"] == "survey.answered" and e["kind"] == "nps"]
    churner_scores = [e["score"] for e in nps if e["account_id"] in churned]
    other_scores = [e["score"] for e in nps if e["account_id"] not in churned]
    assert churner_scores and other_scores
    assert mean(churner_scores) < mean(other_scores)


def test_surges_show_a_volume_spike(events: list[dict[str, Any]], truth: dict[str, Any]) -> None:
    assert truth["surges"]
    opened = [e for e in events if e["type"] == "case.opened"]
    for s in truth["surges"]:
        onset, end = datetime.fromisoformat(s["onset"]), datetime.fromisoformat(s["end"])
        same = [e for e in opened if e["tenant_id"] == s["tenant_id"] and e["topic"] == s["topic"]]
        inside = sum(onset <= at(e) <= end for e in same)
        share_of_time = (end - onset) / timedelta(days=CONFIG.days)
        assert inside >= s["cases"]
        assert inside > 10 * max(1.0, (len(same) - inside) * share_of_time)


def test_cli_writes_events_and_truth(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["simulate", "--help"]).exit_code == 0
    out = tmp_path / "sim.ndjson"
    args = ["--accounts", "30", "--days", "21", "--seed", "5", "--out", str(out)]
    result = runner.invoke(main, ["simulate", *args])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == ndjson(SMALL)
    truth = json.loads((tmp_path / "sim.ndjson.truth.json").read_text())
    assert truth == json.loads(json.dumps(ground_truth(SMALL)))
    assert {"churns", "renewals", "surges", "accounts", "tenants"} <= truth.keys()

    other = tmp_path / "t.json"
    moved = ["--start", "2026-03-02", "--truth", str(other)]
    assert runner.invoke(main, ["simulate", *args, *moved]).exit_code == 0
    assert json.loads(other.read_text())["config"]["start"].startswith("2026-03-02")
