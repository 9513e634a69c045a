"""The foliod.v1 API on a real server: allocation, freeing, contents, reports and mTHP."""

from __future__ import annotations

import grpc
import pytest

from foliod.v1 import foliod_pb2 as pb
from foliod.v1 import foliod_pb2_grpc
from tests.conftest import ServerFactory, connect

MIB = 1 << 20
Stub = foliod_pb2_grpc.FoliodStub


def test_allocate_returns_consecutive_handles_and_free_returns_pages(stub: Stub) -> None:
    """Handles of one call are consecutive; freeing them returns every page to the buddy lists."""
    before = stub.GetMachine(pb.GetMachineRequest()).nr_free_pages
    reply = stub.Allocate(pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_SLAB, order=1, count=5))
    assert (reply.count, reply.nr_pages, dict(reply.folios_by_order)) == (5, 10, {1: 5})
    handles = list(range(reply.first_handle, reply.first_handle + reply.count))
    infos = [stub.GetFolio(pb.GetFolioRequest(handle=h)) for h in handles]
    assert all(i.kind == pb.FOLIO_KIND_SLAB and i.order == 1 and i.owner == "p" for i in infos)
    assert all(i.pfn % 2 == 0 and i.size_bytes == 8192 for i in infos)
    assert len({i.pfn for i in infos}) == 5
    assert stub.GetMachine(pb.GetMachineRequest()).nr_free_pages == before - 10
    freed = stub.Free(pb.FreeRequest(handles=handles))
    assert freed.nr_pages == 10
    assert stub.GetMachine(pb.GetMachineRequest()).nr_free_pages == before


def test_first_allocations_split_the_lowest_block(stub: Stub) -> None:
    """After boot the lowest block is split first; the upper halves land on the lower free lists."""
    reply = stub.Allocate(pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_FILE, count=1))
    assert stub.GetFolio(pb.GetFolioRequest(handle=reply.first_handle)).pfn == 0
    blocks = stub.GetBuddyInfo(pb.GetBuddyInfoRequest()).free_blocks
    assert list(blocks[:10]) == [1] * 10
    assert blocks[10] == 64 - 1  # 256 MiB = 64 order-10 blocks, one of them split
    stub.Free(pb.FreeRequest(handles=[reply.first_handle]))
    assert list(stub.GetBuddyInfo(pb.GetBuddyInfoRequest()).free_blocks) == [0] * 10 + [64]


def test_release_owner_frees_everything_it_holds(stub: Stub) -> None:
    """ReleaseOwner frees data folios and page tables alike, then the owner is gone."""
    total = stub.GetMachine(pb.GetMachineRequest()).nr_free_pages
    stub.Allocate(pb.AllocateRequest(owner="proc", kind=pb.FOLIO_KIND_ANON, bytes=3 * MIB))
    stub.Allocate(pb.AllocateRequest(owner="proc", kind=pb.FOLIO_KIND_FILE, order=3, count=7))
    assert stub.GetMeminfo(pb.GetMeminfoRequest()).page_tables_bytes > 0
    used = total - stub.GetMachine(pb.GetMachineRequest()).nr_free_pages
    assert used == 768 + 7 * 8 + 5  # 3 MiB of anon, seven order-3 folios, five page tables
    released = stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="proc"))
    assert released.nr_pages == used
    assert stub.GetMachine(pb.GetMachineRequest()).nr_free_pages == total
    assert stub.GetMeminfo(pb.GetMeminfoRequest()).page_tables_bytes == 0
    with pytest.raises(grpc.RpcError) as err:
        stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="proc"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_written_bytes_read_back_across_pages(stub: Stub) -> None:
    """Bytes written into a folio read back exactly, across page boundaries; the rest reads zero."""
    reply = stub.Allocate(pb.AllocateRequest(owner="w", kind=pb.FOLIO_KIND_FILE, order=2, count=1))
    payload = bytes(range(256)) * 40  # 10,240 bytes: spans three pages
    written = stub.WriteFolio(
        pb.WriteFolioRequest(handle=reply.first_handle, offset=3000, data=payload)
    )
    assert written.written_bytes == len(payload)
    data = stub.ReadFolio(pb.ReadFolioRequest(handle=reply.first_handle, offset=0, length=16384))
    assert data.data[:3000] == bytes(3000)
    assert data.data[3000 : 3000 + len(payload)] == payload
    assert data.data[3000 + len(payload) :] == bytes(16384 - 3000 - len(payload))


def test_new_folio_reads_as_zeros_after_reuse(stub: Stub) -> None:
    """A freed and reallocated frame does not leak the previous owner's bytes."""
    first = stub.Allocate(pb.AllocateRequest(owner="a", kind=pb.FOLIO_KIND_FILE, count=1))
    stub.WriteFolio(pb.WriteFolioRequest(handle=first.first_handle, offset=0, data=b"secret"))
    pfn = stub.GetFolio(pb.GetFolioRequest(handle=first.first_handle)).pfn
    stub.Free(pb.FreeRequest(handles=[first.first_handle]))
    second = stub.Allocate(pb.AllocateRequest(owner="b", kind=pb.FOLIO_KIND_FILE, count=1))
    assert stub.GetFolio(pb.GetFolioRequest(handle=second.first_handle)).pfn == pfn
    read = stub.ReadFolio(pb.ReadFolioRequest(handle=second.first_handle, offset=0, length=6))
    assert read.data == bytes(6)


