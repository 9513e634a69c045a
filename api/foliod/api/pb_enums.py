"""The API's enums and op codes as protobuf values and back, derived from foliod.v1's descriptors.

Each table pairs a proto enum value with the API member of the same name after the enum's
prefix (FOLIO_KIND_FILE <-> FolioKind.FILE), so a value added to the proto needs no table edited
here: it only needs its member in foliod.api (tests/test_parts.py names any proto value without
one, and any member without a value). Imports protobuf, which foliod.api itself does not: the rpc
layer and the client use this module, the domain core never does.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from foliod.api._enums import Backing, FolioKind, MemmapModel, ThpSetting
from foliod.v1 import foliod_pb2 as pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

E = TypeVar("E", bound=enum.Enum)
V = TypeVar("V", bound=int)


def value_prefix(proto: _EnumTypeWrapper[Any]) -> str:
    """GuestBacking -> "GUEST_BACKING_": the proto enum's name, as protobuf's style guide
    prefixes its values."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", proto.DESCRIPTOR.name).upper() + "_"


@dataclass(frozen=True, slots=True)
class EnumMap(Generic[E, V]):
    """An API enum and its proto enum, both ways. from_pb holds every proto value that has a
    member, never UNSPECIFIED (0): look a request's value up with .get and reject a miss."""

    python: type[E]
    proto: _EnumTypeWrapper[V]
    to_pb: Mapping[E, V]
    from_pb: Mapping[V, E]

    @classmethod
    def derive(cls, python: type[E], proto: _EnumTypeWrapper[V]) -> EnumMap[E, V]:
        prefix = value_prefix(proto)
        from_pb = {
            value: python[member]
            for name, value in proto.items()
            if value and (member := name.removeprefix(prefix)) in python.__members__
        }
        return cls(python, proto, {member: value for value, member in from_pb.items()}, from_pb)


FOLIO_KIND = EnumMap.derive(FolioKind, pb.FolioKind)
MEMMAP_MODEL = EnumMap.derive(MemmapModel, pb.MemmapModel)
THP_SETTING = EnumMap.derive(ThpSetting, pb.ThpSetting)
BACKING = EnumMap.derive(Backing, pb.GuestBacking)

# Every table above, by its API enum.
ENUM_MAPS: Mapping[type[enum.Enum], EnumMap[Any, Any]] = {
    table.python: table for table in (FOLIO_KIND, MEMMAP_MODEL, THP_SETTING, BACKING)
}

# Each op code of a Submit batch and its operation's name: OP_CODE_READ -> "read".
OP_NAMES: Mapping[int, str] = {
    value: name.removeprefix(value_prefix(pb.OpCode)).lower()
    for name, value in pb.OpCode.items()
    if value
}


def to_pb(member: enum.Enum) -> Any:
    """The proto value of an API enum member (typed Any: each proto enum is its own NewType)."""
    return ENUM_MAPS[type(member)].to_pb[member]


def from_pb(cls: type[E], value: int) -> E:
    """The member of the API enum cls for a proto value; KeyError for UNSPECIFIED or unknown."""
    member: E = ENUM_MAPS[cls].from_pb[value]
    return member
