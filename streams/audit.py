"""Audit replay and what-if: re-derive signals from the interaction log and compare.

`replay_signals` runs a fresh embedded engine (the same topology as the live engine, see
`topology.derive_processors`) over the interaction log from position 1 — processor state needs
the whole history — into an in-memory signal log, and keeps the signals detected in the window.
`compare` holds recorded signals against re-derived ones; `what_if` replays under a proposed
policy and summarizes what would change.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from loopservice.domain.events import Event, PolicyPublished
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import (
    HandoffRuleViolated,
    Signal,
    SlaBreached,
    SlaSignal,
    SlaWarning,
)
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.log import Appended, Log, LogRecord
from loopservice.streams.rules import RulesBook
from loopservice.streams.split_replay import (
    BodySource,
    NotSplittable,
    can_split,
    replay_processors,
    split_replay,
)
from loopservice.streams.topology import build_topology

logger = logging.getLogger(__name__)


class MemorySignalLog:
    """A signal log in memory with the SQLite log's semantics: gapless positions, and a
    signal whose identity is already there is not stored twice."""

    def __init__(self) -> None:
        self.records: list[LogRecord[Signal]] = []
        self._positions: dict[str, int] = {}

    def append(self, values: Sequence[Signal]) -> list[Appended]:
        out: list[Appended] = []
        for value in values:
            known = self._positions.get(value.signal_id)
            if known is not None:
                out.append(Appended(value.signal_id, known, duplicate=True))
                continue
            position = len(self.records) + 1
            self.records.append(LogRecord(position, value.detected_at, value))
            self._positions[value.signal_id] = position
            out.append(Appended(value.signal_id, position, duplicate=False))
        return out

    def read(self, start: int, limit: int) -> list[LogRecord[Signal]]:
        return self.records[max(start, 1) - 1 : max(start, 1) - 1 + limit]

    def head(self) -> int:
        return len(self.records)

    def values(self) -> list[Signal]:
        return [r.value for r in self.records]


class FrozenRulesBook(RulesBook[Policy]):
    """A rules book holding one policy for all time: `policy.published` events are ignored.

    What-if uses it to ask "what if this policy had been in force throughout the window"; a
    version published on the log does not displace the proposal.
    """

    def publish(self, event: PolicyPublished) -> None:
        return


def real_rules(default: Policy) -> RulesBook[Policy]:
    """A fresh book with the shipped default; replay folds the published policies into it."""
    return RulesBook(default, policy_from_mapping)


def in_window(signal: Signal, start_at: datetime | None, until: datetime | None) -> bool:
    return (start_at is None or signal.detected_at >= start_at) and (
        until is None or signal.detected_at < until
    )


def replay_signals(
    log: Log[Event],
    *,
    rules: RulesBook[Policy],
    start_at: datetime | None = None,
    until: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    allowed_lateness: timedelta = timedelta(seconds=1),
    workers: int = 1,
) -> list[Signal]:
    """Re-derives the signals from the whole interaction log; those detected in
    [start_at, until). `rules` should be fresh: the log's published policies fold into it
    (so afterwards it answers which version was in force when).

    With `workers` > 1 and a log that hands over undecoded records (the SQLite log), the
    account-keyed processors run on that many processes (`streams.split_replay`): the same
    signals; a log that does not split by account is replayed on this process instead."""
    signals = MemorySignalLog()
    if workers > 1 and isinstance(log, BodySource) and can_split():
        done = _Counted(progress)
        try:
            signals.append(
                split_replay(
                    log,
                    rules,
                    workers=workers,
                    allowed_lateness=allowed_lateness,
                    progress=done,
                )
            )
            return [s for s in signals.values() if in_window(s, start_at, until)]
        except NotSplittable as why:
            logger.warning("audit replay on one process: %s", why)
            progress = done.again()
    processors = replay_processors(build_topology(rules))
    engine = EmbeddedEngine(
        log, signals, processors, allowed_lateness=allowed_lateness, batch_size=5000
    )
    engine.catch_up(progress)
    return [s for s in signals.values() if in_window(s, start_at, until)]


class _Counted:
    """A progress callback that remembers how far it got, so that a replay started again
    after a failed split moves the bar only past that point."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.progress = progress
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(n)

    def again(self) -> Callable[[int], None] | None:
        if self.progress is None:
            return None
        progress, skip = self.progress, self.done
        seen = 0

        def resumed(n: int) -> None:
            nonlocal seen
            before, seen = seen, seen + n
            if seen > skip:
                progress(seen - max(before, skip))

        return resumed


def recorded_signals(
    signals: Iterable[Signal], start_at: datetime | None = None, until: datetime | None = None
) -> list[Signal]:
    return [s for s in signals if in_window(s, start_at, until)]


# -- compare ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    kind: str  # "missing" | "extra" | "changed"
    signal_id: str
    signal_type: str
    case_id: str | None
    detected_at: str
    reason: str
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (recorded, derived)


@dataclass
class AuditReport:
    identical: int = 0
    missing: list[Difference] = field(default_factory=list)
    extra: list[Difference] = field(default_factory=list)
    changed: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.changed)

    def differences(self) -> list[Difference]:
        return sorted(
            [*self.missing, *self.extra, *self.changed], key=lambda d: (d.detected_at, d.signal_id)
        )


def _policy_reason(signal: Signal, rules: RulesBook[Policy] | None) -> str | None:
    # pattern and follow-up signals carry their detectors' own version, not the service policy
    if rules is None or signal.policy_version is None:
        return None
    if not isinstance(signal, SlaSignal | HandoffRuleViolated):
        return None
    version = rules.in_force(signal.detected_at).version
    if version == signal.policy_version:
        return None
    return (
        f"recorded under policy {signal.policy_version} but {version} is in force at "
        f"{signal.detected_at.isoformat()}"
    )


