"""Audit replay split across worker processes by account against the one-process replay: the
same signals, byte for byte, each account's in the same order; a log that does not split by
account falls back to one process."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import orjson
import pytest

from factories import message, opened
from loopservice.domain.events import (
    EVENT_ADAPTER,
    Actor,
    ActorKind,
    CaseOpened,
    Channel,
    Event,
    PolicyPublished,
    Source,
    clock_tick,
)
from loopservice.domain.patterns import BreachClusterRules
from loopservice.domain.signals import Signal
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore
from loopservice.policy_cli import default_policy
from loopservice.simulator import SimulationConfig, generate
from loopservice.streams import split_replay as split
from loopservice.streams.audit import MemorySignalLog, real_rules, replay_signals
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.log import LogRecord
from loopservice.streams.pattern_processors import TopicSurgeProcessor
from loopservice.streams.processor import Processor
from loopservice.streams.split_replay import NotSplittable, split_replay
from loopservice.streams.topology import build_topology, derive_processors


def simulated_with_a_policy_change() -> list[Event]:
    """Two months of two tenants with daily usage history (so health raises risks), and
    halfway a policy whose breach clusters need only three breaches: every signal kind the
    tenant-wide processors derive, from breaches of every worker's accounts."""
    config = SimulationConfig(accounts=60, days=60, seed=5, history_days=56)
    events = [EVENT_ADAPTER.validate_python(raw) for raw in generate(config)]
    middle = len(events) // 2
    policy = policy_at(events[middle])
    last = max(e.occurred_at for e in events)
    return [
        *events[:middle],
        policy,
        *events[middle:],
        *late_burst(events, last),
        # a tick at midnight exactly: the health timers due then fire at that very watermark
        clock_tick(datetime.combine(last.date() + timedelta(days=1), time(), UTC)),
        clock_tick(last + timedelta(days=2)),
    ]


def policy_at(event: Event) -> PolicyPublished:
    """Version 2026.9, published as `event` occurred: its breach clusters need only three
    breaches."""
    clusters = BreachClusterRules(min_breaches=3, window_minutes=480)
    changed = default_policy().model_copy(update={"version": "2026.9", "breach_cluster": clusters})
    return PolicyPublished(
        event_id="policy:2026.9",
        occurred_at=event.occurred_at,
        tenant_id=event.tenant_id,
        account_id="_policy",
        source=Source(platform="loopservice", channel=Channel.WEB),
        actor=Actor(kind=ActorKind.SYSTEM, id="test"),
        version="2026.9",
        policy=changed.model_dump(mode="json", by_alias=True),
    )


def late_burst(events: list[Event], last: datetime) -> list[Event]:
    """Records below the watermark, which the tenant-wide processors count at once: eight
    cases on one topic opened by as many accounts in the half hour before the latest event
    (after the last simulated opening), and three cases opened six hours before it, each
    with a customer message three hours later, which makes the SLA processor derive their
    breaches as it takes the message."""
    tenant = events[-1].tenant_id
    accounts = sorted({e.account_id for e in events if e.tenant_id == tenant})
    case = {"tenant_id": tenant, "team": "support", "impact": "critical", "urgency": "critical"}
    burst = [
        opened(
            900_000 + i,
            at=last - timedelta(minutes=40 - 4 * i),
            case=f"late-{i}",
            account_id=account,
            topic="webhooks",
            **case,
        )
        for i, account in enumerate(accounts[:8])
    ]
    earlier: list[Event] = []
    for i, account in enumerate(accounts[8:11], start=8):
        at = last - timedelta(hours=6, minutes=-i)
        earlier.append(opened(900_000 + i, at=at, case=f"late-{i}", account_id=account, **case))
        earlier.append(
            message(
                900_100 + i,
                at=at + timedelta(hours=3),
                case=f"late-{i}",
                tenant_id=tenant,
                account_id=account,
            )
        )
    return [*earlier, *burst]


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> SQLiteLog[Event]:
    found = interaction_log(open_datastore(tmp_path_factory.mktemp("split") / "log.db"))
    found.append(simulated_with_a_policy_change())
    return found


class TaggingEngine(EmbeddedEngine):
    """The embedded engine, noting for each signal the record, step (event or watermark) and
    processor that derived it."""

    def __init__(self, log: SQLiteLog[Event]) -> None:
        processors = split.replay_processors(build_topology(real_rules(default_policy())))
        super().__init__(log, MemorySignalLog(), processors)
        self.tags: dict[str, tuple[int, int, int]] = {}
        self.watermarks: list[tuple[str, datetime | None]] = []  # topic-surge's, per opening
        self.processors = [Tagging(p, index, self) for index, p in enumerate(self.processors)]
        self.current = 0

    def _process_one(self, record: LogRecord[Event]) -> list[Signal]:
        self.current = record.position
        return super()._process_one(record)


