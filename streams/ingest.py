"""Ingestion: raw bytes from a platform become validated events on the interactions log.

One service for every entry point (HTTP API, `loopservice ingest`), written against the log
port only, so it serves the embedded and the Kafka log alike:

1. `parse_payload` turns a body into raw items: one JSON object, a JSON array of objects, or
   NDJSON (one object per line, blank lines ignored). Malformed JSON raises `PayloadError`.
2. `validate` upcasts each raw item (`domain.upcasting.upcast`), validates it against the one
   event vocabulary, and rejects events whose `occurred_at` lies more than the clock-skew
   tolerance ahead of now (a clock from the future would fire every timer) and engine-only
   records (`clock.tick`). A `Rejection` names every failing field as a dotted path into the
   event (`occurred_at`, `actor.kind`, `source.channel`, `article_ids.0`) with a reason; it never
   quotes submitted values.
3. The valid events are appended to the log; the log answers each with its position and
   whether that `event_id` was already there (a duplicate is accepted once: its result carries
   the existing position and `duplicate=True`).

Batch semantics differ on purpose:

- HTTP (`IngestService.submit_all_or_nothing`): a request is all or nothing. If any event is
  invalid nothing is appended and the caller gets every invalid event with its fields (422),
  so a client can fix and resend the whole request; with idempotent event ids a resend is safe.
- CLI bulk import (`IngestService.submit_each`): per event. Valid events are appended, invalid
  ones are counted and written to the dead-letter store with stage `"ingest"` and the reason,
  so one bad line in a million does not stop an import.

Indexes are 0-based positions in the submitted batch (the CLI passes line numbers instead).
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from loopservice.domain.events import EVENT_ADAPTER, Envelope, Event
from loopservice.domain.upcasting import upcast
from loopservice.streams.clock import Clock
from loopservice.streams.log import Appended, Log, LogRecord

INGEST_STAGE = "ingest"
ENGINE_ONLY_TYPES: frozenset[str] = frozenset({"clock.tick"})
NDJSON_MEDIA_TYPES: frozenset[str] = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)


class PayloadError(ValueError):
    """The body is not JSON, not NDJSON, or not objects: nothing in it can be read as events."""


class UnsupportedMediaType(PayloadError):
    pass


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str  # dotted path into the event; "" for the event as a whole
    reason: str


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    event_id: str | None
    errors: tuple[FieldError, ...]
    raw: object = field(default=None, repr=False, compare=False)

    @property
    def reason(self) -> str:
        return "; ".join(f"{e.field}: {e.reason}" if e.field else e.reason for e in self.errors)


@dataclass(frozen=True, slots=True)
class Valid:
    index: int
    event: Event


@dataclass(frozen=True, slots=True)
class Result:
    index: int
    event_id: str
    type: str
    position: int
    duplicate: bool


@dataclass(slots=True)
class Outcome:
    results: list[Result]
    rejections: list[Rejection]

    @property
    def appended(self) -> int:
        return sum(not r.duplicate for r in self.results)

    @property
    def duplicates(self) -> int:
        return sum(r.duplicate for r in self.results)


class DeadLetterSink(Protocol):
    def add(
        self,
        stage: str,
        reason: str,
        raw: object,
        *,
        event_id: str | None = None,
        position: int | None = None,
    ) -> int: ...

    def add_rejections(self, stage: str, rejections: Sequence[Rejection]) -> int: ...


# --- parsing --------------------------------------------------------------------------------


def parse_payload(body: bytes, content_type: str | None) -> list[object]:
    """Raw items of a JSON object, a JSON array or NDJSON body; raises `PayloadError`."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media in NDJSON_MEDIA_TYPES:
        return parse_ndjson(body)
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"unsupported content type {media!r}: use application/json or application/x-ndjson"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if len(body.strip().splitlines()) > 1:
            try:
                return parse_ndjson(body)  # NDJSON sent as application/json
            except PayloadError:
                pass
        raise PayloadError(f"invalid JSON: {exc}") from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [data]
    raise PayloadError("expected a JSON object or an array of objects")


def parse_ndjson(body: bytes) -> list[object]:
    items: list[object] = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise PayloadError(f"invalid JSON on line {number}: {exc}") from None
    return items


# --- validation -----------------------------------------------------------------------------


def validate(
    items: Sequence[object],
    now: datetime,
    skew_tolerance: timedelta,
    *,
    indexes: Sequence[int] | None = None,
) -> tuple[list[Valid], list[Rejection]]:
    """Splits raw items into valid events and rejections, each keeping its index."""
    if indexes is None:
        indexes = range(len(items))
    latest = now + skew_tolerance
    valid: list[Valid] = []
    rejections: list[Rejection] = []
    for index, item in zip(indexes, items, strict=True):
        checked = validate_one(index, item, now, latest)
        if isinstance(checked, Valid):
            valid.append(checked)
        else:
            rejections.append(checked)
    return valid, rejections


def validate_one(index: int, item: object, now: datetime, latest: datetime) -> Valid | Rejection:
    if not isinstance(item, dict):
        return Rejection(index, None, (FieldError("", "expected a JSON object"),), item)
    event_id = item.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    try:
        raw = upcast(item)
    except Exception as exc:  # a malformed old-schema record can trip an upcaster
        reason = f"cannot upgrade from this schema_version ({type(exc).__name__})"
        return Rejection(index, event_id, (FieldError("schema_version", reason),), item)
    try:
        event: Event = EVENT_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        return Rejection(index, event_id, tuple(field_errors(exc, raw)), item)
    errors: list[FieldError] = []
    if event.type in ENGINE_ONLY_TYPES:
        errors.append(FieldError("type", f"{event.type} is appended by the engine only"))
    if event.occurred_at > latest:
        ahead = math.ceil((event.occurred_at - now).total_seconds())
        errors.append(FieldError("occurred_at", f"in the future by {ahead} s"))
    if errors:
        return Rejection(index, event_id, tuple(errors), item)
    return Valid(index, event)