def test_anon_thp_default_uses_pmd_folios_and_deposits_tables(stub: Stub) -> None:
    """With THP 'always', a 4 MiB mapping is two PMD-mapped 2 MiB folios, each with a deposit."""
    reply = stub.Allocate(pb.AllocateRequest(owner="vm", kind=pb.FOLIO_KIND_ANON, bytes=4 * MIB))
    assert dict(reply.folios_by_order) == {9: 2}
    # PGD + PUD table + PMD table + one deposited PTE table per PMD mapping.
    assert reply.nr_pagetable_pages == 5
    info = stub.GetFolio(pb.GetFolioRequest(handle=reply.first_handle))
    assert info.pmd_mapped and info.virtual_address % (2 * MIB) == 0
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest())
    assert meminfo.anon_huge_pages_bytes == 4 * MIB
    assert meminfo.anon_pages_bytes == 4 * MIB
    assert meminfo.page_tables_bytes == 5 * 4096
    vmstat = {e.name: e.value for e in stub.GetVmstat(pb.GetVmstatRequest()).entries}
    assert vmstat["thp_fault_alloc"] == 2
    assert vmstat["nr_anon_transparent_hugepages"] == 2
    assert vmstat["nr_page_table_pages"] == 5


def test_anon_base_pages_need_one_pte_table_per_512_pages(stub: Stub) -> None:
    """With THP off, 4 MiB of anon memory needs 1024 base pages and two PTE tables."""
    stub.SetThpPolicy(pb.SetThpPolicyRequest(enabled=pb.THP_SETTING_NEVER))
    reply = stub.Allocate(pb.AllocateRequest(owner="vm", kind=pb.FOLIO_KIND_ANON, bytes=4 * MIB))
    assert dict(reply.folios_by_order) == {0: 1024}
    assert reply.nr_pagetable_pages == 3 + 2  # PGD, PUD, PMD + two PTE tables
    info = stub.GetFolio(pb.GetFolioRequest(handle=reply.first_handle))
    assert not info.pmd_mapped


def test_without_deposit_pmd_thps_need_no_pte_table(make_server: ServerFactory) -> None:
    """With the deposit turned off, PMD-mapped folios need no PTE table at all."""
    server = make_server(thp_deposit_pgtable=False)
    _, stub = connect(server)
    reply = stub.Allocate(pb.AllocateRequest(owner="vm", kind=pb.FOLIO_KIND_ANON, bytes=8 * MIB))
    assert dict(reply.folios_by_order) == {9: 4}
    assert reply.nr_pagetable_pages == 3


def test_mthp_takes_largest_enabled_aligned_order(stub: Stub) -> None:
    """With 64 kB enabled and 2 MiB off, a 1 MiB mapping is sixteen 64 kB folios."""
    policy = stub.SetThpPolicy(
        pb.SetThpPolicyRequest(
            sizes={64: pb.THP_SETTING_ALWAYS, 2048: pb.THP_SETTING_NEVER},
        )
    )
    enabled = {s.size_kb: s.enabled for s in policy.sizes}
    assert enabled[64] == pb.THP_SETTING_ALWAYS and enabled[16] == pb.THP_SETTING_NEVER
    reply = stub.Allocate(pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_ANON, bytes=MIB))
    assert dict(reply.folios_by_order) == {4: 16}
    sizes = {s.size_kb: s for s in stub.GetThpPolicy(pb.GetThpPolicyRequest()).sizes}
    assert sizes[64].anon_fault_alloc == 16 and sizes[64].nr_anon == 16
    assert sizes[2048].anon_fault_alloc == 0


def test_mthp_unaligned_tail_falls_back_to_smaller_orders(stub: Stub) -> None:
    """A mapping too short for another aligned 64 kB block takes 16 kB, then 4 kB folios."""
    stub.SetThpPolicy(
        pb.SetThpPolicyRequest(sizes={64: pb.THP_SETTING_ALWAYS, 16: pb.THP_SETTING_ALWAYS})
    )
    # 64 kB + 16 kB + 8 kB: one 64 kB folio, one 16 kB folio, two base pages.
    reply = stub.Allocate(
        pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_ANON, bytes=(16 + 4 + 2) * 4096)
    )
    assert dict(reply.folios_by_order) == {4: 1, 2: 1, 0: 2}


def test_madvise_setting_applies_only_to_madvised_mappings(stub: Stub) -> None:
    """A size set to 'madvise' is used only when the allocation says MADV_HUGEPAGE."""
    stub.SetThpPolicy(pb.SetThpPolicyRequest(enabled=pb.THP_SETTING_MADVISE))
    plain = stub.Allocate(pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_ANON, bytes=2 * MIB))
    assert dict(plain.folios_by_order) == {0: 512}
    advised = stub.Allocate(
        pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_ANON, bytes=2 * MIB, madvise_hugepage=True)
    )
    assert dict(advised.folios_by_order) == {9: 1}