class Tagging:
    def __init__(self, inner: Processor, index: int, engine: TaggingEngine) -> None:
        self.inner, self.index, self.engine, self.name = inner, index, engine, inner.name

    def handle(self, event: Event) -> list[Signal]:
        if isinstance(event, CaseOpened) and isinstance(self.inner, TopicSurgeProcessor):
            self.engine.watermarks.append((event.event_id, self.inner._watermark))
        return self._tagged(self.inner.handle(event), split.HANDLE)

    def advance(self, watermark: datetime) -> list[Signal]:
        return self._tagged(self.inner.advance(watermark), split.ADVANCE)

    def next_due(self) -> datetime | None:
        return self.inner.next_due()

    def _tagged(self, signals: list[Signal], step: int) -> list[Signal]:
        for signal in signals:
            self.engine.tags.setdefault(signal.signal_id, (self.engine.current, step, self.index))
        return signals


@pytest.fixture(scope="module")
def one_process(log: SQLiteLog[Event]) -> TaggingEngine:
    engine = TaggingEngine(log)
    engine.catch_up()
    return engine


def as_json(signals: list[Signal]) -> list[bytes]:
    return [orjson.dumps(s.model_dump(mode="json")) for s in signals]


def per_account(signals: list[Signal]) -> dict[tuple[str, str], list[bytes]]:
    out: dict[tuple[str, str], list[bytes]] = defaultdict(list)
    for signal, text in zip(signals, as_json(signals), strict=True):
        out[(signal.tenant_id, signal.account_id)].append(text)
    return dict(out)


def signals_of(engine: TaggingEngine) -> list[Signal]:
    return [r.value for r in engine.signal_log.read(1, 10**9)]


def test_the_fixture_has_every_kind_of_signal_the_split_must_reproduce(
    log: SQLiteLog[Event], one_process: TaggingEngine
) -> None:
    signals = signals_of(one_process)
    assert as_json(signals) == as_json(replay_signals(log, rules=real_rules(default_policy())))
    # and the live engine's processors, the case-state one with them, derive just these
    engine = EmbeddedEngine(log, MemorySignalLog(), derive_processors(real_rules(default_policy())))
    engine.catch_up()
    assert as_json(signals) == as_json([r.value for r in engine.signal_log.read(1, 10**9)])
    kinds = Counter(getattr(s, "pattern", s.type) for s in signals)
    for kind in ("sla.breached", "risk.raised", "followup.overdue", "repeat_contact"):
        assert kinds[kind] > 0, kind
    assert kinds["breach_cluster"] >= 3 and kinds["topic_surge"] >= 1  # tenant-wide


@pytest.mark.parametrize("workers", [2, 3])
def test_a_split_replay_derives_the_same_signals_in_the_engines_order(
    log: SQLiteLog[Event], one_process: TaggingEngine, workers: int
) -> None:
    expected = signals_of(one_process)
    rules = real_rules(default_policy())
    seen: list[int] = []
    got = replay_signals(log, rules=rules, workers=workers, progress=seen.append)
    assert sum(seen) == log.head()
    assert sorted(as_json(got)) == sorted(as_json(expected))  # the same signals, bytes
    # In the engine's order, but for signals of one processor's same step (ties), which
    # come worker by worker; so each account's own signals are in the engine's order.
    tags = [one_process.tags[s.signal_id] for s in got]
    assert tags == sorted(tags)
    assert per_account(got) == per_account(expected)
    assert [p.version for p in rules.versions()][-1] == "2026.9"  # the book took the policy


def test_the_book_takes_the_published_policies_once_the_split_is_done(
    log: SQLiteLog[Event],
) -> None:
    """Until then it is as it was: a split that fails leaves a one-process replay a fresh
    book, which must take each policy as the engine does, when the log reaches it."""
    rules = real_rules(default_policy())
    versions: list[int] = []  # in the book, after each batch merged
    split_replay(
        log,
        rules,
        workers=2,
        batch_size=1000,
        progress=lambda _: versions.append(len(rules.versions())),
    )
    assert len(versions) > 3 and set(versions) == {1}
    assert [p.version for p in rules.versions()][1:] == ["2026.9"]