_PREFIX = re.compile(r"^(Value error|Assertion failed), ")


def field_errors(exc: ValidationError, raw: dict[str, Any]) -> list[FieldError]:
    """Pydantic's errors as dotted field paths inside the event, without submitted values."""
    tag = raw.get("type")
    out: list[FieldError] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        kind = err["type"]
        if kind == "union_tag_not_found":
            out.append(FieldError("type", "Field required"))
            continue
        if kind == "union_tag_invalid":
            shown = str(tag)[:60]
            out.append(FieldError("type", f"unknown event type {shown!r}"))
            continue
        loc = list(err["loc"])
        if loc and loc[0] == tag:
            loc = loc[1:]
        reason = _PREFIX.sub("", err["msg"])
        path = ".".join(str(p) for p in loc) or _field_named_in(reason, str(tag))
        out.append(FieldError(path, reason))
    return out


def _field_named_in(reason: str, event_type: str) -> str:
    """For a model-level error, the first field of the event type that its message names."""
    model = _models_by_type().get(event_type)
    if model is None:
        return ""
    words = set(re.findall(r"[a-z_]+", reason))
    return next((name for name in model.model_fields if name in words), "")


@functools.cache
def _models_by_type() -> dict[str, type[Envelope]]:
    found: dict[str, type[Envelope]] = {}
    pending: list[type[Envelope]] = [Envelope]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        tag = cls.model_fields.get("type")
        if tag is not None and isinstance(tag.default, str):
            found[tag.default] = cls
    return found


# --- group commit ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    events: Sequence[Event]
    result: list[Appended] | None = None
    error: BaseException | None = None


class GroupCommitLog:
    """A log decorator that merges appends from concurrent threads into one transaction.

    A durable append costs one fsync whatever its size, so many small concurrent requests
    would serialise on fsyncs. Here the first caller to find the log idle writes everything
    pending in one `append` (one transaction) and hands each caller its own outcomes; callers
    arriving meanwhile wait and are written by the next leader. Each caller still returns only
    after its records are committed. If the shared append fails, every caller in it gets the
    error (nothing of theirs was acknowledged; a retry is safe because ids are idempotent).
    """

    def __init__(self, log: Log[Event], max_events: int = 20_000) -> None:
        self.log = log
        self.max_events = max_events
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._writing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.log, name)

    def read(self, start: int, limit: int) -> list[LogRecord[Event]]:
        return self.log.read(start, limit)

    def head(self) -> int:
        return self.log.head()

    def append(self, values: Sequence[Event]) -> list[Appended]:
        if not values:
            return []
        slot = _Slot(values)
        with self._cond:
            self._pending.append(slot)
            while slot.result is None and slot.error is None:
                if self._writing:
                    self._cond.wait()
                    continue
                self._writing = True
                batch = self._take()
                self._cond.release()
                try:
                    self._write(batch)
                finally:
                    self._cond.acquire()
                    self._writing = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        assert slot.result is not None
        return slot.result

    def _take(self) -> list[_Slot]:
        batch: list[_Slot] = []
        size = 0
        while self._pending and (
            not batch or size + len(self._pending[0].events) <= self.max_events
        ):
            slot = self._pending.pop(0)
            batch.append(slot)
            size += len(slot.events)
        return batch

    def _write(self, batch: list[_Slot]) -> None:
        try:
            appended = self.log.append([e for slot in batch for e in slot.events])
        except BaseException as exc:
            for slot in batch:
                slot.error = exc
            return
        offset = 0
        for slot in batch:
            slot.result = appended[offset : offset + len(slot.events)]
            offset += len(slot.events)


# --- the service ----------------------------------------------------------------------------


class IngestService:
    """Validates and appends raw events; blocking (run it in a thread from async code)."""

    def __init__(
        self,
        log: Log[Event],
        clock: Clock,
        skew_tolerance: timedelta,
        dead_letters: DeadLetterSink | None = None,
    ) -> None:
        self.log = log
        self.clock = clock
        self.skew_tolerance = skew_tolerance
        self.dead_letters = dead_letters

    def validate(
        self, items: Sequence[object], indexes: Sequence[int] | None = None
    ) -> tuple[list[Valid], list[Rejection]]:
        return validate(items, self.clock.now(), self.skew_tolerance, indexes=indexes)

    def submit_all_or_nothing(self, items: Sequence[object]) -> Outcome:
        """Appends every item, or none if any is invalid (then `rejections` lists them all)."""
        valid, rejections = self.validate(items)
        if rejections:
            return Outcome([], rejections)
        return Outcome(self.append(valid), [])

    def submit_each(self, items: Sequence[object], indexes: Sequence[int] | None = None) -> Outcome:
        """Appends the valid items; dead-letters the invalid ones (stage "ingest")."""
        valid, rejections = self.validate(items, indexes)
        results = self.append(valid)
        self.reject(rejections)
        return Outcome(results, rejections)

    def append(self, valid: Sequence[Valid]) -> list[Result]:
        if not valid:
            return []
        appended = self.log.append([v.event for v in valid])
        return [
            Result(v.index, a.record_id, v.event.type, a.position, a.duplicate)
            for v, a in zip(valid, appended, strict=True)
        ]

    def reject(self, rejections: Sequence[Rejection]) -> None:
        if rejections and self.dead_letters is not None:
            self.dead_letters.add_rejections(INGEST_STAGE, rejections)
