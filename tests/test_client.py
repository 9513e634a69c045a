"""The typed client: every method against a live server, errors, retries, deadlines, metadata."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2

import foliodclient
from foliod.mm import errors as core
from foliod.server import FoliodServer
from foliod.v1 import foliod_pb2 as pb
from foliodclient import (
    AsyncFoliodClient,
    Backing,
    FaultRule,
    FoliodClient,
    FolioKind,
    MemmapModel,
    RetryPolicy,
    ThpSetting,
    _calls,
)
from tests.conftest import ServerFactory

MIB = 1 << 20
GIB = 1 << 30
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_seconds=0.01, max_backoff_seconds=0.05)


def _target(server: FoliodServer) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture
def client(server: FoliodServer) -> Iterator[FoliodClient]:
    with FoliodClient(_target(server), timeout=10) as c:
        yield c


class FakeFoliod:
    """foliod.v1.Foliod methods that fail on purpose: UNAVAILABLE a few times, stall, record."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()
        self.metadata: list[dict[str, str | bytes]] = []
        self.release = threading.Event()

    def _flaky(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method} unavailable, try again")

    def get_meminfo(
        self, request: pb.GetMeminfoRequest, context: grpc.ServicerContext
    ) -> pb.Meminfo:
        self._flaky("GetMeminfo", context)
        return pb.Meminfo(mem_total_bytes=64 * MIB, mem_free_bytes=32 * MIB)

    def allocate(
        self, request: pb.AllocateRequest, context: grpc.ServicerContext
    ) -> pb.AllocateResponse:
        self._flaky("Allocate", context)
        return pb.AllocateResponse(first_handle=1, count=1, nr_pages=1)

    def stat_file(self, request: pb.StatFileRequest, context: grpc.ServicerContext) -> pb.FileStat:
        self.calls["StatFile"] += 1
        context.abort(grpc.StatusCode.INTERNAL, "broken")

    def get_machine(
        self, request: pb.GetMachineRequest, context: grpc.ServicerContext
    ) -> pb.MachineInfo:
        self.calls["GetMachine"] += 1
        self.release.wait(5)
        return pb.MachineInfo(name="slow")

    def get_memmap(
        self, request: pb.GetMemmapRequest, context: grpc.ServicerContext
    ) -> pb.MemmapReport:
        self.calls["GetMemmap"] += 1
        self.release.wait(5)
        return pb.MemmapReport(machine="slow")

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Callable[..., Message], type[Message]]] = {
            "GetMeminfo": (self.get_meminfo, pb.GetMeminfoRequest),
            "Allocate": (self.allocate, pb.AllocateRequest),
            "StatFile": (self.stat_file, pb.StatFileRequest),
            "GetMachine": (self.get_machine, pb.GetMachineRequest),
            "GetMemmap": (self.get_memmap, pb.GetMemmapRequest),
        }
        return grpc.method_handlers_generic_handler(
            "foliod.v1.Foliod",
            {
                name: grpc.unary_unary_rpc_method_handler(
                    behavior,
                    request_deserializer=request.FromString,
                    response_serializer=lambda reply: reply.SerializeToString(),
                )
                for name, (behavior, request) in methods.items()
            },
        )


@contextmanager
def fake_server(
    failures: int = 0, credentials: grpc.ServerCredentials | None = None
) -> Iterator[tuple[str, FakeFoliod]]:
    """A real gRPC server on an ephemeral loopback port serving FakeFoliod."""
    fake = FakeFoliod(failures)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((fake.handler(),))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        fake.release.set()
        server.stop(0).wait(5)


def test_public_api_is_sorted_and_importable() -> None:
    """foliodclient's __all__ is sorted and every name in it exists."""
    assert foliodclient.__all__ == sorted(foliodclient.__all__)
    assert all(hasattr(foliodclient, name) for name in foliodclient.__all__)


