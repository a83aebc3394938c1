"""Fast JSON encoding and decoding of events for the embedded log.

The log writes events it was handed as validated models and reads back only what it wrote, so
on that path pydantic's full validation is repeated work: it was half of the append time and
three quarters of the read time (`loopservice bench log`). Here:

* `encode_event` serializes a model's fields with orjson. The bytes are the same as pydantic's
  `model_dump_json()` (tests/test_sqlite_log.py holds every event type to that); anything orjson
  cannot write the same way falls back to pydantic. `encode_events` encodes a batch, as the
  log's `append` does.
* `decode_event` / `decode_event_json` parse with orjson and build the model with each field
  converted to the type validation would give (UTC datetimes, dates, enum members, nested
  models, tuples), without re-checking constraints the event already passed on its way in. A
  record that does not have exactly the current model's fields, in order, at the current schema
  version — an older record, or one written by other code — goes through pydantic validation
  (and upcasting) instead. tests/test_event_codec.py holds every event type, and a run of
  simulated traffic, to giving what pydantic gives.
* `decode_events_json` decodes several records' JSON at once, as the log's `read` does.

A replay decodes every record once, so the decoder is built for that: one generated function
per model with no per-field loop, field names that are orjson's own key objects (found by
identity), the instance set up the way pydantic's constructor does it, shared instances of the
small nested models (the last one compared before any lookup), and one parse for the bodies of
some tens of records. `loopservice bench log` measures it against raw sqlite3 + orjson.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from enum import Enum
from functools import partial
from operator import itemgetter
from typing import Any

import annotated_types
import orjson
from pydantic import AfterValidator, AwareDatetime, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from loopservice.domain.events import (
    CURRENT_SCHEMA_VERSION,
    EVENT_ADAPTER,
    EVENT_MODELS,
    Event,
    _in_utc,
)
from loopservice.domain.upcasting import upcast

Convert = Callable[[Any], Any]


class _Unsupported(Exception):
    """A model, or a record, the fast decoder does not take: it goes to pydantic."""


# --- encoding ------------------------------------------------------------------------------


# A model's `__dict__`, or TypeError for anything else: the getter of `BaseModel.__dict__`,
# called from orjson without a Python frame (a nested `source`/`actor` is met twice an event).
_fields_of: Callable[[object], dict[str, Any]] = BaseModel.__dict__["__dict__"].__get__
_dumps_fields = partial(orjson.dumps, default=_fields_of, option=orjson.OPT_UTC_Z)


def encode_event(event: BaseModel) -> bytes:
    """`event.model_dump_json().encode()`, three times faster.

    A model's `__dict__` holds exactly its fields in declaration order, as pydantic dumps them;
    orjson writes enums as their values, tuples as lists and UTC datetimes with `Z` as pydantic
    does."""
    try:
        return _dumps_fields(_fields_of(event))
    except TypeError:  # e.g. a policy document with a non-string key
        return event.model_dump_json().encode()


def encode_events(events: Sequence[BaseModel]) -> list[bytes]:
    """`[encode_event(e) for e in events]`, without a Python call per event."""
    try:
        return list(map(_dumps_fields, map(_fields_of, events)))
    except TypeError:
        return list(map(encode_event, events))


# --- decoding ------------------------------------------------------------------------------

_loads = orjson.loads


def _in_utc_strict(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()!r}")
    return at.astimezone(UTC)


def _float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise ValueError(f"not a number: {value!r}")


def _list_as_tuple(value: Any) -> tuple[Any, ...]:
    if type(value) is not list:
        raise ValueError(f"not a list: {value!r}")
    return tuple(value)


def _exactly(kind: type) -> Convert:
    def check(value: Any) -> Any:
        if type(value) is not kind:  # JSON's 2.0 or 1 would be validated to 2 or True
            raise ValueError(f"not {kind.__name__}: {value!r}")
        return value

    return check


def _enum_lookup(enum: type[Enum], extra: dict[Any, Any]) -> Convert:
    return {**{member.value: member for member in enum}, **extra}.__getitem__


# Constraints only check a value, which the event passed when it was appended.
_CHECKS = (annotated_types.BaseMetadata, annotated_types.GroupedMetadata)


def _checks_only(metadata: list[Any]) -> None:
    for item in metadata:
        if isinstance(item, FieldInfo):
            _checks_only(item.metadata)
        elif not isinstance(item, _CHECKS):
            raise _Unsupported(item)  # a validator may change the value: leave it to pydantic


def _is_utc_datetime(info: FieldInfo) -> bool:
    return info.annotation is AwareDatetime and info.metadata == [AfterValidator(_in_utc)]


def _converter(annotation: Any) -> Convert | None:
    """How to turn a JSON value into the field's Python value; None when it is already that."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        _checks_only(list(annotation.__metadata__))
        return _converter(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise _Unsupported(annotation)
        if isinstance(args[0], type) and issubclass(args[0], Enum):
            return _enum_lookup(args[0], {None: None})  # a C call, no Python frame
        inner = _converter(args[0])
        if inner is None:
            return None
        return lambda v: None if v is None else inner(v)
    if origin is typing.Literal or annotation is str:
        return None
    if annotation in (int, bool):
        return _exactly(annotation)
    if origin is tuple:
        items = typing.get_args(annotation)
        if len(items) != 2 or items[1] is not Ellipsis:
            raise _Unsupported(annotation)
        item = _converter(items[0])
        if item is None:
            return _list_as_tuple
        return lambda v: tuple(item(x) for x in _list_as_tuple(v))
    if origin is dict:
        return None  # `dict[str, object]`: a JSON object already is one
    if annotation is float:
        return _float
    if annotation is date:
        return date.fromisoformat
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _enum_lookup(annotation, {})
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _builder(annotation)
    raise _Unsupported(annotation)


def _json_keys(names: tuple[str, ...]) -> tuple[str, ...]:
    """The names as the very str objects orjson hands out as keys when it parses them (it
    caches the keys it has seen): a parsed record's keys then compare with these, and its
    fields are found, by identity instead of by comparing characters. Were orjson to drop one
    from its cache, the comparisons would still hold, only slower."""
    return tuple(_loads(orjson.dumps(dict.fromkeys(names))))


# What pydantic's construction of a model sets besides its fields, set the same way.
_NEW = object.__new__
_SET_DICT = BaseModel.__dict__["__dict__"].__set__
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


def _builder(model: type[BaseModel]) -> Callable[[dict[str, Any]], BaseModel]:
    """Builds `model` from a parsed JSON object holding exactly its fields, in order (and, for
    an event, at the current schema version); raises otherwise.

    Generated as one straight function per model, as `dataclasses` generates `__init__`: a
    replay calls it once per record, and a loop over per-field steps cost as much again."""
    decorators = model.__pydantic_decorators__
    if (
        decorators.field_validators
        or decorators.validators
        or decorators.root_validators
        or any(d.info.mode != "after" for d in decorators.model_validators.values())
        or model.__pydantic_post_init__
        or model.model_config.get("extra") == "allow"
        or not model.model_config.get("frozen")
    ):
        raise _Unsupported(model)  # they could change values; "after" model validators check
    names = _json_keys(tuple(model.model_fields))
    # Every decoded record sets every field, so its instances share one set of them. Sharing
    # is safe: a frozen model never adds to it, and `model_copy` copies it before updating.
    scope: dict[str, Any] = {
        "NAMES": list(names),  # `[*v]` makes a list, the cheapest copy of its keys
        "MODEL": model,
        "FIELDS_SET": set(names),
        "VERSION": CURRENT_SCHEMA_VERSION,
        "Unsupported": _Unsupported,
        "from_iso": datetime.fromisoformat,
        "UTC": UTC,
        "in_utc": _in_utc_strict,
        "new": _NEW,
        "set_dict": _SET_DICT,
        "set_fields_set": _SET_FIELDS_SET,
        "set_extra": _SET_EXTRA,
        "set_private": _SET_PRIVATE,
    }
    lines = ["def build(v):", "    if [*v] != NAMES:", "        raise Unsupported(MODEL)"]
    for i, (name, info) in enumerate(model.model_fields.items()):
        scope[f"K{i}"] = names[i]
        lines += _field_lines(f"K{i}", name, info, scope)
    lines += [
        "    o = new(MODEL)",
        "    set_dict(o, v)",
        "    set_fields_set(o, FIELDS_SET)",
        "    set_extra(o, None)",
        "    set_private(o, None)",
        "    return o",
    ]
    exec("\n".join(lines), scope)  # the code names fields by index only
    build: Callable[[dict[str, Any]], BaseModel] = scope["build"]
    return build


def _field_lines(key: str, name: str, info: FieldInfo, scope: dict[str, Any]) -> list[str]:
    """The statements that turn `v[key]` into the field's value; the common ones inline."""
    c = f"c{key}"  # this field's helpers in `scope`
    if _is_utc_datetime(info):  # `UtcDatetime`; fromisoformat gives `UTC` itself for "Z"
        return [
            f"    x = from_iso(v[{key}])",
            "    if x.tzinfo is not UTC:",
            "        x = in_utc(x)",
            f"    v[{key}] = x",
        ]
    _checks_only(info.metadata)
    if name == "schema_version":  # an older event is upcast by pydantic's path
        return [
            f"    x = v[{key}]",
            "    if type(x) is not int or x != VERSION:",
            "        raise Unsupported(MODEL)",
        ]
    if info.annotation in (int, bool):
        scope[c] = info.annotation
        return [f"    if type(v[{key}]) is not {c}:", "        raise Unsupported(MODEL)"]
    nested = _interned(info.annotation)
    if nested is not None:
        cache, fields, miss = nested
        scope[c], scope[f"{c}_key"], scope[f"{c}_miss"] = cache, itemgetter(*fields), miss
        # The last value and its model: in a stream the next record mostly holds the same
        # (four in five in simulated traffic), and comparing two small dicts costs less than
        # hashing the new one's strings to look it up. One tuple, so that threads decoding
        # at once never see one's value with another's model.
        scope[f"{c}_last"] = [(_NOTHING, None)]
        return [
            f"    x = v[{key}]",
            f"    last = {c}_last[0]",
            "    if x == last[0]:",
            f"        v[{key}] = last[1]",
            "    else:",
            f"        if len(x) != {len(fields)}:",
            "            raise Unsupported(MODEL)",
            f"        o = {c}.get({c}_key(x))",
            "        if o is None:",
            f"            o = {c}_miss(x)",
            f"        v[{key}] = o",
            f"        {c}_last[0] = (x, o)",
        ]
    convert = _converter(info.annotation)
    if convert is None:
        return []
    scope[c] = convert
    return [f"    v[{key}] = {c}(v[{key}])"]


_INTERNED_PER_MODEL = 4096
_NOTHING = object()  # equal to no JSON value


def _interned(
    annotation: Any,
) -> tuple[dict[tuple[Any, ...], BaseModel], tuple[str, ...], Convert] | None:
    """A nested model whose fields all hold strings (an event's `source`, `actor`) repeats
    across events: frozen, so one instance per distinct value can be shared instead of one
    built per event. Its fields' values, in field order, are the key: strings (or null), which
    equal no other JSON value, and which give the same model whatever order the keys came in
    (the builder checks there are no others). The builder looks the cache up inline; a miss
    builds (and checks) the model and adds it."""
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return None
    for info in annotation.model_fields.values():
        kind = info.annotation
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind, *rest = [a for a in typing.get_args(kind) if a is not type(None)]
            if rest:
                return None
        if not (isinstance(kind, type) and issubclass(kind, str)):
            return None
    build = _builder(annotation)
    fields = _json_keys(tuple(annotation.model_fields))
    cache: dict[tuple[Any, ...], BaseModel] = {}
    key_of = itemgetter(*fields)

    def miss(values: dict[str, Any]) -> BaseModel:
        key = key_of(values)
        found = build(values)
        if len(cache) >= _INTERNED_PER_MODEL:
            cache.clear()  # many distinct values (actor ids): start over, stay bounded
        cache[key] = found
        return found

    return cache, fields, miss


def _builders() -> dict[str, Callable[[dict[str, Any]], BaseModel]]:
    out = {}
    for topic, model in EVENT_MODELS.items():
        try:
            out[topic] = _builder(model)
        except _Unsupported:
            continue
    return out


_BUILDERS = _builders()
_TYPE = _json_keys(("type",))[0]
# Anything the fast path does not take (an older record, a foreign writer's, a bad one) raises
# one of these on its way, and goes to pydantic.
_NOT_FAST = (_Unsupported, ValueError, KeyError, TypeError, AttributeError)


def validate_event(topic: str, body: bytes) -> Event:
    """Pydantic's path: validate as the topic's model, or upcast an older record first."""
    model = EVENT_MODELS[topic]
    try:
        return model.model_validate_json(body)  # type: ignore[return-value]
    except ValidationError as invalid:
        return _upcast(body, invalid)


def validate_event_json(body: bytes) -> Event:
    """Pydantic's path for a record whose type is read from its own JSON."""
    try:
        return EVENT_ADAPTER.validate_json(body)
    except ValidationError as invalid:
        return _upcast(body, invalid)


def _upcast(body: bytes, invalid: ValidationError) -> Event:
    """The record as an older schema version, upcast; `invalid` if it is no JSON object."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict):
        raise invalid
    return EVENT_ADAPTER.validate_python(upcast(raw))


def decode_event_json(body: bytes) -> Event:
    """The event a record's JSON holds, its type read from the JSON: what
    `validate_event_json` gives, without validating again what the log validated."""
    try:
        values = _loads(body)
        return _BUILDERS[values[_TYPE]](values)  # type: ignore[return-value]
    except _NOT_FAST:
        return validate_event_json(body)


def decode_events_json(bodies: list[bytes]) -> list[Event]:
    """`[decode_event_json(body) for body in bodies]`, faster: the bodies parsed as one JSON
    array (one call into orjson instead of one per record), each object then built as
    `decode_event_json` builds it. If any is not on the fast path, every body goes the way
    `decode_event_json` takes it (an older log: one more parse beside pydantic's).

    For some tens of bodies at a time: the objects are built while the parsed array is still
    in the CPU cache (a whole 5,000-record read parsed first, then built, was slower)."""
    try:
        values = _loads(_SEPARATOR.join([b"[0", *bodies, b"0]"]))
        if len(values) == len(bodies) + 2:
            builders = _BUILDERS
            return [builders[v[_TYPE]](v) for v in values[1:-1]]  # type: ignore[misc]
    except _NOT_FAST:  # orjson.JSONDecodeError is a ValueError
        pass
    return [decode_event_json(body) for body in bodies]


# The bodies are copied once, into one array: the brackets go in as elements of the join
# (`[0` and `0]`, two zeros dropped after the parse). The separator holds a newline, which
# may stand between JSON values but not inside a string: so a body that is not one JSON
# document (the log writes no such body) makes the array invalid or its length wrong, and
# never moves the text of one record into another's string.
_SEPARATOR = b",\n"


def decode_event(topic: str, body: bytes) -> Event:
    """The event of a record stored under `topic`: what `validate_event` gives."""
    try:
        values = _loads(body)
        return _BUILDERS[values[_TYPE]](values)  # type: ignore[return-value]
    except _NOT_FAST:
        return validate_event(topic, body)