def test_thp_fallback_counted_when_no_2mib_block_is_free(make_server: ServerFactory) -> None:
    """When no order-9 block is free the fault falls back to base pages and counts the fallback."""
    server = make_server(ram=8 * MIB)
    _, stub = connect(server)
    # Fragment: take every page as order 0, then free every other one.
    info = stub.GetMachine(pb.GetMachineRequest())
    usable = info.nr_free_pages - info.watermarks.nr_min - 1
    full = stub.Allocate(pb.AllocateRequest(owner="frag", kind=pb.FOLIO_KIND_FILE, count=usable))
    stub.Free(pb.FreeRequest(handles=list(range(full.first_handle, full.first_handle + usable, 2))))
    reply = stub.Allocate(pb.AllocateRequest(owner="p", kind=pb.FOLIO_KIND_ANON, bytes=2 * MIB))
    assert dict(reply.folios_by_order) == {0: 512}
    vmstat = {e.name: e.value for e in stub.GetVmstat(pb.GetVmstatRequest()).entries}
    assert vmstat["thp_fault_fallback"] == 1
    assert vmstat["thp_fault_alloc"] == 0
    sizes = {s.size_kb: s for s in stub.GetThpPolicy(pb.GetThpPolicyRequest()).sizes}
    assert sizes[2048].anon_fault_fallback == 1


def test_hugetlb_gigantic_page_is_one_folio(make_server: ServerFactory) -> None:
    """A 1 GiB hugetlb page is one aligned order-18 folio made of free max-order blocks."""
    server = make_server(ram=2 << 30)
    _, stub = connect(server)
    stub.Allocate(pb.AllocateRequest(owner="x", kind=pb.FOLIO_KIND_FILE, count=1))
    reply = stub.Allocate(
        pb.AllocateRequest(owner="vm", kind=pb.FOLIO_KIND_HUGETLB, order=18, count=1)
    )
    info = stub.GetFolio(pb.GetFolioRequest(handle=reply.first_handle))
    assert info.order == 18 and info.pfn == 262_144  # the first 1 GiB is no longer whole
    assert stub.GetMeminfo(pb.GetMeminfoRequest()).hugetlb_bytes == 1 << 30
    with pytest.raises(grpc.RpcError) as err:
        stub.Allocate(pb.AllocateRequest(owner="vm", kind=pb.FOLIO_KIND_HUGETLB, order=18, count=1))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stub.Free(pb.FreeRequest(handles=[reply.first_handle]))
    assert stub.GetBuddyInfo(pb.GetBuddyInfoRequest()).free_blocks[10] == 512 - 1


def test_machine_info_reports_kernel_watermarks(make_server: ServerFactory) -> None:
    """Watermarks follow calculate_min_free_kbytes and __setup_per_zone_wmarks for 4 GiB."""
    server = make_server(ram=4 << 30, debug_checks=False)
    _, stub = connect(server)
    info = stub.GetMachine(pb.GetMachineRequest(machine="host"))
    assert (info.name, info.nr_pages, info.page_size_bytes, info.max_order) == (
        "host",
        1 << 20,
        4096,
        10,
    )
    marks = info.watermarks
    # min_free_kbytes = isqrt(16 * 4194304) = 8192; min = 2048 pages;
    # delta = max(2048 / 4, 1048576 * 10 / 10000) = 1048; low = 3096; high = 4144.
    assert (marks.min_free_kbytes, marks.nr_min, marks.nr_low, marks.nr_high) == (
        8192,
        2048,
        3096,
        4144,
    )
    assert not info.below_low_watermark


def test_meminfo_and_vmstat_follow_allocations(stub: Stub) -> None:
    """Meminfo fields and pgalloc/pgfree move with each kind of allocation."""
    for kind, count in ((pb.FOLIO_KIND_FILE, 3), (pb.FOLIO_KIND_SLAB, 2)):
        stub.Allocate(pb.AllocateRequest(owner="k", kind=kind, order=0, count=count))
    stub.Allocate(pb.AllocateRequest(owner="k", kind=pb.FOLIO_KIND_HUGETLB, order=9, count=1))
    meminfo = stub.GetMeminfo(pb.GetMeminfoRequest())
    assert meminfo.file_pages_bytes == 3 * 4096
    assert meminfo.slab_bytes == 2 * 4096
    assert meminfo.hugetlb_bytes == 2 * MIB
    assert meminfo.mem_total_bytes == 256 * MIB
    assert meminfo.memmap_bytes == 4 * MIB  # 64 B per 4 KiB frame of 256 MiB
    assert meminfo.mem_free_bytes == 256 * MIB - (5 + 512) * 4096
    stub.ReleaseOwner(pb.ReleaseOwnerRequest(owner="k"))
    vmstat = {e.name: e.value for e in stub.GetVmstat(pb.GetVmstatRequest()).entries}
    assert vmstat["pgalloc"] == vmstat["pgfree"] == 517
    assert vmstat["nr_free_pages"] == 65_536