def test_every_rpc_has_a_method_on_both_clients() -> None:
    """Each unary RPC of foliod.v1.Foliod is a snake_case method of the sync and the async
    client; the streaming Submit is open_submission, the client-streaming Replay replay, the
    snapshot streams snapshot_machine and boot_guest."""
    service = pb.DESCRIPTOR.services_by_name["Foliod"]
    table = {rpc.method for rpc in vars(_calls).values() if isinstance(rpc, _calls.Rpc)}
    streaming = {m.name for m in service.methods if m.client_streaming or m.server_streaming}
    assert streaming == {"Submit", "Replay", "SnapshotMachine", "BootGuest"}
    assert callable(FoliodClient.open_submission) and callable(AsyncFoliodClient.open_submission)
    assert callable(FoliodClient.replay) and callable(AsyncFoliodClient.replay)
    for name in ("snapshot_machine", "boot_guest"):
        assert callable(getattr(FoliodClient, name))
        assert asyncio.iscoroutinefunction(getattr(AsyncFoliodClient, name)), name
    for method in service.methods:
        if method.name in streaming:
            continue
        name = "".join(f"_{c.lower()}" if c.isupper() else c for c in method.name).lstrip("_")
        assert method.name in table
        assert callable(getattr(FoliodClient, name)), name
        assert asyncio.iscoroutinefunction(getattr(AsyncFoliodClient, name)), name
        assert getattr(FoliodClient, name).__doc__ == getattr(_calls, name).__doc__


def test_only_reads_are_marked_idempotent() -> None:
    """The retry table marks exactly the calls that change nothing as idempotent."""
    rpcs = [rpc for rpc in vars(_calls).values() if isinstance(rpc, _calls.Rpc)]
    assert {rpc.method for rpc in rpcs if rpc.idempotent} == {
        "GetFolio", "ReadFolio", "GetMachine", "GetBuddyInfo", "GetMeminfo", "GetMemmap",
        "GetVmstat", "GetThpPolicy", "StatFile", "ListFiles", "ReadFile", "GetFaults", "Check",
        "GetGuest", "ListGuests",
    }  # fmt: skip


