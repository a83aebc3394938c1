"""The simulated world behind `loopservice simulate`: tenants, accounts, topics, calendars.

Everything here is decided up front from the seed, before a single event is generated:
which accounts churn or renew and when, whose usage declines, which incident surges hit which
topic. That plan is the ground truth a detector can be scored against; `loopservice.simulator`
turns it into events.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

DAY = 86_400
HOUR = 3_600
DEFAULT_START = date(2026, 1, 5)  # a Monday


@dataclass(frozen=True)
class SimulationConfig:
    accounts: int = 300
    days: int = 90
    seed: int = 1
    start: date = DEFAULT_START
    history_days: int = 0  # daily usage before the start, backfilled at the start

    def __post_init__(self) -> None:
        if self.accounts < 1 or self.days < 1:
            raise ValueError("accounts and days must be at least 1")
        if self.history_days < 0:
            raise ValueError("history_days must not be negative")

    @property
    def start_ts(self) -> int:
        return int(datetime.combine(self.start, time(), UTC).timestamp())

    @property
    def end_ts(self) -> int:
        return self.start_ts + self.days * DAY


@dataclass(frozen=True)
class Topic:
    name: str
    product_area: str
    team: str
    subjects: tuple[str, ...]
    resolutions: tuple[tuple[str, int], ...]


TOPICS: tuple[Topic, ...] = (
    Topic("login", "auth", "support",
          ("Cannot log in", "Password reset email never arrives", "Locked out after MFA change"),
          (("password_reset", 6), ("mfa_reset", 3), ("account_unlocked", 1))),
    Topic("billing", "billing", "support",
          ("Invoice shows the wrong amount", "Charged twice this month", "Need a VAT invoice"),
          (("invoice_corrected", 5), ("refund_issued", 3), ("plan_changed", 1))),
    Topic("integrations", "integrations", "support",
          ("Salesforce sync stopped", "Slack notifications missing", "Connector keeps failing"),
          (("connector_reauthorized", 6), ("config_fixed", 3), ("known_bug_workaround", 2))),
    Topic("performance", "platform", "support",
          ("Dashboard is very slow", "Pages time out", "Search takes forever"),
          (("cache_cleared", 3), ("capacity_increased", 2), ("known_incident", 4))),
    Topic("data_import", "import", "onboarding",
          ("CSV import fails", "Imported records are duplicated", "Field mapping is wrong"),
          (("mapping_fixed", 5), ("file_reformatted", 3), ("import_rerun", 2))),
    Topic("permissions", "admin", "support",
          ("User cannot see projects", "How do I restrict admin rights?", "Role changes ignored"),
          (("roles_updated", 5), ("explained_how_to", 4))),
    Topic("notifications", "notifications", "support",
          ("Too many emails", "Alerts not delivered", "Digest arrives twice"),
          (("settings_changed", 5), ("known_bug_workaround", 2))),
    Topic("reporting", "analytics", "support",
          ("Report totals do not match", "Scheduled report not sent", "Need a custom report"),
          (("report_rebuilt", 4), ("explained_how_to", 4))),
    Topic("api_errors", "api", "support",
          ("API returns 500", "Rate limited on the API", "Webhook signature invalid"),
          (("client_fix_advised", 4), ("rate_limit_raised", 3), ("bug_fixed", 2))),
    Topic("sso", "auth", "onboarding",
          ("SAML login loops", "Okta setup fails", "SSO certificate expired"),
          (("saml_config_fixed", 5), ("certificate_renewed", 3))),
    Topic("mobile_app", "mobile", "support",
          ("App crashes on start", "Push notifications missing", "Cannot attach photos"),
          (("app_update", 5), ("reinstall", 3))),
    Topic("export", "analytics", "support",
          ("Export is empty", "Export times out", "Need a full data export"),
          (("export_rerun", 4), ("explained_how_to", 3))),
    Topic("webhooks", "api", "support",
          ("Webhooks not firing", "Webhook retries flood us", "Missing webhook events"),
          (("endpoint_fixed", 4), ("retries_enabled", 3))),
    Topic("contract", "account", "success",
          ("Question about renewal terms", "Want to add seats", "Considering other options"),
          (("renewal_quote_sent", 4), ("contract_amended", 3))),
)  # fmt: skip
TOPIC_BY_NAME = {t.name: t for t in TOPICS}
TOPIC_WEIGHTS: tuple[float, ...] = tuple(1.0 / (k + 1) ** 1.05 for k in range(len(TOPICS)))
SURGE_TOPICS = ("performance", "integrations", "api_errors", "notifications", "webhooks", "export")

CHANNELS = ("email", "chat", "phone", "web", "social", "in-app")
CHANNEL_WEIGHTS = (35, 20, 10, 20, 5, 10)
PLATFORM_BY_CHANNEL = {
    "email": "zendesk",
    "chat": "intercom",
    "phone": "aircall",
    "web": "zendesk",
    "social": "sprinklr",
    "in-app": "intercom",
}

TIERS = ("starter", "growth", "enterprise")
TIER_WEIGHTS = (60, 30, 10)
TIER_ARR = {
    "starter": (3_000, 15_000),
    "growth": (20_000, 120_000),
    "enterprise": (150_000, 900_000),
}
TIER_SEATS = {"starter": (3, 25), "growth": (20, 150), "enterprise": (150, 1_500)}
TIER_CASE_RATE = {"starter": 0.02, "growth": 0.035, "enterprise": 0.07}
TIER_CHURN = {"starter": 0.32, "growth": 0.22, "enterprise": 0.12}
PLANS = {
    "starter": ("starter-monthly", "starter-annual"),
    "growth": ("growth-annual", "growth-plus"),
    "enterprise": ("enterprise", "enterprise-plus"),
}
CHURN_REASONS = (
    "moved to a competitor",
    "budget cut",
    "product did not fit the workflow",
    "champion left the company",
    "too many unresolved issues",
)
MILESTONES = (  # (milestone, days after onboarding start it is due)
    ("kickoff", 3),
    ("sso_configured", 10),
    ("data_imported", 21),
    ("first_workflow_live", 30),
    ("team_trained", 45),
)

TENANTS = (  # (tenant_id, IANA zone, share of accounts)
    ("acme", "America/New_York", 0.5),
    ("globex", "Europe/Berlin", 0.3),
    ("initech", "Asia/Singapore", 0.2),
)


class BusinessCalendar:
    """Agents' working hours, Mon–Fri 08:00–18:00 local, as UTC epoch intervals."""

    def __init__(self, zone: str, first: date, last: date) -> None:
        tz = ZoneInfo(zone)
        self.opens: list[int] = []
        self.closes: list[int] = []
        day = first
        while day <= last:
            if day.weekday() < 5:
                self.opens.append(int(datetime.combine(day, time(8), tz).timestamp()))
                self.closes.append(int(datetime.combine(day, time(18), tz).timestamp()))
            day += timedelta(days=1)

    def add(self, ts: int, seconds: int) -> int:
        """The instant `seconds` of working time after `ts`."""
        i = bisect_right(self.closes, ts)
        opens, closes = self.opens, self.closes
        while i < len(closes):
            cur = max(ts, opens[i])
            avail = closes[i] - cur
            if seconds <= avail:
                return cur + seconds
            seconds -= avail
            i += 1
        return max(ts, closes[-1] if closes else ts) + seconds

    def is_open(self, ts: int) -> bool:
        i = bisect_right(self.closes, ts)
        return i < len(self.opens) and self.opens[i] <= ts


