"""The partitioned fold (the Kafka engine's core, without a broker) against the embedded engine:
the same log, split by account into partitions, folded per account with state saved to and
restored from a key-value store across simulated crashes, gives the same signals."""

from __future__ import annotations

import pickle
import random
import zlib
from datetime import timedelta
from pathlib import Path

import pytest

from factories import message, opened
from loopservice.domain.events import (
    EVENT_ADAPTER,
    Actor,
    ActorKind,
    Channel,
    ClockTick,
    Event,
    PolicyPublished,
    Source,
    clock_tick,
)
from loopservice.domain.health import HealthRules
from loopservice.domain.policy import policy_from_mapping
from loopservice.domain.signals import RiskRaised, Signal
from loopservice.infra.sqlite_log import interaction_log, open_datastore, signal_log
from loopservice.policy_cli import default_policy
from loopservice.simulator import SimulationConfig, generate
from loopservice.streams.engine import EmbeddedEngine
from loopservice.streams.partitioned import Partition
from loopservice.streams.recent_ids import KEPT, RecentIds
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import build_topology

PARTITIONS = 4


def simulated(accounts: int, days: int, seed: int) -> list[Event]:
    config = SimulationConfig(accounts=accounts, days=days, seed=seed)
    return [EVENT_ADAPTER.validate_python(raw) for raw in generate(config)]


def embedded_signals(
    events: list[Event], tmp_path: Path, *, tenant_wide: bool = False
) -> list[Signal]:
    datastore = open_datastore(tmp_path / "embedded.db")
    log, signals = interaction_log(datastore), signal_log(datastore)
    log.append(events)
    topology = build_topology(RulesBook(default_policy(), policy_from_mapping))
    # what the Kafka engine's folds run (per account), or with `tenant_wide` all of it: the
    # tenant-wide task and the breach clusters too
    processors = topology.processors if tenant_wide else topology.by_account
    engine = EmbeddedEngine(log, signals, processors)
    engine.catch_up()
    return [r.value for r in signals.read(1, 10**9)]


def partitioned_signals(
    events: list[Event],
    crash_every: int,
    *,
    commits_past_the_store: bool = False,
    heed_the_position: bool = True,
) -> tuple[list[Signal], int]:
    """Folds `events` per partition, as the Faust worker does. State changes reach the store
    (the changelog) every few records; offsets are committed less often, and only up to what
    the store holds (Faust flushes the changelog before it commits). Every `crash_every`
    records the partition's worker dies: what had not reached the store is lost, and a new one
    restores from the store and resumes from the last committed offset — or, with
    `commits_past_the_store`, from an offset committed past what the store holds (what Faust's
    acks of records it skips in a rebalance can do), unless the restored partition's
    `resume_from` is heeded."""
    logs: list[list[Event]] = [[] for _ in range(PARTITIONS)]
    for event in events:
        logs[partition_of(event)].append(event)
    store: dict[str, bytes] = {}
    out: list[Signal] = []
    crashes = 0
    for number, records in enumerate(logs):
        partition = Partition(number, default_policy())
        pending: dict[str, bytes] = {}
        committed = 0  # the next offset to read after a restart
        offset = 0
        crashed_at: set[int] = set()
        while offset < len(records):
            resume_at = partition.resume_from(offset) if heed_the_position else None
            if resume_at is not None:
                offset = resume_at  # the worker seeks back
                continue
            out += partition.process(offset, records[offset])
            pending.update(partition.flush())
            offset += 1
            if offset % 13 == 0:
                store.update(pending)
                pending.clear()
                if offset % 91 == 0:
                    committed = offset - 39
            if offset % crash_every == 0 and offset not in crashed_at:
                crashed_at.add(offset)
                crashes += 1
                pending.clear()
                partition = Partition(number, default_policy())
                partition.restore(store.items())
                offset = offset + 5 if commits_past_the_store else committed
        store.update(pending)
    return out, crashes


def with_repeats(events: list[Event], every: int = 7, later: int = 5) -> list[Event]:
    """`events` with every `every`-th one submitted again `later` records after it (a platform
    retrying a request that timed out): what a Kafka log holds, and a SQLite log refuses."""
    out: list[Event] = []
    again: dict[int, Event] = {}
    for i, event in enumerate(events):
        out.append(event)
        if i - later in again:
            out.append(again.pop(i - later))
        if i % every == 0:
            again[i] = event
    return [*out, *again.values()]


def partition_of(event: Event) -> int:
    if isinstance(event, ClockTick):
        return event.partition
    return zlib.crc32(event.account_id.encode()) % PARTITIONS


def by_identity(signals: list[Signal]) -> dict[str, Signal]:
    found: dict[str, Signal] = {}
    for signal in signals:
        earlier = found.setdefault(signal.signal_id, signal)
        assert earlier == signal, f"{signal.signal_id} derived twice with different content"
    return found


