"""Upcasters: raw events written under an older schema become the current schema on read.

Each upcaster takes the raw mapping of one version and returns the next version's mapping;
`upcast` chains them until `CURRENT_SCHEMA_VERSION`. Stored bytes are never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loopservice.domain.events import CURRENT_SCHEMA_VERSION

Raw = dict[str, Any]
Upcaster = Callable[[Raw], Raw]

# (event type or "*" for every type, from version) -> upcaster to version + 1
_REGISTRY: dict[tuple[str, int], Upcaster] = {}


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    def register(fn: Upcaster) -> Upcaster:
        _REGISTRY[(event_type, from_version)] = fn
        return fn

    return register


def upcast(raw: Raw) -> Raw:
    version = raw.get("schema_version", CURRENT_SCHEMA_VERSION)
    if not isinstance(version, int):
        return raw  # let validation report the bad field
    while version < CURRENT_SCHEMA_VERSION:
        fn = _REGISTRY.get((str(raw.get("type")), version)) or _REGISTRY.get(("*", version))
        if fn is None:
            break
        raw = fn(dict(raw))
        version += 1
        raw["schema_version"] = version
    return raw


@upcaster("*", 1)
def _v1_channel_to_source(raw: Raw) -> Raw:
    """v1 carried a bare `channel` (and an optional `platform`); v2 nests both in `source`."""
    if "source" not in raw and "channel" in raw:
        raw["source"] = {"platform": raw.pop("platform", "unknown"), "channel": raw.pop("channel")}
    return raw


@upcaster("case.opened", 1)
def _v1_severity_to_impact_urgency(raw: Raw) -> Raw:
    """v1 case.opened had one `severity` 1 (worst) to 4; v2 splits it into impact and urgency."""
    raw = _v1_channel_to_source(raw)
    if "severity" in raw:
        level = {1: "critical", 2: "high", 3: "medium", 4: "low"}.get(raw.pop("severity"), "medium")
        raw.setdefault("impact", level)
        raw.setdefault("urgency", level)
    return raw
