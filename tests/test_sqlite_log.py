import gc
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from factories import message, opened
from loopservice.infra.event_codec import validate_event
from loopservice.infra.sqlite_log import (
    SQLiteLog,
    decode_interaction,
    interaction_log,
    open_datastore,
)
from loopservice.streams.clock import FixedClock
from loopservice.streams.log import Appended, LogRecord


def test_append_read_positions_are_gapless(tmp_path: Path) -> None:
    log = interaction_log(open_datastore(tmp_path / "log.db"))
    out = log.append([opened(1), message(2), message(3)])
    assert [a.position for a in out] == [1, 2, 3]
    assert not any(a.duplicate for a in out)
    # the outcomes are set up field by field: they must be what the dataclass makes
    expected = [Appended(f"ev-{n}", n, duplicate=False) for n in (1, 2, 3)]
    assert out == expected
    assert [(type(a), hash(a), repr(a)) for a in out] == [
        (type(a), hash(a), repr(a)) for a in expected
    ]
    with pytest.raises(FrozenInstanceError):
        out[0].position = 7  # type: ignore[misc]
    out = log.append([message(4)])
    assert out[0].position == 4
    records = log.read(2, 10)
    assert [r.position for r in records] == [2, 3, 4]
    assert records[0].value == message(2)
    assert records[0].recorded_at.tzinfo is not None
    assert log.head() == 4


def test_records_carry_their_append_time_and_the_events_pydantic_gives(tmp_path: Path) -> None:
    clock = FixedClock(datetime(2026, 3, 2, 9, 0, 0, 250_000, tzinfo=UTC))
    log = interaction_log(open_datastore(tmp_path / "log.db"), clock=clock)
    first = [opened(1), message(2)]
    log.append(first)
    clock.advance(timedelta(seconds=90))
    log.append([message(3)])
    # The same table read through the topic column, as a log without `decode_body` reads.
    by_topic = SQLiteLog(
        log.datastore,
        "stored_interactions",
        identity=lambda e: e.event_id,
        topic=lambda e: e.type,
        decode=decode_interaction,
    )
    for records in (log.read(1, 10), by_topic.read(1, 10)):
        assert [r.recorded_at for r in records] == [
            datetime(2026, 3, 2, 9, 0, 0, 250_000, tzinfo=UTC),
            datetime(2026, 3, 2, 9, 0, 0, 250_000, tzinfo=UTC),
            datetime(2026, 3, 2, 9, 1, 30, 250_000, tzinfo=UTC),
        ]
        assert all(type(r) is LogRecord for r in records)
        assert [r.position for r in records] == [1, 2, 3]
        assert [r.value for r in records] == [*first, message(3)]
        for r in records:
            assert r.value == validate_event(r.value.type, r.value.model_dump_json().encode())


def test_a_long_read_decodes_every_record_as_one_at_a_time(tmp_path: Path) -> None:
    """More records than `read` decodes together, append times changing inside such a part,
    and a record of an older schema stored by other code among them: the same records as a
    log reading one at a time through the topic column."""
    clock = FixedClock(datetime(2026, 3, 2, 9, 0, 0, 250_000, tzinfo=UTC))
    log = interaction_log(open_datastore(tmp_path / "log.db"), clock=clock)
    n = 0
    for size in (1, 37, 64, 3, 120):
        log.append([opened(n + i) if (n + i) % 5 == 0 else message(n + i) for i in range(size)])
        n += size
        clock.advance(timedelta(seconds=1))
        if size == 64:  # an older record, as an earlier version of the log wrote it
            written = clock.now() - timedelta(milliseconds=500)
            stamp = written.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00").encode()
            v1 = {**opened(999).model_dump(mode="json"), "schema_version": 1, "severity": 1}
            v1["channel"] = v1.pop("source")["channel"]
            with log.datastore.transaction(commit=True) as cursor:
                cursor.execute(
                    "INSERT INTO stored_interactions VALUES (?, 0, ?, ?)",
                    ("ev-999", "case.opened", stamp + orjson.dumps(v1)),
                )
            n += 1
    one_at_a_time = SQLiteLog(
        log.datastore,
        "stored_interactions",
        identity=lambda e: e.event_id,
        topic=lambda e: e.type,
        decode=decode_interaction,
    )
    for start, limit in ((1, 1000), (30, 77)):
        records = log.read(start, limit)
        assert records == one_at_a_time.read(start, limit)
        assert [r.position for r in records] == list(range(start, min(n, start + limit - 1) + 1))
    records = log.read(1, 1000)
    assert len({r.recorded_at for r in records}) == 6
    older = next(r for r in records if r.value.event_id == "ev-999")
    assert older.recorded_at == written
    assert older.value.schema_version == 2 and older.value.source.channel == "email"


def test_duplicates_are_accepted_once_across_restarts(tmp_path: Path) -> None:
    log = interaction_log(open_datastore(tmp_path / "log.db"))
    log.append([opened(1), message(2)])
    reopened = interaction_log(open_datastore(tmp_path / "log.db"))
    out = reopened.append([message(2), message(3), message(3)])
    assert [(a.record_id, a.position, a.duplicate) for a in out] == [
        ("ev-2", 2, True),
        ("ev-3", 3, False),
        ("ev-3", 3, True),
    ]
    assert reopened.head() == 3


WRITER = textwrap.dedent(
    """
    import sys
    from loopservice.infra.sqlite_log import interaction_log, open_datastore
    from factories import message
    log = interaction_log(open_datastore(sys.argv[1]))
    n = 0
    while True:
        batch = [message(n + i) for i in range(50)]
        out = log.append(batch)
        n += 50
        print(out[-1].position, flush=True)
    """
)


def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    assert proc.stdout is not None
    acknowledged = 0
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 2000:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = interaction_log(open_datastore(db))
    assert log.head() >= acknowledged
    records = log.read(1, acknowledged)
    assert [r.position for r in records] == list(range(1, acknowledged + 1))


def test_a_read_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    """`read` holds the collector off while it builds records: it must hand it back on."""
    log = interaction_log(open_datastore(tmp_path / "log.db"))
    log.append([message(i) for i in range(120)])
    assert gc.isenabled()
    assert len(log.read(1, 1000)) == 120
    assert gc.isenabled()
    gc.disable()
    try:
        assert len(log.read(1, 1000)) == 120
        assert not gc.isenabled()
    finally:
        gc.enable()
