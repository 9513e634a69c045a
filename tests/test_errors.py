"""Every bad input gets the right status, names its field, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import foliodclient
from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from foliodclient import (
    FolioAlreadyFreed,
    OutOfMemory,
    OutOfRange,
    RemoteError,
    UnknownFolio,
    UnknownMachine,
    UnknownOwner,
    error_from_rpc,
)

Stub = foliod_pb2_grpc.FoliodStub
INVALID = grpc.StatusCode.INVALID_ARGUMENT
MIB = 1 << 20


def _snapshot(stub: Stub) -> tuple[Any, ...]:
    """Everything a failed request must leave untouched."""
    return (
        list(stub.GetBuddyInfo(pb.GetBuddyInfoRequest()).free_blocks),
        stub.GetMemmap(pb.GetMemmapRequest()).SerializeToString(deterministic=True),
        stub.GetMeminfo(pb.GetMeminfoRequest()).SerializeToString(deterministic=True),
        stub.GetThpPolicy(pb.GetThpPolicyRequest()).SerializeToString(deterministic=True),
    )


def _expect(
    stub: Stub, call: Callable[[], Any], code: grpc.StatusCode, field: str | None
) -> grpc.RpcError:
    """Runs a call that must fail with code (and a BadRequest naming field), changing nothing."""
    before = _snapshot(stub)
    with pytest.raises(grpc.RpcError) as raised:
        call()
    err = raised.value
    assert err.code() == code, err.details()
    assert err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    reasons: list[tuple[str, str]] = []
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons.append((info.domain, info.reason))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
    assert len(reasons) == 1 and reasons[0][0] == "foliod"
    if field is not None:
        assert fields == [field]
    assert _snapshot(stub) == before
    return err


def _alloc(**fields: Any) -> pb.AllocateRequest:
    base: dict[str, Any] = {"owner": "p", "kind": pb.FOLIO_KIND_FILE, "count": 1}
    base.update(fields)
    return pb.AllocateRequest(**base)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"owner": ""}, "owner"),
        ({"owner": "has space"}, "owner"),
        ({"owner": "x" * 65}, "owner"),
        ({"owner": "a/b/c"}, "owner"),  # "a/b" is owner b in tenant a's namespace
        ({"kind": pb.FOLIO_KIND_UNSPECIFIED}, "kind"),
        ({"kind": 99}, "kind"),
        ({"order": 11, "kind": pb.FOLIO_KIND_SLAB}, "order"),
        ({"order": 10}, "order"),  # file folios stop at order 9
        ({"order": 1, "kind": pb.FOLIO_KIND_ANON}, "order"),  # no order-1 anon folios
        ({"order": 0, "kind": pb.FOLIO_KIND_HUGETLB}, "order"),
        ({"order": 4_000_000_000}, "order"),
        ({"count": 0}, "count"),
        ({"count": 2, "bytes": 8192}, "count"),
        ({"count": 0, "bytes": 1000}, "bytes"),
        ({"count": 0, "bytes": 4096, "order": 1}, "bytes"),
        ({"count": (1 << 20) + 1}, "count"),
        ({"count": (1 << 64) - 1}, "count"),
        ({"count": 0, "bytes": 1 << 30}, "bytes"),  # more than the machine's 256 MiB
        ({"madvise_hugepage": True}, "madvise_hugepage"),  # file memory is not a mapping
    ],
)
def test_allocate_rejects_bad_fields(
    stub: Stub, request_fields: dict[str, Any], field: str
) -> None:
    """A malformed Allocate is INVALID_ARGUMENT naming the field, and allocates nothing."""
    _expect(stub, lambda: stub.Allocate(_alloc(**request_fields)), INVALID, field)


def test_unknown_machine_is_not_found(stub: Stub) -> None:
    """Naming a machine that does not exist is NOT_FOUND on every machine-scoped call."""
    for call in (
        lambda: stub.Allocate(_alloc(machine="guest0")),
        lambda: stub.GetMemmap(pb.GetMemmapRequest(machine="guest0")),
        lambda: stub.GetMachine(pb.GetMachineRequest(machine="nope")),
        lambda: stub.Free(pb.FreeRequest(machine="nope", handles=[1])),
    ):
        err = _expect(stub, call, grpc.StatusCode.NOT_FOUND, None)
        assert isinstance(error_from_rpc(err), UnknownMachine)


def test_out_of_memory_names_order_and_free_memory(stub: Stub) -> None:
    """An allocation beyond free memory is RESOURCE_EXHAUSTED with the order and free pages."""
    stub.Allocate(_alloc(owner="hog", order=9, count=120))  # 240 of 256 MiB
    err = _expect(
        stub,
        lambda: stub.Allocate(_alloc(order=9, count=10)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        None,
    )
    details = err.details() or ""
    assert "order-9" in details and "pages free" in details
    mapped = error_from_rpc(err)
    assert isinstance(mapped, OutOfMemory)
    assert mapped.metadata["order"] == "9"
    assert int(mapped.metadata["nr_free_pages"]) == 16 * 256


def test_out_of_memory_midway_rolls_back_the_whole_call(stub: Stub) -> None:
    """An anon mapping that runs out of memory partway leaves no folio or page table behind."""
    stub.Allocate(_alloc(owner="hog", order=9, count=124))  # leaves 8 MiB minus nothing
    stub.SetThpPolicy(pb.SetThpPolicyRequest(enabled=pb.THP_SETTING_NEVER))
    free = stub.GetMachine(pb.GetMachineRequest()).nr_free_pages
    # Fits the pre-check (pages <= free - min) but the page tables push it over the watermark.
    min_pages = stub.GetMachine(pb.GetMachineRequest()).watermarks.nr_min
    nr_bytes = (free - min_pages) * 4096
    err = _expect(
        stub,
        lambda: stub.Allocate(
            _alloc(owner="new", kind=pb.FOLIO_KIND_ANON, count=0, bytes=nr_bytes)
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        None,
    )
    assert isinstance(error_from_rpc(err), OutOfMemory)
    with pytest.raises(grpc.RpcError) as missing:
        stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="new"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_free_errors_are_all_or_nothing(stub: Stub) -> None:
    """Free rejects unknown, freed, duplicate and empty handle lists without freeing any."""
    reply = stub.Allocate(_alloc(count=3))
    h = reply.first_handle
    err = _expect(
        stub,
        lambda: stub.Free(pb.FreeRequest(handles=[h, 10_000])),
        grpc.StatusCode.NOT_FOUND,
        None,
    )
    assert isinstance(error_from_rpc(err), UnknownFolio)
    _expect(stub, lambda: stub.Free(pb.FreeRequest(handles=[h, h + 1, h])), INVALID, "handles")
    _expect(stub, lambda: stub.Free(pb.FreeRequest(handles=[])), INVALID, "handles")
    _expect(stub, lambda: stub.Free(pb.FreeRequest(handles=[0])), grpc.StatusCode.NOT_FOUND, None)
    stub.Free(pb.FreeRequest(handles=[h]))
    err = _expect(
        stub,
        lambda: stub.Free(pb.FreeRequest(handles=[h + 1, h])),
        grpc.StatusCode.FAILED_PRECONDITION,
        None,
    )
    assert isinstance(error_from_rpc(err), FolioAlreadyFreed)
    assert stub.GetFolio(pb.GetFolioRequest(handle=h + 1)).handle == h + 1


def test_owner_errors(stub: Stub) -> None:
    """Releasing an unknown owner is NOT_FOUND; a malformed owner name is INVALID_ARGUMENT."""
    err = _expect(
        stub,
        lambda: stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="ghost")),
        grpc.StatusCode.NOT_FOUND,
        None,
    )
    assert isinstance(error_from_rpc(err), UnknownOwner)
    _expect(stub, lambda: stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="")), INVALID, "owner")


def test_folio_io_errors(stub: Stub) -> None:
    """Reads and writes past the folio end, empty, oversized or on freed folios are refused."""
    h = stub.Allocate(_alloc(order=1)).first_handle
    out_of_range = grpc.StatusCode.OUT_OF_RANGE

    def write(offset: int, data: bytes, handle: int = h) -> Callable[[], Any]:
        return lambda: stub.WriteFolio(
            pb.WriteFolioRequest(handle=handle, offset=offset, data=data)
        )

    def read(offset: int, length: int, handle: int = h) -> Callable[[], Any]:
        return lambda: stub.ReadFolio(
            pb.ReadFolioRequest(handle=handle, offset=offset, length=length)
        )

    err = _expect(stub, write(8190, b"abc"), out_of_range, "offset")
    assert isinstance(error_from_rpc(err), OutOfRange)
    _expect(stub, write(0, b""), INVALID, "data")
    _expect(stub, write(0, bytes((2 << 20) + 1)), INVALID, "data")
    _expect(stub, read(8192, 1), out_of_range, "length")
    _expect(stub, read((1 << 64) - 1, 1), out_of_range, "length")
    _expect(stub, read(0, 0), INVALID, "length")
    _expect(stub, read(0, (2 << 20) + 1), INVALID, "length")
    _expect(stub, read(0, 1, handle=999), grpc.StatusCode.NOT_FOUND, None)
    stub.Free(pb.FreeRequest(handles=[h]))
    _expect(stub, write(0, b"x"), grpc.StatusCode.FAILED_PRECONDITION, None)
    _expect(
        stub,
        lambda: stub.GetFolio(pb.GetFolioRequest(handle=h)),
        grpc.StatusCode.FAILED_PRECONDITION,
        None,
    )


def test_oversized_message_is_refused_by_transport(stub: Stub) -> None:
    """A message over the 4 MiB limit is RESOURCE_EXHAUSTED before it reaches the core."""
    h = stub.Allocate(_alloc(order=9)).first_handle
    before = _snapshot(stub)
    with pytest.raises(grpc.RpcError) as err:
        stub.WriteFolio(pb.WriteFolioRequest(handle=h, offset=0, data=bytes(5 * MIB)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert isinstance(error_from_rpc(err.value), RemoteError)
    assert _snapshot(stub) == before
    assert stub.ReadFolio(pb.ReadFolioRequest(handle=h, offset=0, length=8)).data == bytes(8)


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"enabled": pb.THP_SETTING_INHERIT}, "enabled"),
        ({"enabled": 42}, "enabled"),
        ({"sizes": {8: pb.THP_SETTING_ALWAYS}}, "sizes"),
        ({"sizes": {4096: pb.THP_SETTING_ALWAYS}}, "sizes"),
        ({"sizes": {64: pb.THP_SETTING_ALWAYS, 32: 77}}, "sizes"),
        ({"sizes": {64: pb.THP_SETTING_ALWAYS, 100: pb.THP_SETTING_ALWAYS}}, "sizes"),
    ],
)
def test_thp_policy_rejects_bad_settings(
    stub: Stub, request_fields: dict[str, Any], field: str
) -> None:
    """A bad THP knob or size is INVALID_ARGUMENT and no knob changes."""
    _expect(
        stub, lambda: stub.SetThpPolicy(pb.SetThpPolicyRequest(**request_fields)), INVALID, field
    )


def test_client_maps_every_code_back_to_its_tree(stub: Stub) -> None:
    """The client's error mapping gives back the class (by reason), field and message the server
    raised."""
    with pytest.raises(grpc.RpcError) as raised:
        stub.Allocate(_alloc(order=12, kind=pb.FOLIO_KIND_FILE))
    mapped = error_from_rpc(raised.value)
    assert isinstance(mapped, foliodclient.InvalidArgument)
    assert mapped.reason == "INVALID_ARGUMENT"
    assert mapped.field == "order"
    assert mapped.metadata["grpc_code"] == "INVALID_ARGUMENT"
    assert "order 12" in mapped.message