def compare(
    recorded: Sequence[Signal],
    derived: Sequence[Signal],
    rules: RulesBook[Policy] | None = None,
) -> AuditReport:
    """Recorded vs re-derived, by signal identity. `rules` (the book the replay folded the
    published policies into) lets a difference name the policy version in force."""
    mine = {s.signal_id: s for s in recorded}
    theirs = {s.signal_id: s for s in derived}
    report = AuditReport()
    for sid, r in mine.items():
        d = theirs.get(sid)
        if d is None:
            reason = _policy_reason(r, rules) or (
                "on the signal log but not re-derived from the interaction log"
            )
            report.missing.append(_diff("missing", r, reason))
            continue
        if r == d:  # equal models dump alike; unequal ones may still (a tz offset, 1 vs 1.0)
            report.identical += 1
            continue
        a, b = r.model_dump(mode="json"), d.model_dump(mode="json")
        if a == b:
            report.identical += 1
            continue
        changed = {
            k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)
        }
        reason = (
            "content differs in field" + ("s " if len(changed) > 1 else " ") + ", ".join(changed)
        )
        if "policy_version" in changed:
            reason = (
                f"recorded under policy {r.policy_version} but re-derived under "
                f"{d.policy_version}; " + reason
            )
        report.changed.append(_diff("changed", r, reason, changed))
    for sid, d in theirs.items():
        if sid not in mine:
            reason = "re-derived from the log but not on the signal log"
            report.extra.append(_diff("extra", d, reason))
    return report


def _diff(
    kind: str, s: Signal, reason: str, fields: dict[str, tuple[Any, Any]] | None = None
) -> Difference:
    return Difference(
        kind, s.signal_id, s.type, s.case_id, s.detected_at.isoformat(), reason, fields or {}
    )


# -- what-if ---------------------------------------------------------------------------------


@dataclass
class WhatIf:
    proposed_version: str
    before_signals: int = 0
    after_signals: int = 0
    breaches: dict[str, tuple[int, int]] = field(default_factory=dict)  # "metric P1" -> (b, a)
    warnings: tuple[int, int] = (0, 0)
    handoff_violations: tuple[int, int] = (0, 0)
    priorities: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    pages: dict[str, tuple[int, int]] = field(default_factory=dict)  # route -> (b, a)

    @property
    def breaches_total(self) -> tuple[int, int]:
        return (
            sum(b for b, _ in self.breaches.values()),
            sum(a for _, a in self.breaches.values()),
        )


def _breaches(signals: Iterable[Signal]) -> Counter[str]:
    return Counter(f"{s.metric} {s.priority.value}" for s in signals if isinstance(s, SlaBreached))


def _case_priorities(signals: Iterable[Signal]) -> dict[str, str]:
    """Each case's priority as its latest SLA signal states it."""
    out: dict[str, str] = {}
    for s in sorted((s for s in signals if isinstance(s, SlaSignal)), key=lambda s: s.detected_at):
        if s.case_id is not None:
            out[f"{s.tenant_id}/{s.case_id}"] = s.priority.value
    return out


def _pages(signals: Iterable[Signal], policy_at: Callable[[datetime], Policy]) -> Counter[str]:
    out: Counter[str] = Counter()
    for s in signals:
        priority = s.priority if isinstance(s, SlaSignal) else None
        team = s.team if isinstance(s, SlaSignal) else None
        if isinstance(s, HandoffRuleViolated):
            team = s.to_team
        route = policy_at(s.detected_at).oncall.route_for(s.type, team, priority)
        if route is not None:
            out[route.name] += 1
    return out


def _pair(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    return {k: (before.get(k, 0), after.get(k, 0)) for k in sorted(before.keys() | after.keys())}


def summarize(
    before: Sequence[Signal],
    after: Sequence[Signal],
    *,
    before_rules: RulesBook[Policy],
    proposed: Policy,
) -> WhatIf:
    out = WhatIf(proposed.version, len(before), len(after))
    out.breaches = _pair(_breaches(before), _breaches(after))
    out.warnings = (
        sum(isinstance(s, SlaWarning) for s in before),
        sum(isinstance(s, SlaWarning) for s in after),
    )
    out.handoff_violations = (
        sum(isinstance(s, HandoffRuleViolated) for s in before),
        sum(isinstance(s, HandoffRuleViolated) for s in after),
    )
    pb, pa = _case_priorities(before), _case_priorities(after)
    out.priorities = {
        k: (pb.get(k), pa.get(k))
        for k in sorted(pb.keys() | pa.keys())
        if pb.get(k) is not None and pa.get(k) is not None and pb[k] != pa[k]
    }
    out.pages = _pair(_pages(before, before_rules.in_force), _pages(after, lambda _: proposed))
    return out


def what_if(
    log: Log[Event],
    proposed: Policy,
    start_at: datetime | None = None,
    until: datetime | None = None,
    *,
    default: Policy,
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
) -> WhatIf:
    """Replays the log twice: under the real rules (`default` plus every published policy)
    and under `proposed` alone (a `FrozenRulesBook`: published policies are ignored, so the
    proposal is in force for the whole history), and summarizes the difference in the window.
    Case priorities are those the SLA signals state (first-response/resolution clocks carry
    the case priority)."""
    rules = real_rules(default)

    def replay(book: RulesBook[Policy]) -> list[Signal]:
        return replay_signals(
            log, rules=book, start_at=start_at, until=until, progress=progress, workers=workers
        )

    before = replay(rules)
    after = replay(FrozenRulesBook(proposed, policy_from_mapping))
    return summarize(before, after, before_rules=rules, proposed=proposed)