@dataclass
class Tenant:
    tenant_id: str
    zone: str
    calendar: BusinessCalendar
    utc_offset_h: list[int]  # per simulated day, local offset in whole hours
    support: list[str]
    success: list[str]
    onboarding: list[str]
    accounts: list[Account] = field(default_factory=list)

    def agents(self, team: str) -> list[str]:
        return {"support": self.support, "success": self.success}.get(team, self.onboarding)


@dataclass(eq=False)
class Account:
    account_id: str
    tenant: Tenant
    name: str
    tier: str
    plan: str
    arr: float
    seats: int
    owner_id: str
    renewal_day: int  # day index relative to the start; may lie beyond the simulated range
    active_from: int  # day index; > 0 for accounts onboarded during the simulation
    onboarding: bool
    engagement: float
    case_rate: float
    users: list[str]
    outcome: str | None = None  # "churned" | "renewed" | None (renewal outside the range)
    end_ts: int | None = None  # churn instant: no activity afterwards
    decline_start: int | None = None
    decline_end: int | None = None
    decline_depth: float = 0.0
    dip: tuple[int, int, float] | None = None  # a temporary dip that recovers: noise

    def health_factor(self, day: int) -> float:
        """Usage multiplier for a day: 1.0 healthy, lower while declining or dipping."""
        f = 1.0
        if self.decline_start is not None and self.decline_end is not None:
            if day >= self.decline_start:
                span = max(1, self.decline_end - self.decline_start)
                f *= 1.0 - self.decline_depth * min(1.0, (day - self.decline_start) / span)
        if self.dip is not None and self.dip[0] <= day < self.dip[1]:
            f *= 1.0 - self.dip[2]
        return f

    def declining(self, day: int) -> bool:
        return self.health_factor(day) < 0.85


