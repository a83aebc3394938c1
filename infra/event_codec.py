"""Fast JSON encoding and decoding of events for the embedded log.

The log writes events it was handed as validated models and reads back only what it wrote, so
on that path pydantic's full validation is repeated work: it was half of the append time and
three quarters of the read time (`loopservice bench log`). Here:

* `encode_event` serializes a model's fields with orjson. The bytes are the same as pydantic's
  `model_dump_json()` (tests/test_sqlite_log.py holds every event type to that); anything orjson
  cannot write the same way falls back to pydantic.
* `decode_event` parses with orjson and builds the model with each field converted to the type
  validation would give (UTC datetimes, dates, enum members, nested models, tuples), without
  re-checking constraints the event already passed on its way in. A record that does not have
  exactly the current model's fields, in order, at the current schema version — an older record,
  or one written by other code — goes through pydantic validation (and upcasting) instead.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from datetime import UTC, date, datetime
from enum import Enum
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
_object_setattr = object.__setattr__


class _Unsupported(Exception):
    """A field type the fast decoder does not know: that model always takes pydantic's path."""


# --- encoding ------------------------------------------------------------------------------


def _nested(obj: object) -> object:
    if isinstance(obj, BaseModel):
        return obj.__dict__
    raise TypeError(type(obj).__name__)


def encode_event(event: BaseModel) -> bytes:
    """`event.model_dump_json().encode()`, three times faster.

    A model's `__dict__` holds exactly its fields in declaration order, as pydantic dumps them;
    orjson writes enums as their values, tuples as lists and UTC datetimes with `Z` as pydantic
    does."""
    try:
        return orjson.dumps(event.__dict__, default=_nested, option=orjson.OPT_UTC_Z)
    except TypeError:  # e.g. a policy document with a non-string key
        return event.model_dump_json().encode()


# --- decoding ------------------------------------------------------------------------------


def _utc_datetime(value: str) -> datetime:
    at = datetime.fromisoformat(value)
    if at.tzinfo is UTC:
        return at
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}")
    return at.astimezone(UTC)


def _float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise ValueError(f"not a number: {value!r}")


# Constraints only check a value, which the event passed when it was appended.
_CHECKS = (annotated_types.BaseMetadata, annotated_types.GroupedMetadata)


def _checks_only(metadata: list[Any]) -> None:
    for item in metadata:
        if isinstance(item, FieldInfo):
            _checks_only(item.metadata)
        elif not isinstance(item, _CHECKS):
            raise _Unsupported(item)  # a validator may change the value: leave it to pydantic


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
    if origin is typing.Literal or annotation in (str, int, bool):
        return None
    if origin is tuple:
        items = typing.get_args(annotation)
        if len(items) != 2 or items[1] is not Ellipsis:
            raise _Unsupported(annotation)
        item = _converter(items[0])
        if item is None:
            return tuple
        return lambda v: tuple(item(x) for x in v)
    if origin is dict:
        return None  # `dict[str, object]`: a JSON object already is one
    if annotation is float:
        return _float
    if annotation is date:
        return date.fromisoformat
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return _enum_lookup(annotation, {})
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _interned(annotation, _builder(annotation))
    raise _Unsupported(annotation)


def _enum_lookup(enum: type[Enum], extra: dict[Any, Any]) -> Convert:
    return {**{member.value: member for member in enum}, **extra}.__getitem__


def _interned(
    model: type[BaseModel], build: Callable[[dict[str, Any]], BaseModel]
) -> Callable[[dict[str, Any]], BaseModel]:
    """A nested model (an event's `source`, `actor`) repeats across events: frozen, so one
    instance per distinct value can be shared instead of built for every event."""
    cache: dict[tuple[Any, ...], BaseModel] = {}

    def get(values: dict[str, Any]) -> BaseModel:
        # Names and values in order: only what `build` accepted is ever in the cache. A value
        # that cannot be hashed raises TypeError, which sends the record to pydantic.
        key = (*values, *values.values())
        found = cache.get(key)
        if found is None:
            found = build(values)
            if len(cache) >= _INTERNED_PER_MODEL:
                cache.clear()  # many distinct values (actor ids): start over, stay bounded
            cache[key] = found
        return found

    return get


_INTERNED_PER_MODEL = 4096


def _builder(model: type[BaseModel]) -> Callable[[dict[str, Any]], BaseModel]:
    """Builds `model` from a parsed JSON object holding exactly its fields, in order."""
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
    names = tuple(model.model_fields)
    # Every decoded record sets every field, so its instances share one set of them. Sharing
    # is safe: a frozen model never adds to it, and `model_copy` copies it before updating.
    fields_set = set(names)
    steps: list[tuple[str, Convert]] = []
    for name, info in model.model_fields.items():
        if info.annotation is AwareDatetime and info.metadata == [AfterValidator(_in_utc)]:
            steps.append((name, _utc_datetime))  # `UtcDatetime`
            continue
        _checks_only(info.metadata)
        convert = _converter(info.annotation)
        if convert is not None:
            steps.append((name, convert))

    def build(values: dict[str, Any]) -> BaseModel:
        if tuple(values) != names:
            raise _Unsupported(model)
        for name, convert in steps:
            values[name] = convert(values[name])
        obj = model.__new__(model)
        _object_setattr(obj, "__dict__", values)
        _object_setattr(obj, "__pydantic_fields_set__", fields_set)
        _object_setattr(obj, "__pydantic_extra__", None)
        _object_setattr(obj, "__pydantic_private__", None)
        return obj

    return build


def _builders() -> dict[str, Callable[[dict[str, Any]], BaseModel]]:
    out = {}
    for topic, model in EVENT_MODELS.items():
        try:
            out[topic] = _builder(model)
        except _Unsupported:
            continue
    return out


_BUILDERS = _builders()


def validate_event(topic: str, body: bytes) -> Event:
    """Pydantic's path: validate as the topic's model, or upcast an older record first."""
    model = EVENT_MODELS[topic]
    try:
        return model.model_validate_json(body)  # type: ignore[return-value]
    except ValidationError:
        return EVENT_ADAPTER.validate_python(upcast(orjson.loads(body)))


def decode_event(topic: str, body: bytes) -> Event:
    build = _BUILDERS.get(topic)
    if build is not None:
        try:
            values = orjson.loads(body)
            if values.get("schema_version") == CURRENT_SCHEMA_VERSION:
                return build(values)  # type: ignore[return-value]
        except (_Unsupported, ValueError, KeyError, TypeError, AttributeError):
            pass
    return validate_event(topic, body)
