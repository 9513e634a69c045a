"""The foliod.v1.Foliod servicer: unpack the request, one call into the core, pack the reply."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TypeVar

import grpc

from foliod.api.pb_enums import BACKING, FOLIO_KIND, MEMMAP_MODEL, THP_SETTING
from foliod.mm import (
    PAGE_SIZE,
    FolioKind,
    InvalidArgument,
    Machine,
    Machines,
    MthpStat,
    Release,
    ThpSetting,
    check_machine,
)
from foliod.mm.backing_dev import FaultInjector, FaultRule, check_fault_rules
from foliod.mm.filemap import FileStat, IoStats
from foliod.mm.folio_table import OwnedFolio
from foliod.mm.guest import Backing, Guest, Guests
from foliod.mm.huge_memory import order_to_size_kb, size_kb_to_order
from foliod.mm.page_alloc import MAX_PAGE_ORDER
from foliod.mm.snapshot import MAX_SNAPSHOT_BYTES, Snapshot, snapshot_machine
from foliod.mm.snapshot import decode as decode_snapshot
from foliod.rpc.auth import current_identity
from foliod.rpc.batch import submit_batch
from foliod.rpc.idempotency import OutcomeCache, submit_once
from foliod.rpc.replay import parse as parse_replay
from foliod.rpc.replay import run as run_replay
from foliod.rpc.tenancy import Namespace, namespace_of
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc

T = TypeVar("T")

_KIND_RANK = {k: rank for rank, k in enumerate(FolioKind)}


def _kind(value: pb.FolioKind.ValueType) -> FolioKind:
    kind = FOLIO_KIND.from_pb.get(value)
    if kind is None:
        raise InvalidArgument(f"kind {value} is not a folio kind", field="kind")
    return kind


def _thp_setting(value: pb.ThpSetting.ValueType, field: str) -> ThpSetting:
    setting = THP_SETTING.from_pb.get(value)
    if setting is None:
        raise InvalidArgument(f"{value} is not a THP setting", field=field)
    return setting


class FoliodServicer(foliod_pb2_grpc.FoliodServicer):
    """Serves foliod.v1.Foliod over a set of machines."""

    def __init__(
        self,
        machines: Machines,
        guests: Guests,
        *,
        debug_checks: bool = False,
        max_streams: int = 7,
        outcomes: OutcomeCache | None = None,
    ) -> None:
        self.machines = machines
        # Outcomes of Submit batches sent under an idempotency key (None: no deduplication).
        self.outcomes = outcomes
        self.guests = guests
        self.debug_checks = debug_checks
        # An open Submit stream holds a worker thread: leave some for unary calls.
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)

    def _change(self, name: str, operation: Callable[[Machine], T]) -> T:
        """Runs a state-changing operation under the machine's lock (and the checker, in debug);
        tenants' page cache is trimmed back to their memory.max once it returns."""
        machine = self.machines.get(name)
        with machine.lock:
            try:
                result = operation(machine)
            finally:
                if machine.memcgs:
                    machine.enforce_memcg_limits()
            if self.debug_checks:
                check_machine(machine)
        return result

    @staticmethod
    def _ns() -> Namespace:
        """The caller's namespace: its tenant's, or the whole server's."""
        return namespace_of(current_identity())

    def _read(self, name: str, operation: Callable[[Machine], T]) -> T:
        machine = self.machines.get(name)
        with machine.lock:
            return operation(machine)

    def Allocate(
        self, request: pb.AllocateRequest, context: grpc.ServicerContext
    ) -> pb.AllocateResponse:
        kind = _kind(request.kind)
        order = request.order if request.HasField("order") else None
        owner = self._ns().owner(request.owner)
        result = self._change(
            request.machine,
            lambda m: m.allocate(
                owner,
                kind,
                order=order,
                count=request.count,
                nr_bytes=request.bytes,
                madvise_hugepage=request.madvise_hugepage,
            ),
        )
        return pb.AllocateResponse(
            first_handle=result.first_handle,
            count=result.count,
            nr_pages=result.nr_pages,
            folios_by_order=result.folios_by_order,
            nr_pagetable_pages=result.nr_pagetable_pages,
        )

    def Free(self, request: pb.FreeRequest, context: grpc.ServicerContext) -> pb.FreeResponse:
        ns = self._ns()

        def free(m: Machine) -> Release:
            for handle in request.handles:
                ns.check_folio(m, handle, "handles")
            return m.free(request.handles)

        result = self._change(request.machine, free)
        return pb.FreeResponse(
            nr_pages=result.nr_pages, nr_pagetable_pages=result.nr_pagetable_pages
        )

    def ReleaseOwner(
        self, request: pb.ReleaseOwnerRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseOwnerResponse:
        owner = self._ns().owner(request.owner)
        result = self._change(request.machine, lambda m: m.release_owner(owner))
        return pb.ReleaseOwnerResponse(folios=result.folios, nr_pages=result.nr_pages)

    def GetFolio(self, request: pb.GetFolioRequest, context: grpc.ServicerContext) -> pb.FolioInfo:
        ns = self._ns()

        def lookup(m: Machine) -> OwnedFolio:
            ns.check_folio(m, request.handle)
            return m.lookup(request.handle)

        folio = self._read(request.machine, lookup)
        return pb.FolioInfo(
            handle=folio.handle,
            pfn=folio.pfn,
            order=folio.order,
            kind=FOLIO_KIND.to_pb[folio.kind],
            owner=ns.owner_out(folio.owner),
            size_bytes=folio.size_bytes,
            virtual_address=max(folio.vaddr, 0) * PAGE_SIZE,
            pmd_mapped=folio.pmd_mapped,
        )

    def WriteFolio(
        self, request: pb.WriteFolioRequest, context: grpc.ServicerContext
    ) -> pb.WriteFolioResponse:
        ns = self._ns()

        def write(m: Machine) -> int:
            ns.check_folio(m, request.handle)
            return m.folio_write(request.handle, request.offset, request.data)

        written = self._change(request.machine, write)
        return pb.WriteFolioResponse(written_bytes=written)

    def ReadFolio(
        self, request: pb.ReadFolioRequest, context: grpc.ServicerContext
    ) -> pb.ReadFolioResponse:
        ns = self._ns()

        def read(m: Machine) -> bytes:
            ns.check_folio(m, request.handle)
            return m.folio_read(request.handle, request.offset, request.length)

        data = self._read(request.machine, read)
        return pb.ReadFolioResponse(data=data)

    def GetMachine(
        self, request: pb.GetMachineRequest, context: grpc.ServicerContext
    ) -> pb.MachineInfo:
        def info(m: Machine) -> pb.MachineInfo:
            marks = m.watermarks
            return pb.MachineInfo(
                name=m.name,
                ram_bytes=m.ram_bytes,
                nr_pages=m.nr_pages,
                nr_free_pages=m.zone.nr_free,
                page_size_bytes=PAGE_SIZE,
                max_order=MAX_PAGE_ORDER,
                watermarks=pb.Watermarks(
                    nr_min=marks.nr_min,
                    nr_low=marks.nr_low,
                    nr_high=marks.nr_high,
                    min_free_kbytes=marks.min_free_kbytes,
                ),
                below_low_watermark=m.zone.nr_free < marks.nr_low,
            )

        return self._read(request.machine, info)

    def GetBuddyInfo(
        self, request: pb.GetBuddyInfoRequest, context: grpc.ServicerContext
    ) -> pb.BuddyInfo:
        blocks = self._read(request.machine, lambda m: m.zone.buddyinfo())
        return pb.BuddyInfo(zone="Normal", free_blocks=blocks)

    def GetMeminfo(
        self, request: pb.GetMeminfoRequest, context: grpc.ServicerContext
    ) -> pb.Meminfo:
        # The core's Meminfo and the message share their field names.
        return pb.Meminfo(**asdict(self._read(request.machine, lambda m: m.meminfo())))

    def GetMemmap(
        self, request: pb.GetMemmapRequest, context: grpc.ServicerContext
    ) -> pb.MemmapReport:
        machine = self.machines.get(request.machine)
        with machine.lock:
            reports = machine.memmap()
            counts = sorted(
                machine.nr_folios.items(),
                key=lambda kv: (_KIND_RANK[kv[0][0]], kv[0][1]),
            )
        return pb.MemmapReport(
            machine=machine.name,
            ram_bytes=machine.ram_bytes,
            models=[
                pb.ModelReport(
                    model=MEMMAP_MODEL.to_pb[r.model],
                    total_bytes=r.total_bytes,
                    fraction_of_ram=r.fraction_of_ram,
                    breakdown=[
                        pb.DescriptorBytes(
                            descriptor=str(c.descriptor),
                            size_bytes=c.size_bytes,
                            count=c.count,
                            total_bytes=c.total_bytes,
                        )
                        for c in r.breakdown
                    ],
                    by_kind=[
                        pb.KindBytes(kind=FOLIO_KIND.to_pb[kind], total_bytes=nr_bytes)
                        for kind, nr_bytes in r.by_kind.items()
                    ],
                    free_memory_bytes=r.free_memory_bytes,
                    hvo_freed_bytes=r.hvo_freed_bytes,
                )
                for r in reports
            ],
            folios=[
                pb.FolioCount(
                    kind=FOLIO_KIND.to_pb[kind], order=order, folios=n, nr_pages=n << order
                )
                for (kind, order), n in counts
            ],
        )

    def GetVmstat(self, request: pb.GetVmstatRequest, context: grpc.ServicerContext) -> pb.Vmstat:
        values = self._read(request.machine, lambda m: m.vmstat())
        return pb.Vmstat(entries=[pb.VmstatEntry(name=k, value=v) for k, v in values.items()])

    def GetThpPolicy(
        self, request: pb.GetThpPolicyRequest, context: grpc.ServicerContext
    ) -> pb.ThpPolicy:
        return self._read(request.machine, _thp_policy)

    def SetThpPolicy(
        self, request: pb.SetThpPolicyRequest, context: grpc.ServicerContext
    ) -> pb.ThpPolicy:
        enabled = None
        if request.enabled != pb.THP_SETTING_UNSPECIFIED:
            enabled = _thp_setting(request.enabled, "enabled")
        sizes = {
            size_kb_to_order(size_kb): _thp_setting(value, "sizes")
            for size_kb, value in request.sizes.items()
        }

        def apply(m: Machine) -> pb.ThpPolicy:
            m.set_thp(enabled, sizes)
            return _thp_policy(m)

        return self._change(request.machine, apply)

    # -- files -----------------------------------------------------------------------------

    def CreateFile(
        self, request: pb.CreateFileRequest, context: grpc.ServicerContext
    ) -> pb.FileStat:
        max_order = request.max_order if request.HasField("max_order") else None
        ra_pages = request.ra_pages if request.HasField("ra_pages") else None

        ns = self._ns()
        name = ns.file(request.name)

        def create(m: Machine) -> FileStat:
            m.files.create(name, max_order=max_order, ra_pages=ra_pages)
            return m.files.stat(name)

        return _file_stat(ns.stat_out(self._change(request.machine, create)))

    def OpenFile(
        self, request: pb.OpenFileRequest, context: grpc.ServicerContext
    ) -> pb.OpenFileResponse:
        name = self._ns().file(request.name)
        handle = self._change(request.machine, lambda m: m.files.open(name))
        return pb.OpenFileResponse(handle=handle.number)

    def CloseFile(
        self, request: pb.CloseFileRequest, context: grpc.ServicerContext
    ) -> pb.CloseFileResponse:
        ns = self._ns()

        def close(m: Machine) -> None:
            ns.check_file_handle(m, request.handle)
            m.files.close(request.handle)

        self._change(request.machine, close)
        return pb.CloseFileResponse()

    def StatFile(self, request: pb.StatFileRequest, context: grpc.ServicerContext) -> pb.FileStat:
        ns = self._ns()
        name = ns.file(request.name)
        return _file_stat(ns.stat_out(self._read(request.machine, lambda m: m.files.stat(name))))

    def ListFiles(
        self, request: pb.ListFilesRequest, context: grpc.ServicerContext
    ) -> pb.ListFilesResponse:
        ns = self._ns()
        stats = self._read(
            request.machine,
            lambda m: [m.files.stat(name) for name in sorted(m.files.files) if ns.sees_file(name)],
        )
        return pb.ListFilesResponse(files=[_file_stat(ns.stat_out(s)) for s in stats])

    def ReadFile(
        self, request: pb.ReadFileRequest, context: grpc.ServicerContext
    ) -> pb.ReadFileResponse:
        # A read changes the cache (readahead, LRU), so it takes the machine like a write.
        # _change written out: this is the RPC small enough for a call to show.
        ns = self._ns()
        machine = self.machines.get(request.machine)
        with machine.lock:
            ns.check_file_handle(machine, request.handle)
            try:
                data, stats = machine.files.read(
                    ns.file(request.name), request.offset, request.length, request.handle or None
                )
            finally:
                if machine.memcgs:
                    machine.enforce_memcg_limits()
            if self.debug_checks:
                check_machine(machine)
        response = pb.ReadFileResponse(data=data)
        _set_io_stats(response.stats, stats)
        return response

    def WriteFile(
        self, request: pb.WriteFileRequest, context: grpc.ServicerContext
    ) -> pb.WriteFileResponse:
        name = self._ns().file(request.name)
        stats = self._change(
            request.machine, lambda m: m.files.write(name, request.offset, request.data)
        )
        response = pb.WriteFileResponse(written_bytes=len(request.data))
        _set_io_stats(response.stats, stats)
        return response

    def TruncateFile(
        self, request: pb.TruncateFileRequest, context: grpc.ServicerContext
    ) -> pb.FileStat:
        ns = self._ns()
        name = ns.file(request.name)

        def truncate(m: Machine) -> FileStat:
            m.files.truncate(name, request.size_bytes)
            return m.files.stat(name)

        return _file_stat(ns.stat_out(self._change(request.machine, truncate)))

    def DropFileRange(
        self, request: pb.DropFileRangeRequest, context: grpc.ServicerContext
    ) -> pb.DropFileRangeResponse:
        name = self._ns().file(request.name)
        freed = self._change(
            request.machine,
            lambda m: m.files.fadvise_dontneed(name, request.offset, request.length),
        )
        return pb.DropFileRangeResponse(dropped_bytes=freed * PAGE_SIZE)

    def DeleteFile(
        self, request: pb.DeleteFileRequest, context: grpc.ServicerContext
    ) -> pb.DeleteFileResponse:
        name = self._ns().file(request.name)
        self._change(request.machine, lambda m: m.files.delete(name))
        return pb.DeleteFileResponse()

    def Writeback(
        self, request: pb.WritebackRequest, context: grpc.ServicerContext
    ) -> pb.WritebackResponse:
        ns = self._ns()
        end = request.offset + request.length if request.length else None

        def writeback(m: Machine) -> int:
            if request.name or ns.whole:
                return m.files.writeback(ns.file(request.name) or None, request.offset, end)
            # A tenant's "every file" is every file of its own.
            names = [name for name in m.files.files if ns.sees_file(name)]
            return sum(m.files.writeback(name, request.offset, end) for name in names)

        pages = self._change(request.machine, writeback)
        return pb.WritebackResponse(nr_pages=pages)

    def Fsync(self, request: pb.FsyncRequest, context: grpc.ServicerContext) -> pb.FsyncResponse:
        ns = self._ns()

        def fsync(m: Machine) -> int:
            ns.check_file_handle(m, request.handle)
            return m.files.fsync(request.handle)

        pages = self._change(request.machine, fsync)
        return pb.FsyncResponse(nr_pages=pages)

    def Reclaim(
        self, request: pb.ReclaimRequest, context: grpc.ServicerContext
    ) -> pb.ReclaimResponse:
        freed = self._change(request.machine, lambda m: m.reclaim(request.bytes))
        return pb.ReclaimResponse(reclaimed_bytes=freed)

    def DropCaches(
        self, request: pb.DropCachesRequest, context: grpc.ServicerContext
    ) -> pb.DropCachesResponse:
        dropped = self._change(request.machine, lambda m: m.drop_caches())
        return pb.DropCachesResponse(dropped_bytes=dropped)

    # -- fault injection -------------------------------------------------------------------

    def SetFaults(self, request: pb.SetFaultsRequest, context: grpc.ServicerContext) -> pb.Faults:
        check_fault_rules(len(request.rules))  # before building any
        rules = [
            FaultRule(
                errno_name=r.errno,
                name=r.name,
                offset=r.offset,
                length=r.length,
                remaining=r.count if r.HasField("count") else None,
                probability=r.probability if r.HasField("probability") else 1.0,
                delay_seconds=r.delay_ms / 1000,
            )
            for r in request.rules
        ]

        def apply(m: Machine) -> FaultInjector:
            m.files.store.faults.set(rules, request.seed)
            return m.files.store.faults

        return _faults(self._change(request.machine, apply))

    def GetFaults(self, request: pb.GetFaultsRequest, context: grpc.ServicerContext) -> pb.Faults:
        return _faults(self._read(request.machine, lambda m: m.files.store.faults))

    # -- guests ----------------------------------------------------------------------------

    def _guest(self, guest: Guest) -> pb.Guest:
        """The guest's state, read under its machine's and its host's locks."""
        with guest.machine.lock, guest.host.lock:
            if self.debug_checks:
                check_machine(guest.machine)
                check_machine(guest.host)
            return _guest_pb(guest)

    def CreateGuest(
        self, request: pb.CreateGuestRequest, context: grpc.ServicerContext
    ) -> pb.Guest:
        return self._create_guest(request)

    def _create_guest(
        self, request: pb.CreateGuestRequest, snapshot: Snapshot | None = None
    ) -> pb.Guest:
        backing = BACKING.from_pb.get(request.backing)
        if backing is None:
            raise InvalidArgument(
                f"backing {request.backing} is not one of {', '.join(Backing)}", field="backing"
            )
        guest = self.guests.create(
            request.name,
            request.ram_bytes,
            backing,
            mthp_size_kb=request.mthp_size_kb,
            hvo=request.hvo,
            on=request.machine,
            free_page_reporting=(
                request.free_page_reporting if request.HasField("free_page_reporting") else None
            ),
            snapshot=snapshot,
        )
        return self._guest(guest)

    def DestroyGuest(
        self, request: pb.DestroyGuestRequest, context: grpc.ServicerContext
    ) -> pb.DestroyGuestResponse:
        freed = self.guests.destroy(request.name, delete_files=request.delete_files)
        if self.debug_checks:
            with self.machines.host.lock:
                check_machine(self.machines.host)
        return pb.DestroyGuestResponse(freed_bytes=freed)

    def GetGuest(self, request: pb.GetGuestRequest, context: grpc.ServicerContext) -> pb.Guest:
        return self._guest(self.guests.get(request.name))

    def ListGuests(
        self, request: pb.ListGuestsRequest, context: grpc.ServicerContext
    ) -> pb.ListGuestsResponse:
        guests = [self._guest(g) for g in sorted(self.guests, key=lambda g: g.name)]
        totals: dict[pb.MemmapModel.ValueType, list[int]] = {}
        ram = sum(g.ram_bytes for g in guests)
        for g in guests:
            for d in g.duplication:
                entry = totals.setdefault(d.model, [0, 0])
                entry[0] += d.guest_memmap_bytes
                entry[1] += d.host_memmap_bytes
        return pb.ListGuestsResponse(
            guests=guests,
            totals=[
                _duplication_pb(model, ram, guest_bytes, host_bytes)
                for model, (guest_bytes, host_bytes) in totals.items()
            ],
        )

    def SetBalloon(
        self, request: pb.SetBalloonRequest, context: grpc.ServicerContext
    ) -> pb.SetBalloonResponse:
        guest = self.guests.get(request.name)
        change = self._change(request.name, lambda m: guest.set_balloon(request.size_bytes))
        return pb.SetBalloonResponse(
            inflated_bytes=change.nr_inflated * PAGE_SIZE,
            deflated_bytes=change.nr_deflated * PAGE_SIZE,
            balloon_bytes=change.nr_balloon_pages * PAGE_SIZE,
            host_freed_bytes=change.nr_host_pages_freed * PAGE_SIZE,
            guest=self._guest(guest),
        )

    def ReportFreePages(
        self, request: pb.ReportFreePagesRequest, context: grpc.ServicerContext
    ) -> pb.ReportFreePagesResponse:
        guest = self.guests.get(request.name)
        run = self._change(request.name, lambda m: guest.report_free_pages())
        return pb.ReportFreePagesResponse(
            batches=run.nr_batches,
            blocks=run.nr_blocks,
            host_freed_bytes=run.nr_host_pages_freed * PAGE_SIZE,
            guest=self._guest(guest),
        )

    # -- snapshots ---------------------------------------------------------------------------

    def SnapshotMachine(
        self, request: pb.SnapshotMachineRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SnapshotChunk]:
        # The walk holds the machine's lock; compressing the file does not.
        return snapshot_chunks(self._read(request.machine, snapshot_machine))

    def BootGuest(
        self, request_iterator: Iterator[pb.BootGuestChunk], context: grpc.ServicerContext
    ) -> pb.Guest:
        if not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} Submit, Replay and BootGuest streams are open, the most "
                "this server allows (each holds a worker thread; see --workers)",
            )
        try:
            settings, data = receive_snapshot(request_iterator)
        finally:
            self._streams.release()
        snapshot = decode_snapshot(data)  # checked whole before anything is created
        return self._create_guest(settings, snapshot)

    # -- batched submission ----------------------------------------------------------------

    def Submit(
        self, request_iterator: Iterator[pb.SubmitRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SubmitResponse]:
        if not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} Submit streams are open, the most this server allows "
                "(each holds a worker thread; see --workers)",
            )
        namespace = self._ns()

        def run(request: pb.SubmitRequest) -> pb.SubmitResponse:
            return submit_batch(
                self.machines, request, debug_checks=self.debug_checks, namespace=namespace
            )

        try:
            if self.outcomes is None:
                yield from map(run, request_iterator)
            else:
                identity = current_identity()
                principal = "" if identity is None else identity.principal
                yield from submit_once(
                    self.outcomes,
                    context,
                    request_iterator,
                    run,
                    principal=principal,
                    parse=pb.SubmitResponse.FromString,
                )
        finally:
            self._streams.release()

    def Replay(
        self, request_iterator: Iterator[pb.ReplayChunk], context: grpc.ServicerContext
    ) -> pb.ReplayResult:
        if not self._streams.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_streams} Submit and Replay streams are open, the most this server "
                "allows (each holds a worker thread; see --workers)",
            )
        try:
            trace = parse_replay(request_iterator)  # every chunk checked before anything runs
        finally:
            self._streams.release()
        ns = self._ns()
        names = [ns.file(name) for name in trace.names]
        return self._change(trace.machine, lambda m: run_replay(m, names, trace))


