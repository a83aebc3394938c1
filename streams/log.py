"""The log port: an append-only, gapless, idempotent sequence of records.

Two logs share this shape: interactions (events from platforms plus the engine's clock ticks)
and signals (what processors derive). Adapters live in `infra/` (`sqlite_log`, `kafka_log`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, NamedTuple, Protocol, TypeVar

from loopservice.domain.events import Event
from loopservice.domain.signals import Signal

T = TypeVar("T", Event, Signal)
T_co = TypeVar("T_co", covariant=True)


class LogRecord(NamedTuple, Generic[T_co]):
    """One record as read: immutable, and a named tuple because a replay builds one per record
    (half the cost of a frozen dataclass)."""

    position: int
    recorded_at: datetime
    value: T_co


@dataclass(frozen=True, slots=True)
class Appended:
    """The outcome for one submitted record: where it sits, and whether it was already there."""

    record_id: str
    position: int
    duplicate: bool


class Log(Protocol[T]):
    def append(self, values: Sequence[T]) -> list[Appended]:
        """Appends durably, in order; returns only after the records are committed."""
        ...

    def read(self, start: int, limit: int) -> list[LogRecord[T]]:
        """Records with position >= start, in position order, at most `limit`."""
        ...

    def head(self) -> int:
        """The last position written, 0 for an empty log."""
        ...
