"""Protobuf messages to the client's dataclasses and back, driven by the dataclasses' type hints.

One reader per dataclass is derived (once, on first use) from its fields: scalars are copied,
``X | None`` reads an optional field, enums go through foliod.api.pb_enums, nested dataclasses
recurse, ``tuple[X, ...]`` reads a repeated field and ``Mapping`` a map.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from foliod.api.pb_enums import from_pb, to_pb

D = TypeVar("D")

FieldReader = Callable[[Message, str], Any]


def from_message(cls: type[D], message: Message) -> D:
    """The dataclass `cls` filled from the message fields of the same names."""
    result: D = _reader(cls)(message)
    return result


def into(cls: type[D]) -> Callable[[Message], D]:
    """A converter from a message to `cls`, for tables of calls."""
    return functools.partial(from_message, cls)


_READERS: dict[type[Any], Callable[[Message], Any]] = {}


def _reader(cls: type[Any]) -> Callable[[Message], Any]:
    reader = _READERS.get(cls)
    if reader is None:
        hints = typing.get_type_hints(cls)
        fields = [(f.name, _field_reader(hints[f.name])) for f in dataclasses.fields(cls)]

        def reader(message: Message) -> Any:
            return cls(**{name: read(message, name) for name, read in fields})

        _READERS[cls] = reader
    return reader


def _field_reader(hint: Any) -> FieldReader:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = (arg for arg in args if arg is not type(None))
        present = _field_reader(inner)
        return lambda m, name: present(m, name) if m.HasField(name) else None
    if origin is tuple:
        item = _value_reader(args[0])
        return lambda m, name: tuple(item(v) for v in getattr(m, name))
    if origin in (Mapping, dict):
        return lambda m, name: dict(getattr(m, name))
    value = _value_reader(hint)
    return lambda m, name: value(getattr(m, name))


def _value_reader(hint: Any) -> Callable[[Any], Any]:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return functools.partial(from_pb, hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _reader(hint)
    return _identity


def _identity(value: Any) -> Any:
    return value


def to_fields(obj: Any) -> dict[str, Any]:
    """The fields of a flat dataclass as message constructor arguments (None: left unset)."""
    return {
        f.name: to_pb(v) if isinstance(v := getattr(obj, f.name), enum.Enum) else v
        for f in dataclasses.fields(obj)
    }
