"""`loopservice evaluate`: the Anticipate signals scored against the simulator's ground truth.

Signals come from running the topology (the processors the engine runs) over the simulated
events (`--events FILE`), or are read from the embedded signal log. Then:

- churn: an account is *flagged* by its first `risk.raised` to the flag level (default: any)
  within `lookback` days before the outcome. Recall = churners flagged at least `lead` days
  (default 14) before they churned; false-alarm rate = renewing accounts flagged in the
  `lookback` days before their renewal; lead time = churn instant − first flag. Churners that
  churn within `warmup` days of the start have too little history for the usage baseline:
  they are reported apart as well as in the totals.
- surges: a `topic_surge` signal is a true detection when its tenant and topic match an
  injected surge and it was detected between the onset and the end (+ `slack`). Precision =
  true detections / detections; recall = surges detected within `within` (default 1 h) of
  their onset; delay = first detection − onset.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import click
import orjson

from loopservice.domain.events import EVENT_ADAPTER, Event
from loopservice.domain.health import LEVELS
from loopservice.domain.patterns import TENANT_WIDE
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import PatternDetected, RiskLevel, RiskRaised, Signal
from loopservice.domain.upcasting import upcast
from loopservice.infra.settings import Settings
from loopservice.infra.sqlite_log import open_datastore, signal_log
from loopservice.policy_cli import default_policy, load_policy
from loopservice.streams.audit import MemorySignalLog
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.log import Appended, LogRecord
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import derive_processors

DAY = timedelta(days=1)


# --- deriving signals ----------------------------------------------------------------------


class EventList:
    """A read-only interaction log over events in memory (the evaluation never ticks)."""

    def __init__(self, events: Iterable[Event]) -> None:
        self.records = [LogRecord(i, e.occurred_at, e) for i, e in enumerate(events, start=1)]

    def append(self, values: Sequence[Event]) -> list[Appended]:
        raise NotImplementedError("the evaluation log is read-only")

    def read(self, start: int, limit: int) -> list[LogRecord[Event]]:
        first = max(start, 1) - 1
        return self.records[first : first + limit]

    def head(self) -> int:
        return len(self.records)


def read_events(path: Path) -> Iterator[Event]:
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield EVENT_ADAPTER.validate_python(upcast(orjson.loads(line)))


def derive_signals(events: Iterable[Event], policy: Policy) -> list[Signal]:
    """The signals the engine derives from `events`, replayed in order with no clock ticks."""
    rules: RulesBook[Policy] = RulesBook(policy, policy_from_mapping)
    signals = MemorySignalLog()
    engine = EmbeddedEngine(EventList(events), signals, derive_processors(rules), batch_size=5000)
    engine.catch_up()
    return signals.values()


# --- scoring -------------------------------------------------------------------------------


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass
class ChurnScore:
    churners: int = 0
    flagged_early: int = 0  # at least `lead` days before the churn
    flagged_any: int = 0
    lead_days: list[float] = field(default_factory=list)
    renewing: int = 0
    renewing_flagged: int = 0
    evaluable: int = 0  # churners with at least `warmup` days of history
    evaluable_early: int = 0
    others: int = 0
    others_flagged: int = 0

    @property
    def recall(self) -> float | None:
        return _rate(self.flagged_early, self.churners)

    @property
    def evaluable_recall(self) -> float | None:
        return _rate(self.evaluable_early, self.evaluable)

    @property
    def false_alarm_rate(self) -> float | None:
        return _rate(self.renewing_flagged, self.renewing)

    @property
    def median_lead_days(self) -> float | None:
        return _median(self.lead_days)


@dataclass
class SurgeScore:
    surges: int = 0
    detections: int = 0
    true_detections: int = 0
    detected_within: int = 0
    detected_any: int = 0
    delays_minutes: list[float] = field(default_factory=list)

    @property
    def precision(self) -> float | None:
        return _rate(self.true_detections, self.detections)

    @property
    def recall(self) -> float | None:
        return _rate(self.detected_within, self.surges)

    @property
    def median_delay_minutes(self) -> float | None:
        return _median(self.delays_minutes)


def score_churn(
    truth: dict[str, Any],
    signals: Iterable[Signal],
    *,
    level: RiskLevel = "medium",
    lead: timedelta = 14 * DAY,
    lookback: timedelta = 120 * DAY,
    warmup: timedelta = 42 * DAY,
) -> ChurnScore:
    floor = LEVELS.index(level)
    raised: dict[tuple[str, str], list[datetime]] = {}
    for s in signals:
        if isinstance(s, RiskRaised) and LEVELS.index(s.level) >= floor:
            raised.setdefault((s.tenant_id, s.account_id), []).append(s.detected_at)
    for times in raised.values():
        times.sort()

    def first_flag(key: tuple[str, str], until: datetime) -> datetime | None:
        return next((t for t in raised.get(key, ()) if until - lookback <= t <= until), None)

    start = _at(truth["config"]["start"])
    end = _at(truth["config"]["end"])
    out = ChurnScore()
    decided: set[tuple[str, str]] = set()
    for churn in truth["churns"]:
        if churn["churned_at"] is None:
            continue
        key = (churn["tenant_id"], churn["account_id"])
        decided.add(key)
        at = _at(churn["churned_at"])
        out.churners += 1
        enough_history = at - start >= warmup
        out.evaluable += enough_history
        flag = first_flag(key, at)
        if flag is None:
            continue
        out.flagged_any += 1
        out.lead_days.append((at - flag) / DAY)
        if at - flag >= lead:
            out.flagged_early += 1
            out.evaluable_early += enough_history
    for renewal in truth["renewals"]:
        key = (renewal["tenant_id"], renewal["account_id"])
        decided.add(key)
        renews = min(_at(renewal["renewed_on"] + "T23:59:59+00:00"), end)
        out.renewing += 1
        out.renewing_flagged += first_flag(key, renews) is not None
    for account in truth["accounts"]:
        key = (account["tenant_id"], account["account_id"])
        if key in decided:
            continue
        out.others += 1
        out.others_flagged += bool(raised.get(key))
    return out


def score_surges(
    truth: dict[str, Any],
    signals: Iterable[Signal],
    *,
    within: timedelta = timedelta(hours=1),
    slack: timedelta = timedelta(hours=1),
) -> SurgeScore:
    found = [
        s
        for s in signals
        if isinstance(s, PatternDetected)
        and s.pattern == "topic_surge"
        and s.account_id == TENANT_WIDE
    ]
    out = SurgeScore(surges=len(truth["surges"]), detections=len(found))
    firsts: dict[int, datetime] = {}
    for s in found:
        hit = False
        for i, surge in enumerate(truth["surges"]):
            if s.key != f"{surge['tenant_id']}/{surge['topic']}":
                continue
            onset, ends = _at(surge["onset"]), _at(surge["end"])
            if onset <= s.detected_at <= ends + slack:
                hit = True
                if i not in firsts or s.detected_at < firsts[i]:
                    firsts[i] = s.detected_at
        out.true_detections += hit
    for i, at in firsts.items():
        delay = at - _at(truth["surges"][i]["onset"])
        out.detected_any += 1
        out.delays_minutes.append(delay / timedelta(minutes=1))
        out.detected_within += delay <= within
    return out


# --- printing ------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _num(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}"


def report_lines(
    churn: ChurnScore, surges: SurgeScore, *, level: str, lead_days: float, within_min: float
) -> list[str]:
    def verdict(ok: bool) -> str:
        return "meets aim" if ok else "below aim"

    recall_ok = (churn.recall or 0) >= 0.8
    fa_ok = churn.false_alarm_rate is not None and churn.false_alarm_rate <= 0.2
    s_recall_ok = (surges.recall or 0) >= 0.9
    s_prec_ok = surges.precision is not None and surges.precision >= 0.8
    return [
        f"churn (flag = first risk.raised to {level}):",
        f"  churners                     {churn.churners}",
        f"  recall (≥ {lead_days:g} days ahead)     {_pct(churn.recall)} "
        f"({churn.flagged_early}/{churn.churners}; {churn.flagged_any} flagged at all)"
        f"  [aim ≥ 80%: {verdict(recall_ok)}]",
        f"  recall, churners with history {_pct(churn.evaluable_recall)} "
        f"({churn.evaluable_early}/{churn.evaluable})",
        f"  false alarms among renewing  {_pct(churn.false_alarm_rate)} "
        f"({churn.renewing_flagged}/{churn.renewing})  [aim ≤ 20%: {verdict(fa_ok)}]",
        f"  median lead time             {_num(churn.median_lead_days, 'days')}",
        f"  other accounts flagged       {churn.others_flagged}/{churn.others} "
        f"(renewal outside the simulated range)",
        "surges:",
        f"  injected                     {surges.surges}",
        f"  detections                   {surges.detections} ({surges.true_detections} true)",
        f"  precision                    {_pct(surges.precision)}  "
        f"[aim ≥ 80%: {verdict(s_prec_ok)}]",
        f"  recall (≤ {within_min:g} min from onset)   {_pct(surges.recall)} "
        f"({surges.detected_within}/{surges.surges}; {surges.detected_any} detected at all)"
        f"  [aim ≥ 90%: {verdict(s_recall_ok)}]",
        f"  median delay from onset      {_num(surges.median_delay_minutes, 'min')}",
    ]


@click.command("evaluate")
@click.option(
    "--truth",
    "truth_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="ground-truth JSON written by `loopservice simulate`",
)
@click.option(
    "--events",
    "events_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="simulated NDJSON events to run the processors over [default: read the signal log]",
)
@click.option(
    "--db",
    type=click.Path(path_type=Path),
    default=None,
    help="embedded log whose signals to read, without --events [default: from LOOP_LOG_URL]",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="policy TOML [default: the shipped one]",
)
@click.option(
    "--level",
    type=click.Choice(["medium", "high"]),
    default="medium",
    show_default=True,
    help="the risk level that counts as flagged",
)
@click.option("--lead-days", type=float, default=14, show_default=True)
@click.option("--within-minutes", type=float, default=60, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def evaluate_command(
    truth_path: Path,
    events_path: Path | None,
    db: Path | None,
    policy_path: Path | None,
    level: Literal["medium", "high"],
    lead_days: float,
    within_minutes: float,
    as_json: bool,
) -> None:
    """Score churn-risk and surge signals against a simulation's ground truth."""
    truth = orjson.loads(truth_path.read_bytes())
    if events_path is not None:
        policy = load_policy(policy_path) if policy_path is not None else default_policy()
        signals = derive_signals(read_events(events_path), policy)
    else:
        path = db or Settings.from_env().sqlite_path()
        if not path.exists():
            raise click.ClickException(f"no log at {path}; pass --events FILE")
        signals = list(signal_log(open_datastore(path)).values())
    within = timedelta(minutes=within_minutes)
    churn = score_churn(truth, signals, level=level, lead=lead_days * DAY)
    surges = score_surges(truth, signals, within=within)
    if as_json:
        figures = {
            "churn": {
                "churners": churn.churners,
                "recall": churn.recall,
                "recall_with_history": churn.evaluable_recall,
                "false_alarm_rate": churn.false_alarm_rate,
                "median_lead_days": churn.median_lead_days,
                "flagged_any": churn.flagged_any,
                "renewing": churn.renewing,
                "renewing_flagged": churn.renewing_flagged,
            },
            "surges": {
                "surges": surges.surges,
                "detections": surges.detections,
                "precision": surges.precision,
                "recall": surges.recall,
                "median_delay_minutes": surges.median_delay_minutes,
            },
        }
        click.echo(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
        return
    for line in report_lines(
        churn, surges, level=level, lead_days=lead_days, within_min=within_minutes
    ):
        click.echo(line)
