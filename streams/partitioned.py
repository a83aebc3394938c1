"""One Kafka partition's share of the fold: the embedded engine's processors, run per account,
with their state kept as bytes in a key-value store (a Faust table backed by a changelog topic).

Why per account: a partition holds many accounts and a worker may lose the partition at any
rebalance, so the state must be recoverable from the changelog alone. Each account gets its
own `Topology` (the same processors the embedded engine runs, restricted to that account's
events); after a record changes an account, it is pickled under `acct/<partition>/<tenant>/<id>`.
What every account shares — the policy book and the objects derived from a policy (calendars,
memoised answers) — is written as a reference, not a copy, and resolved on load by the loading
partition, so a snapshot stays small and the shared objects stay shared.

The partition's own state — watermark, highest event time, the policy events it has seen — is a
small JSON document under `part/<partition>`, written at once when a policy arrives and every
`META_EVERY` records otherwise: the watermark stored is only where a restored partition starts
from, and replaying the records after the committed offset moves it on again.

Exactly-once effect over an at-least-once consumer: the worker acks a record only once its
changelog writes are on the broker, in offset order (`streams/kafka_acks.py`), so after a crash
the state is usually ahead of the committed offset. Each account remembers the last offset
folded into it and skips records at or below it; the partition's own folds (watermark, policy)
are idempotent. Signals re-derived while catching up carry the same identity and are
deduplicated downstream. The committed offset can also be *past* the state (Faust commits
records it skipped during a rebalance), so every write ends with the partition's position
under `pos/<partition>`, and a restored partition folds nothing beyond it until the records
after it have been folded (`resume_from`: the worker reads them from the log first).

A repeated submission — the same `event_id` on the log twice, which the SQLite log refuses at
append and Kafka cannot — has the same key, so it reaches the same partition and account. Each
account keeps the ids of the last `KEPT` (256) distinct events folded into it (`RecentIds`,
8 bytes each in its pickle) and drops an event among them without folding it: processed and
acked like any record, logged at debug, passed to `on_repeat`. The bound is a count: a repeat
arriving after 256 other events of its account have been folded is folded again, as is the
repeat of an event folded into a state pickled before the ids were kept. Policy events and
clock ticks reach no account: the partition keeps policies by id, and a tick repeated cannot
move the watermark again.

Deadlines sit in one heap per partition, `(due, account)`, lazily invalidated and rebuilt from
the accounts when the partition is assigned; no timer scans every account.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import logging
import operator
import pickle
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import count
from types import ModuleType
from typing import Any, cast

import orjson

from loopservice.domain import case, followups, health, patterns, priority, sla
from loopservice.domain.calendar import BusinessCalendar
from loopservice.domain.events import ClockTick, Event, PolicyPublished
from loopservice.domain.policy import Policy, policy_from_mapping
from loopservice.domain.signals import Signal
from loopservice.streams.processors import CachedRules
from loopservice.streams.recent_ids import RecentIds
from loopservice.streams.rules import RulesBook
from loopservice.streams.topology import Topology, build_topology

logger = logging.getLogger(__name__)

FailureHandler = Callable[[int, Event, str, Exception], None]
RepeatHandler = Callable[[Event], None]
META_EVERY = 200  # records between writes of a partition's watermark


def account_key(partition: int, tenant_id: str, account_id: str) -> str:
    return f"acct/{partition}/{tenant_id}/{account_id}"


def partition_key(partition: int) -> str:
    return f"part/{partition}"


def position_key(partition: int) -> str:
    return f"pos/{partition}"


@dataclass
class AccountSlot:
    applied: int  # the last offset folded into `topology`
    topology: Topology
    folded: RecentIds = field(default_factory=RecentIds)  # ids of the last events folded

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickled before `folded` existed: it remembers nothing, so an event folded then and
        # submitted again is folded again
        state.setdefault("folded", RecentIds())
        self.__dict__.update(state)


class Partition:
    """The processors of one partition; `process` folds a record, `flush` says what to store."""

    def __init__(
        self,
        number: int,
        default_policy: Policy,
        *,
        allowed_lateness: timedelta = timedelta(seconds=1),
        on_failure: FailureHandler | None = None,
        on_repeat: RepeatHandler | None = None,
    ) -> None:
        self.number = number
        self.allowed_lateness = allowed_lateness
        self.on_failure = on_failure
        self.on_repeat = on_repeat
        self.rules: RulesBook[Policy] = RulesBook(default_policy, policy_from_mapping)
        self.sla_cache = RulesMemo()
        self.accounts: dict[str, AccountSlot] = {}
        self.watermark: datetime | None = None
        self.max_seen: datetime | None = None
        self.offset = -1  # the last offset processed
        self._first_offset: int | None = None  # the log's first record, once restored
        self.policies: dict[str, bytes] = {}
        self._queue: list[tuple[datetime, int, str]] = []
        self._scheduled: dict[str, datetime] = {}
        self._seq = count()
        self._dirty: dict[str, None] = {}  # insertion-ordered set
        self._meta_dirty = False
        self._policy_unsaved = False
        self._unsaved_meta = 0
        self._shared_ids: dict[int, tuple[str, ...]] | None = None
        self._shared_version = (0, 0)

    # -- restore -----------------------------------------------------------------------------

    def restore(self, stored: Iterable[tuple[str, bytes]], first_offset: int = 0) -> None:
        """Loads this partition's entries from the store (others are ignored). With none, it
        folds from `first_offset`, the log's first record: every record folded writes."""
        prefix = f"acct/{self.number}/"
        accounts: list[tuple[str, bytes]] = []
        for key, value in stored:
            if key == partition_key(self.number):
                self._load_meta(value)
            elif key == position_key(self.number):
                self._load_position(int(value))
            elif key.startswith(prefix):
                accounts.append((key, value))
        for key, value in accounts:  # after the meta: they refer to its policies
            slot = self._loads(value)
            self.accounts[key] = slot
            self._schedule(key, slot)
        self._first_offset = first_offset

    def _load_meta(self, value: bytes) -> None:
        meta = orjson.loads(value)
        for raw in meta["policies"]:
            event = PolicyPublished.model_validate_json(raw)
            self.rules.publish(event)
            self.policies[event.event_id] = raw.encode()
        self.watermark = _dt(meta["watermark"])
        self.max_seen = _dt(meta["max_seen"])
        self._load_position(meta["offset"])

    def _load_position(self, offset: int) -> None:
        self.offset = max(self.offset, offset)

    @property
    def next_offset(self) -> int | None:
        """The next offset this partition must fold: after the last one processed or stored,
        else the log's first; None before it has folded or restored any."""
        return self.offset + 1 if self.offset >= 0 else self._first_offset

    def resume_from(self, offset: int) -> int | None:
        """Where to read again when the record at `offset` would skip records whose effect the
        store does not hold (None: fold it).

        The committed offset is not trusted for this: Faust acks records it skips during a
        rebalance (stale generation, flow suspended) into the offsets it commits, so after a
        takeover a commit can lie past records nobody stored. The store's own position cannot.
        """
        start = self.next_offset
        return None if start is None or offset <= start else start

    # -- the fold ----------------------------------------------------------------------------

    def process(self, offset: int, event: Event) -> list[Signal]:
        """Folds the record at `offset`; returns the signals it causes (maybe again, after a
        crash: same identities)."""
        out: list[Signal] = []
        if isinstance(event, ClockTick):
            candidate = event.occurred_at
        else:
            if isinstance(event, PolicyPublished):
                if event.event_id not in self.policies:
                    self.rules.publish(event)
                    self.policies[event.event_id] = event.model_dump_json().encode()
                    self._meta_dirty = self._policy_unsaved = True
            else:
                out += self._handle(offset, event)
            if self.max_seen is None or event.occurred_at > self.max_seen:
                self.max_seen = event.occurred_at
                self._meta_dirty = True
            candidate = self.max_seen - self.allowed_lateness
        if self.watermark is None or candidate > self.watermark:
            self.watermark = candidate
            self._meta_dirty = True
            out += self._advance(candidate)
        self.offset = max(self.offset, offset)
        self._unsaved_meta += 1  # counted per record: a flush may follow a run of them
        return out

    def _handle(self, offset: int, event: Event) -> list[Signal]:
        key = account_key(self.number, event.tenant_id, event.account_id)
        slot = self.accounts.get(key)
        if slot is None:
            slot = self.accounts[key] = AccountSlot(
                -1, build_topology(self.rules, sla_cache=self.sla_cache)
            )
        if offset <= slot.applied:
            return []  # folded before a crash; the changelog was ahead of the offsets
        if not slot.folded.add(event.event_id):
            # A repeated submission (its key, the account, put it in this partition too): what
            # the SQLite log refuses at append. The account is unchanged, so nothing is written.
            logger.debug(
                "partition %s offset %s: %s %s already folded into its account: dropped",
                self.number,
                offset,
                event.type,
                event.event_id,
            )
            if self.on_repeat is not None:
                self.on_repeat(event)
            return []
        out: list[Signal] = []
        for processor in slot.topology.by_account:
            try:
                out += processor.handle(event)
            except Exception as exc:  # a bad event must not stop the partition: dead-letter it
                logger.warning(
                    "processor %s failed on partition %s offset %s (%s): %s",
                    processor.name,
                    self.number,
                    offset,
                    event.type,
                    type(exc).__name__,
                )
                if self.on_failure is not None:
                    self.on_failure(offset, event, processor.name, exc)
        slot.applied = offset
        self._dirty[key] = None
        self._schedule(key, slot)
        return out

    def _advance(self, watermark: datetime) -> list[Signal]:
        out: list[Signal] = []
        queue = self._queue
        while queue and queue[0][0] <= watermark:
            due, _, key = heapq.heappop(queue)
            if self._scheduled.get(key) != due:
                continue  # superseded by a later entry for the account
            del self._scheduled[key]
            slot = self.accounts[key]
            for processor in slot.topology.by_account:
                out += processor.advance(watermark)
            self._dirty[key] = None
            self._schedule(key, slot)
        return out

    def _schedule(self, key: str, slot: AccountSlot) -> None:
        dues = [d for p in slot.topology.by_account if (d := p.next_due()) is not None]
        due = min(dues) if dues else None
        if due is None or self._scheduled.get(key) == due:
            return
        self._scheduled[key] = due
        heapq.heappush(self._queue, (due, next(self._seq), key))

    def next_due(self) -> datetime | None:
        """The earliest pending deadline, so the worker knows when a clock tick is worth it."""
        while self._queue and self._scheduled.get(self._queue[0][2]) != self._queue[0][0]:
            heapq.heappop(self._queue)
        return self._queue[0][0] if self._queue else None

    # -- persistence -------------------------------------------------------------------------

    def flush(self) -> list[tuple[str, bytes]]:
        """The entries to store for what changed since the last flush (one record or a run of
        them: an account changed twice is written once), the partition last.

        When anything is written, the offset processed is written after it: the changelog keeps
        one partition's writes in order, so a stored position vouches for every earlier record.
        """
        shared = self._shared()
        out = [(key, self._dumps(self.accounts[key], shared)) for key in self._dirty]
        self._dirty.clear()
        # The watermark stored is only a lower bound to resume from (replay moves it on), so
        # it need not be written for every record; a new policy must be, as accounts refer to it.
        if self._policy_unsaved or (self._meta_dirty and self._unsaved_meta >= META_EVERY):
            out.append((partition_key(self.number), self._meta()))
            self._meta_dirty = self._policy_unsaved = False
            self._unsaved_meta = 0
        if out:
            out.append((position_key(self.number), str(self.offset).encode()))
        return out

    def _meta(self) -> bytes:
        return orjson.dumps(
            {
                "watermark": _iso(self.watermark),
                "max_seen": _iso(self.max_seen),
                "offset": self.offset,
                "policies": [raw.decode() for raw in self.policies.values()],
            }
        )

    def _dumps(self, slot: AccountSlot, shared: Mapping[int, tuple[str, ...]]) -> bytes:
        def reference(obj: object) -> tuple[Any, ...]:
            pid = shared.get(id(obj))
            if pid is None:  # not one of this partition's: by value, as pickle would
                return cast(tuple[Any, ...], obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL))
            return (_shared_object, (pid,))

        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        # A dispatch table, unlike `persistent_id`, costs nothing for the objects it does not
        # name: the C pickler only looks up their type.
        pickler.dispatch_table = {**_SLOTTED, **{kind: reference for kind in _SHARED_TYPES}}
        pickler.dump(slot)
        return buffer.getvalue()

    def _shared(self) -> dict[int, tuple[str, ...]]:
        """Ids of the objects written as references; rebuilt when a policy or memo is added."""
        version = (len(self.rules.versions()), len(self.sla_cache))
        if self._shared_ids is not None and self._shared_version == version:
            return self._shared_ids
        self._shared_version = version
        shared: dict[int, tuple[str, ...]] = {
            id(self.rules): ("rules",),
            id(self.sla_cache): ("sla_cache",),
        }
        for policy in self.rules.versions():
            shared[id(policy)] = ("policy", policy.version)
            for name, spec in policy.calendars.named.items():
                shared[id(spec.calendar)] = ("calendar", policy.version, name)
        for cached in self.sla_cache.values():
            shared[id(cached)] = ("cached", cached.version)
        self._shared_ids = shared
        return shared

    def _loads(self, value: bytes) -> AccountSlot:
        token = _resolver.set(self._resolve)
        try:
            slot: AccountSlot = pickle.loads(value)
        finally:
            _resolver.reset(token)
        return slot

    def _resolve(self, pid: tuple[str, ...]) -> Any:
        kind = pid[0]
        if kind == "rules":
            return self.rules
        if kind == "sla_cache":
            return self.sla_cache
        policy = self._policy(pid[1])
        if kind == "policy":
            return policy
        if kind == "calendar":
            return policy.calendars.named[pid[2]].calendar
        if kind == "cached":
            cached = self.sla_cache.get(id(policy))
            if cached is None or cached.rules is not policy:
                cached = self.sla_cache[id(policy)] = CachedRules(policy)
            return cached
        raise pickle.UnpicklingError(f"unknown shared object {pid!r}")

    def _policy(self, version: str) -> Policy:
        for policy in self.rules.versions():
            if policy.version == version:
                return policy
        raise pickle.UnpicklingError(f"policy version {version} is not on this partition")