@dataclass(frozen=True)
class Surge:
    tenant_id: str
    topic: str
    onset: int
    end: int
    opens: tuple[tuple[int, Account], ...]


@dataclass
class World:
    config: SimulationConfig
    tenants: list[Tenant]
    accounts: list[Account]
    surges: list[Surge]

    def truth(self) -> dict[str, Any]:
        cfg = self.config

        def day_iso(d: int) -> str:
            return (cfg.start + timedelta(days=d)).isoformat()

        accounts = []
        for a in self.accounts:
            accounts.append(
                {
                    "account_id": a.account_id,
                    "tenant_id": a.tenant.tenant_id,
                    "tier": a.tier,
                    "plan": a.plan,
                    "arr": a.arr,
                    "owner_id": a.owner_id,
                    "renewal_date": day_iso(a.renewal_day),
                    "onboarding_start": day_iso(a.active_from) if a.onboarding else None,
                    "outcome": a.outcome,
                    "decline_start": None if a.decline_start is None else day_iso(a.decline_start),
                    "temporary_dip": None
                    if a.dip is None
                    else {"start": day_iso(a.dip[0]), "end": day_iso(a.dip[1])},
                }
            )
        churns = [
            {
                "account_id": a.account_id,
                "tenant_id": a.tenant.tenant_id,
                "churned_at": iso(a.end_ts) if a.end_ts is not None else None,
                "decline_start": None if a.decline_start is None else day_iso(a.decline_start),
                "decline_depth": round(a.decline_depth, 3),
            }
            for a in self.accounts
            if a.outcome == "churned"
        ]
        renewals = [
            {
                "account_id": a.account_id,
                "tenant_id": a.tenant.tenant_id,
                "renewed_on": day_iso(a.renewal_day),
                "arr": a.arr,
            }
            for a in self.accounts
            if a.outcome == "renewed"
        ]
        surges = [
            {
                "tenant_id": s.tenant_id,
                "topic": s.topic,
                "onset": iso(s.onset),
                "end": iso(s.end),
                "cases": len(s.opens),
                "accounts": len({a.account_id: None for _, a in s.opens}),
            }
            for s in self.surges
        ]
        return {
            "config": {
                "accounts": cfg.accounts,
                "days": cfg.days,
                "seed": cfg.seed,
                "history_days": cfg.history_days,
                "start": iso(cfg.start_ts),
                "end": iso(cfg.end_ts),
            },
            "tenants": [
                {"tenant_id": t.tenant_id, "time_zone": t.zone, "accounts": len(t.accounts)}
                for t in self.tenants
            ],
            "accounts": accounts,
            "churns": churns,
            "renewals": renewals,
            "surges": surges,
        }


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def build_world(config: SimulationConfig) -> World:
    rng = random.Random(f"world:{config.seed}")
    n_tenants = min(len(TENANTS), config.accounts)
    shares = [s for _, _, s in TENANTS[:n_tenants]]
    counts = [max(1, int(config.accounts * s / sum(shares))) for s in shares]
    counts[0] += config.accounts - sum(counts)

    first = config.start - timedelta(days=3)
    last = config.start + timedelta(days=config.days + 120)
    tenants: list[Tenant] = []
    accounts: list[Account] = []
    for (tenant_id, zone, _), count in zip(TENANTS, counts, strict=False):
        tz = ZoneInfo(zone)
        offsets = []
        for d in range(config.days):
            noon = datetime.combine(config.start + timedelta(days=d), time(12), UTC)
            off = noon.astimezone(tz).utcoffset()
            offsets.append(round(off.total_seconds() / HOUR) if off is not None else 0)
        tenant = Tenant(
            tenant_id=tenant_id,
            zone=zone,
            calendar=BusinessCalendar(zone, first, last),
            utc_offset_h=offsets,
            support=[f"{tenant_id}-agent-{i:03d}" for i in range(max(3, count // 30))],
            success=[f"{tenant_id}-csm-{i:03d}" for i in range(max(2, count // 25))],
            onboarding=[f"{tenant_id}-onb-{i:03d}" for i in range(max(2, count // 60))],
        )
        for _ in range(count):
            account = _make_account(rng, tenant, len(accounts), config)
            tenant.accounts.append(account)
            accounts.append(account)
        tenants.append(tenant)
    surges = _plan_surges(rng, config, tenants)
    return World(config=config, tenants=tenants, accounts=accounts, surges=surges)


def _make_account(rng: random.Random, tenant: Tenant, n: int, config: SimulationConfig) -> Account:
    tier = rng.choices(TIERS, TIER_WEIGHTS)[0]
    lo, hi = TIER_ARR[tier]
    seats_lo, seats_hi = TIER_SEATS[tier]
    seats = int(math.exp(rng.uniform(math.log(seats_lo), math.log(seats_hi))))
    onboarding = rng.random() < 0.15 and config.days >= 14
    active_from = rng.randrange(0, max(1, config.days // 2)) if onboarding else 0
    renewal_day = active_from + 365 if onboarding else rng.randrange(7, 365)
    account_id = f"{tenant.tenant_id}-acct-{n:05d}"
    account = Account(
        account_id=account_id,
        tenant=tenant,
        name=f"{_company_name(rng)} ({n})",
        tier=tier,
        plan=rng.choice(PLANS[tier]),
        arr=float(round(rng.uniform(lo, hi), -2)),
        seats=seats,
        owner_id=rng.choice(tenant.success),
        renewal_day=renewal_day,
        active_from=active_from,
        onboarding=onboarding,
        engagement=rng.uniform(0.35, 0.9),
        case_rate=TIER_CASE_RATE[tier] * rng.lognormvariate(0, 0.35),
        users=[f"{account_id}-u{k}" for k in range(1, min(seats, 6) + 1)],
    )
    if renewal_day < config.days:
        if rng.random() < TIER_CHURN[tier]:
            account.outcome = "churned"
            churn_day = max(1, renewal_day - rng.choice((0, 0, 0, rng.randrange(1, 21))))
            account.end_ts = config.start_ts + churn_day * DAY + rng.randrange(13 * HOUR, 22 * HOUR)
            mild = rng.random() < 0.2
            account.decline_depth = rng.uniform(0.12, 0.3) if mild else rng.uniform(0.4, 0.8)
            account.decline_start = churn_day - rng.randrange(30, 75)
            account.decline_end = churn_day - rng.randrange(0, 10)
        else:
            account.outcome = "renewed"
    if account.outcome == "renewed" and rng.random() < 0.2:  # at risk, saved at renewal
        start = renewal_day - rng.randrange(25, 60)
        account.dip = (start, renewal_day + rng.randrange(0, 20), rng.uniform(0.15, 0.45))
    elif account.outcome != "churned" and rng.random() < 0.12:
        start = rng.randrange(-20, max(1, config.days))
        account.dip = (start, start + rng.randrange(10, 30), rng.uniform(0.15, 0.4))
    return account


_NAME_A = ("Blue", "North", "Bright", "Silver", "Rapid", "Green", "Iron", "Clear", "Solid", "Nova")
_NAME_B = ("Harbor", "Peak", "Forge", "Field", "Logic", "Works", "Labs", "Systems", "Foods", "Air")


def _company_name(rng: random.Random) -> str:
    return f"{rng.choice(_NAME_A)} {rng.choice(_NAME_B)}"


def _plan_surges(
    rng: random.Random, config: SimulationConfig, tenants: list[Tenant]
) -> list[Surge]:
    if config.days < 3:
        return []
    n = max(1, round(config.days / 30))
    weights = [len(t.accounts) for t in tenants]
    surges: list[Surge] = []
    for _ in range(n):
        tenant = rng.choices(tenants, weights)[0]
        day = rng.randrange(2, config.days)
        while day < config.days and (config.start + timedelta(days=day)).weekday() >= 5:
            day += 1
        if day >= config.days:
            day = 2
        local_start = (10 - tenant.utc_offset_h[day]) % 24
        onset = config.start_ts + day * DAY + local_start * HOUR + rng.randrange(0, 3 * HOUR)
        end = min(onset + rng.randrange(2 * HOUR, 6 * HOUR), config.end_ts - 1)
        live = [
            a
            for a in tenant.accounts
            if a.active_from * DAY + config.start_ts <= onset and (a.end_ts or end + 1) > end
        ]
        if not live:
            continue
        topic = rng.choice(SURGE_TOPICS)
        size = max(12, int(len(tenant.accounts) * rng.uniform(0.15, 0.3)))
        times = [int(rng.triangular(onset, end, onset + (end - onset) * 0.25)) for _ in range(size)]
        opens = [(ts, rng.choice(live)) for ts in sorted(times)]
        surges.append(Surge(tenant.tenant_id, topic, onset, end, tuple(opens)))
    return surges
