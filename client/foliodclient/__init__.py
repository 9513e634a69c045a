"""foliod's Python client: typed synchronous and asyncio clients, and the error tree they raise.

    with FoliodClient("127.0.0.1:50051") as client:
        client.allocate("cache", "file", order=0, size_bytes=1 << 30)
        print(client.get_memmap().models[0].total_bytes)
        guest = client.create_guest("vm0", 1 << 30, "hugetlb_2m", hvo=True)
        print(guest.duplication[0].fraction_of_guest_ram)

Batches of reads, writes, fsyncs, allocations and frees go over one stream:

    with client.open_submission() as s:
        batch = Batch()
        batch.write("log", 0, b"hello")
        print(s.submit(batch).ok)

`foliodctl` (foliodclient.cli) is the command line built on it.
"""

from foliod.mm import FolioKind, MemmapModel, ThpSetting
from foliod.mm.guest import Backing
from foliodclient._batch import (
    AsyncSubmission,
    Batch,
    BatchResult,
    OpResult,
    Submission,
)
from foliodclient._client import AsyncFoliodClient, FoliodClient, RetryPolicy
from foliodclient._types import (
    Allocation,
    BalloonResult,
    BuddyInfo,
    DescriptorBytes,
    Duplication,
    FaultRule,
    Faults,
    FileRead,
    FileStat,
    FileWrite,
    FolioCount,
    FolioInfo,
    FreeResult,
    Guest,
    GuestList,
    IoStats,
    KindBytes,
    MachineInfo,
    Meminfo,
    MemmapReport,
    ModelReport,
    MthpSize,
    ReleaseResult,
    ReportResult,
    ThpPolicy,
    Watermarks,
)
from foliodclient.errors import (
    AddressSpaceExhausted,
    AlreadyExists,
    CallError,
    DeadlineExceeded,
    FailedPrecondition,
    FileHandleClosed,
    FolioAlreadyFreed,
    GuestNesting,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    OutOfRange,
    PermissionDenied,
    RemoteError,
    TenantLimit,
    Unauthenticated,
    Unavailable,
    UnknownFile,
    UnknownFileHandle,
    UnknownFolio,
    UnknownGuest,
    UnknownMachine,
    UnknownOwner,
    UnsafeStorePath,
    WritebackFailed,
    error_from_rpc,
)

__all__ = [
    "AddressSpaceExhausted",
    "Allocation",
    "AlreadyExists",
    "AsyncFoliodClient",
    "AsyncSubmission",
    "Backing",
    "BalloonResult",
    "Batch",
    "BatchResult",
    "BuddyInfo",
    "CallError",
    "DeadlineExceeded",
    "DescriptorBytes",
    "Duplication",
    "FailedPrecondition",
    "FaultRule",
    "Faults",
    "FileHandleClosed",
    "FileRead",
    "FileStat",
    "FileWrite",
    "FolioAlreadyFreed",
    "FolioCount",
    "FolioInfo",
    "FolioKind",
    "FoliodClient",
    "FreeResult",
    "Guest",
    "GuestList",
    "GuestNesting",
    "InvalidArgument",
    "IoStats",
    "KindBytes",
    "MachineInfo",
    "Meminfo",
    "MemmapModel",
    "MemmapReport",
    "ModelReport",
    "MthpSize",
    "NotFound",
    "OpResult",
    "OutOfMemory",
    "OutOfRange",
    "PermissionDenied",
    "ReleaseResult",
    "RemoteError",
    "ReportResult",
    "RetryPolicy",
    "Submission",
    "TenantLimit",
    "ThpPolicy",
    "ThpSetting",
    "Unauthenticated",
    "Unavailable",
    "UnknownFile",
    "UnknownFileHandle",
    "UnknownFolio",
    "UnknownGuest",
    "UnknownMachine",
    "UnknownOwner",
    "UnsafeStorePath",
    "Watermarks",
    "WritebackFailed",
    "error_from_rpc",
]
