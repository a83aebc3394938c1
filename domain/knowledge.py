"""Knowledge from repeated resolutions, and the self-service deflection articles bring.

Definitions (thresholds from the policy's `[knowledge]` section):

- A **resolution group** is (topic, resolution code, normalised summary) within one tenant;
  `normalise_summary` lower-cases the agent's summary and keeps its words, dropping numbers,
  ids, URLs, e-mail addresses and filler words, so "Reset the password for user #4411." and
  "reset password for user 918" fall together.
- A group becomes a **knowledge candidate** the first time `min_repeats` of its resolutions
  lie within `window_days` of each other (one resolution per case). What it would save is the
  volume and handling time (opening to resolution, elapsed) of its resolutions in the trailing
  window ending at its latest resolution.
- A published article **covers** the resolutions of its topic with its resolution code (an
  article without a code covers its whole topic). A resolution is covered when such an article
  was published at or before it; the article counts it as a use.
- A self-service session is **deflected** when its account opens no case on the session's
  topic within `deflection_window_hours` after it; it **became a case** when it does. It is
  settled once the watermark passes the end of that window.

Everything here works on plain JSON-able mappings so the projection can store them as they are;
times are ISO 8601 strings in UTC, which sort as the instants they name. No I/O, no clock.
"""

from __future__ import annotations

import bisect
import re
from datetime import datetime, timedelta
from typing import Any

from loopservice.domain.policy import KnowledgeSection

State = dict[str, Any]

SUMMARY_WORDS = 12
_FILLER = frozenset(
    "a an and are as at be by for from has have i in is it its of on or so that the this to "
    "was we were with via our your their".split()
)
_NOISE = re.compile(r"https?://\S+|\S+@\S+|\S*\d\S*")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def normalise_summary(text: str) -> str:
    """The words that name a resolution: lower case, no numbers, ids, URLs or filler."""
    words = [w for w in _WORD.findall(_NOISE.sub(" ", text.lower())) if w not in _FILLER]
    return " ".join(words[:SUMMARY_WORDS])


def group_key(topic: str, code: str, summary: str) -> str:
    return f"{topic}|{code}|{summary}"


def new_group(topic: str, code: str, summary: str) -> State:
    return {
        "topic": topic,
        "resolution_code": code,
        "summary": summary,
        "resolutions": 0,
        "handled": 0,
        "handling_seconds": 0.0,
        "first_at": None,
        "last_at": None,
        "recent": [],
        "candidate_since": None,
        "covered_by": [],
        "covered_resolutions": 0,
    }


def add_resolution(
    group: State, at: datetime, handling_seconds: float | None, rules: KnowledgeSection
) -> bool:
    """Counts one case's resolution in its group; True when this one makes it a candidate."""
    stamp = at.isoformat()
    group["resolutions"] += 1
    if handling_seconds is not None:
        group["handled"] += 1
        group["handling_seconds"] += handling_seconds
    group["first_at"] = min(group["first_at"] or stamp, stamp)
    group["last_at"] = max(group["last_at"] or stamp, stamp)
    recent: list[list[Any]] = group["recent"]
    bisect.insort(recent, [stamp, handling_seconds], key=_first)
    start = datetime.fromisoformat(group["last_at"]) - timedelta(days=rules.window_days)
    first_inside = bisect.bisect_left(recent, start.isoformat(), key=_first)
    del recent[:first_inside]
    if group["candidate_since"] is None and _repeats_within(recent, rules) >= rules.min_repeats:
        group["candidate_since"] = stamp
        return True
    return False


def _first(entry: list[Any]) -> Any:
    return entry[0]


def _repeats_within(recent: list[list[Any]], rules: KnowledgeSection) -> int:
    """The most resolutions in any span of `window_days` among `recent` (sorted by time)."""
    width = timedelta(days=rules.window_days)
    times = [datetime.fromisoformat(r[0]) for r in recent]
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def would_save(group: State) -> dict[str, Any]:
    """Volume and handling time of the group's resolutions in its trailing window."""
    recent = group["recent"]
    timed = [r[1] for r in recent if r[1] is not None]
    mean = group["handling_seconds"] / group["handled"] if group["handled"] else None
    return {
        "cases_in_window": len(recent),
        "handling_hours_in_window": round(sum(timed) / 3600, 2),
        "mean_handling_hours": None if mean is None else round(mean / 3600, 2),
    }


def covers(article_topic: str, article_code: str | None, topic: str, code: str) -> bool:
    return article_topic == topic and article_code in (None, code)


def covering_article(
    index: dict[str, list[list[Any]]], topic: str, code: str, at: datetime
) -> str | None:
    """The article that covered a resolution at `at`: the latest published at or before it,
    one with the same resolution code before one that covers the whole topic."""
    stamp = at.isoformat()
    found = [a for a in index.get(topic, ()) if a[0] <= stamp and a[1] in (None, code)]
    if not found:
        return None
    exact = [a for a in found if a[1] == code]
    return str(max(exact or found)[2])


def index_article(
    index: dict[str, list[list[Any]]], topic: str, code: str | None, at: datetime, article_id: str
) -> None:
    entries = index.setdefault(topic, [])
    if not any(e[2] == article_id for e in entries):
        bisect.insort(entries, [at.isoformat(), code, article_id], key=lambda e: (e[0], e[2]))


# --- self-service deflection ----------------------------------------------------------------


def new_sessions() -> State:
    """Sessions awaiting their verdict: `queue` ordered by due instant, `open` by subject, and
    the watermark they were last settled at."""
    return {"queue": [], "open": {}, "watermark": ""}


def session_subject(tenant: str, account: str, topic: str) -> str:
    return f"{tenant}|{account}|{topic}"


def start_session(
    pending: State, session_id: str, tenant: str, account: str, topic: str, at: datetime,
    article_ids: tuple[str, ...], resolved: bool, rules: KnowledgeSection,
) -> None:  # fmt: skip
    due = (at + timedelta(hours=rules.deflection_window_hours)).isoformat()
    subject = session_subject(tenant, account, topic)
    pending["open"].setdefault(subject, {})[session_id] = {
        "tenant": tenant, "topic": topic, "at": at.isoformat(), "due": due,
        "articles": list(article_ids), "resolved": resolved,
    }  # fmt: skip
    bisect.insort(pending["queue"], [due, subject, session_id])


def case_opened(pending: State, tenant: str, account: str, topic: str, at: datetime) -> list[State]:
    """The sessions that a case opened at `at` turns into cases; they leave `pending`."""
    subject = session_subject(tenant, account, topic)
    sessions = pending["open"].get(subject)
    if not sessions:
        return []
    stamp = at.isoformat()
    became = [sid for sid, s in sessions.items() if s["at"] <= stamp <= s["due"]]
    out = [sessions.pop(sid) for sid in sorted(became)]
    if not sessions:
        del pending["open"][subject]
    return out


def settle(pending: State, watermark: datetime) -> list[State]:
    """The sessions whose window has passed by `watermark` without a case: deflected."""
    stamp = watermark.isoformat()
    queue: list[list[str]] = pending["queue"]
    cut = bisect.bisect_right(queue, [stamp, "\uffff"])
    out = []
    for _, subject, sid in queue[:cut]:
        sessions = pending["open"].get(subject)
        if sessions is None or sid not in sessions:
            continue  # it became a case
        out.append(sessions.pop(sid))
        if not sessions:
            del pending["open"][subject]
    del queue[:cut]
    return out


def rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