# Bytes of the snapshot file per SnapshotChunk.
SNAPSHOT_CHUNK_BYTES = 1 << 20


def snapshot_chunks(snapshot: Snapshot) -> Iterator[pb.SnapshotChunk]:
    """A snapshot's file in chunks, its summary in the first."""
    data = snapshot.encode()
    header = snapshot.header()
    info = pb.SnapshotInfo(
        source=header.get("source", ""),
        machine=header.get("machine", ""),
        hostname=header.get("hostname", ""),
        kernel=header.get("kernel", ""),
        nr_frames=snapshot.nr_frames,
        nr_free_pages=header["nr_free_pages"],
        nr_runs=header["nr_runs"],
        size_bytes=len(data),
        folios=header["folios"],
    )
    for start in range(0, len(data), SNAPSHOT_CHUNK_BYTES):
        chunk = data[start : start + SNAPSHOT_CHUNK_BYTES]
        yield pb.SnapshotChunk(info=info, data=chunk) if not start else pb.SnapshotChunk(data=chunk)


def receive_snapshot(
    chunks: Iterator[pb.BootGuestChunk],
) -> tuple[pb.CreateGuestRequest, bytearray]:
    """BootGuest's stream: the guest's settings from the first chunk and the file's bytes,
    refused past MAX_SNAPSHOT_BYTES."""
    settings: pb.CreateGuestRequest | None = None
    data = bytearray()
    for number, chunk in enumerate(chunks, 1):
        if number == 1:
            if not chunk.HasField("guest"):
                raise InvalidArgument("the first chunk must carry the guest", field="guest")
            settings = chunk.guest
        elif chunk.HasField("guest"):
            raise InvalidArgument(
                f"chunk {number} carries a guest: only the first may", field="guest"
            )
        if len(data) + len(chunk.data) > MAX_SNAPSHOT_BYTES:
            raise InvalidArgument(
                f"the snapshot passes {MAX_SNAPSHOT_BYTES} bytes at chunk {number}",
                field="data",
            )
        data += chunk.data
    if settings is None:
        raise InvalidArgument("an empty stream: no guest and no snapshot", field="guest")
    if not data:
        raise InvalidArgument("the stream carries no snapshot bytes", field="data")
    return settings, data


