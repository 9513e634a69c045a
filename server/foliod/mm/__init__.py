"""foliod's domain core: simulated physical memory, folios and memory-map accounting.

Imports no grpc, protobuf or prometheus_client (tests/test_structure.py proves it).
"""

from foliod.mm.debug import InconsistentState, check_machine
from foliod.mm.errors import (
    AddressSpaceExhausted,
    AlreadyExists,
    FailedPrecondition,
    FileHandleClosed,
    FolioAlreadyFreed,
    FoliodError,
    GuestNesting,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    OutOfRange,
    TenantLimit,
    UnknownFile,
    UnknownFileHandle,
    UnknownFolio,
    UnknownGuest,
    UnknownMachine,
    UnknownOwner,
    UnsafeStorePath,
    WritebackFailed,
)
from foliod.mm.filemap import MAX_IO_BYTES
from foliod.mm.huge_memory import ThpPolicy, ThpSetting
from foliod.mm.machine import (
    HOST,
    MAX_FOLIOS_PER_CALL,
    Allocation,
    Machine,
    Machines,
    Meminfo,
    Release,
)
from foliod.mm.memcontrol import TenantLimits
from foliod.mm.memmap import Descriptor, DescriptorCost, DescriptorSizes, MemmapModel, ModelCost
from foliod.mm.mm_types import Folio, FolioKind
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SIZE, Watermarks
from foliod.mm.vmstat import MthpStat, VmEvent, VmStat

__all__ = [
    "HOST",
    "MAX_FOLIOS_PER_CALL",
    "MAX_IO_BYTES",
    "MAX_PAGE_ORDER",
    "PAGE_SIZE",
    "AddressSpaceExhausted",
    "Allocation",
    "AlreadyExists",
    "Descriptor",
    "DescriptorCost",
    "DescriptorSizes",
    "FailedPrecondition",
    "FileHandleClosed",
    "Folio",
    "FolioAlreadyFreed",
    "FolioKind",
    "FoliodError",
    "GuestNesting",
    "InconsistentState",
    "InvalidArgument",
    "Machine",
    "Machines",
    "Meminfo",
    "MemmapModel",
    "ModelCost",
    "MthpStat",
    "NotFound",
    "OutOfMemory",
    "OutOfRange",
    "Release",
    "TenantLimit",
    "TenantLimits",
    "ThpPolicy",
    "ThpSetting",
    "UnknownFile",
    "UnknownFileHandle",
    "UnknownFolio",
    "UnknownGuest",
    "UnknownMachine",
    "UnknownOwner",
    "UnsafeStorePath",
    "VmEvent",
    "VmStat",
    "Watermarks",
    "WritebackFailed",
    "check_machine",
]
