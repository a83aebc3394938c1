"""Events as the context and cases folds read them: the record's JSON object, not a model.

Those folds copy a few strings from each event into documents and timeline entries; building
a model (datetimes, enum members, nested models) for every record cost more than the fold
itself. A record on the log was validated when it was appended, so its JSON object already
holds the values the model would: enum values, ISO dates, UTC times ending in `Z`.

`event_json` returns that object when the record has exactly the current model's fields at the
current schema version (the test `infra.event_codec` applies before its own fast path); an
older or foreign record is decoded through the codec (upcast, validated, converted) and
written back to JSON, so a fold sees one shape whatever wrote the record.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from loopservice.domain.events import CURRENT_SCHEMA_VERSION, EVENT_MODELS
from loopservice.infra.event_codec import encode_event
from loopservice.infra.sqlite_log import decode_interaction

Record = dict[str, Any]


def _parsed(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names as orjson's parser returns them: it hands out the same string object for a
    key it has seen (its key cache), so comparing a record's keys with these mostly compares
    identities, not characters (a sixth of `event_json`'s time otherwise)."""
    return tuple(orjson.loads(orjson.dumps(dict.fromkeys(names))))


_FIELDS: dict[str, tuple[str, ...]] = {
    topic: _parsed(tuple(model.model_fields)) for topic, model in EVENT_MODELS.items()
}


def event_json(topic: str, body: bytes) -> Record:
    """The JSON object of a stored event (a record's state after its 32-byte stamp)."""
    values: Record = orjson.loads(body)
    if values.get("schema_version") == CURRENT_SCHEMA_VERSION and tuple(values) == _FIELDS.get(
        topic
    ):
        return values
    result: Record = orjson.loads(encode_event(decode_interaction(topic, body)))
    return result


def event_time(at: str) -> str:
    """A record's time as the model's `isoformat()` writes it: `…+00:00` for `…Z`, and no
    fraction when it is zero."""
    n = len(at)
    # Indexing by position, not slicing: a one-character string is a cached object.
    if n == 20 and at[19] == "Z" and at[10] == "T":
        return at[:19] + "+00:00"
    if n == 27 and at[26] == "Z" and at[10] == "T" and at[19] == "." and at[20:26] != "000000":
        return at[:26] + "+00:00"
    return utc(at).isoformat()


def utc(at: str) -> datetime:
    """A record's time as the model holds it (UTC)."""
    return datetime.fromisoformat(at).astimezone(UTC)
