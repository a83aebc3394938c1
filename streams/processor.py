"""The processor contract both engines drive.

A processor folds records into state it owns and returns the signals that follow. Time only
reaches it as event times and the watermark, so any engine that feeds it the same records in
the same order (per partition) gets the same signals.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from loopservice.domain.events import Event
from loopservice.domain.signals import Signal


class Processor(Protocol):
    name: str

    def handle(self, event: Event) -> list[Signal]:
        """Folds one event; returns the signals it causes at once."""
        ...

    def advance(self, watermark: datetime) -> list[Signal]:
        """Fires every timer due at or before the watermark."""
        ...

    def next_due(self) -> datetime | None:
        """The earliest pending timer, so an engine knows when a clock tick is worth appending."""
        ...
