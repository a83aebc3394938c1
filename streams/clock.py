"""Clocks the engines and logs are given. The domain never reads one: time is passed in."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class WallClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ScaledClock:
    """Simulated time that runs `speedup` times faster than the wall clock, from `start`.

    The demo gives this one clock to the simulator, the log and the engine, so that a
    simulated hour can pass in a second while every component agrees on "now".
    """

    def __init__(self, start: datetime, speedup: float) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be positive")
        self._start = start
        self._speedup = speedup
        self._origin = time.monotonic()

    def now(self) -> datetime:
        elapsed = (time.monotonic() - self._origin) * self._speedup
        return self._start + timedelta(seconds=elapsed)


class FixedClock:
    """A clock that moves only when told to: for tests and deterministic runs."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta
