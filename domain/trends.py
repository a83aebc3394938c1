"""The outer loop: weekly trends per topic, product area and channel, rising topics, and the
effect of an improvement measured before and after it.

Definitions:

- Weeks are ISO weeks in UTC, named by their Monday (`2026-03-02`).
- A case counts in the week it was **opened** (a cohort): its volume, its CSAT answers, whether
  it breached an SLA (at least one `sla.breached` not retracted) and whether it was reopened
  all count in that week, so a week's figures settle as its cases finish.
- volume = cases opened; CSAT = mean CSAT score (1–5) of answers about those cases;
  breach rate = breached cases / cases opened; reopen rate = cases reopened at least once /
  cases resolved at least once.
- The product area of a case is the one its `case.opened` names, else the policy's
  `outer_loop.product_areas[topic]`, else `unassigned`.
- A topic is **rising** in week w when its volume exceeds the mean volume of the
  `baseline_weeks` weeks before w (a week without cases counts 0, weeks before the tenant's
  first week with data do not count); topics rank by the excess, then by the ratio
  (volume + 1) / (baseline + 1).
- An improvement effective on day d is measured on `effect_weeks` full weeks before the week
  holding d and on as many weeks from d on (the week holding d counts as after only when d is
  its Monday): the same four metrics on each side, volume as cases per week, and the change.

Buckets are plain JSON-able mappings (the projection stores them as they are). No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

Bucket = dict[str, Any]

DIMENSIONS = ("topic", "area", "channel")
UNASSIGNED = "unassigned"
COUNTERS = ("opened", "resolved", "reopened", "breached", "csat_sum", "csat_n")


def week_of(at: datetime | date) -> str:
    """The Monday (UTC) of the ISO week holding `at`."""
    day = at.date() if isinstance(at, datetime) else at
    return (day - timedelta(days=day.weekday())).isoformat()


def shift_week(week: str, weeks: int) -> str:
    return (date.fromisoformat(week) + timedelta(weeks=weeks)).isoformat()


def product_area(topic: str, given: str | None, areas: Mapping[str, str]) -> str:
    return given or areas.get(topic) or UNASSIGNED


def new_bucket(dimension: str, value: str, week: str) -> Bucket:
    return {"dimension": dimension, "value": value, "week": week,
            **dict.fromkeys(COUNTERS, 0), "signals": {}}  # fmt: skip


def combine(buckets: Iterable[Mapping[str, Any]]) -> Bucket:
    out: Bucket = dict.fromkeys(COUNTERS, 0) | {"signals": {}}
    for b in buckets:
        for k in COUNTERS:
            out[k] += b[k]
        for label, n in b["signals"].items():
            out["signals"][label] = out["signals"].get(label, 0) + n
    return out


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def metrics(bucket: Mapping[str, Any], weeks: int = 1) -> dict[str, Any]:
    """volume (cases per week over `weeks`), CSAT, breach rate and reopen rate of a bucket."""
    return {
        "volume": bucket["opened"]
        if weeks == 1
        else round(bucket["opened"] / weeks, 2)
        if weeks
        else 0,
        "csat": _ratio(bucket["csat_sum"], bucket["csat_n"]),
        "csat_answers": bucket["csat_n"],
        "breach_rate": _ratio(bucket["breached"], bucket["opened"]),
        "reopen_rate": _ratio(bucket["reopened"], bucket["resolved"]),
    }


def rising(
    volumes: Mapping[str, Mapping[str, int]], week: str, baseline_weeks: int, since: str,
    top: int = 5,
) -> list[dict[str, Any]]:  # fmt: skip
    """Topics whose volume in `week` exceeds the mean of the weeks before, fastest first.

    Only weeks from `since` (the first with data) on form the baseline: a week before the
    records begin is unknown, not zero. Without any such week nothing is rising."""
    found: list[dict[str, Any]] = []
    before = [shift_week(week, -k) for k in range(1, baseline_weeks + 1)]
    before = [w for w in before if w >= since]
    if not before:
        return []
    for topic, by_week in volumes.items():
        now = by_week.get(week, 0)
        baseline = sum(by_week.get(w, 0) for w in before) / len(before)
        if now > baseline:
            found.append({"topic": topic, "week": week, "volume": now,
                          "baseline": round(baseline, 2), "rise": round(now - baseline, 2),
                          "ratio": round((now + 1) / (baseline + 1), 2)})  # fmt: skip
    found.sort(key=lambda r: (-r["rise"], -r["ratio"], r["topic"]))
    return found[:top]


def effect_weeks(effective: date, weeks: int) -> tuple[list[str], list[str]]:
    """The full weeks measured before and after an improvement effective on `effective`."""
    first_after = week_of(effective)
    if effective.weekday() != 0:
        first_after = shift_week(first_after, 1)
    before = [shift_week(week_of(effective), -k) for k in range(weeks, 0, -1)]
    after = [shift_week(first_after, k) for k in range(weeks)]
    return before, after


def effect(
    by_week: Mapping[str, Mapping[str, Any]], effective: date, weeks: int, last_week: str | None
) -> dict[str, Any]:
    """The metrics before and after an improvement and their change (after − before).

    Weeks after `last_week` (the latest with data) have not happened yet and are left out.
    """
    before, after = effect_weeks(effective, weeks)
    if last_week is not None:
        after = [w for w in after if w <= last_week]
    sides = {}
    for name, span in (("before", before), ("after", after)):
        bucket = combine(by_week[w] for w in span if w in by_week)
        sides[name] = {"weeks": span, **metrics(bucket, len(span))}
    change: dict[str, float | None] = {}
    for key in ("volume", "csat", "breach_rate", "reopen_rate"):
        a, b = sides["after"][key], sides["before"][key]
        change[key] = None if a is None or b is None or not after else round(a - b, 4)
    return {**sides, "change": change, "complete": len(after) == weeks}
