"""A deterministic, realistic customer-service workload: `loopservice simulate`.

`generate(config)` streams raw event dicts (valid under `EVENT_ADAPTER`) in `occurred_at`
order; `ground_truth(config)` says what was planted in them (churners, renewals, surges).
All randomness comes from `random.Random` instances seeded from `config.seed`, and no wall
clock is read, so one seed always yields the same bytes.

Events are generated one simulated day at a time. Everything that starts on a day (a case and
its whole future conversation, an onboarding plan) is pushed on a heap at once; at the end of
the day every event due before midnight is popped, so memory holds only the open future.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time as wallclock
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from loopservice.simulator_world import (
    CHANNEL_WEIGHTS,
    CHANNELS,
    CHURN_REASONS,
    DAY,
    DEFAULT_START,
    HOUR,
    MILESTONES,
    PLATFORM_BY_CHANNEL,
    TOPIC_BY_NAME,
    TOPIC_WEIGHTS,
    TOPICS,
    Account,
    SimulationConfig,
    Tenant,
    Topic,
    World,
    build_world,
    iso,
)

__all__ = ["SimulationConfig", "generate", "ground_truth", "simulate_command"]

SCHEMA_VERSION = 2
KNOWLEDGE_ACCOUNT = "_knowledge"  # articles belong to the tenant, not to a customer
LEVELS = ("low", "medium", "high", "critical")
LEVEL_WEIGHTS = (30, 45, 20, 5)
FIRST_RESPONSE = {"P1": HOUR, "P2": 4 * HOUR, "P3": 8 * HOUR, "P4": 24 * HOUR}
LOCAL_HOUR_WEIGHTS = (1, 1, 1, 1, 1, 2, 3, 6, 10, 12, 12, 11, 9, 11, 11, 10, 9, 7, 5, 4, 3, 2, 2, 1)
CSAT_HEALTHY = (2, 3, 8, 30, 57)
CSAT_STRAINED = (12, 12, 20, 30, 26)
CSAT_BAD = (25, 20, 20, 20, 15)
NPS_HEALTHY = (1, 1, 1, 1, 2, 2, 4, 8, 14, 30, 36)
NPS_DECLINING = (6, 6, 7, 8, 8, 10, 10, 12, 12, 12, 9)
ESCALATIONS = (
    ("customer escalated: blocking their whole team", -1),
    ("impact wider than first reported", -1),
    ("executive sponsor involved", -1),
    ("workaround available", 1),
    ("only one user affected", 1),
)
HANDOFF_REASONS = {
    "success": "commercial question for the account owner",
    "onboarding": "setup is not finished: needs the onboarding team",
    "support": "technical fault: back to support",
}
CUSTOMER_LINES = (
    "Any update on this?",
    "Still happening on our side.",
    "Here is a screenshot of the error.",
    "That did not help, same result.",
    "Thanks, trying that now.",
)
AGENT_LINES = (
    "Thanks for reaching out, looking into this now.",
    "Could you send the exact error message and the time it happened?",
    "We found the cause and applied a fix, can you confirm?",
    "I have escalated this to engineering and will update you.",
)


def _priority(impact: str, urgency: str) -> str:
    score = LEVELS.index(impact) + LEVELS.index(urgency)
    if score >= 5:
        return "P1"
    if score == 4:
        return "P2"
    return "P3" if score >= 2 else "P4"


class _Simulation:
    def __init__(self, world: World) -> None:
        cfg = world.config
        self.world = world
        self.cfg = cfg
        self.rng = random.Random(f"events:{cfg.seed}")
        self.heap: list[tuple[int, int, dict[str, Any]]] = []
        self.seq = 0
        self.case_n = 0
        self.article_n = 0
        self.articles: dict[str, dict[str, list[tuple[int, str]]]] = {
            t.tenant_id: {} for t in world.tenants
        }
        self.day_start = [cfg.start_ts + d * DAY for d in range(cfg.days)]
        self.day_date = [(cfg.start + timedelta(days=d)).isoformat() for d in range(cfg.days)]
        self.weekday = [(cfg.start.weekday() + d) % 7 for d in range(cfg.days)]
        self.surges_by_day: dict[int, list[tuple[int, Account, str]]] = {}
        for s in world.surges:
            for ts, account in s.opens:
                day = (ts - cfg.start_ts) // DAY
                self.surges_by_day.setdefault(day, []).append((ts, account, s.topic))

    # --- emitting -------------------------------------------------------------------------

    def _push(
        self,
        ts: int,
        type_: str,
        account: Account,
        case_id: str | None,
        channel: str,
        platform: str,
        actor: dict[str, Any],
        fields: dict[str, Any],
    ) -> None:
        ev: dict[str, Any] = {
            "event_id": "",
            "type": type_,
            "schema_version": SCHEMA_VERSION,
            "occurred_at": "",
            "tenant_id": account.tenant.tenant_id,
            "account_id": account.account_id,
        }
        if case_id is not None:
            ev["case_id"] = case_id
        ev["source"] = {"platform": platform, "channel": channel}
        ev["actor"] = actor
        ev.update(fields)
        self.seq += 1
        heapq.heappush(self.heap, (ts, self.seq, ev))

    def run(self, on_day: Callable[[int], None] | None) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        prefix = f"sim{cfg.seed}-"
        heap = self.heap
        n = 0
        last_ts = -1
        last_iso = ""
        for d in range(cfg.days):
            self._day(d)
            limit = cfg.end_ts if d == cfg.days - 1 else self.day_start[d] + DAY
            while heap and heap[0][0] < limit:
                ts, _, ev = heapq.heappop(heap)
                n += 1
                if ts != last_ts:
                    last_ts, last_iso = ts, iso(ts)
                ev["event_id"] = f"{prefix}{n:08d}"
                ev["occurred_at"] = last_iso
                yield ev
            if on_day is not None:
                on_day(d + 1)
        heap.clear()

    # --- one day --------------------------------------------------------------------------

    def _day(self, d: int) -> None:
        rng = self.rng
        start = self.day_start[d]
        weekend = self.weekday[d] >= 5
        today = self.day_date[d]
        usage_at = start + 23 * HOUR + 1800
        weekend_factor = 0.3 if weekend else 1.0
        heap, heappush, random_ = self.heap, heapq.heappush, rng.random
        for tenant in self.world.tenants:
            self._knowledge(tenant, d, start, weekend)
            off = tenant.utc_offset_h[d]
            for a in tenant.accounts:
                if d < a.active_from or (a.end_ts is not None and a.end_ts <= start):
                    continue
                if d == a.active_from:
                    self._account_start(a, d, start)
                health = a.health_factor(d)
                declining = health < 0.85
                ts = usage_at + int(random_() * 1800)
                if a.end_ts is None or ts < a.end_ts:
                    value = a.seats * a.engagement * health * weekend_factor
                    value *= rng.gauss(1.0, 0.09)
                    self.seq += 1
                    heappush(
                        heap,
                        (
                            ts,
                            self.seq,
                            {
                                "event_id": "",
                                "type": "usage.recorded",
                                "schema_version": SCHEMA_VERSION,
                                "occurred_at": "",
                                "tenant_id": tenant.tenant_id,
                                "account_id": a.account_id,
                                "source": {"platform": "product-analytics", "channel": "in-app"},
                                "actor": {"kind": "system", "id": "usage-pipeline"},
                                "metric": "active_users",
                                "value": round(max(0.0, value), 1),
                                "period_start": today,
                                "period_end": today,
                            },
                        ),
                    )
                lam = a.case_rate * (0.3 if weekend else 1.0) * (1.9 if declining else 1.0)
                r = random_()
                if r < lam:
                    for _ in range(2 if r < lam * lam * 0.5 else 1):
                        self._new_case(a, d, self._local_time(start, off), declining)
                if rng.random() < (0.006 if weekend else 0.02):
                    self._self_service(a, d, self._local_time(start, off), declining)
                if rng.random() < 1 / 75:
                    self._nps(a, self._local_time(start, off), declining)
                if d == a.renewal_day and a.outcome == "renewed":
                    self._renewal(a, d, start)
                if a.end_ts is not None and a.end_ts < start + DAY:
                    self._churn(a)
                if rng.random() < 0.0005:
                    self._push(
                        start + rng.randrange(9 * HOUR, 17 * HOUR),
                        "account.updated",
                        a,
                        None,
                        "web",
                        "salesforce",
                        {"kind": "system", "id": "crm-sync"},
                        {"owner_id": rng.choice(tenant.success)},
                    )
        for ts, a, topic in self.surges_by_day.get(d, ()):
            if a.end_ts is None or ts < a.end_ts:
                self._surge_case(a, d, ts, TOPIC_BY_NAME[topic])

    def _local_time(self, start: int, off: int) -> int:
        rng = self.rng
        hour = rng.choices(range(24), LOCAL_HOUR_WEIGHTS)[0]
        return start + ((hour - off) % 24) * HOUR + rng.randrange(HOUR)

    # --- accounts -------------------------------------------------------------------------

    def _account_start(self, a: Account, d: int, start: int) -> None:
        ts = start  # before anything else the account does that day
        crm = {"kind": "system", "id": "crm-sync"}
        renewal = (self.cfg.start + timedelta(days=a.renewal_day)).isoformat()
        self._push(
            ts,
            "account.updated",
            a,
            None,
            "web",
            "salesforce",
            crm,
            {
                "name": a.name,
                "plan": a.plan,
                "tier": a.tier,
                "arr": a.arr,
                "renewal_date": renewal,
                "owner_id": a.owner_id,
                "seats": a.seats,
            },
        )
        if a.onboarding:
            self._onboarding(a, d, ts)
        elif d == 0 and self.cfg.history_days:
            self._usage_history(a, ts)

    def _usage_history(self, a: Account, ts: int) -> None:
        """The account's daily usage before the start, as the product-analytics backfill that
        an existing customer brings along, recorded at the start. Drawn from its own random
        stream, so the rest of the run is the same with or without history."""
        rng = random.Random(f"history:{self.cfg.seed}:{a.account_id}")
        for k, d in enumerate(range(-self.cfg.history_days, 0)):
            weekend = (self.cfg.start.weekday() + d) % 7 >= 5
            value = a.seats * a.engagement * a.health_factor(d) * (0.3 if weekend else 1.0)
            value *= rng.gauss(1.0, 0.09)
            day = (self.cfg.start + timedelta(days=d)).isoformat()
            self._push(
                ts + 60 + k,
                "usage.recorded",
                a,
                None,
                "in-app",
                "product-analytics",
                {"kind": "system", "id": "usage-backfill"},
                {
                    "metric": "active_users",
                    "value": round(max(0.0, value), 1),
                    "period_start": day,
                    "period_end": day,
                },
            )

    def _onboarding(self, a: Account, d: int, ts: int) -> None:
        rng = self.rng
        cal = a.tenant.calendar
        manager = rng.choice(a.tenant.onboarding)
        struggling = rng.random() < 0.25
        actor = {"kind": "agent", "id": manager, "team": "onboarding"}
        for milestone, due_in in MILESTONES:
            due_day = d + due_in
            due_date = (self.cfg.start + timedelta(days=due_day)).isoformat()
            due_ts = self.cfg.start_ts + due_day * DAY
            if rng.random() < (0.55 if struggling else 0.85):
                at = cal.add(due_ts - rng.randrange(1, max(2, due_in // 2 + 1)) * DAY, 3600)
                self._push(
                    max(at, ts + 60),
                    "onboarding.milestone_reached",
                    a,
                    None,
                    "web",
                    "gainsight",
                    dict(actor),
                    {"milestone": milestone, "due_date": due_date},
                )
            else:
                missed_at = due_ts + DAY + rng.randrange(HOUR)
                self._push(
                    missed_at,
                    "onboarding.milestone_missed",
                    a,
                    None,
                    "web",
                    "gainsight",
                    {"kind": "system", "id": "onboarding-tracker"},
                    {"milestone": milestone, "due_date": due_date},
                )
                if rng.random() < 0.5:
                    self._push(
                        cal.add(missed_at + rng.randrange(2, 10) * DAY, 7200),
                        "onboarding.milestone_reached",
                        a,
                        None,
                        "web",
                        "gainsight",
                        dict(actor),
                        {"milestone": milestone, "due_date": due_date},
                    )

    def _renewal(self, a: Account, d: int, start: int) -> None:
        rng = self.rng
        ts = a.tenant.calendar.add(start, rng.randrange(HOUR, 8 * HOUR))
        ts = min(ts, start + DAY - 1)
        arr = float(round(a.arr * rng.uniform(1.0, 1.15), -2))
        nxt = (self.cfg.start + timedelta(days=d + 365)).isoformat()
        csm = {"kind": "agent", "id": a.owner_id, "team": "success"}
        self._push(
            ts,
            "account.renewed",
            a,
            None,
            "web",
            "salesforce",
            csm,
            {"arr": arr, "next_renewal_date": nxt},
        )
        self._push(
            ts + 5,
            "account.updated",
            a,
            None,
            "web",
            "salesforce",
            {"kind": "system", "id": "crm-sync"},
            {"arr": arr, "renewal_date": nxt},
        )

    def _churn(self, a: Account) -> None:
        assert a.end_ts is not None
        self._push(
            a.end_ts,
            "account.churned",
            a,
            None,
            "web",
            "salesforce",
            {"kind": "agent", "id": a.owner_id, "team": "success"},
            {"reason": self.rng.choice(CHURN_REASONS)},
        )

    def _nps(self, a: Account, ts: int, declining: bool) -> None:
        if a.end_ts is not None and ts >= a.end_ts:
            return
        rng = self.rng
        score = rng.choices(range(11), NPS_DECLINING if declining else NPS_HEALTHY)[0]
        comment = "" if rng.random() < 0.6 else ("Too many issues lately" if score <= 6 else "")
        self._push(
            ts,
            "survey.answered",
            a,
            None,
            "email",
            "delighted",
            {"kind": "customer", "id": rng.choice(a.users)},
            {"kind": "nps", "score": score, "comment": comment},
        )

    # --- knowledge and self-service -------------------------------------------------------

    def _knowledge(self, tenant: Tenant, d: int, start: int, weekend: bool) -> None:
        rng = self.rng
        if d == 0:
            topics = list(TOPICS[:6])
        elif not weekend and rng.random() < 0.3:
            topics = rng.choices(TOPICS, TOPIC_WEIGHTS)
        else:
            return
        for topic in topics:
            self.article_n += 1
            article_id = f"{tenant.tenant_id}-kb-{self.article_n:05d}"
            code = topic.resolutions[0][0]
            ts = tenant.calendar.add(start, rng.randrange(HOUR, 8 * HOUR))
            ts = min(ts, start + DAY - 1)
            self.articles[tenant.tenant_id].setdefault(topic.name, []).append((ts, article_id))
            self._push(
                ts,
                "knowledge.article_published",
                tenant.accounts[0],
                None,
                "web",
                "helpcenter",
                {"kind": "agent", "id": rng.choice(tenant.support), "team": "support"},
                {
                    "article_id": article_id,
                    "title": f"How to fix: {rng.choice(topic.subjects).lower()}",
                    "topic": topic.name,
                    "resolution_code": code,
                    "account_id": KNOWLEDGE_ACCOUNT,
                },
            )

    def _self_service(self, a: Account, d: int, ts: int, declining: bool) -> None:
        if a.end_ts is not None and ts >= a.end_ts:
            return
        rng = self.rng
        topic = rng.choices(TOPICS, TOPIC_WEIGHTS)[0]
        published = [
            aid for at, aid in self.articles[a.tenant.tenant_id].get(topic.name, ()) if at < ts
        ]
        seen = rng.sample(published[-4:], min(len(published[-4:]), rng.randint(1, 2)))
        user = rng.choice(a.users)
        for i, article_id in enumerate(seen):
            self._push(
                ts + 30 * i,
                "knowledge.article_viewed",
                a,
                None,
                "web",
                "helpcenter",
                {"kind": "customer", "id": user},
                {"article_id": article_id},
            )
        resolved = rng.random() < (0.65 if seen else 0.2)
        self._push(
            ts + 30 * len(seen) + 60,
            "selfservice.session",
            a,
            None,
            "web",
            "helpcenter",
            {"kind": "customer", "id": user},
            {"topic": topic.name, "article_ids": seen, "resolved": resolved},
        )
        if not resolved and rng.random() < 0.35:
            self._case(a, d, ts + rng.randrange(5 * 60, 2 * HOUR), topic, "web", declining)

    # --- cases ----------------------------------------------------------------------------

    def _new_case(self, a: Account, d: int, ts: int, declining: bool) -> None:
        rng = self.rng
        if declining and rng.random() < 0.15:
            topic = TOPIC_BY_NAME["contract"]
        else:
            topic = rng.choices(TOPICS, TOPIC_WEIGHTS)[0]
        channel = rng.choices(CHANNELS, CHANNEL_WEIGHTS)[0]
        self._case(a, d, ts, topic, channel, declining)

    def _surge_case(self, a: Account, d: int, ts: int, topic: Topic) -> None:
        channel = self.rng.choices(CHANNELS, (25, 30, 10, 10, 15, 10))[0]
        self._case(a, d, ts, topic, channel, a.declining(d), incident=True)

    def _case(
        self,
        a: Account,
        d: int,
        ts: int,
        topic: Topic,
        channel: str,
        declining: bool,
        *,
        incident: bool = False,
    ) -> None:
        if a.end_ts is not None and ts >= a.end_ts:
            return
        rng = self.rng
        tenant = a.tenant
        cal = tenant.calendar
        push = self._push
        self.case_n += 1
        case_id = f"case-{self.cfg.seed}-{self.case_n:07d}"
        platform = PLATFORM_BY_CHANNEL[channel]
        customer = {"kind": "customer", "id": rng.choice(a.users)}
        team = (
            "onboarding"
            if a.onboarding and topic.team == "support" and rng.random() < 0.4
            else (topic.team)
        )
        if incident:
            impact = rng.choices(LEVELS, (5, 15, 50, 30))[0]
            urgency = rng.choices(LEVELS, (5, 20, 50, 25))[0]
        else:
            impact = rng.choices(LEVELS, LEVEL_WEIGHTS)[0]
            urgency = rng.choices(LEVELS, LEVEL_WEIGHTS)[0]
        priority = _priority(impact, urgency)

        def agent_of(team_: str) -> dict[str, Any]:
            return {"kind": "agent", "id": rng.choice(tenant.agents(team_)), "team": team_}

        push(
            ts,
            "case.opened",
            a,
            case_id,
            channel,
            platform,
            customer,
            {
                "subject": rng.choice(topic.subjects),
                "topic": topic.name,
                "impact": impact,
                "urgency": urgency,
                "product_area": topic.product_area,
                "team": team,
            },
        )
        agent = agent_of(team)
        t = ts + rng.randrange(20, 600)
        push(
            t,
            "case.assigned",
            a,
            case_id,
            channel,
            platform,
            {"kind": "system", "id": "router"},
            {"assignee_id": agent["id"], "team": team},
        )
        if rng.random() < 0.07:
            reason, step = rng.choice(ESCALATIONS)
            new = f"P{min(4, max(1, int(priority[1]) + step))}"
            if new != priority:
                priority = new
                t = cal.add(t, rng.randrange(300, 2 * HOUR))
                push(
                    t,
                    "case.priority_changed",
                    a,
                    case_id,
                    channel,
                    platform,
                    dict(agent),
                    {"priority": priority, "reason": reason},
                )
        target = FIRST_RESPONSE[priority]
        fast = channel in ("chat", "phone")
        median = target * (0.06 if fast else 0.35) * (1.3 if incident else 1.0)
        delay = max(60, int(median * rng.lognormvariate(0.0, 0.9)))
        breached = delay > target
        if rng.random() < 0.35:
            push(
                cal.add(t, rng.randrange(120, max(180, delay // 2))),
                "case.note_added",
                a,
                case_id,
                channel,
                platform,
                dict(agent),
                {"body": "Checked logs; reproducing in staging."},
            )
        t = max(t + 1, cal.add(ts, delay))
        push(
            t,
            "case.agent_replied",
            a,
            case_id,
            channel,
            platform,
            dict(agent),
            {"body": AGENT_LINES[0]},
        )

        rounds = rng.choices((0, 1, 2, 3, 4), (30, 35, 20, 10, 5))[0]
        if declining and rng.random() < 0.4:
            rounds += 1
        handoff_at = rng.randrange(rounds + 1) if rng.random() < 0.1 else -1
        for r in range(rounds + 1):
            if r == handoff_at:
                t, team, agent = self._handoff(a, case_id, channel, platform, t, team, agent_of)
            if r == rounds:
                break
            waiting = rng.random() < 0.35
            if waiting:
                push(
                    t + 1,
                    "case.status_changed",
                    a,
                    case_id,
                    channel,
                    platform,
                    dict(agent),
                    {"status": "waiting_on_customer"},
                )
            t += max(300, min(5 * DAY, int(3 * HOUR * rng.lognormvariate(0.0, 1.1))))
            push(
                t,
                "case.customer_message",
                a,
                case_id,
                channel,
                platform,
                dict(customer),
                {"body": rng.choice(CUSTOMER_LINES)},
            )
            if waiting:
                push(
                    t + 1,
                    "case.status_changed",
                    a,
                    case_id,
                    channel,
                    platform,
                    {"kind": "system", "id": "workflow"},
                    {"status": "open"},
                )
            t = cal.add(t + 2, max(60, int(target * 0.5 * rng.lognormvariate(-0.5, 0.9))))
            push(
                t,
                "case.agent_replied",
                a,
                case_id,
                channel,
                platform,
                dict(agent),
                {"body": rng.choice(AGENT_LINES[1:])},
            )

        if rng.random() > 0.93:
            return  # still open when the story ends
        codes, weights = zip(*topic.resolutions, strict=True)
        code = "known_incident" if incident else rng.choices(codes, weights)[0]
        t = cal.add(t, rng.randrange(600, 6 * HOUR))
        push(
            t,
            "case.resolved",
            a,
            case_id,
            channel,
            platform,
            dict(agent),
            {"resolution_code": code, "summary": f"{topic.name}: {code.replace('_', ' ')}"},
        )
        reopened = rng.random() < (0.16 if declining else 0.07)
        if reopened:
            t += rng.randrange(6 * HOUR, 4 * DAY)
            push(
                t,
                "case.customer_message",
                a,
                case_id,
                channel,
                platform,
                dict(customer),
                {"body": "The problem is back."},
            )
            push(
                t + 1,
                "case.reopened",
                a,
                case_id,
                channel,
                platform,
                dict(customer),
                {"reason": "issue recurred"},
            )
            t = cal.add(t + 2, max(60, int(target * 0.4 * rng.lognormvariate(0.0, 0.8))))
            push(
                t,
                "case.agent_replied",
                a,
                case_id,
                channel,
                platform,
                dict(agent),
                {"body": rng.choice(AGENT_LINES[1:])},
            )
            t = cal.add(t, rng.randrange(600, 8 * HOUR))
            code = rng.choices(codes, weights)[0] if not incident else code
            push(
                t,
                "case.resolved",
                a,
                case_id,
                channel,
                platform,
                dict(agent),
                {"resolution_code": code, "summary": "fixed for good"},
            )
        if rng.random() < 0.3:
            strained = declining or breached or reopened
            table = (
                CSAT_BAD
                if declining and (breached or reopened)
                else (CSAT_STRAINED if strained else CSAT_HEALTHY)
            )
            score = rng.choices((1, 2, 3, 4, 5), table)[0]
            push(
                t + rng.randrange(HOUR, 2 * DAY),
                "survey.answered",
                a,
                case_id,
                "email",
                "delighted",
                dict(customer),
                {"kind": "csat", "score": score},
            )
        push(
            t + rng.randrange(3 * DAY, 7 * DAY),
            "case.closed",
            a,
            case_id,
            channel,
            platform,
            {"kind": "system", "id": "auto-close"},
            {},
        )

    def _handoff(
        self,
        a: Account,
        case_id: str,
        channel: str,
        platform: str,
        t: int,
        team: str,
        agent_of: Callable[[str], dict[str, Any]],
    ) -> tuple[int, str, dict[str, Any]]:
        rng = self.rng
        cal = a.tenant.calendar
        if team == "support":
            other = "onboarding" if a.onboarding or rng.random() < 0.3 else "success"
        else:
            other = "support"
        hops = [team, other]
        if rng.random() < 0.15:  # ping-pong
            hops += [team, other] if rng.random() < 0.5 else [team]
        skip_rules = rng.random() < 0.08
        agent = agent_of(team)
        for src, dst in itertools.pairwise(hops):
            t = cal.add(t, rng.randrange(600, 4 * HOUR))
            self._push(
                t,
                "case.handed_off",
                a,
                case_id,
                channel,
                platform,
                dict(agent),
                {
                    "from_team": src,
                    "to_team": dst,
                    "reason": "" if skip_rules else HANDOFF_REASONS[dst],
                    "summary": "" if skip_rules else "Customer context and steps tried so far.",
                },
            )
            agent = agent_of(dst)
            t = cal.add(t, rng.randrange(60, 2 * HOUR))
            self._push(
                t,
                "case.assigned",
                a,
                case_id,
                channel,
                platform,
                {"kind": "system", "id": "router"},
                {"assignee_id": agent["id"], "team": dst},
            )
        return t, hops[-1], agent


def generate(
    config: SimulationConfig, on_day: Callable[[int], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw event dicts in `occurred_at` order; `on_day(n)` after each of the n simulated days."""
    return _Simulation(build_world(config)).run(on_day)