def test_partitioned_fold_gives_the_embedded_engines_signals_across_crashes(
    tmp_path: Path,
) -> None:
    """With repeated submissions too: the embedded log refuses them, the partitions get them."""
    events = simulated(accounts=120, days=40, seed=11)
    end = max(e.occurred_at for e in events) + timedelta(days=30)
    # the final tick, once on the embedded log and once per partition
    expected = by_identity(embedded_signals([*events, clock_tick(end)], tmp_path))
    got_raw, crashes = partitioned_signals(
        [*with_repeats(events), *(clock_tick(end, partition=p) for p in range(PARTITIONS))],
        crash_every=250,
    )
    got = by_identity(got_raw)
    assert crashes >= 8
    breaches = [s for s in expected.values() if s.type == "sla.breached"]
    assert len(breaches) >= 50
    assert got.keys() == expected.keys()
    assert got == expected
    assert len(got_raw) > len(got)  # the crashes did re-derive signals, deduplicated by id


def test_a_commit_past_the_stored_state_is_read_again_from_the_stored_position(
    tmp_path: Path,
) -> None:
    events = simulated(accounts=120, days=40, seed=11)
    end = max(e.occurred_at for e in events) + timedelta(days=30)
    expected = by_identity(embedded_signals([*events, clock_tick(end)], tmp_path))
    log = [*events, *(clock_tick(end, partition=p) for p in range(PARTITIONS))]
    got_raw, crashes = partitioned_signals(log, crash_every=250, commits_past_the_store=True)
    assert crashes >= 8
    assert by_identity(got_raw) == expected
    # the same crashes without the position check lose the records skipped
    careless, _ = partitioned_signals(
        log, crash_every=250, commits_past_the_store=True, heed_the_position=False
    )
    assert by_identity(careless) != expected


def test_a_partition_stores_its_position_after_what_it_writes() -> None:
    events = simulated(accounts=20, days=10, seed=3)
    partition = Partition(0, default_policy())
    written: list[tuple[str, bytes]] = []
    for offset, event in enumerate(events[:50]):
        partition.process(offset, event)
        entries = partition.flush()
        if entries:
            assert entries[-1] == ("pos/0", str(offset).encode())
        written += entries
    empty = Partition(0, default_policy())
    empty.restore([], first_offset=3)
    assert empty.resume_from(7) == 3  # nothing stored: from the log's first record
    restored = Partition(0, default_policy())
    restored.restore(written)
    assert restored.next_offset == 50
    assert restored.resume_from(50) is None
    assert restored.resume_from(12) is None  # read again: each account skips what it holds
    assert restored.resume_from(51) == 50


def test_health_explanations_survive_the_crashes_of_a_long_history(tmp_path: Path) -> None:
    """Months of daily usage, so that the health model's slower factors (the usage slide, its
    caches) are computed on both paths: a restored account must explain its risk as the
    account that never crashed does, to the digit."""
    events = simulated(accounts=40, days=150, seed=3)
    end = max(e.occurred_at for e in events) + timedelta(days=1)
    expected = by_identity(embedded_signals([*events, clock_tick(end)], tmp_path))
    got_raw, crashes = partitioned_signals(
        [*events, *(clock_tick(end, partition=p) for p in range(PARTITIONS))], crash_every=97
    )
    assert crashes >= 20
    assert any(s.type == "risk.raised" for s in expected.values())
    assert by_identity(got_raw) == expected


def restarted_signals(records: list[Event], rng: random.Random, restarts: int) -> list[Signal]:
    """Folds `records` on one partition whose worker dies at `restarts` random records. The
    store (the changelog) takes what the partition flushes after a random number of records,
    and the new worker restores from it and resumes right after the last record the store
    holds, so it folds again the records that had not reached the store."""
    crash_at = set(rng.sample(range(len(records)), restarts))
    partition = Partition(0, default_policy())
    store: dict[str, bytes] = {}
    stored_upto = 0  # the records before this offset are all in the store
    pending: dict[str, bytes] = {}
    next_flush = rng.randint(1, 60)
    out: list[Signal] = []
    offset = 0
    while offset < len(records):
        out += partition.process(offset, records[offset])
        pending.update(partition.flush())
        offset += 1
        if offset >= next_flush:
            store.update(pending)
            pending.clear()
            stored_upto = offset
            next_flush = offset + rng.randint(1, 60)
        if offset - 1 in crash_at:
            crash_at.discard(offset - 1)
            pending.clear()
            partition = Partition(0, default_policy())
            partition.restore(store.items())
            offset = stored_upto
    return out


