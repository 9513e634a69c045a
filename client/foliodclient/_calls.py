"""Every RPC the client makes: one table of methods, and one request builder per RPC.

A builder takes plain Python arguments and returns a Call (request, how to read the reply, and
the per-call options); the synchronous and the asyncio client both turn each builder into a
method, so arguments, requests and results are written once for both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from foliod.api import Backing, FolioKind, ThpSetting
from foliod.api.pb_enums import BACKING, FOLIO_KIND, THP_SETTING
from foliod.v1 import foliod_pb2 as pb
from foliodclient._convert import into, to_fields
from foliodclient._types import (
    Allocation,
    BalloonResult,
    BuddyInfo,
    FaultRule,
    Faults,
    FileRead,
    FileStat,
    FileWrite,
    FolioInfo,
    FreeResult,
    Guest,
    GuestList,
    MachineInfo,
    Meminfo,
    MemmapReport,
    ReleaseResult,
    ReportResult,
    Snapshot,
    SnapshotInfo,
    ThpPolicy,
)

T = TypeVar("T")

FOLIOD = "foliod.v1.Foliod"
HEALTH = "grpc.health.v1.Health"
# The metadata carrying a mutation's idempotency key (foliod.rpc.idempotency.IDEMPOTENCY_KEY).
IDEMPOTENCY_KEY = "idempotency-key"


@dataclass(frozen=True, slots=True)
class Rpc(Generic[T]):
    """One method of a service, whether a retry is safe, and how to read its reply."""

    method: str
    result: Callable[[Any], T]
    idempotent: bool = field(kw_only=True)
    service: str = field(default=FOLIOD, kw_only=True)


def _vmstat(reply: pb.Vmstat) -> dict[str, int]:
    return {entry.name: entry.value for entry in reply.entries}


def _serving(reply: health_pb2.HealthCheckResponse) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


def _nothing(reply: Message) -> None:
    return None


def _files(reply: pb.ListFilesResponse) -> tuple[FileStat, ...]:
    return tuple(map(into(FileStat), reply.files))


# Idempotent calls change nothing the caller asked for (reads, including ReadFile, whose only
# effect is on the cache) and are sent as they are. A mutation may have been applied before the
# connection broke, so each carries an idempotency key, the same on its retries: the server runs
# it once per key and replays the first outcome to a retry.
# fmt: off
ALLOCATE          = Rpc("Allocate",        into(Allocation),                  idempotent=False)
FREE              = Rpc("Free",            into(FreeResult),                  idempotent=False)
RELEASE_OWNER     = Rpc("ReleaseOwner",    into(ReleaseResult),               idempotent=False)
GET_FOLIO         = Rpc("GetFolio",        into(FolioInfo),                   idempotent=True)
WRITE_FOLIO       = Rpc("WriteFolio",      lambda r: int(r.written_bytes),    idempotent=False)
READ_FOLIO        = Rpc("ReadFolio",       lambda r: bytes(r.data),           idempotent=True)
GET_MACHINE       = Rpc("GetMachine",      into(MachineInfo),                 idempotent=True)
GET_BUDDY_INFO    = Rpc("GetBuddyInfo",    into(BuddyInfo),                   idempotent=True)
GET_MEMINFO       = Rpc("GetMeminfo",      into(Meminfo),                     idempotent=True)
GET_MEMMAP        = Rpc("GetMemmap",       into(MemmapReport),                idempotent=True)
GET_VMSTAT        = Rpc("GetVmstat",       _vmstat,                           idempotent=True)
GET_THP_POLICY    = Rpc("GetThpPolicy",    into(ThpPolicy),                   idempotent=True)
SET_THP_POLICY    = Rpc("SetThpPolicy",    into(ThpPolicy),                   idempotent=False)
CREATE_FILE       = Rpc("CreateFile",      into(FileStat),                    idempotent=False)
OPEN_FILE         = Rpc("OpenFile",        lambda r: int(r.handle),           idempotent=False)
CLOSE_FILE        = Rpc("CloseFile",       _nothing,                          idempotent=False)
STAT_FILE         = Rpc("StatFile",        into(FileStat),                    idempotent=True)
LIST_FILES        = Rpc("ListFiles",       _files,                            idempotent=True)
READ_FILE         = Rpc("ReadFile",        into(FileRead),                    idempotent=True)
WRITE_FILE        = Rpc("WriteFile",       into(FileWrite),                   idempotent=False)
TRUNCATE_FILE     = Rpc("TruncateFile",    into(FileStat),                    idempotent=False)
DROP_FILE_RANGE   = Rpc("DropFileRange",   lambda r: int(r.dropped_bytes),    idempotent=False)
DELETE_FILE       = Rpc("DeleteFile",      _nothing,                          idempotent=False)
WRITEBACK         = Rpc("Writeback",       lambda r: int(r.nr_pages),         idempotent=False)
FSYNC             = Rpc("Fsync",           lambda r: int(r.nr_pages),         idempotent=False)
RECLAIM           = Rpc("Reclaim",         lambda r: int(r.reclaimed_bytes),  idempotent=False)
DROP_CACHES       = Rpc("DropCaches",      lambda r: int(r.dropped_bytes),    idempotent=False)
SET_FAULTS        = Rpc("SetFaults",       into(Faults),                      idempotent=False)
GET_FAULTS        = Rpc("GetFaults",       into(Faults),                      idempotent=True)
CREATE_GUEST      = Rpc("CreateGuest",     into(Guest),                       idempotent=False)
DESTROY_GUEST     = Rpc("DestroyGuest",    lambda r: int(r.freed_bytes),      idempotent=False)
GET_GUEST         = Rpc("GetGuest",        into(Guest),                       idempotent=True)
LIST_GUESTS       = Rpc("ListGuests",      into(GuestList),                   idempotent=True)
SET_BALLOON       = Rpc("SetBalloon",      into(BalloonResult),               idempotent=False)
REPORT_FREE_PAGES = Rpc("ReportFreePages", into(ReportResult),                idempotent=False)
# fmt: on
CHECK_HEALTH = Rpc("Check", _serving, idempotent=True, service=HEALTH)


class CallOptions(TypedDict, total=False):
    """Options every call takes: the machine (default: the client's), a deadline in seconds
    (default: the client's; it bounds all attempts of a retried call together) and, for a
    mutation, its idempotency key (default: a fresh random one; pass the key of an earlier call
    to have its outcome replayed instead of applying the call again)."""

    machine: str
    timeout: float
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One call, ready to send: a client fills in the machine and runs it."""

    rpc: Rpc[T]
    request: Message
    machine: str | None = None
    timeout: float | None = None
    idempotency_key: str | None = None


# Builders, in the order of the service definition. Their docstrings become the methods'.


def allocate(
    owner: str,
    kind: FolioKind | str,
    *,
    order: int | None = None,
    count: int = 0,
    size_bytes: int = 0,
    madvise_hugepage: bool = False,
    **options: Unpack[CallOptions],
) -> Call[Allocation]:
    """Allocates `count` folios, or `size_bytes` of memory, of a kind for an owner."""
    request = pb.AllocateRequest(
        owner=owner,
        kind=FOLIO_KIND.to_pb[FolioKind(kind)],
        order=order,
        count=count,
        bytes=size_bytes,
        madvise_hugepage=madvise_hugepage,
    )
    return Call(ALLOCATE, request, **options)


def free(handles: Iterable[int], **options: Unpack[CallOptions]) -> Call[FreeResult]:
    """Frees folios by handle, all or nothing."""
    return Call(FREE, pb.FreeRequest(handles=handles), **options)


def release_owner(owner: str, **options: Unpack[CallOptions]) -> Call[ReleaseResult]:
    """Frees everything an owner holds, page tables included, and forgets the owner."""
    return Call(RELEASE_OWNER, pb.ReleaseOwnerRequest(owner=owner), **options)


def get_folio(handle: int, **options: Unpack[CallOptions]) -> Call[FolioInfo]:
    """Describes one allocated folio."""
    return Call(GET_FOLIO, pb.GetFolioRequest(handle=handle), **options)


def write_folio(
    handle: int, data: bytes, offset: int = 0, **options: Unpack[CallOptions]
) -> Call[int]:
    """Writes bytes into a folio at a byte offset; returns the bytes written."""
    request = pb.WriteFolioRequest(handle=handle, offset=offset, data=data)
    return Call(WRITE_FOLIO, request, **options)


def read_folio(
    handle: int, length: int, offset: int = 0, **options: Unpack[CallOptions]
) -> Call[bytes]:
    """Reads `length` bytes of a folio from a byte offset; never written bytes read as zero."""
    request = pb.ReadFolioRequest(handle=handle, offset=offset, length=length)
    return Call(READ_FOLIO, request, **options)


def get_machine(**options: Unpack[CallOptions]) -> Call[MachineInfo]:
    """RAM, watermarks and free memory of the machine."""
    return Call(GET_MACHINE, pb.GetMachineRequest(), **options)


def get_buddy_info(**options: Unpack[CallOptions]) -> Call[BuddyInfo]:
    """Free blocks per order, as /proc/buddyinfo."""
    return Call(GET_BUDDY_INFO, pb.GetBuddyInfoRequest(), **options)


def get_meminfo(**options: Unpack[CallOptions]) -> Call[Meminfo]:
    """A /proc/meminfo-style summary, in bytes."""
    return Call(GET_MEMINFO, pb.GetMeminfoRequest(), **options)


def get_memmap(**options: Unpack[CallOptions]) -> Call[MemmapReport]:
    """The memory map under the three models, with breakdown and folio histogram."""
    return Call(GET_MEMMAP, pb.GetMemmapRequest(), **options)


def get_vmstat(**options: Unpack[CallOptions]) -> Call[dict[str, int]]:
    """Every vmstat counter by its kernel name, in the kernel's order."""
    return Call(GET_VMSTAT, pb.GetVmstatRequest(), **options)


def get_thp_policy(**options: Unpack[CallOptions]) -> Call[ThpPolicy]:
    """The mTHP knobs and per-size counters."""
    return Call(GET_THP_POLICY, pb.GetThpPolicyRequest(), **options)


def set_thp_policy(
    enabled: ThpSetting | str | None = None,
    sizes: Mapping[int, ThpSetting | str] | None = None,
    **options: Unpack[CallOptions],
) -> Call[ThpPolicy]:
    """Sets the top-level knob (None keeps it) and per-size knobs by size in kB."""
    to_pb = THP_SETTING.to_pb
    request = pb.SetThpPolicyRequest(
        enabled=pb.THP_SETTING_UNSPECIFIED if enabled is None else to_pb[ThpSetting(enabled)],
        sizes={kb: to_pb[ThpSetting(s)] for kb, s in (sizes or {}).items()},
    )
    return Call(SET_THP_POLICY, request, **options)


def create_file(
    name: str,
    *,
    max_order: int | None = None,
    ra_pages: int | None = None,
    **options: Unpack[CallOptions],
) -> Call[FileStat]:
    """Creates an empty file (AlreadyExists if it exists)."""
    request = pb.CreateFileRequest(name=name, max_order=max_order, ra_pages=ra_pages)
    return Call(CREATE_FILE, request, **options)


def open_file(name: str, **options: Unpack[CallOptions]) -> Call[int]:
    """Opens a file; the handle samples the file's writeback errors for fsync and keeps its own
    readahead state for read_file."""
    return Call(OPEN_FILE, pb.OpenFileRequest(name=name), **options)


def close_file(handle: int, **options: Unpack[CallOptions]) -> Call[None]:
    """Closes a file handle."""
    return Call(CLOSE_FILE, pb.CloseFileRequest(handle=handle), **options)


def stat_file(name: str, **options: Unpack[CallOptions]) -> Call[FileStat]:
    """Size, cached and dirty pages, and folio orders of a file."""
    return Call(STAT_FILE, pb.StatFileRequest(name=name), **options)


def list_files(**options: Unpack[CallOptions]) -> Call[tuple[FileStat, ...]]:
    """Every file of the machine, sorted by name."""
    return Call(LIST_FILES, pb.ListFilesRequest(), **options)


def read_file(
    name: str,
    length: int,
    offset: int = 0,
    *,
    handle: int | None = None,
    **options: Unpack[CallOptions],
) -> Call[FileRead]:
    """Reads through the page cache; holes read as zeros, EOF shortens the data. With a handle
    (from open_file) the read goes through it, with its own readahead state; name may then be
    empty."""
    request = pb.ReadFileRequest(name=name, offset=offset, length=length, handle=handle or 0)
    return Call(READ_FILE, request, **options)


def write_file(
    name: str, data: bytes, offset: int = 0, **options: Unpack[CallOptions]
) -> Call[FileWrite]:
    """Writes into the page cache at a byte offset; the file grows as written."""
    request = pb.WriteFileRequest(name=name, offset=offset, data=data)
    return Call(WRITE_FILE, request, **options)


# Operations per ReplayChunk: at most about 20 bytes each (a 10-byte offset, a 5-byte length,
# a file and an op), 1.3 MiB, well under the 4 MiB message limit.
REPLAY_CHUNK_OPS = 65536


def replay_chunks(
    names: str | Sequence[str],
    offsets: Sequence[int],
    lengths: Sequence[int] | None = None,
    writes: Sequence[int] | None = None,
    files: Sequence[int] | None = None,
    *,
    machine: str = "",
    interval_accesses: int = 0,
    chunk_ops: int = REPLAY_CHUNK_OPS,
) -> Iterator[pb.ReplayChunk]:
    """A trace as ReplayChunks, in order: byte `offsets`, `lengths` (None: each operation is
    the page holding its offset), which operations are `writes` (true values; None: all
    reads) and the index into `names` of each one's file (None: all names[0]). The first chunk
    names the machine and the files. ValueError when the columns differ in length."""
    names = [names] if isinstance(names, str) else list(names)
    for column, values in (("lengths", lengths), ("writes", writes), ("files", files)):
        if values is not None and len(values) != len(offsets):
            raise ValueError(f"{len(values)} {column} for {len(offsets)} offsets")
    if writes is not None and not any(writes):
        writes = None
    if files is not None and not any(files):
        files = None
    # Checked above, now: the chunks are made as grpc sends them.
    return _replay_chunks(
        names,
        offsets,
        lengths=lengths,
        writes=writes,
        files=files,
        machine=machine,
        interval_accesses=interval_accesses,
        chunk_ops=chunk_ops,
    )


def _replay_chunks(
    names: list[str],
    offsets: Sequence[int],
    *,
    lengths: Sequence[int] | None,
    writes: Sequence[int] | None,
    files: Sequence[int] | None,
    machine: str,
    interval_accesses: int,
    chunk_ops: int,
) -> Iterator[pb.ReplayChunk]:
    start = 0
    while True:
        end = start + chunk_ops
        chunk = pb.ReplayChunk(offsets=offsets[start:end])
        if start == 0:
            chunk.machine = machine
            chunk.names.extend(names)
            chunk.interval_accesses = interval_accesses
        if lengths is not None:
            chunk.lengths.extend(lengths[start:end])
        if writes is not None:
            chunk.ops.extend([_REPLAY_WRITE if w else _REPLAY_READ for w in writes[start:end]])
        if files is not None:
            chunk.files.extend(files[start:end])
        yield chunk
        start = end
        if start >= len(offsets):
            return


# A Replay call's default deadline grows with the trace: the server replays some 10^5 to 10^6
# operations a second, so 20 us each leaves room on a loaded host.
REPLAY_SECONDS_PER_OP = 20e-6


def replay_timeout(
    client_timeout: float | None, timeout: float | None, nr_ops: int
) -> float | None:
    """A Replay call's deadline: `timeout` if given, else the client's plus
    REPLAY_SECONDS_PER_OP an operation (None: no deadline, as the client has none)."""
    if timeout is not None:
        return timeout
    if client_timeout is None:
        return None
    return client_timeout + nr_ops * REPLAY_SECONDS_PER_OP


_REPLAY_READ = pb.REPLAY_OP_READ
_REPLAY_WRITE = pb.REPLAY_OP_WRITE


def truncate_file(name: str, size_bytes: int, **options: Unpack[CallOptions]) -> Call[FileStat]:
    """Sets a file's size, splitting a large folio that straddles a smaller new end."""
    request = pb.TruncateFileRequest(name=name, size_bytes=size_bytes)
    return Call(TRUNCATE_FILE, request, **options)


def drop_file_range(
    name: str, offset: int = 0, length: int = 0, **options: Unpack[CallOptions]
) -> Call[int]:
    """posix_fadvise(POSIX_FADV_DONTNEED) of a byte range (length 0: to the end of the file):
    clean folios wholly inside its full pages leave the cache; returns the bytes dropped."""
    request = pb.DropFileRangeRequest(name=name, offset=offset, length=length)
    return Call(DROP_FILE_RANGE, request, **options)


def delete_file(name: str, **options: Unpack[CallOptions]) -> Call[None]:
    """Deletes a file and drops its page cache."""
    return Call(DELETE_FILE, pb.DeleteFileRequest(name=name), **options)


def writeback(
    name: str = "", *, offset: int = 0, length: int = 0, **options: Unpack[CallOptions]
) -> Call[int]:
    """Writes dirty pages back (a byte range, a file, or every file); returns the pages."""
    request = pb.WritebackRequest(name=name, offset=offset, length=length)
    return Call(WRITEBACK, request, **options)


def fsync(handle: int, **options: Unpack[CallOptions]) -> Call[int]:
    """Makes a handle's file durable; WritebackFailed reports a writeback error once."""
    return Call(FSYNC, pb.FsyncRequest(handle=handle), **options)


def reclaim(size_bytes: int, **options: Unpack[CallOptions]) -> Call[int]:
    """Reclaims page cache like memory.reclaim; returns the bytes reclaimed."""
    return Call(RECLAIM, pb.ReclaimRequest(bytes=size_bytes), **options)


def drop_caches(**options: Unpack[CallOptions]) -> Call[int]:
    """Frees clean page cache like drop_caches; returns the bytes dropped."""
    return Call(DROP_CACHES, pb.DropCachesRequest(), **options)


def set_faults(
    rules: Iterable[FaultRule], *, seed: int = 0, **options: Unpack[CallOptions]
) -> Call[Faults]:
    """Replaces the backing store's fault rules (none: clears them)."""
    request = pb.SetFaultsRequest(rules=[pb.FaultRule(**to_fields(r)) for r in rules], seed=seed)
    return Call(SET_FAULTS, request, **options)


def get_faults(**options: Unpack[CallOptions]) -> Call[Faults]:
    """The backing store's fault rules and how often each has fired."""
    return Call(GET_FAULTS, pb.GetFaultsRequest(), **options)


def create_guest(
    name: str,
    ram_bytes: int,
    backing: Backing | str = Backing.BASE,
    *,
    mthp_size_kb: int = 0,
    hvo: bool = False,
    free_page_reporting: bool | None = None,
    **options: Unpack[CallOptions],
) -> Call[Guest]:
    """Creates a guest of `ram_bytes` backed by host memory of a backing ("base", "mthp" with
    `mthp_size_kb`, "thp", "hugetlb_2m", "hugetlb_1g"); `hvo` needs hugetlb; free page
    reporting is on unless False. OutOfMemory, and nothing changes, when the host cannot back
    it; `machine` names the host (a guest there is GuestNesting)."""
    request = pb.CreateGuestRequest(
        name=name,
        ram_bytes=ram_bytes,
        backing=BACKING.to_pb[Backing(backing)],
        mthp_size_kb=mthp_size_kb,
        hvo=hvo,
        free_page_reporting=free_page_reporting,
    )
    return Call(CREATE_GUEST, request, **options)


def destroy_guest(
    name: str, *, delete_files: bool = False, **options: Unpack[CallOptions]
) -> Call[int]:
    """Writes a guest's dirty page cache back and forgets the guest (its files stay on disk
    unless `delete_files`); returns the host memory freed in bytes."""
    request = pb.DestroyGuestRequest(name=name, delete_files=delete_files)
    return Call(DESTROY_GUEST, request, **options)


def get_guest(name: str, **options: Unpack[CallOptions]) -> Call[Guest]:
    """A guest's backing, balloon, reporting and memmap duplication per model."""
    return Call(GET_GUEST, pb.GetGuestRequest(name=name), **options)


def list_guests(**options: Unpack[CallOptions]) -> Call[GuestList]:
    """Every guest, sorted by name, and the duplication per model summed over them."""
    return Call(LIST_GUESTS, pb.ListGuestsRequest(), **options)


def set_balloon(name: str, size_bytes: int, **options: Unpack[CallOptions]) -> Call[BalloonResult]:
    """Inflates or deflates a guest's balloon to `size_bytes` (virtio-balloon's target)."""
    request = pb.SetBalloonRequest(name=name, size_bytes=size_bytes)
    return Call(SET_BALLOON, request, **options)


def report_free_pages(name: str, **options: Unpack[CallOptions]) -> Call[ReportResult]:
    """Runs a guest's free page reporting now, without waiting for its delay."""
    return Call(REPORT_FREE_PAGES, pb.ReportFreePagesRequest(name=name), **options)


def check_health(service: str = "", **options: Unpack[CallOptions]) -> Call[str]:
    """grpc.health.v1 status of a service ("" for the server): "SERVING", "NOT_SERVING", ..."""
    return Call(CHECK_HEALTH, health_pb2.HealthCheckRequest(service=service), **options)


# Snapshots (SnapshotMachine, BootGuest): bytes of the file per message, and the time a
# snapshot call gets beyond the client's timeout (a real host's scan takes a second or two,
# a large simulated machine's walk longer).
SNAPSHOT_CHUNK_BYTES = 1 << 20
SNAPSHOT_EXTRA_SECONDS = 120.0


def snapshot_timeout(client_timeout: float | None, timeout: float | None) -> float | None:
    """A snapshot call's deadline: `timeout` if given, else the client's plus
    SNAPSHOT_EXTRA_SECONDS (None: no deadline, as the client has none)."""
    if timeout is not None:
        return timeout
    return None if client_timeout is None else client_timeout + SNAPSHOT_EXTRA_SECONDS


def snapshot_from_chunks(chunks: Iterable[pb.SnapshotChunk]) -> Snapshot:
    """A SnapshotMachine reply: the first chunk's summary and every chunk's bytes."""
    info: SnapshotInfo | None = None
    data = bytearray()
    for chunk in chunks:
        if info is None:
            info = into(SnapshotInfo)(chunk.info)
        data += chunk.data
    if info is None:
        raise ValueError("SnapshotMachine ended without a chunk")
    return Snapshot(info, bytes(data))


def snapshot_bytes(snapshot: bytes | str | os.PathLike[str]) -> bytes:
    """A snapshot file's bytes, given as such or as its path."""
    return snapshot if isinstance(snapshot, bytes) else Path(snapshot).read_bytes()


def boot_guest_chunks(
    name: str,
    snapshot: bytes,
    ram_bytes: int = 0,
    backing: Backing | str = Backing.BASE,
    *,
    machine: str = "",
    mthp_size_kb: int = 0,
    hvo: bool = False,
    free_page_reporting: bool | None = None,
) -> Iterator[pb.BootGuestChunk]:
    """BootGuest's stream: the guest's settings, then the file in SNAPSHOT_CHUNK_BYTES pieces."""
    guest = pb.CreateGuestRequest(
        machine=machine,
        name=name,
        ram_bytes=ram_bytes,
        backing=BACKING.to_pb[Backing(backing)],
        mthp_size_kb=mthp_size_kb,
        hvo=hvo,
        free_page_reporting=free_page_reporting,
    )
    for start in range(0, max(len(snapshot), 1), SNAPSHOT_CHUNK_BYTES):
        data = snapshot[start : start + SNAPSHOT_CHUNK_BYTES]
        yield (
            pb.BootGuestChunk(guest=guest, data=data) if not start else pb.BootGuestChunk(data=data)
        )