def ground_truth(config: SimulationConfig) -> dict[str, Any]:
    """What the simulation plants: churners, renewals, declines, injected topic surges."""
    return build_world(config).truth()


# --- command line ---------------------------------------------------------------------------


@click.command("simulate")
@click.option(
    "--accounts",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Customer accounts (each with a tier, an owner and an onboarding journey).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=90,
    show_default=True,
    help="Days of operation to simulate from --start.",
)
@click.option(
    "--seed",
    type=int,
    default=1,
    show_default=True,
    help="Random seed: the same seed and options write the same files, byte for byte.",
)
@click.option(
    "--history-days",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="daily usage of existing accounts before the start, backfilled at the start",
)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="NDJSON events"
)
@click.option(
    "--truth",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="ground-truth JSON (default: <out>.truth.json)",
)
@click.option(
    "--start",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=DEFAULT_START.isoformat(),
    show_default=True,
    help="first simulated day (UTC)",
)
def simulate_command(
    accounts: int,
    days: int,
    seed: int,
    history_days: int,
    out: Path,
    truth: Path | None,
    start: datetime,
) -> None:
    """Write a deterministic, realistic service workload as NDJSON plus its ground truth."""
    config = SimulationConfig(
        accounts=accounts, days=days, seed=seed, start=start.date(), history_days=history_days
    )
    truth_path = truth or out.with_name(out.name + ".truth.json")
    console = Console(stderr=True)
    began = wallclock.perf_counter()
    world = build_world(config)
    events = cases = 0
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    progress = Progress(
        TextColumn("simulating"),
        BarColumn(),
        TextColumn("day {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[events]:,} events"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress, out.open("wb") as fh:
        task = progress.add_task("simulate", total=days, events=0)

        def on_day(n: int) -> None:
            progress.update(task, completed=n, events=events)

        batch: list[bytes] = []
        for ev in _Simulation(world).run(on_day):
            events += 1
            if ev["type"] == "case.opened":
                cases += 1
            batch.append(dumps(ev, option=newline))
            if len(batch) >= 4096:
                fh.write(b"".join(batch))
                batch.clear()
        fh.write(b"".join(batch))
    facts = world.truth()
    truth_path.write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2))
    seconds = wallclock.perf_counter() - began
    console.print(
        f"{events:,} events, {accounts:,} accounts, {cases:,} cases; "
        f"churners: {len(facts['churns'])}, surges: {len(facts['surges'])}; "
        f"{seconds:.1f} s → {out} (truth: {truth_path})",
        soft_wrap=True,
        highlight=False,
    )
