import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from factories import T0, opened, raw_event
from loopservice.cli import main
from loopservice.domain.events import Event
from loopservice.infra.dead_letters import DeadLetterStore
from loopservice.infra.sqlite_log import SQLiteLog, interaction_log, open_datastore
from loopservice.streams.clock import FixedClock
from loopservice.streams.ingest import (
    FieldError,
    GroupCommitLog,
    IngestService,
    PayloadError,
    UnsupportedMediaType,
    parse_payload,
    validate,
)
from loopservice.streams.log import Appended, LogRecord

NOW = T0 + timedelta(days=1)
SKEW = timedelta(seconds=300)


def opened_raw(n: int, **kw: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "subject": "Cannot log in",
        "topic": "login",
        "impact": "high",
        "urgency": "medium",
    }
    fields.update(kw)
    return raw_event("case.opened", n, **fields)


def fields_of(items: list[object]) -> list[tuple[str, ...]]:
    _, rejections = validate(items, NOW, SKEW)
    return [tuple(e.field for e in r.errors) for r in rejections]


def test_parse_one_object_an_array_and_ndjson() -> None:
    assert parse_payload(b'{"a": 1}', "application/json") == [{"a": 1}]
    assert parse_payload(b'[{"a": 1}, {"a": 2}]', "application/json; charset=utf-8") == [
        {"a": 1},
        {"a": 2},
    ]
    body = b'{"a": 1}\n\n{"a": 2}\r\n{"a": 3}\n'
    assert parse_payload(body, "application/x-ndjson") == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert parse_payload(body, "application/json") == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert parse_payload(b"[]", None) == []


def test_parse_errors_say_where() -> None:
    with pytest.raises(PayloadError, match="line 2"):
        parse_payload(b'{"a": 1}\n{"a": \n', "application/x-ndjson")
    with pytest.raises(PayloadError, match="invalid JSON"):
        parse_payload(b'{"a": ', "application/json")
    with pytest.raises(PayloadError, match="object"):
        parse_payload(b"42", "application/json")
    with pytest.raises(UnsupportedMediaType):
        parse_payload(b"a=1", "application/x-www-form-urlencoded")


def test_valid_events_keep_their_index() -> None:
    valid, rejections = validate([opened_raw(1), {"nope": 1}, opened_raw(2)], NOW, SKEW)
    assert [(v.index, v.event.event_id) for v in valid] == [(0, "ev-1"), (2, "ev-2")]
    assert [r.index for r in rejections] == [1]


def test_rejections_name_the_field_path() -> None:
    bad_actor = opened_raw(1, actor={"kind": "robot", "id": "x"})
    no_time = opened_raw(2)
    del no_time["occurred_at"]
    naive_time = opened_raw(3)
    naive_time["occurred_at"] = "2026-03-02T09:00:00"
    bad_channel = opened_raw(4, source={"platform": "zendesk", "channel": "fax"})
    valid, rejections = validate([bad_actor, no_time, naive_time, bad_channel], NOW, SKEW)
    assert valid == []
    assert [(r.index, r.event_id, [e.field for e in r.errors]) for r in rejections] == [
        (0, "ev-1", ["actor.kind"]),
        (1, "ev-2", ["occurred_at"]),
        (2, "ev-3", ["occurred_at"]),
        (3, "ev-4", ["source.channel"]),
    ]
    assert "customer" in rejections[0].errors[0].reason
    assert rejections[1].errors[0].reason == "Field required"


def test_type_and_model_level_errors_name_a_field() -> None:
    unknown = raw_event("case.exploded", 1)
    untyped = raw_event("case.opened", 2)
    del untyped["type"]
    no_case = opened_raw(3, case=None)
    bad_score = raw_event("survey.answered", 4, case=None, kind="csat", score=9)
    assert fields_of([unknown, untyped, no_case, bad_score, "text"]) == [
        ("type",),
        ("type",),
        ("case_id",),
        ("score",),
        ("",),
    ]


def test_rejections_never_quote_submitted_values() -> None:
    secret = "my password is hunter2"
    raw = raw_event("case.customer_message", 1, body=secret, actor={"kind": "robot", "id": "x"})
    _, [rejection] = validate([raw], NOW, SKEW)
    assert secret not in repr(rejection)
    assert "robot" not in rejection.reason


def test_events_from_the_future_are_rejected() -> None:
    ahead = opened_raw(1, at=NOW + timedelta(hours=1))
    just_inside = opened_raw(2, at=NOW + SKEW)
    valid, rejections = validate([ahead, just_inside], NOW, SKEW)
    assert [v.event.event_id for v in valid] == ["ev-2"]
    assert rejections[0].errors == (FieldError("occurred_at", "in the future by 3600 s"),)


def test_old_schema_is_upcast_before_validation_and_ticks_are_refused() -> None:
    v1 = opened_raw(1, schema_version=1, severity=1, channel="chat")
    del v1["source"], v1["impact"], v1["urgency"]
    tick = raw_event("clock.tick", 2, case=None)
    valid, rejections = validate([v1, tick], NOW, SKEW)
    assert [v.event.schema_version for v in valid] == [2]
    assert valid[0].event.source.channel == "chat"
    assert [e.field for e in rejections[0].errors] == ["type"]


