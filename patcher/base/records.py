"""Typed JSON records: dataclasses written as JSON objects in field order, and read back with every value checked.

A record class is a plain dataclass whose fields are JSON-shaped: str, int, float, bool, None, other record
classes, list/tuple of them, dict[str, ...] of them, Path (as a string), unions, or Any. `to_json` writes the fields in
declaration order (tuples as lists; a field whose metadata says `omit_none` is left out while None);
`from_json` builds the class from parsed JSON, checking each value's type (a key the class lacks is an error: a
union of record classes is told apart by their fields), and lets the class's
`__post_init__` check meaning (a ValueError there becomes a RecordError naming the field's path).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path, PurePath
from typing import Any, TypeVar

T = TypeVar("T")
OMIT_NONE = {"omit_none": True}  # dataclasses.field(metadata=OMIT_NONE): not written while None


class RecordError(ValueError):
    """A record that does not have the shape or meaning its class requires; the message names where."""


def to_json(value: Any) -> Any:
    """The JSON-ready form of a record (or of any JSON-shaped value holding records)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: to_json(getattr(value, field.name))
            for field in dataclasses.fields(value)
            if not (field.metadata.get("omit_none") and getattr(value, field.name) is None)
        }
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): to_json(item) for key, item in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _overlap(kind: Any, value: Any) -> int:
    """How many of a dict's keys are fields of record class `kind` (0 for anything else)."""
    if not (dataclasses.is_dataclass(kind) and isinstance(value, dict)):
        return 0
    return len(set(value) & {field.name for field in dataclasses.fields(kind)})


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _convert(kind: Any, value: Any, where: str) -> Any:
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        options = sorted((a for a in arguments if a is not type(None)), key=lambda option: -_overlap(option, value))
        errors = []
        for option in options:  # the record class whose fields the value shares most is tried (and reported) first
            try:
                return _convert(option, value, where)
            except RecordError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(kind):
        return from_json(kind, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, found {type(value).__name__}")
        item = arguments[0] if arguments else Any
        items = [_convert(item, element, f"{where}[{index}]") for index, element in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, found {type(value).__name__}")
        item = arguments[1] if arguments else Any
        return {str(key): _convert(item, element, f"{where}.{key}") for key, element in value.items()}
    if kind is Path and isinstance(value, str):
        return Path(value)
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(kind, type) and isinstance(value, kind):
        return value
    raise RecordError(f"{where}: expected {_type_name(kind)}, found {value!r}"[:300])


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    """An instance of record class `cls` from parsed JSON; RecordError naming the first field that does not fit."""
    if not isinstance(data, dict):
        raise RecordError(f"{where or cls.__name__}: expected an object, found {type(data).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(data) - {field.name for field in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise RecordError(f"{where + '.' if where else ''}{unknown[0]} is not a field of {cls.__name__}")
    values = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        path = f"{where}.{field.name}" if where else field.name
        if field.name in data:
            values[field.name] = _convert(hints[field.name], data[field.name], path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecordError(f"{path} is missing")
    try:
        return cls(**values)
    except RecordError:
        raise
    except (ValueError, TypeError) as error:
        raise RecordError(f"{where or cls.__name__}: {error}") from None