def test_client_error_tree_mirrors_the_core() -> None:
    """Every core error class has a client class of the same name and reason, below its
    parent's, in the client's own tree (no core class among its bases). A core class that
    keeps its parent's reason (HostCannotBack) is the core's own distinction: on the wire, and
    so in the client, it is its parent."""
    pending: list[type[core.FoliodError]] = list(core.FoliodError.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls.__module__ != core.__name__ or cls.reason == getattr(
            cls.__bases__[0], "reason", None
        ):
            continue
        mirror = getattr(foliodclient.errors, cls.__name__)
        assert issubclass(mirror, foliodclient.CallError)
        assert not any(issubclass(base, core.FoliodError) for base in mirror.__mro__)
        assert mirror.reason == cls.reason
        parent = cls.__bases__[0]
        if parent is not core.FoliodError:
            assert issubclass(mirror, getattr(foliodclient.errors, parent.__name__))
        pending.extend(cls.__subclasses__())


def test_allocation_calls_return_typed_results(client: FoliodClient) -> None:
    """Allocate, GetFolio, Write/ReadFolio, Free and ReleaseOwner give dataclasses and values."""
    alloc = client.allocate("cache", FolioKind.FILE, order=2, count=4)
    assert isinstance(alloc, foliodclient.Allocation)
    assert alloc.count == 4 and alloc.nr_pages == 16 and dict(alloc.folios_by_order) == {2: 4}
    assert list(alloc.handles) == list(range(alloc.first_handle, alloc.first_handle + 4))
    folio = client.get_folio(alloc.first_handle)
    assert isinstance(folio, foliodclient.FolioInfo)
    assert (folio.kind, folio.order, folio.owner, folio.size_bytes) == (
        FolioKind.FILE,
        2,
        "cache",
        16384,
    )
    assert client.write_folio(folio.handle, b"folio!", 100) == 6
    assert client.read_folio(folio.handle, 10, 98) == b"\0\0folio!\0\0"
    freed = client.free([alloc.first_handle])
    assert freed == foliodclient.FreeResult(nr_pages=4, nr_pagetable_pages=0)
    anon = client.allocate("app", "anon", size_bytes=2 * MIB, madvise_hugepage=True)
    assert anon.folios_by_order == {9: 1} and anon.nr_pagetable_pages > 0
    assert client.get_folio(anon.first_handle).pmd_mapped
    released = client.release_owner("app")
    assert isinstance(released, foliodclient.ReleaseResult)
    assert released == foliodclient.ReleaseResult(folios=5, nr_pages=512 + anon.nr_pagetable_pages)


def test_machine_views_are_typed(client: FoliodClient) -> None:
    """GetMachine, GetBuddyInfo, GetMeminfo, GetMemmap and GetVmstat agree with each other."""
    client.allocate("cache", "file", count=256)
    machine = client.get_machine()
    assert machine.name == "host" and machine.ram_bytes == 256 * MIB
    assert machine.nr_pages == 65536 and machine.max_order == 10
    assert isinstance(machine.watermarks, foliodclient.Watermarks)
    assert machine.watermarks.nr_min < machine.watermarks.nr_low < machine.watermarks.nr_high
    buddy = client.get_buddy_info()
    assert buddy.zone == "Normal" and len(buddy.free_blocks) == 11
    assert sum(n << order for order, n in enumerate(buddy.free_blocks)) == machine.nr_free_pages
    meminfo = client.get_meminfo()
    assert meminfo.mem_total_bytes == 256 * MIB
    assert meminfo.mem_free_bytes == machine.nr_free_pages * 4096
    assert meminfo.file_pages_bytes == MIB
    memmap = client.get_memmap()
    assert [m.model for m in memmap.models] == list(MemmapModel)
    struct_page = memmap.models[0]
    assert struct_page.total_bytes == 4 * MIB and struct_page.fraction_of_ram == 1 / 64
    assert struct_page.breakdown[0] == foliodclient.DescriptorBytes("page", 64, 65536, 4 * MIB)
    for model in memmap.models:
        total = sum(k.total_bytes for k in model.by_kind) + model.free_memory_bytes
        assert total == model.total_bytes
    assert memmap.folios == (foliodclient.FolioCount(FolioKind.FILE, 0, 256, 256),)
    vmstat = client.get_vmstat()
    assert (
        next(iter(vmstat)) == "nr_free_pages" and vmstat["nr_free_pages"] == machine.nr_free_pages
    )
    assert vmstat["pgalloc"] >= 256


def test_thp_policy_round_trips(client: FoliodClient) -> None:
    """SetThpPolicy takes enum members or their names and GetThpPolicy reads them back."""
    policy = client.set_thp_policy("madvise", {64: ThpSetting.ALWAYS, 2048: "never"})
    assert policy.enabled is ThpSetting.MADVISE
    sizes = {s.size_kb: s.enabled for s in policy.sizes}
    assert sizes[64] is ThpSetting.ALWAYS and sizes[2048] is ThpSetting.NEVER
    assert client.set_thp_policy(sizes={16: "always"}).enabled is ThpSetting.MADVISE
    assert client.get_thp_policy().sizes[0] == foliodclient.MthpSize(
        16, 2, ThpSetting.ALWAYS, 0, 0, 0, 0, 0
    )


def test_file_calls_return_typed_results(client: FoliodClient) -> None:
    """Every file RPC: create, open, write, read, stat, list, truncate, writeback, fsync, delete."""
    created = client.create_file("dir/a.dat", max_order=2, ra_pages=8)
    assert created == foliodclient.FileStat("dir/a.dat", 0, 0, 0, {}, 2, 8, 0)
    handle = client.open_file("dir/a.dat")
    written = client.write_file("dir/a.dat", b"x" * 20000)
    assert isinstance(written.stats, foliodclient.IoStats)
    assert written.written_bytes == 20000 and written.stats.pages_missed == 5
    read = client.read_file("dir/a.dat", 8, 19996)
    assert read.data == b"xxxx" and read.stats.pages_hit == 1
    stat = client.stat_file("dir/a.dat")
    assert (stat.size_bytes, stat.nr_cached, stat.nr_dirty, stat.open_handles) == (20000, 5, 5, 1)
    assert sum((4 << order) // 4 * n for order, n in stat.folios_by_order.items()) == 5
    assert client.list_files() == (stat,)
    assert client.writeback("dir/a.dat", offset=0, length=4096) == 4  # the whole order-2 folio
    assert client.fsync(handle) == 1
    client.close_file(handle)
    assert client.truncate_file("dir/a.dat", 4096).size_bytes == 4096
    assert client.drop_caches() == 4096
    assert client.reclaim(4096) == 0
    client.delete_file("dir/a.dat")
    assert client.list_files() == ()


def test_fault_rules_and_fsync_errors(client: FoliodClient) -> None:
    """SetFaults/GetFaults round-trip rules; a failed writeback is WritebackFailed at fsync."""
    rule = FaultRule(errno="EIO", name="f.dat", count=1)
    faults = client.set_faults([rule], seed=7)
    assert faults.seed == 7 and faults.rules[0].errno == "EIO" and faults.rules[0].count == 1
    client.create_file("f.dat")
    handle = client.open_file("f.dat")
    client.write_file("f.dat", b"lost")
    with pytest.raises(foliodclient.WritebackFailed) as raised:
        client.fsync(handle)
    err = raised.value
    assert err.code == grpc.StatusCode.DATA_LOSS and "EIO" in err.message
    assert err.reason == core.WritebackFailed.reason
    assert client.get_faults().rules[0].injected == 1
    assert client.set_faults([]).rules == ()


def test_health_and_machine_selection(server: FoliodServer) -> None:
    """check_health reads grpc.health.v1; a client's machine applies to every call unless
    overridden per call."""
    with FoliodClient(_target(server), machine="guest0") as c:
        assert c.check_health() == "SERVING"
        assert c.check_health("foliod.v1.Foliod") == "SERVING"
        with pytest.raises(foliodclient.UnknownMachine):
            c.get_meminfo()
        assert c.get_meminfo(machine="").mem_total_bytes == 256 * MIB
        with pytest.raises(foliodclient.RemoteError) as raised:
            c.check_health("no.such.Service")
        assert raised.value.code == grpc.StatusCode.NOT_FOUND


def test_errors_carry_code_message_and_details(client: FoliodClient) -> None:
    """A domain error maps to the client's class, with code, field, metadata and google.rpc
    details, raised from the grpc.RpcError."""
    with pytest.raises(foliodclient.InvalidArgument) as raised:
        client.allocate("x", "file", order=12, count=1)
    err = raised.value
    assert isinstance(err, foliodclient.CallError) and err.reason == "INVALID_ARGUMENT"
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "order"
    assert "order 12" in err.message and str(err).startswith("INVALID_ARGUMENT: ")
    assert isinstance(err.__cause__, grpc.RpcError)
    info, bad = err.details
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.domain, info.reason) == ("foliod", "INVALID_ARGUMENT")
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "order"

    client.allocate("hog", "anon", order=9, count=120)
    with pytest.raises(foliodclient.OutOfMemory) as oom:
        client.allocate("hog", "anon", order=9, count=10)
    assert oom.value.reason == "OUT_OF_MEMORY"
    assert oom.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert oom.value.metadata["order"] == "9"

    first = client.allocate("one", "slab", count=1).first_handle
    client.free([first])
    with pytest.raises(foliodclient.FolioAlreadyFreed) as freed:
        client.free([first])
    assert freed.value.reason == "FOLIO_ALREADY_FREED"
    with pytest.raises(foliodclient.UnknownFile):
        client.stat_file("missing")
    with pytest.raises(foliodclient.AlreadyExists):
        client.create_file("twice")
        client.create_file("twice")


@pytest.fixture
def guest_host(make_server: ServerFactory) -> Iterator[FoliodClient]:
    """A client of an 8 GiB host whose free page reporting runs only when asked."""
    server = make_server(ram=8 * GIB, reporting_delay_seconds=3600)
    with FoliodClient(_target(server), timeout=30) as c:
        yield c


def test_create_guest_sends_the_backing_by_name_or_member() -> None:
    """create_guest takes a Backing member or its value and sends the API's enum value; an
    unknown name fails before any call."""

    def request(call: _calls.Call[foliodclient.Guest]) -> pb.CreateGuestRequest:
        assert isinstance(call.request, pb.CreateGuestRequest)
        return call.request

    assert request(_calls.create_guest("a", GIB)).backing == pb.GUEST_BACKING_BASE
    huge = request(_calls.create_guest("a", GIB, Backing.HUGETLB_1G, hvo=True))
    assert huge.backing == pb.GUEST_BACKING_HUGETLB_1G and huge.hvo
    assert not huge.HasField("free_page_reporting")
    mthp = request(
        _calls.create_guest("a", GIB, "mthp", mthp_size_kb=64, free_page_reporting=False)
    )
    assert mthp.backing == pb.GUEST_BACKING_MTHP and mthp.mthp_size_kb == 64
    assert mthp.HasField("free_page_reporting") and not mthp.free_page_reporting
    with pytest.raises(ValueError, match="bogus"):
        _calls.create_guest("a", GIB, "bogus")


def test_guest_calls_return_typed_results(guest_host: FoliodClient) -> None:
    """CreateGuest, GetGuest, ListGuests and DestroyGuest give Guest and GuestList dataclasses
    with the memmap duplication per model, and the host's memmap counts HVO."""
    client = guest_host
    base = client.create_guest("vm0", GIB)
    assert isinstance(base, foliodclient.Guest)
    assert (base.name, base.host, base.ram_bytes, base.backing) == ("vm0", "host", GIB, "base")
    assert base.backing is Backing.BASE and base.lazy and base.free_page_reporting
    assert (base.backed_bytes, base.host_folios, base.host_folio_order) == (0, 0, 0)
    assert [d.model for d in base.duplication] == list(MemmapModel)
    struct_page = base.duplication[0]
    assert isinstance(struct_page, foliodclient.Duplication)
    assert struct_page == foliodclient.Duplication(
        MemmapModel.STRUCT_PAGE, 16 * MIB, 16 * MIB, 32 * MIB, 1 / 32
    )
    huge = client.create_guest("vm1", GIB, Backing.HUGETLB_2M, hvo=True, free_page_reporting=False)
    assert huge.backing is Backing.HUGETLB_2M and huge.hvo and not huge.lazy
    assert not huge.free_page_reporting
    assert (huge.backed_bytes, huge.host_folios, huge.host_folio_order) == (GIB, 512, 9)
    # HVO keeps one of the eight memmap pages of each 2 MiB page.
    assert huge.duplication[0].host_memmap_bytes == 2 * MIB
    assert huge.duplication[0].fraction_of_guest_ram == 18 / 1024
    mthp = client.create_guest("vm2", 64 * MIB, "mthp", mthp_size_kb=64)
    assert (mthp.backing, mthp.mthp_size_kb, mthp.host_folio_order) == (Backing.MTHP, 64, 4)

    assert client.get_guest("vm0") == base
    listing = client.list_guests()
    assert isinstance(listing, foliodclient.GuestList)
    assert listing.guests == (base, huge, mthp)
    assert [t.model for t in listing.totals] == list(MemmapModel)
    for model, total in enumerate(listing.totals):
        parts = [g.duplication[model] for g in listing.guests]
        assert total.guest_memmap_bytes == sum(d.guest_memmap_bytes for d in parts)
        assert total.host_memmap_bytes == sum(d.host_memmap_bytes for d in parts)
        assert total.fraction_of_guest_ram == total.total_bytes / (GIB + GIB + 64 * MIB)

    host = client.get_memmap()
    assert [m.hvo_freed_bytes for m in host.models] == [14 * MIB, 6 * MIB, 0]
    assert host.models[0].total_bytes == sum(d.total_bytes for d in host.models[0].breakdown) - (
        14 * MIB
    )
    assert client.get_memmap(machine="vm0").models[0].hvo_freed_bytes == 0
    assert client.destroy_guest("vm1") == GIB
    assert client.destroy_guest("vm2", delete_files=True) == 0
    assert [g.name for g in client.list_guests().guests] == ["vm0"]


def test_balloon_and_free_page_reporting(guest_host: FoliodClient) -> None:
    """SetBalloon and ReportFreePages report what moved and the guest after it; the balloon's
    pages are balloon folios of the guest."""
    client = guest_host
    client.create_guest("vm0", GIB)
    client.allocate("app", "anon", size_bytes=64 * MIB, machine="vm0")
    backed = client.get_guest("vm0").backed_bytes
    assert backed >= 64 * MIB
    inflated = client.set_balloon("vm0", 32 * MIB)
    assert isinstance(inflated, foliodclient.BalloonResult)
    assert (inflated.inflated_bytes, inflated.deflated_bytes, inflated.balloon_bytes) == (
        32 * MIB,
        0,
        32 * MIB,
    )
    assert inflated.guest.balloon_bytes == 32 * MIB
    folios = client.get_memmap(machine="vm0").folios
    assert foliodclient.FolioCount(FolioKind.BALLOON, 0, 8192, 8192) in folios
    deflated = client.set_balloon("vm0", 0)
    assert (deflated.deflated_bytes, deflated.balloon_bytes, deflated.host_freed_bytes) == (
        32 * MIB,
        0,
        0,
    )

    client.release_owner("app", machine="vm0")
    report = client.report_free_pages("vm0")
    assert isinstance(report, foliodclient.ReportResult)
    # 64 MiB freed merges into 4 MiB blocks (order 10) and smaller.
    assert report.batches >= 1 and report.blocks >= 16 and report.host_freed_bytes >= 64 * MIB
    guest = report.guest
    assert guest.reported_bytes == report.host_freed_bytes
    assert (guest.reporting_batches, guest.reported_blocks) == (report.batches, report.blocks)
    # Nothing is left in use in the guest: every backed granule goes back, with the host page
    # tables that mapped them.
    assert guest.backed_bytes == 0 and report.host_freed_bytes >= backed
    assert client.report_free_pages("vm0").host_freed_bytes == 0
    # The host also frees the page tables mapping the guest's RAM into its VMM owner.
    host_tables = client.get_meminfo().page_tables_bytes
    assert client.destroy_guest("vm0") == guest.backed_bytes + host_tables
    assert client.get_meminfo().page_tables_bytes == 0


def test_guest_errors_map_to_the_tree(guest_host: FoliodClient) -> None:
    """An unknown guest is UnknownGuest, a nested one GuestNesting; bad settings, duplicates and
    guests too big for the host map to their classes."""
    client = guest_host
    with pytest.raises(foliodclient.UnknownGuest) as unknown:
        client.get_guest("nope")
    err = unknown.value
    assert isinstance(err, foliodclient.UnknownGuest) and isinstance(err, foliodclient.NotFound)
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "UNKNOWN_GUEST")
    assert "'nope'" in err.message
    for call in (
        lambda: client.destroy_guest("nope"),
        lambda: client.set_balloon("nope", 0),
        lambda: client.report_free_pages("nope"),
    ):
        with pytest.raises(foliodclient.UnknownGuest):
            call()

    client.create_guest("vm0", 64 * MIB)
    with pytest.raises(foliodclient.GuestNesting) as nested:
        client.create_guest("inner", 64 * MIB, machine="vm0")
    nesting = nested.value
    assert isinstance(nesting, foliodclient.GuestNesting)
    assert isinstance(nesting, foliodclient.FailedPrecondition)
    assert (nesting.code, nesting.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "GUEST_NESTING")
    with pytest.raises(foliodclient.AlreadyExists):
        client.create_guest("vm0", 64 * MIB)
    with pytest.raises(foliodclient.InvalidArgument) as bad:
        client.create_guest("vm1", 64 * MIB, "base", hvo=True)
    assert bad.value.field == "hvo"
    with pytest.raises(foliodclient.InvalidArgument) as bad:
        client.create_guest("vm1", 3 * MIB, "hugetlb_2m")
    assert bad.value.field == "ram_bytes"
    with pytest.raises(foliodclient.InvalidArgument) as bad:
        client.set_balloon("vm0", 128 * MIB)
    assert bad.value.field == "size_bytes"
    with pytest.raises(foliodclient.OutOfMemory) as oom:
        client.create_guest("huge", 16 * GIB)
    assert oom.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [g.name for g in client.list_guests().guests] == ["vm0"]


