"""The loop maturity scorecard: what each stage counts, ratings at the thresholds, the API."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient

from factories import T0, event, opened
from loopservice.domain import maturity as mt
from loopservice.domain.events import Event
from loopservice.domain.signals import HandoffRuleViolated, SignalBase
from loopservice.infra.api import create_app
from loopservice.infra.auth import TokenRegistry
from loopservice.infra.loop_api import loop_router, maturity_page_router
from loopservice.infra.settings import Settings, TokenGrant
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.projections.loop_queries import LoopQueries
from loopservice.projections.maturity import MaturityFold
from loopservice.projections.store import View, memory_view
from loopservice.projections_cli import open_runner
from loopservice.streams.clock import FixedClock

POLICY = default_policy()
AGENT = {"kind": "agent", "id": "a-1", "team": "support"}
DAY = timedelta(days=1)


class RiskStub(SignalBase):
    """A stand-in for the `risk.*` signals the health processor emits: the scorecard reads only
    the type, the account, the time and, when present, the level and the previous level."""

    type: str = "risk.raised"
    level: Literal["low", "medium", "high"] = "high"
    previous_level: Literal["low", "medium", "high"] = "medium"


def risk(n: int, at: datetime, account: str = "acct-1", **kw: Any) -> RiskStub:
    return RiskStub(signal_id=f"risk-{n}", tenant_id="acme", account_id=account,
                    detected_at=at, caused_by=("x",), **kw)  # fmt: skip


def violation(n: int, handoff_event: str, case: str = "c1") -> HandoffRuleViolated:
    return HandoffRuleViolated(
        signal_id=f"violation-{n}", tenant_id="acme", account_id="acct-1", case_id=case,
        detected_at=T0, caused_by=(handoff_event,), rule="route", from_team="support",
        to_team="success", detail="",
    )  # fmt: skip


def fold(events: list[Event], signals: list[Any] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    f, view = MaturityFold(POLICY), memory_view()
    for p, e in enumerate(events, 1):
        f.apply_event(view, p, e)
    for p, s in enumerate(signals, 1):
        f.apply_signal(view, p, s)
    return summary(view)


def summary(view: View) -> dict[str, Any]:
    found = view.find("summary", "acme", "acme")
    assert found is not None
    return found


# --- what counts ----------------------------------------------------------------------------


def test_unexplained_overrides_and_risk_warnings() -> None:
    for reason in ("n/a", "Override", "x", "  -  ", "fix."):
        assert mt.unexplained(reason), reason
    for reason in ("exec escalation", "customer blocked on launch"):
        assert not mt.unexplained(reason), reason
    assert mt.is_risk_warning("risk.raised", "high", "medium")
    assert mt.is_risk_warning("risk.anything_new")  # no level stated: the type warns
    assert not mt.is_risk_warning("risk.cleared", "medium", "high")
    assert not mt.is_risk_warning("risk.changed", "medium", "high")  # a fall
    assert not mt.is_risk_warning("risk.changed", "low", "low")
    assert not mt.is_risk_warning("pattern.detected")
    assert mt.is_escalation("P3", "P2") and not mt.is_escalation("P2", "P3")


def test_standardize_counts_cases_with_unexplained_overrides_and_violated_handoffs() -> None:
    events = [
        opened(1, case="c1"), opened(2, case="c2"), opened(3, case="c3"),
        event("case.priority_changed", 4, case="c1", actor=AGENT, priority="P1", reason="n/a"),
        event("case.priority_changed", 5, case="c1", actor=AGENT, priority="P2", reason="-"),
        event("case.priority_changed", 6, case="c2", actor=AGENT, priority="P1",
              reason="production down for all users"),
        event("case.handed_off", 7, case="c1", actor=AGENT, from_team="support",
              to_team="success", summary="s"),
        event("case.handed_off", 8, case="c2", actor=AGENT, from_team="support",
              to_team="success", summary="s"),
    ]  # fmt: skip
    # two rules broken by one handoff count once
    s = fold(events, [violation(1, "ev-7"), violation(2, "ev-7")])
    assert (s["cases"], s["unexplained_override_cases"], s["overrides"],
            s["unexplained_overrides"]) == (3, 1, 3, 2)  # fmt: skip
    assert (s["handoffs"], s["violated_handoffs"]) == (2, 1)


def test_contextualize_counts_repeat_contacts_and_restarted_diagnoses() -> None:
    def resolve(n: int, case: str, at: datetime, code: str, account: str = "acct-1") -> Event:
        return event("case.resolved", n, at=at, case=case, account_id=account, actor=AGENT,
                     resolution_code=code)  # fmt: skip

    events = [
        opened(1, at=T0, case="c1"), resolve(2, "c1", T0 + DAY, "password_reset"),
        # 3 days later, same topic, same answer: a repeat that restarts the diagnosis
        opened(3, at=T0 + 3 * DAY, case="c2"), resolve(4, "c2", T0 + 4 * DAY, "password_reset"),
        # another answer: a repeat, no restart
        opened(5, at=T0 + 5 * DAY, case="c3"), resolve(6, "c3", T0 + 6 * DAY, "mfa_reset"),
        # 30 days on: neither
        opened(7, at=T0 + 40 * DAY, case="c4"), resolve(8, "c4", T0 + 41 * DAY, "password_reset"),
        # another topic, another account: neither
        opened(9, at=T0 + 3 * DAY, case="c5", topic="billing"),
        opened(10, at=T0 + 3 * DAY, case="c6", account_id="acct-2"),
    ]  # fmt: skip
    s = fold(events)
    assert (s["cases"], s["repeat_contacts"]) == (6, 2)
    assert (s["resolved_cases"], s["diagnosis_restarts"]) == (4, 1)


def test_anticipate_counts_outcomes_preceded_by_a_risk_warning_and_the_lead_time() -> None:
    churn_at, escalation_at = T0 + 100 * DAY, T0 + 50 * DAY
    events = [
        opened(1, at=T0, case="c1", impact="low", urgency="low"),  # P4
        event("case.priority_changed", 2, at=escalation_at, case="c1", actor=AGENT,
              priority="P2", reason="customer blocked"),
        event("case.priority_changed", 3, at=escalation_at + DAY, case="c1", actor=AGENT,
              priority="P3", reason="workaround found"),  # a de-escalation
        event("account.churned", 4, at=churn_at, case=None),
        event("account.churned", 5, at=churn_at, case=None, account_id="acct-2"),
    ]  # fmt: skip
    signals = [
        risk(1, churn_at - 20 * DAY),  # the earliest warning within 90 days: lead 20 days
        risk(2, churn_at - 5 * DAY),
        risk(3, churn_at - 200 * DAY),  # too early for the churn, too for the escalation
        risk(4, churn_at - 2 * DAY, account="acct-2", type="risk.cleared", level="low"),
    ]
    s = fold(events, signals)
    assert s["anticipation"]["churn"] == {"n": 2, "preceded": 1, "leads": [20 * 86_400.0]}
    assert s["anticipation"]["escalation"] == {"n": 1, "preceded": 0, "leads": []}
    # the same in the other order: warnings folded before the outcomes
    f, view = MaturityFold(POLICY), memory_view()
    for p, sig in enumerate(signals, 1):
        f.apply_signal(view, p, sig)
    for p, e in enumerate(events, 1):
        f.apply_event(view, p, e)
    assert summary(view)["anticipation"] == s["anticipation"]


def test_without_any_risk_signal_anticipation_is_zero_not_an_error() -> None:
    s = fold([event("account.churned", 1, case=None)])
    assert s["anticipation"]["churn"] == {"n": 1, "preceded": 0, "leads": []}


# --- ratings --------------------------------------------------------------------------------

FULL = {
    "cases": 100, "unexplained_override_cases": 0, "handoffs": 100, "violated_handoffs": 0,
    "repeat_contacts": 0, "resolved_cases": 100, "diagnosis_restarts": 0, "outcomes": 100,
    "preceded_outcomes": 100, "lead_seconds": [100 * 3600.0] * 10, "resolutions": 100,
    "covered_resolutions": 100, "settled_sessions": 100, "deflected_sessions": 100,
}  # fmt: skip


def stage(card: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in card["stages"] if s["stage"] == name)


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"unexplained_override_cases": 2}, "predictive"),  # 98 %: at the predictive bound
        ({"unexplained_override_cases": 3}, "coordinated"),  # 97 %
        ({"unexplained_override_cases": 10}, "coordinated"),  # 90 %: at the coordinated bound
        ({"unexplained_override_cases": 11}, "reactive"),  # 89 %
        ({"violated_handoffs": 11}, "reactive"),  # the weakest metric rates the stage
    ],
)
def test_standardize_is_rated_at_its_thresholds(counts: dict[str, int], expected: str) -> None:
    assert stage(mt.score(FULL | counts), "standardize")["rating"] == expected


@pytest.mark.parametrize(
    ("restarts", "repeats", "expected"),
    [(3, 0, "predictive"), (4, 0, "coordinated"), (10, 10, "coordinated"), (11, 0, "reactive"),
     (0, 21, "reactive")],
)  # fmt: skip
def test_contextualize_lower_is_better(restarts: int, repeats: int, expected: str) -> None:
    counts = FULL | {"diagnosis_restarts": restarts, "repeat_contacts": repeats}
    assert stage(mt.score(counts), "contextualize")["rating"] == expected


def test_anticipate_scale_and_sample_size() -> None:
    card = mt.score(FULL | {"preceded_outcomes": 30, "lead_seconds": [24 * 3600.0] * 5})
    assert stage(card, "anticipate")["rating"] == "coordinated"
    card = mt.score(FULL | {"preceded_outcomes": 29})
    assert stage(card, "anticipate")["rating"] == "reactive"
    card = mt.score(FULL | {"lead_seconds": [71 * 3600.0] * 5})
    assert stage(card, "anticipate")["rating"] == "coordinated"
    card = mt.score(FULL | {"covered_resolutions": 60, "deflected_sessions": 40})
    assert stage(card, "scale")["rating"] == "predictive"
    card = mt.score(FULL | {"covered_resolutions": 59})
    assert stage(card, "scale")["rating"] == "coordinated"
    few = mt.score(FULL | {"settled_sessions": 4, "deflected_sessions": 0})  # under min_sample
    deflection = stage(few, "scale")["metrics"][1]
    assert deflection["rating"] is None and stage(few, "scale")["rating"] == "predictive"
    empty = mt.score({})
    assert all(s["rating"] == "reactive" and not s["measured"] for s in empty["stages"])


# --- the view and the API -------------------------------------------------------------------


class World:
    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "loop.db"
        datastore = open_datastore(path)
        clock = FixedClock(T0 + timedelta(days=400))
        self.log = interaction_log(datastore, clock)
        self.signals = signal_log(datastore, clock)
        self.runner = open_runner(path)
        self.queries = LoopQueries(self.runner.store, POLICY, mt.MaturityThresholds(min_sample=1))


ACME, GLOBEX, INGEST = "acme-read-token-000001", "globex-read-token-0001", "acme-ingest-token-001"


def test_scorecard_from_the_log_per_tenant_over_http(tmp_path: Path) -> None:
    world = World(tmp_path)
    article = event(
        "knowledge.article_published", 1, at=T0 - DAY, case=None, actor=AGENT, article_id="kb",
        title="t", topic="login", resolution_code="password_reset",
    )  # fmt: skip
    world.log.append([
        article, opened(2, case="c1"),
        event("case.resolved", 3, case="c1", actor=AGENT, resolution_code="password_reset"),
        opened(4, case="g1", tenant_id="globex", topic="billing"),
        event("case.priority_changed", 5, case="g1", tenant_id="globex", actor=AGENT,
              priority="P1", reason="n/a"),
    ])  # fmt: skip
    world.runner.catch_up()
    grants = [
        TokenGrant.model_validate({"token": ACME, "tenant": "acme", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": GLOBEX, "tenant": "globex", "scopes": ["read"]}),
        TokenGrant.model_validate({"token": INGEST, "tenant": "acme", "scopes": ["ingest"]}),
    ]
    http = TestClient(create_app(Settings(data_dir=tmp_path), world.log,
                                 tokens=TokenRegistry(grants),
                                 routers=[loop_router(world.queries)]))  # fmt: skip
    acme = http.get("/v1/maturity", headers={"Authorization": f"Bearer {ACME}"}).json()
    assert stage(acme, "standardize")["rating"] == "predictive"
    assert stage(acme, "scale")["metrics"][0]["value"] == 1.0  # the one resolution is covered
    assert acme["counts"]["cases"] == 1 and acme["thresholds"]["min_sample"] == 1
    globex = http.get("/v1/maturity", headers={"Authorization": f"Bearer {GLOBEX}"}).json()
    assert stage(globex, "standardize")["rating"] == "reactive"  # its one case was overridden
    assert globex["counts"]["resolutions"] == 0
    assert http.get("/v1/maturity").status_code == 401
    assert (
        http.get("/v1/maturity", headers={"Authorization": f"Bearer {INGEST}"}).status_code == 403
    )


def test_the_maturity_page_is_served_without_a_build_step(tmp_path: Path) -> None:
    world = World(tmp_path)
    app = create_app(Settings(data_dir=tmp_path), world.log, tokens=TokenRegistry([]),
                     routers=[maturity_page_router()])  # fmt: skip
    page = TestClient(app).get("/maturity")
    assert page.status_code == 200 and "/v1/maturity" in page.text