def test_all_or_nothing_appends_nothing_when_one_is_invalid(tmp_path: Path) -> None:
    datastore = open_datastore(f"{tmp_path}/log.db")
    log = interaction_log(datastore)
    service = IngestService(log, FixedClock(NOW), SKEW, DeadLetterStore(datastore))
    outcome = service.submit_all_or_nothing([opened_raw(1), {"event_id": "x"}])
    assert log.head() == 0 and outcome.results == []
    assert [r.index for r in outcome.rejections] == [1]
    assert DeadLetterStore(datastore).count() == 0

    outcome = service.submit_all_or_nothing([opened_raw(1), opened_raw(2), opened_raw(1)])
    assert [(r.event_id, r.position, r.duplicate) for r in outcome.results] == [
        ("ev-1", 1, False),
        ("ev-2", 2, False),
        ("ev-1", 1, True),
    ]


def test_per_event_appends_the_valid_and_dead_letters_the_rest(tmp_path: Path) -> None:
    datastore = open_datastore(f"{tmp_path}/log.db")
    log = interaction_log(datastore)
    letters = DeadLetterStore(datastore)
    service = IngestService(log, FixedClock(NOW), SKEW, letters)
    service.submit_each([opened_raw(1)])
    bad = opened_raw(3, actor={"kind": "robot", "id": "x"})
    outcome = service.submit_each([opened_raw(1), opened_raw(2), bad], indexes=[10, 11, 12])
    assert (outcome.appended, outcome.duplicates, len(outcome.rejections)) == (1, 1, 1)
    assert [r.position for r in outcome.results] == [1, 2]
    assert log.head() == 2
    [letter] = letters.list()
    assert (letter.stage, letter.event_id) == ("ingest", "ev-3")
    assert letter.reason.startswith("actor.kind: ")


def test_cli_ingest_counts_appends_and_dead_letters(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    interaction_log(open_datastore(db)).append([opened(1)])
    lines = [
        json.dumps(opened_raw(1)),  # duplicate of what is on the log
        json.dumps(opened_raw(2)),
        "",
        '{"event_id": "broken", ',  # not JSON
        json.dumps(opened_raw(3, actor={"kind": "robot", "id": "x"})),
        json.dumps(opened_raw(4, at=datetime.now(UTC) + timedelta(days=2))),
        json.dumps(opened_raw(5)),
        json.dumps(opened_raw(5)),  # duplicate within the file
        json.dumps(opened_raw(6, actor={"kind": "robot", "id": "y"})),
    ]
    source = tmp_path / "events.ndjson"
    source.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["ingest", str(source), "--db", str(db), "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    summary = {
        m[0]: int(m[1])
        for m in re.findall(r"(accepted|duplicates|rejected)\s*│\s*(\d+)", result.output)
    }
    assert summary == {"accepted": 2, "duplicates": 2, "rejected": 4}
    assert re.search(r"actor\.kind: .*│\s*2", result.output)

    log = interaction_log(open_datastore(db))
    assert [r.value.event_id for r in log.read(1, 10)] == ["ev-1", "ev-2", "ev-5"]
    letters = DeadLetterStore(open_datastore(db)).list()
    assert sorted((d.event_id or "-", d.reason.split(":")[0]) for d in letters) == [
        ("-", "invalid JSON"),
        ("ev-3", "actor.kind"),
        ("ev-4", "occurred_at"),
        ("ev-6", "actor.kind"),
    ]
    assert all(d.stage == "ingest" for d in letters)


def test_cli_ingest_reads_stdin(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    body = "\n".join(json.dumps(opened_raw(n)) for n in range(1, 6))
    result = CliRunner().invoke(main, ["ingest", "-", "--db", str(db)], input=body)
    assert result.exit_code == 0, result.output
    assert interaction_log(open_datastore(db)).head() == 5


class _SlowLog:
    """Counts appends; each takes a while, as an fsync does."""

    def __init__(self, log: SQLiteLog[Event]) -> None:
        self.log = log
        self.calls = 0

    def append(self, values: Sequence[Event]) -> list[Appended]:
        self.calls += 1
        time.sleep(0.02)
        return self.log.append(values)

    def read(self, start: int, limit: int) -> list[LogRecord[Event]]:
        return self.log.read(start, limit)

    def head(self) -> int:
        return self.log.head()


def test_group_commit_merges_concurrent_appends(tmp_path: Path) -> None:
    slow = _SlowLog(interaction_log(open_datastore(tmp_path / "log.db")))
    grouped = GroupCommitLog(slow)
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda n: grouped.append([opened(n), opened(n)]), range(1, 33)))
    assert slow.calls < 16
    for n, (first, again) in enumerate(outcomes, start=1):
        assert (first.record_id, first.duplicate) == (f"ev-{n}", False)
        assert (again.position, again.duplicate) == (first.position, True)
        assert slow.log.read(first.position, 1)[0].value.event_id == f"ev-{n}"
    assert grouped.head() == 32


def test_group_commit_hands_the_error_to_every_caller_in_the_group(tmp_path: Path) -> None:
    class Broken(_SlowLog):
        def append(self, values: Sequence[Event]) -> list[Appended]:
            time.sleep(0.02)
            raise OSError("disk full")

    grouped = GroupCommitLog(Broken(interaction_log(open_datastore(tmp_path / "log.db"))))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(grouped.append, [opened(n)]) for n in range(8)]
    assert all(isinstance(f.exception(), OSError) for f in futures)
