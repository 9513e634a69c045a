"""The memory-map numbers of docs/FACTS.md, read from a running server through the gRPC API."""

from __future__ import annotations

import pytest

from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerFactory, connect

GIB = 1 << 30
MIB = 1 << 20


def _model(report: pb.MemmapReport, model: pb.MemmapModel.ValueType) -> pb.ModelReport:
    return next(m for m in report.models if m.model == model)


def _kind_bytes(model: pb.ModelReport, kind: pb.FolioKind.ValueType) -> int:
    return next(k.total_bytes for k in model.by_kind if k.kind == kind)


@pytest.fixture
def host4g(make_server: ServerFactory) -> foliod_pb2_grpc.FoliodStub:
    server = make_server(ram=4 * GIB, debug_checks=False)
    _, stub = connect(server)
    return stub


def test_idle_machine_costs_struct_page_and_memdesc_fractions(
    host4g: foliod_pb2_grpc.FoliodStub,
) -> None:
    """An idle machine pays 1.5625% of RAM for struct page, 0.78% interim and 0.195% memdesc."""
    report = host4g.GetMemmap(pb.GetMemmapRequest())
    assert report.ram_bytes == 4 * GIB
    assert [m.model for m in report.models] == [
        pb.MEMMAP_MODEL_STRUCT_PAGE,
        pb.MEMMAP_MODEL_INTERIM,
        pb.MEMMAP_MODEL_MEMDESC,
    ]
    struct_page, interim, memdesc = report.models
    assert struct_page.total_bytes == 64 * MIB
    assert struct_page.fraction_of_ram == pytest.approx(0.015625)
    assert interim.fraction_of_ram == pytest.approx(0.0078125)
    assert memdesc.total_bytes == 8 * MIB
    assert memdesc.fraction_of_ram == pytest.approx(0.001953125)
    assert not report.folios


def test_one_gib_of_order0_file_folios(host4g: foliod_pb2_grpc.FoliodStub) -> None:
    """Caching 1 GiB in base pages: 16 MiB of struct pages, 22 MiB (23.07 MB) of memdescs."""
    reply = host4g.Allocate(
        pb.AllocateRequest(owner="cache", kind=pb.FOLIO_KIND_FILE, order=0, bytes=GIB)
    )
    assert reply.count == 262_144
    report = host4g.GetMemmap(pb.GetMemmapRequest())
    struct_page = _model(report, pb.MEMMAP_MODEL_STRUCT_PAGE)
    memdesc = _model(report, pb.MEMMAP_MODEL_MEMDESC)
    assert _kind_bytes(struct_page, pb.FOLIO_KIND_FILE) == 16 * MIB
    file_memdesc = _kind_bytes(memdesc, pb.FOLIO_KIND_FILE)
    assert file_memdesc == 22 * MIB
    assert round(file_memdesc / 1e6, 2) == 23.07
    # The machine-wide struct_page total does not move: every frame already had one.
    assert struct_page.total_bytes == 64 * MIB
    # memdesc machine-wide: 8 B for all 1 Mi frames plus 262,144 order-0 folio descriptors.
    assert memdesc.total_bytes == 8 * MIB + 262_144 * 80
    folio_row = next(d for d in memdesc.breakdown if d.descriptor == "folio")
    assert (folio_row.size_bytes, folio_row.count) == (80, 262_144)
    assert [(c.kind, c.order, c.folios) for c in report.folios] == [
        (pb.FOLIO_KIND_FILE, 0, 262_144)
    ]