class RulesMemo(dict[int, CachedRules]):
    """The per-policy memo the SLA processors of one partition share (a type of its own, so
    the pickler can tell it from any other dict)."""


_SHARED_TYPES = (RulesBook, RulesMemo, Policy, BusinessCalendar, CachedRules)


def _slotted_reducers(*modules: ModuleType) -> dict[type, Callable[[Any], tuple[Any, ...]]]:
    """Reducers for the state's slotted dataclasses. Pickle's default for them goes through
    `dataclasses.fields()` on every object, which was a quarter of the time a record's state
    took to write; these read the fields with one `attrgetter`."""
    reducers: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
    for module in modules:
        for kind in vars(module).values():
            if (
                isinstance(kind, type)
                and kind.__module__ == module.__name__
                and dataclasses.is_dataclass(kind)
                and "__slots__" in vars(kind)
            ):
                names = tuple(f.name for f in dataclasses.fields(kind))
                if names:
                    reducers[kind] = _reducer(kind, names)
    return reducers


def _reducer(kind: type, names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    get = operator.attrgetter(*names)
    if len(names) == 1:
        return lambda obj: (_rebuild, (kind, names, (get(obj),)))
    return lambda obj: (_rebuild, (kind, names, get(obj)))


def _rebuild(kind: type, names: tuple[str, ...], values: tuple[Any, ...]) -> Any:
    obj: Any = object.__new__(kind)
    for name, value in zip(names, values, strict=True):
        object.__setattr__(obj, name, value)  # frozen ones too
    return obj


_SLOTTED = _slotted_reducers(case, followups, health, patterns, priority, sla)
_resolver: ContextVar[Callable[[tuple[str, ...]], Any]] = ContextVar("resolver")


def _shared_object(pid: tuple[str, ...]) -> Any:
    """Called by `pickle.loads` for each shared object: the loading partition's own."""
    return _resolver.get()(pid)


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None