def _duplication_pb(
    model: pb.MemmapModel.ValueType, ram_bytes: int, guest_bytes: int, host_bytes: int
) -> pb.Duplication:
    total = guest_bytes + host_bytes
    return pb.Duplication(
        model=model,
        guest_memmap_bytes=guest_bytes,
        host_memmap_bytes=host_bytes,
        total_bytes=total,
        fraction_of_guest_ram=total / ram_bytes if ram_bytes else 0.0,
    )


def _guest_pb(guest: Guest) -> pb.Guest:
    spec, backing = guest.spec, guest.backing
    return pb.Guest(
        name=guest.name,
        host=guest.host.name,
        ram_bytes=guest.ram_bytes,
        backing=BACKING.to_pb[spec.backing],
        mthp_size_kb=spec.mthp_size_kb,
        hvo=spec.hvo,
        lazy=spec.lazy,
        backed_bytes=backing.nr_backed_pages * PAGE_SIZE,
        host_folios=backing.nr_backed,
        host_folio_order=spec.order,
        balloon_bytes=len(guest.machine.balloon) * PAGE_SIZE,
        balloon_returned_bytes=guest.nr_ballooned_host_pages * PAGE_SIZE,
        reported_bytes=guest.nr_reported_pages * PAGE_SIZE,
        reporting_batches=guest.nr_reporting_batches,
        reported_blocks=guest.nr_reported_blocks,
        free_page_reporting=guest.reporting is not None,
        duplication=[
            _duplication_pb(
                MEMMAP_MODEL.to_pb[d.model], d.ram_bytes, d.guest_memmap_bytes, d.host_memmap_bytes
            )
            for d in guest.duplication()
        ],
    )