def test_one_gib_of_order2_file_folios(host4g: foliod_pb2_grpc.FoliodStub) -> None:
    """Caching 1 GiB in four-page folios costs 9 MiB as memdescs: 2 MiB + 65,536 x 112 B."""
    reply = host4g.Allocate(
        pb.AllocateRequest(owner="cache", kind=pb.FOLIO_KIND_FILE, order=2, bytes=GIB)
    )
    assert reply.count == 65_536
    assert dict(reply.folios_by_order) == {2: 65_536}
    report = host4g.GetMemmap(pb.GetMemmapRequest())
    assert _kind_bytes(_model(report, pb.MEMMAP_MODEL_MEMDESC), pb.FOLIO_KIND_FILE) == 9 * MIB
    assert _kind_bytes(_model(report, pb.MEMMAP_MODEL_STRUCT_PAGE), pb.FOLIO_KIND_FILE) == 16 * MIB
    large = next(
        d
        for d in _model(report, pb.MEMMAP_MODEL_MEMDESC).breakdown
        if d.descriptor == "large_folio"
    )
    assert (large.size_bytes, large.count, large.total_bytes) == (112, 65_536, 7 * MIB)


def test_order0_vs_order2_moves_memdesc_by_13_mib(host4g: foliod_pb2_grpc.FoliodStub) -> None:
    """Switching 1 GiB from base pages to four-page folios saves 13 MiB under memdesc."""
    host4g.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_FILE, order=0, bytes=GIB))
    base = _model(host4g.GetMemmap(pb.GetMemmapRequest()), pb.MEMMAP_MODEL_MEMDESC).total_bytes
    host4g.ReleaseOwner(pb.ReleaseOwnerRequest(owner="a"))
    host4g.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_FILE, order=2, bytes=GIB))
    large = _model(host4g.GetMemmap(pb.GetMemmapRequest()), pb.MEMMAP_MODEL_MEMDESC).total_bytes
    assert base - large == 13 * MIB


def test_breakdown_and_attribution_sum_to_total(host4g: foliod_pb2_grpc.FoliodStub) -> None:
    """Every model's breakdown and its per-kind attribution plus free memory add up to its total."""
    for kind, order, count in (
        (pb.FOLIO_KIND_SLAB, 1, 100),
        (pb.FOLIO_KIND_PAGETABLE, 0, 50),
        (pb.FOLIO_KIND_HUGETLB, 9, 3),
        (pb.FOLIO_KIND_FILE, 4, 10),
    ):
        host4g.Allocate(pb.AllocateRequest(owner="mix", kind=kind, order=order, count=count))
    host4g.Allocate(pb.AllocateRequest(owner="proc", kind=pb.FOLIO_KIND_ANON, bytes=6 * MIB))
    report = host4g.GetMemmap(pb.GetMemmapRequest())
    for model in report.models:
        assert sum(d.total_bytes for d in model.breakdown) == model.total_bytes
        assert all(d.total_bytes == d.size_bytes * d.count for d in model.breakdown)
        assert (
            sum(k.total_bytes for k in model.by_kind) + model.free_memory_bytes == model.total_bytes
        )
    memdesc = {d.descriptor: d for d in _model(report, pb.MEMMAP_MODEL_MEMDESC).breakdown}
    assert memdesc["slab"].count == 100
    # 50 explicit page-table folios plus the anon owner's PGD, PUD, PMD and 3 deposited PTE tables.
    assert memdesc["ptdesc"].count == 56
    assert memdesc["large_folio"].count == 3 + 10 + 3  # hugetlb, file order 4, three 2 MiB THPs


def test_descriptor_sizes_are_configurable(make_server: ServerFactory) -> None:
    """Configured descriptor sizes flow into the report."""
    server = make_server(ram=64 * MIB, folio_bytes=96, large_folio_bytes=128, memdesc_bytes=16)
    _, stub = connect(server)
    stub.Allocate(pb.AllocateRequest(owner="f", kind=pb.FOLIO_KIND_FILE, order=0, count=10))
    memdesc = _model(stub.GetMemmap(pb.GetMemmapRequest()), pb.MEMMAP_MODEL_MEMDESC)
    rows = {d.descriptor: (d.size_bytes, d.count) for d in memdesc.breakdown}
    assert rows["memdesc"] == (16, 16_384)
    assert rows["folio"] == (96, 10)
    assert _kind_bytes(memdesc, pb.FOLIO_KIND_FILE) == 10 * (16 + 96)