def test_health_state_restored_at_random_records_explains_as_the_uninterrupted_fold() -> None:
    """Every health value is a function of the account's history up to that point, never of
    what was computed before: an account pickled and restored at any record, then folding
    again what the store had not kept, derives every signal (explanations to the digit) as
    the fold that never stopped, and nothing else."""
    config = SimulationConfig(accounts=24, days=200, seed=8, history_days=56)
    events = [EVENT_ADAPTER.validate_python(raw) for raw in generate(config)]
    # two thirds in, a policy with other health windows: nothing computed under the first may
    # stand in for what the second computes
    middle = len(events) * 2 // 3
    health = HealthRules(slide_window_days=56, slide_from=0.07, usage_window_days=21)
    changed = default_policy().model_copy(update={"version": "2026.9", "health": health})
    policy = PolicyPublished(
        event_id="policy:2026.9",
        occurred_at=events[middle].occurred_at,
        tenant_id=events[middle].tenant_id,
        account_id="_policy",
        source=Source(platform="loopservice", channel=Channel.WEB),
        actor=Actor(kind=ActorKind.SYSTEM, id="test"),
        version="2026.9",
        policy=changed.model_dump(mode="json", by_alias=True),
    )
    end = max(e.occurred_at for e in events) + timedelta(days=2)
    records = [*events[:middle], policy, *events[middle:], clock_tick(end, partition=0)]
    uninterrupted = Partition(0, default_policy())
    expected = [s for offset, e in enumerate(records) for s in uninterrupted.process(offset, e)]
    got = restarted_signals(records, random.Random(20240603), restarts=80)
    assert by_identity(got) == by_identity(expected)
    assert len(got) > len(expected)  # restored workers did derive signals again
    raised = [s for s in expected if isinstance(s, RiskRaised)]
    assert {s.policy_version for s in raised} == {"2026.1", "2026.9"}
    assert any(f.factor == "usage_slide" for s in raised for f in s.factors)


def folded(records: list[tuple[int, Event]]) -> tuple[list[Signal], dict[str, bytes], list[str]]:
    """One partition's signals, its accounts' last stored state, and the repeats it dropped."""
    dropped: list[str] = []
    partition = Partition(0, default_policy(), on_repeat=lambda e: dropped.append(e.event_id))
    signals: list[Signal] = []
    store: dict[str, bytes] = {}
    for offset, event in records:
        signals += partition.process(offset, event)
        store.update(partition.flush())
    return signals, {k: v for k, v in store.items() if k.startswith("acct/")}, dropped


def test_an_event_submitted_twice_is_folded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    events = simulated(accounts=20, days=30, seed=3)
    end = max(e.occurred_at for e in events) + timedelta(days=30)
    records = [*events, clock_tick(end, partition=0)]
    # every record at an even offset; every fourth event again at the odd offset three records
    # later, so both logs fold each first submission at the same offset
    once = [(2 * i, e) for i, e in enumerate(records)]
    repeats = [(2 * (i + 3) + 1, records[i]) for i in range(0, len(events), 4)]
    twice = sorted(once + repeats, key=lambda r: r[0])
    signals, accounts, dropped = folded(once)
    assert dropped == []
    assert any(s.type == "sla.breached" for s in signals)
    got_signals, got_accounts, got_dropped = folded(twice)
    assert got_dropped == [e.event_id for _, e in repeats]
    assert got_signals == signals
    assert got_accounts == accounts
    # the repeats are ones that change an account when folded
    monkeypatch.setattr(RecentIds, "add", lambda self, event_id: True)
    careless_signals, careless_accounts, _ = folded(twice)
    assert careless_accounts != accounts
    assert careless_signals != signals


def test_a_repeat_after_kept_other_events_of_its_account_is_folded_again() -> None:
    dropped: list[str] = []
    partition = Partition(0, default_policy(), on_repeat=lambda e: dropped.append(e.event_id))
    offsets = iter(range(10**6))

    def fold(event: Event) -> list[str]:
        partition.process(next(offsets), event)
        return [key for key, _ in partition.flush() if key.startswith("acct/")]

    first = message(1)
    fold(opened(0))
    assert fold(first) == ["acct/0/acme/acct-1"]
    for n in range(2, KEPT + 1):  # KEPT - 1 others, and as many of another account
        fold(message(n))
        fold(message(n, account_id="acct-2"))
    assert fold(first) == []  # dropped: the account is not written
    assert dropped == [first.event_id]
    fold(message(KEPT + 1))  # the KEPT-th after it: `first` is forgotten
    assert fold(first) == ["acct/0/acme/acct-1"]
    assert dropped == [first.event_id]


def test_an_account_pickled_before_the_ids_were_kept_loads() -> None:
    partition = Partition(0, default_policy())
    store: dict[str, bytes] = {}
    for offset, event in enumerate([opened(0), message(1)]):
        partition.process(offset, event)
        store.update(partition.flush())
    key = "acct/0/acme/acct-1"
    slot = partition.accounts[key]
    del slot.__dict__["folded"]  # what the slot held then: its pickle names no ids
    partition._dirty[key] = None
    store.update(partition.flush())
    assert b"RecentIds" in pickle.dumps(RecentIds()) and b"RecentIds" not in store[key]
    dropped: list[str] = []
    restored = Partition(0, default_policy(), on_repeat=lambda e: dropped.append(e.event_id))
    restored.restore(store.items())
    assert len(restored.accounts[key].folded) == 0
    restored.process(2, message(1))  # folded before the ids were kept: folded again
    restored.process(3, message(3))
    restored.process(4, message(3))
    assert dropped == [message(3).event_id]