def _faults(faults: FaultInjector) -> pb.Faults:
    return pb.Faults(
        seed=faults.seed,
        rules=[
            pb.FaultRule(
                errno=r.errno_name,
                name=r.name,
                offset=r.offset,
                length=r.length,
                count=r.remaining,
                probability=r.probability,
                delay_ms=round(r.delay_seconds * 1000),
                injected=r.injected,
            )
            for r in faults.rules
        ],
    )


def _file_stat(stat: FileStat) -> pb.FileStat:
    return pb.FileStat(
        name=stat.name,
        size_bytes=stat.size_bytes,
        nr_cached=stat.nr_cached,
        nr_dirty=stat.nr_dirty,
        folios_by_order=stat.folios_by_order,
        max_order=stat.max_order,
        ra_pages=stat.ra_pages,
        open_handles=stat.open_handles,
    )


def _set_io_stats(target: pb.IoStats, stats: IoStats) -> None:
    """Fills a reply's IoStats in place (cheaper than building one and copying it in)."""
    # Zero is every field's default: a cache hit sets one field, not five.
    if stats.pages_hit:
        target.pages_hit = stats.pages_hit
    if stats.pages_missed:
        target.pages_missed = stats.pages_missed
    if stats.pages_readahead:
        target.pages_readahead = stats.pages_readahead
    if stats.device_seconds:
        target.device_seconds = stats.device_seconds
    if stats.throttle_seconds:
        target.throttle_seconds = stats.throttle_seconds


def _thp_policy(m: Machine) -> pb.ThpPolicy:
    thp = m.thp
    return pb.ThpPolicy(
        enabled=THP_SETTING.to_pb[thp.enabled],
        sizes=[
            pb.MthpSize(
                size_kb=order_to_size_kb(order),
                order=order,
                enabled=THP_SETTING.to_pb[setting],
                anon_fault_alloc=thp.stats[order][MthpStat.ANON_FAULT_ALLOC],
                anon_fault_fallback=thp.stats[order][MthpStat.ANON_FAULT_FALLBACK],
                split=thp.stats[order][MthpStat.SPLIT],
                split_failed=thp.stats[order][MthpStat.SPLIT_FAILED],
                nr_anon=thp.nr_anon[order],
            )
            for order, setting in thp.items()
        ],
    )