def test_every_worker_has_accounts(log: SQLiteLog[Event]) -> None:
    """Not a split in name only: with three workers each folds some accounts."""
    records = log.read_bodies(1, 10**9)
    batch = split.Router(3, timedelta(seconds=1), log.decode_body).route(records)
    assert all(len(rows) > len(records) // 6 for rows in batch.rows)


def test_a_case_with_records_of_two_accounts_is_not_split(tmp_path: Path) -> None:
    """The split keeps a case's state in one worker only if all its records name one account:
    a log where they do not is refused, with the rules book as it was (published policies are
    the one-process replay's to fold in, in its order), and `replay_signals` replays it on
    one process."""
    events = [
        EVENT_ADAPTER.validate_python(raw)
        for raw in generate(SimulationConfig(accounts=20, days=10))
    ]
    first = next(e for e in events if e.type == "case.opened")
    stranger = next(
        e.account_id
        for e in events
        if split.owner(first.tenant_id, e.account_id, 2)
        != split.owner(first.tenant_id, first.account_id, 2)
    )
    last = max(e.occurred_at for e in events)
    # a message on the first case, last on the log, from an account other than the case's
    moved = message(
        900_001, at=last, case=first.case_id, tenant_id=first.tenant_id, account_id=stranger
    )
    log = interaction_log(open_datastore(tmp_path / "log.db"))
    log.append([policy_at(events[0]), *events, moved])
    rules = real_rules(default_policy())
    with pytest.raises(NotSplittable, match="two accounts"):
        split_replay(log, rules, workers=2, batch_size=50)
    expected = replay_signals(log, rules=real_rules(default_policy()))
    seen: list[int] = []
    got = replay_signals(log, rules=rules, workers=2, progress=seen.append)
    assert as_json(got) == as_json(expected)
    assert sum(seen) == log.head()  # the bar ends full, not past it
    assert [p.version for p in rules.versions()][1:] == ["2026.9"]


def split_tags(
    log: SQLiteLog[Event], workers: int, batch_size: int
) -> tuple[dict[str, tuple[int, ...]], list[tuple[str, datetime | None]]]:
    """The split's pieces run on this process, batch by batch: each signal's record, step and
    processor; and the watermark the surge detector had at each opening it took."""
    router = split.Router(workers, timedelta(seconds=1), log.decode_body)
    shards = [
        split.Shard(
            k,
            workers,
            split.account_processors(build_topology(real_rules(default_policy()))),
            log.decode_body,
        )
        for k in range(workers)
    ]
    tenant_wide = split.TenantWide(real_rules(default_policy()))
    (surges,) = tenant_wide.surges
    assert isinstance(surges, TopicSurgeProcessor)
    watermarks: list[tuple[str, datetime | None]] = []
    handle = surges.handle

    def noting(event: Event) -> list[Signal]:
        watermarks.append((event.event_id, surges._watermark))
        return handle(event)

    surges.handle = noting  # type: ignore[method-assign]
    tags: dict[str, tuple[int, ...]] = {}
    for start in range(1, log.head() + 1, batch_size):
        batch = router.route(log.read_bodies(start, batch_size))
        by_worker = [shard.run(batch.share(k)) for k, shard in enumerate(shards)]
        for position, step, index, _, signal in split.merge(batch, by_worker, tenant_wide):
            tags.setdefault(signal.signal_id, (position, step, index))
    return tags, [w for w in watermarks if not w[0].startswith("policy:")]


def test_each_signal_comes_from_the_engines_record_step_and_processor(
    log: SQLiteLog[Event], one_process: TaggingEngine
) -> None:
    """Small batches, so timers and watermark rises cross batch boundaries; late openings and
    the breaches of late cases, which the tenant-wide processors count at once."""
    tags, watermarks = split_tags(log, workers=3, batch_size=700)
    assert tags == one_process.tags
    assert watermarks == one_process.watermarks  # which decides what is late
    late = [t for sid, t in tags.items() if "late-" in sid or "webhooks" in sid]
    assert any(step == split.HANDLE for _, step, _ in late)  # counted at once


class OneTimer:
    """A processor with one timer, which notes the watermark it fired at."""

    name = "one-timer"

    def __init__(self, due: datetime) -> None:
        self.due: datetime | None = due
        self.fired_at: list[datetime] = []

    def handle(self, event: Event) -> list[Signal]:
        return []

    def advance(self, watermark: datetime) -> list[Signal]:
        if self.due is not None and self.due <= watermark:
            self.fired_at.append(watermark)
            self.due = None
        return []

    def next_due(self) -> datetime | None:
        return self.due


def test_a_worker_fires_a_timer_at_the_first_watermark_that_reaches_it() -> None:
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    second = timedelta(seconds=1)
    rises = [due - 2 * second, due - second, due, due + second]
    for k, fired in enumerate([due, due + second]):  # due exactly, and one second later
        timer = OneTimer(due + k * second)
        share = split.Share(0, 4, [], [1, 2, 3, 4], [split._micros(w) for w in rises])
        split.Shard(0, 1, [timer], EVENT_ADAPTER.validate_python).run(share)
        assert timer.fired_at == [fired]