def test_transport_errors_are_remote_errors(client: FoliodClient) -> None:
    """A status without foliod details (message too large) is a RemoteError with its code."""
    with pytest.raises(foliodclient.RemoteError) as raised:
        client.write_file("big", bytes(5 * MIB))
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not isinstance(raised.value, foliodclient.OutOfMemory)


def test_backoff_is_exponential_with_full_jitter() -> None:
    """Retry n sleeps a uniform draw below min(max, initial * multiplier**n)."""
    policy = RetryPolicy(initial_backoff_seconds=0.1, max_backoff_seconds=1.0, multiplier=2.0)
    rng = random.Random(1)
    for retry, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        draws = [policy.backoff_seconds(retry, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.9 and min(draws) < ceiling * 0.1
    with pytest.raises(ValueError, match="invalid retry policy"):
        RetryPolicy(max_attempts=0)


def test_reads_are_retried_on_unavailable_until_they_succeed() -> None:
    """An idempotent call that meets UNAVAILABLE three times succeeds on the fourth attempt."""
    with fake_server(failures=3) as (target, fake), FoliodClient(target, retry=FAST_RETRY) as c:
        assert c.get_meminfo().mem_total_bytes == 64 * MIB
    assert fake.calls["GetMeminfo"] == 4


def test_retries_stop_after_max_attempts() -> None:
    """A read that stays UNAVAILABLE is tried max_attempts times, then raises Unavailable."""
    with (
        fake_server(failures=10) as (target, fake),
        FoliodClient(target, retry=FAST_RETRY) as c,
        pytest.raises(foliodclient.Unavailable) as raised,
    ):
        c.get_meminfo()
    assert fake.calls["GetMeminfo"] == 4
    assert "try again" in raised.value.message
    assert isinstance(raised.value.__cause__, grpc.RpcError)


def test_mutations_are_retried_with_one_key_and_other_codes_are_not() -> None:
    """A mutation is retried on UNAVAILABLE up to max_attempts, every attempt with the same
    idempotency key; a read failing INTERNAL is sent once."""
    with fake_server(failures=10) as (target, fake), FoliodClient(target, retry=FAST_RETRY) as c:
        with pytest.raises(foliodclient.Unavailable):
            c.allocate("o", "file", count=1)
        with pytest.raises(foliodclient.RemoteError) as raised:
            c.stat_file("x")
    assert fake.calls["Allocate"] == 4 and fake.calls["StatFile"] == 1
    assert len({m["idempotency-key"] for m in fake.metadata[:4]}) == 1
    assert raised.value.code == grpc.StatusCode.INTERNAL


def test_retries_never_pass_the_deadline() -> None:
    """With a long backoff and a short deadline the call gives up instead of sleeping past it."""
    slow = RetryPolicy(max_attempts=10, initial_backoff_seconds=5, max_backoff_seconds=5)
    with fake_server(failures=10) as (target, _), FoliodClient(target, retry=slow) as c:
        start = time.monotonic()
        with pytest.raises(foliodclient.Unavailable):
            c.get_meminfo(timeout=0.3)
        assert time.monotonic() - start < 2


def test_deadlines_default_per_client_and_override_per_call() -> None:
    """A stalled call fails with DeadlineExceeded at the client's default or the call's deadline."""
    with fake_server() as (target, fake), FoliodClient(target, timeout=0.2) as c:
        start = time.monotonic()
        with pytest.raises(foliodclient.DeadlineExceeded) as raised:
            c.get_machine()
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 2
        with pytest.raises(foliodclient.DeadlineExceeded):
            c.get_machine(timeout=0.1)
        fake.release.set()
        assert c.get_machine(timeout=5).name == "slow"


def test_unreachable_server_is_unavailable() -> None:
    """Nothing listening: the call ends as Unavailable within its deadline."""
    with fake_server() as (target, _):
        pass
    with FoliodClient(target, timeout=2, retry=FAST_RETRY) as c:
        start = time.monotonic()
        with pytest.raises(foliodclient.Unavailable):
            c.get_meminfo()
        assert time.monotonic() - start < 4


def test_token_is_sent_as_bearer_metadata() -> None:
    """token= arrives at the server as `authorization: Bearer <token>`; no token, no header."""
    with fake_server() as (target, fake):
        with FoliodClient(target, token="s3cret") as c:
            c.get_meminfo()
        with FoliodClient(target) as c:
            c.get_meminfo()
    assert fake.metadata[0]["authorization"] == "Bearer s3cret"
    assert "authorization" not in fake.metadata[1]
    assert str(fake.metadata[0]["user-agent"]).startswith("foliodclient/")


def test_tls_with_a_root_certificate(tmp_path: Path) -> None:
    """tls_ca= (a PEM path or its bytes) makes a TLS channel that trusts that certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    with fake_server(credentials=credentials) as (target, _):
        with FoliodClient(target, tls_ca=cert, token="t") as c:
            assert c.get_meminfo().mem_total_bytes == 64 * MIB
        with FoliodClient(target, tls_ca=cert.read_bytes()) as c:
            assert c.get_meminfo().mem_free_bytes == 32 * MIB
        with (
            FoliodClient(target, timeout=2, retry=FAST_RETRY) as c,
            pytest.raises(foliodclient.Unavailable),
        ):
            c.get_meminfo()  # plaintext to a TLS port


def test_async_client_against_a_live_server(make_server: ServerFactory) -> None:
    """The asyncio client runs the same calls with the same results and errors."""
    server = make_server()

    async def scenario() -> None:
        async with AsyncFoliodClient(_target(server), token="t") as c:
            alloc = await c.allocate("cache", "file", order=0, count=8)
            assert alloc.folios_by_order == {0: 8}
            meminfo, memmap = await asyncio.gather(c.get_meminfo(), c.get_memmap())
            assert meminfo.file_pages_bytes == 8 * 4096
            assert memmap.folios[0].folios == 8
            await c.create_file("a")
            assert (await c.write_file("a", b"abc")).written_bytes == 3
            assert (await c.read_file("a", 3)).data == b"abc"
            assert await c.check_health() == "SERVING"
            with pytest.raises(foliodclient.UnknownFile) as raised:
                await c.stat_file("b")
            assert raised.value.code == grpc.StatusCode.NOT_FOUND
            assert isinstance(raised.value.details[0], error_details_pb2.ErrorInfo)
            assert isinstance(raised.value.__cause__, grpc.aio.AioRpcError)

    asyncio.run(scenario())


def test_async_client_guest_calls(make_server: ServerFactory) -> None:
    """The asyncio client's guest calls give the same dataclasses and errors."""
    server = make_server(ram=8 * GIB, reporting_delay_seconds=3600)

    async def scenario() -> None:
        async with AsyncFoliodClient(_target(server), timeout=30) as c:
            created = await c.create_guest("vm0", 128 * MIB, "thp")
            assert created.backing is Backing.THP and created.host_folio_order == 9
            assert await c.get_guest("vm0") == created
            assert (await c.list_guests()).guests == (created,)
            await c.allocate("app", "anon", size_bytes=4 * MIB, machine="vm0")
            ballooned = await c.set_balloon("vm0", 8 * MIB)
            assert ballooned.guest.balloon_bytes == 8 * MIB
            report = await c.report_free_pages("vm0")
            assert report.guest.reported_bytes == report.host_freed_bytes
            host_tables = (await c.get_meminfo()).page_tables_bytes
            assert await c.destroy_guest("vm0") == report.guest.backed_bytes + host_tables
            with pytest.raises(foliodclient.UnknownGuest):
                await c.get_guest("vm0")

    asyncio.run(scenario())


def test_async_client_retries_reads_and_keyed_mutations() -> None:
    """The asyncio client retries UNAVAILABLE reads, and mutations with their idempotency key,
    with backoff."""

    async def scenario(target: str) -> None:
        async with AsyncFoliodClient(target, retry=FAST_RETRY) as c:
            assert (await c.get_meminfo()).mem_total_bytes == 64 * MIB
            assert (await c.allocate("o", "file", count=1)).count == 1
            with pytest.raises(foliodclient.DeadlineExceeded):
                await c.get_machine(timeout=0.1)

    with fake_server(failures=2) as (target, fake):
        asyncio.run(scenario(target))
    assert fake.calls["GetMeminfo"] == 3 and fake.calls["Allocate"] == 3
    assert len({m["idempotency-key"] for m in fake.metadata[3:6]}) == 1


def test_results_are_frozen() -> None:
    """Results are frozen dataclasses."""
    stat = foliodclient.IoStats(1, 2, 3, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stat.pages_hit = 5  # type: ignore[misc]
