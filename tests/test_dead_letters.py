from pathlib import Path

from click.testing import CliRunner

from factories import T0
from loopservice.cli import main
from loopservice.infra.dead_letters import DeadLetterStore
from loopservice.infra.sqlite_log import interaction_log, open_datastore
from loopservice.streams.clock import FixedClock


def test_add_list_newest_first_and_by_stage(tmp_path: Path) -> None:
    store = DeadLetterStore(open_datastore(tmp_path / "log.db"), FixedClock(T0))
    first = store.add("ingest", "actor.kind: bad", {"event_id": "e1"}, event_id="e1")
    second = store.add("sla", "no policy in force", '{"x": 1}', event_id="e2", position=7)
    third = store.add("ingest", "invalid JSON", "{not json")
    assert first < second < third

    assert [d.id for d in store.list()] == [third, second, first]
    assert [d.id for d in store.list(limit=1)] == [third]
    [sla] = store.list(stage="sla")
    assert (sla.event_id, sla.position, sla.reason, sla.raw) == (
        "e2",
        7,
        "no policy in force",
        '{"x": 1}',
    )
    assert sla.recorded_at == T0
    assert store.list(stage="ingest")[1].raw == '{"event_id":"e1"}'
    assert (store.count(), store.count("ingest"), store.count("health")) == (3, 2, 0)


def test_dead_letters_share_the_log_file_and_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    datastore = open_datastore(db)
    interaction_log(datastore)
    DeadLetterStore(datastore).add("ingest", "type: Field required", {"body": "secret text"})
    reopened = DeadLetterStore(open_datastore(db))
    assert [d.reason for d in reopened.list()] == ["type: Field required"]
    assert "secret text" not in repr(reopened.list()[0])


def test_cli_lists_without_bodies(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    store = DeadLetterStore(open_datastore(db))
    store.add("ingest", "actor.kind: bad", {"event_id": "e1", "body": "secret text"}, event_id="e1")
    store.add("sla", "boom", {"event_id": "e2"}, event_id="e2", position=3)
    result = CliRunner().invoke(main, ["dead-letters", "--db", str(db), "--stage", "ingest"])
    assert result.exit_code == 0, result.output
    assert "e1" in result.output and "actor.kind" in result.output
    assert "e2" not in result.output
    assert "secret text" not in result.output
