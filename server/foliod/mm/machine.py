"""A simulated machine: one node, one zone, its folios, owners and counters (mm/ as a whole).

The operations here are the core's public verbs; each validates its arguments, applies all or
nothing, and raises the error tree of foliod.mm.errors. A machine is not thread-safe by itself:
callers hold ``machine.lock`` around every operation.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt

from foliod.mm.backing_dev import BackingStore
from foliod.mm.errors import (
    AddressSpaceExhausted,
    FailedPrecondition,
    FolioAlreadyFreed,
    HostCannotBack,
    InvalidArgument,
    OutOfMemory,
    TenantLimit,
    UnknownFolio,
    UnknownMachine,
    UnknownOwner,
)
from foliod.mm.filemap import PageCache, check_range
from foliod.mm.folio_store import MAX_PAGECACHE_ORDER
from foliod.mm.folio_table import (
    CHUNK_SHIFT,
    FREED,
    HVO,
    KINDS,
    PMD_MAPPED,
    FolioTable,
    Int64Array,
    OwnedFolio,
    Records,
    by_chunk,
)
from foliod.mm.huge_memory import ANON_ORDERS, HPAGE_PMD_NR, HPAGE_PMD_ORDER, ThpPolicy, ThpSetting
from foliod.mm.lru import POLICIES
from foliod.mm.memcontrol import (
    MemcgEvent,
    MemCgroup,
    TenantLimits,
    tenant_of_file,
    tenant_of_owner,
)
from foliod.mm.memmap import DescriptorSizes, ModelCost, memmap_report
from foliod.mm.memory import MmStruct
from foliod.mm.mm_types import Folio, FolioKind, check_folio_range, read_pages, write_pages
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, PUD_ORDER, Watermarks, Zone
from foliod.mm.page_writeback import DirtyLimits
from foliod.mm.readahead import DEFAULT_RA_PAGES
from foliod.mm.vmstat import MthpStat, VmEvent, VmStat, new_event_counters

HOST = "host"
MIN_RAM_BYTES = 1 << 20
MAX_RAM_BYTES = 16 << 40
MAX_FOLIOS_PER_CALL = 1 << 20
# Pages reclaim tries to free per attempt (SWAP_CLUSTER_MAX).
SWAP_CLUSTER_MAX = 32
# A name of up to 64 of these, in a tenant's namespace behind "<tenant>/" (memcontrol).
_OWNER_NAME = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,62}/)?[A-Za-z0-9._:-]{1,64}")
# Owners named so hold guests' RAM on their host: only the guests' backing may change them.
GUEST_OWNER_PREFIX = "guest:"

VALID_ORDERS: Mapping[FolioKind, tuple[int, ...]] = {
    FolioKind.ANON: ANON_ORDERS,
    FolioKind.FILE: tuple(range(HPAGE_PMD_ORDER + 1)),
    FolioKind.SLAB: tuple(range(MAX_PAGE_ORDER + 1)),
    FolioKind.PAGETABLE: tuple(range(MAX_PAGE_ORDER + 1)),
    FolioKind.HUGETLB: (HPAGE_PMD_ORDER, PUD_ORDER),
}

_PGALLOC, _PGFREE, _PGFAULT = VmEvent.PGALLOC, VmEvent.PGFREE, VmEvent.PGFAULT


class FrameBacking(Protocol):
    """What backs a guest machine's frames: the host, which faults them in on first touch."""

    def touch(self, pfn: int, nr_pages: int) -> None:
        """Frames [pfn, pfn + nr_pages) are about to be used; raises OutOfMemory when the
        host cannot back them."""
        ...

    def touch_many(self, pfns: Int64Array, nr_pages: int) -> None:
        """touch(pfn, nr_pages) for every pfn, all or nothing: on OutOfMemory nothing more
        is backed than before."""
        ...


@dataclass(frozen=True, slots=True)
class Allocation:
    """What one allocate call produced: handles first_handle .. first_handle + count - 1."""

    first_handle: int
    count: int
    nr_pages: int
    folios_by_order: dict[int, int]
    nr_pagetable_pages: int


@dataclass(frozen=True, slots=True)
class Release:
    folios: int
    nr_pages: int
    nr_pagetable_pages: int = 0


@dataclass(frozen=True, slots=True)
class Meminfo:
    """Selected /proc/meminfo fields, in bytes."""

    mem_total_bytes: int
    mem_free_bytes: int
    anon_pages_bytes: int
    anon_huge_pages_bytes: int
    file_pages_bytes: int
    slab_bytes: int
    page_tables_bytes: int
    hugetlb_bytes: int
    memmap_bytes: int
    cached_bytes: int
    dirty_bytes: int
    active_file_bytes: int
    inactive_file_bytes: int
    # Writeback completes within the call that starts it: 0 between calls.
    writeback_bytes: int = 0


class Owner:
    """A named holder of folios; anon memory lives in its address space. Its folios' records
    are in the machine's FolioTable under its id; it counts them per table chunk."""

    __slots__ = ("chunks", "id", "memcg", "mm", "name", "nr_folios", "table")

    def __init__(self, name: str, owner_id: int, table: FolioTable) -> None:
        self.name = name
        self.id = owner_id
        self.table = table
        self.nr_folios = 0
        self.chunks: dict[int, int] = {}
        self.mm: MmStruct | None = None
        # The tenant its folios are charged to (memcontrol.tenant_of_owner), if any.
        self.memcg: MemCgroup | None = None

    def handles(self) -> Int64Array:
        """Handles of the owner's live folios, ascending."""
        if not self.nr_folios:
            return np.empty(0, np.int64)
        return self.table.handles_of(self.id, iter(self.chunks))

    @property
    def folios(self) -> dict[int, OwnedFolio]:
        """The owner's folios by handle (built on demand: for checks and tests)."""
        return {h: folio_view(self.table, h, self.name) for h in self.handles().tolist()}

    def count_one(self, handle: int, delta: int) -> None:
        """Counts one handle in (delta 1) or out (delta -1)."""
        self.nr_folios += delta
        index = handle >> CHUNK_SHIFT
        left = self.chunks.get(index, 0) + delta
        if left:
            self.chunks[index] = left
        else:
            del self.chunks[index]

    def count_range(self, first: int, count: int) -> None:
        """Counts in handles first .. first + count - 1."""
        self.nr_folios += count
        chunks = self.chunks
        handle, end = first, first + count
        while handle < end:
            index = handle >> CHUNK_SHIFT
            stop = min(end, (index + 1) << CHUNK_SHIFT)
            chunks[index] = chunks.get(index, 0) + stop - handle
            handle = stop

    def count(self, handles: Int64Array, delta: int) -> None:
        """Counts handles in (delta 1) or out (delta -1)."""
        self.nr_folios += delta * len(handles)
        chunks = self.chunks
        for index, where in by_chunk(handles):
            n = len(handles[where])
            left = chunks.get(index, 0) + delta * n
            if left:
                chunks[index] = left
            else:
                del chunks[index]


def folio_view(table: FolioTable, handle: int, owner: str) -> OwnedFolio:
    """One live handle's record as an OwnedFolio."""
    rec = table.records(np.array([handle], np.int64))
    flags = int(rec.flags[0])
    return OwnedFolio(
        handle=handle,
        pfn=int(rec.pfn[0]),
        order=int(rec.order[0]),
        kind=KINDS[int(rec.kind[0])],
        owner=owner,
        vaddr=int(rec.vaddr[0]),
        pmd_mapped=bool(flags & PMD_MAPPED),
        hvo=bool(flags & HVO),
    )


class OwnedFolios(Mapping[int, OwnedFolio]):
    """The machine's live owned folios by handle, read out of its FolioTable."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def __getitem__(self, handle: int) -> OwnedFolio:
        machine = self.machine
        owner_id = machine.table.owner_id(handle) if isinstance(handle, int) else 0
        if owner_id == FREED:
            raise KeyError(handle)
        return folio_view(machine.table, handle, machine.owner_by_id[owner_id].name)

    def __iter__(self) -> Iterator[int]:
        return iter(self.machine.table.live_handles().tolist())

    def __len__(self) -> int:
        return self.machine.table.nr_live


def validate_ram_bytes(ram_bytes: int, field_name: str = "ram_bytes") -> int:
    if ram_bytes % PAGE_SIZE or not MIN_RAM_BYTES <= ram_bytes <= MAX_RAM_BYTES:
        raise InvalidArgument(
            f"RAM must be a multiple of {PAGE_SIZE} bytes between {MIN_RAM_BYTES} and "
            f"{MAX_RAM_BYTES} bytes, not {ram_bytes}",
            field=field_name,
        )
    return ram_bytes >> PAGE_SHIFT


class Machine:
    """One simulated machine."""

    def __init__(
        self,
        name: str,
        ram_bytes: int,
        *,
        sizes: DescriptorSizes | None = None,
        thp: ThpPolicy | None = None,
        deposit_pgtable: bool = True,
        store: BackingStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_file_order: int = MAX_PAGECACHE_ORDER,
        ra_pages: int = DEFAULT_RA_PAGES,
        dirty_limits: DirtyLimits | None = None,
        reclaim_policy: str = "two_list",
        cache_capacity_pages: int | None = None,
    ) -> None:
        self.name = name
        self.nr_pages = validate_ram_bytes(ram_bytes)
        self.zone = Zone(self.nr_pages)
        self.sizes = sizes or DescriptorSizes()
        self.thp = thp or ThpPolicy()
        self.deposit_pgtable = deposit_pgtable
        self.lock = threading.RLock()
        self.events = new_event_counters()
        # Allocate, Free and ReleaseOwner move many blocks in one step where that takes the
        # same frames as one at a time; False makes them go one at a time (for tests).
        self.bulk = True
        self.table = FolioTable()
        self.folios = OwnedFolios(self)
        self.owners: dict[str, Owner] = {}
        self.owner_by_id: dict[int, Owner] = {}
        self.next_owner_id = 1
        # Bytes written into owned folios: handle -> page index in the folio -> page.
        self.contents: dict[int, dict[int, bytearray]] = {}
        # Allocated folios per (kind, order), page tables and page cache included.
        self.nr_folios: dict[tuple[FolioKind, int], int] = {}
        # HugeTLB folios with an optimized vmemmap, by order.
        self.nr_hvo: dict[int, int] = {}
        # A guest's frames are backed by its host (None: real RAM, always there).
        self.backing: FrameBacking | None = None
        # Frames of the pages the balloon driver holds (a guest's, handed back to its host),
        # oldest first.
        self.balloon: Int64Array = np.empty(0, np.int64)
        # Frames a snapshot booted this machine with that are neither free nor in a folio
        # (zero, other, reserved, hole runs): rows of first pfn, run kind code, order, count
        # (foliod.mm.snapshot); holes have no per-frame descriptor in the memory map.
        self.withheld: Int64Array = np.empty((0, 4), np.int64)
        self.nr_hole_pages = 0
        self.clock = clock
        policy = POLICIES.get(reclaim_policy)
        if policy is None:
            raise InvalidArgument(
                f"no reclaim policy {reclaim_policy!r} ({', '.join(POLICIES)})",
                field="reclaim_policy",
            )
        self.lru = policy(self.events)
        # Tenants' limits (shared by every machine of a server) and their memory cgroups here.
        self.tenant_limits: dict[str, TenantLimits] = {}
        self.memcgs: dict[str, MemCgroup] = {}
        self.page_cache: PageCache | None = None
        if store is not None:
            self.page_cache = PageCache(
                store, self, self.lru, self.events, clock, max_file_order, ra_pages
            )
            self.page_cache.dirtyable = lambda: self.zone.nr_free + self.nr_reclaimable
            self.page_cache.limits = dirty_limits or DirtyLimits()
            self.page_cache.capacity_pages = cache_capacity_pages
            self.page_cache.memcg_of = lambda name: self.memcg(tenant_of_file(name))

    # -- tenants (memcontrol) --------------------------------------------------------------

    def memcg(self, tenant: str | None) -> MemCgroup | None:
        """The tenant's memory cgroup on this machine, made on first use; None for no tenant."""
        if tenant is None:
            return None
        memcg = self.memcgs.get(tenant)
        if memcg is None:
            limits = self.tenant_limits.get(tenant, TenantLimits())
            memcg = self.memcgs[tenant] = MemCgroup(tenant, limits)
        return memcg

    def set_tenant_limits(self, limits: Mapping[str, TenantLimits]) -> None:
        """Replaces every tenant's limits (a tenant left out has none); usage over a lowered
        memory.max is trimmed at the end of the next call (enforce_memcg_limits)."""
        new = dict(limits)  # limits may be this very dict, shared with other machines
        self.tenant_limits.clear()
        self.tenant_limits.update(new)
        for name, memcg in self.memcgs.items():
            memcg.limits = new.get(name, TenantLimits())

    def enforce_memcg_limits(self) -> int:
        """Reclaims each tenant's page cache down to its memory.max; returns pages freed."""
        freed = 0
        for memcg in self.memcgs.values():
            over = memcg.nr_over
            if over and self.page_cache is not None:
                memcg.events[MemcgEvent.MAX] += 1
                freed += self.page_cache.shrink_memcg(memcg, over)
        return freed

    def _try_charge(self, memcg: MemCgroup, nr_pages: int) -> None:
        """Makes room for nr_pages of new folios under the tenant's memory.max, reclaiming its
        page cache; TenantLimit, with nothing changed, when its own folios leave no room."""
        limit = memcg.limits.max_pages
        if memcg.nr_owned + nr_pages > limit:
            memcg.events[MemcgEvent.MAX] += 1
            memcg.events[MemcgEvent.OOM] += 1
            raise TenantLimit(
                f"tenant {memcg.name!r} holds {memcg.nr_owned} pages of folios and "
                f"{memcg.nr_cache} of page cache; {nr_pages} more do not fit its memory.max "
                f"of {limit} pages",
                field="bytes",
                metadata={
                    "tenant": memcg.name,
                    "memory_max_bytes": str(limit << PAGE_SHIFT),
                    "memory_current_bytes": str(memcg.nr_pages << PAGE_SHIFT),
                },
            )
        over = memcg.nr_pages + nr_pages - limit
        if over > 0 and self.page_cache is not None:
            memcg.events[MemcgEvent.MAX] += 1
            self.page_cache.shrink_memcg(memcg, over)

    # -- accounting ------------------------------------------------------------------------

    @property
    def ram_bytes(self) -> int:
        return self.nr_pages << PAGE_SHIFT

    @property
    def watermarks(self) -> Watermarks:
        return self.zone.watermarks

    @property
    def next_handle(self) -> int:
        return self.table.next_handle

    def _account(self, kind: FolioKind, order: int, delta: int) -> None:
        key = (kind, order)
        count = self.nr_folios.get(key, 0) + delta
        if count:
            self.nr_folios[key] = count
        else:
            del self.nr_folios[key]
        if kind is FolioKind.ANON and order in self.thp.nr_anon:
            self.thp.nr_anon[order] += delta

    def account(self, kind: FolioKind, order: int, delta: int) -> None:
        """Counts delta folios of (kind, order) in or out (for the bulk unmap helper)."""
        self._account(kind, order, delta)

    def nr_pages_of(self, kind: FolioKind) -> int:
        return sum(n << order for (k, order), n in self.nr_folios.items() if k is kind)

    # -- folio allocation ------------------------------------------------------------------

    def _rmqueue(self, order: int) -> int | None:
        zone = self.zone
        if not zone.watermark_ok(order):
            return None
        pfn = zone.rmqueue(order) if order <= MAX_PAGE_ORDER else zone.alloc_contig(order)
        if pfn is not None and self.backing is not None:
            try:
                self.backing.touch(pfn, 1 << order)
            except OutOfMemory:
                self._free_block(pfn, order)
                raise
        return pfn

    def _free_block(self, pfn: int, order: int) -> None:
        if order <= MAX_PAGE_ORDER:
            self.zone.free_one_page(pfn, order)
        else:
            self.zone.free_contig(pfn, order)

    def _alloc_pfn(self, order: int) -> int:
        """Takes a 2^order block above the min watermark, reclaiming page cache directly when
        there is none (__alloc_pages_slowpath); wakes kswapd below the low watermark.
        Counts pgalloc, not the folio (the caller accounts it). Raises OutOfMemory when
        reclaim can free nothing more."""
        pfn = self._rmqueue(order)
        while pfn is None:
            if self.page_cache is None or not self.lru.nr_pages:
                raise self._out_of_memory(order)
            self.events[VmEvent.ALLOCSTALL] += 1
            if not self.lru.shrink(max(SWAP_CLUSTER_MAX, 1 << order), self.page_cache, direct=True):
                raise self._out_of_memory(order)
            pfn = self._rmqueue(order)
        self.events[_PGALLOC] += 1 << order
        zone = self.zone
        if zone.nr_free < zone.watermarks.nr_low and self.page_cache is not None:
            # kswapd, run in line: reclaim until free memory is back above high.
            self.lru.shrink(zone.watermarks.nr_high - zone.nr_free, self.page_cache, direct=False)
        return pfn

    def _alloc_folio(self, order: int, kind: FolioKind) -> Folio:
        """A folio object (page cache, page tables) from _alloc_pfn."""
        pfn = self._alloc_pfn(order)
        self._account(kind, order, 1)
        return Folio(pfn, order, kind)

    def _bulk_ok(self, order: int, count: int, nr_pages: int) -> bool:
        """Whether count blocks of order (nr_pages in all) can be taken in one go: as many
        single allocations in a row would neither fail nor reclaim nor wake kswapd (free
        memory stays at or above the min watermark, and the low one when there is page cache
        for kswapd to reclaim), and the free lists hold that many blocks of the order."""
        zone = self.zone
        marks = zone.watermarks
        floor = marks.nr_low if self.page_cache is not None and self.lru.nr_pages else marks.nr_min
        return (
            order <= MAX_PAGE_ORDER
            and zone.nr_free - nr_pages >= floor
            and zone.nr_obtainable(order) >= count
        )

    def _alloc_bulk(self, order: int, count: int) -> Int64Array | None:
        """count blocks of order taken as count _alloc_pfn calls in a row would take them,
        when _bulk_ok; None (nothing taken) when not, or when a guest's host cannot back
        them (the caller then goes block by block, to fail where that would)."""
        if count <= _FEW or not self.bulk or not self._bulk_ok(order, count, count << order):
            return None
        pfns = self.zone.rmqueue_bulk(order, count)
        if self.backing is not None:
            try:
                self.backing.touch_many(pfns, 1 << order)
            except OutOfMemory:
                self.zone.free_pages_bulk(pfns[::-1].copy(), np.full(count, order, np.int8))
                return None
        self.events[_PGALLOC] += count << order
        return pfns

    def alloc_cache_folio(self, order: int) -> int:
        """CacheAllocator: the frames of a page cache folio (filemap_alloc_folio), by first
        pfn. A large one is tried with one round of reclaim at most (__GFP_NORETRY): the
        caller falls back to smaller folios rather than emptying the cache for one large
        block."""
        if order:
            pfn = self._rmqueue(order)
            if pfn is None and self.page_cache is not None and self.lru.nr_pages:
                self.events[VmEvent.ALLOCSTALL] += 1
                self.lru.shrink(max(SWAP_CLUSTER_MAX, 1 << order), self.page_cache, direct=True)
                pfn = self._rmqueue(order)
            if pfn is None:
                raise self._out_of_memory(order)
            self.events[_PGALLOC] += 1 << order
        else:
            pfn = self._alloc_pfn(order)
        self._account(FolioKind.FILE, order, 1)
        return pfn

    def alloc_cache_folios(self, order: int, count: int) -> list[int] | None:
        """CacheAllocator: the frames of count page cache folios in one step where as many
        alloc_cache_folio calls would neither reclaim nor fail; else None."""
        pfns = self._alloc_bulk(order, count)
        if pfns is None:
            return None
        self._account(FolioKind.FILE, order, count)
        return cast(list[int], pfns.tolist())

    def split_cache_folio(self, pfn: int, order: int, into: Sequence[int] = ()) -> None:
        """CacheAllocator: a large page cache folio becomes folios of the orders into (base
        pages when empty) over the same frames, allocating nothing (split_huge_page, or
        folio_split's buddy pieces); the caller places or frees each one."""
        self._account(FolioKind.FILE, order, -1)
        if not into:
            self._account(FolioKind.FILE, 0, 1 << order)
        for piece in into:
            self._account(FolioKind.FILE, piece, 1)
        if order == HPAGE_PMD_ORDER:
            self.events[VmEvent.THP_SPLIT_PAGE] += 1

    def free_cache_folio(self, pfn: int, order: int) -> None:
        """CacheAllocator: returns the frames of an evicted or truncated page cache folio."""
        self._free_block(pfn, order)
        self._account(FolioKind.FILE, order, -1)
        self.events[_PGFREE] += 1 << order

    def free_cache_folios(self, pfns: list[int], orders: list[int]) -> None:
        """CacheAllocator: free_cache_folio of each in turn, the blocks through the buddy
        allocator in bulk."""
        order_array = np.array(orders, np.int8)
        self._free_pfns(np.array(pfns, np.int64), order_array)
        for order, n in zip(*np.unique(order_array, return_counts=True), strict=True):
            self._account(FolioKind.FILE, int(order), -int(n))

    def recycle_cache_frames(self, nr: int) -> None:
        """CacheAllocator: nr base-page frames went from evicted folios straight to new ones,
        as the per-CPU page list hands back the frame freed last; the buddy lists and the
        folio counts are unchanged, the free and the allocation are counted."""
        self.events[_PGFREE] += nr
        self.events[_PGALLOC] += nr

    @property
    def nr_reclaimable(self) -> int:
        """Pages reclaim could free: the page cache on the file LRU lists."""
        return self.lru.nr_pages

    def _free_folio(self, folio: Folio) -> None:
        self._free_block(folio.pfn, folio.order)
        self._account(folio.kind, folio.order, -1)
        self.events[_PGFREE] += folio.nr_pages
        folio.contents = None

    def _out_of_memory(self, order: int) -> OutOfMemory:
        zone = self.zone
        largest = max((o for o, area in enumerate(zone.free_area) if area), default=-1)
        why = (
            f"reclaim could free nothing more ({self.lru.nr_pages} page cache pages, all busy)"
            if self.lru.nr_pages
            else "nothing is reclaimable"
        )
        return OutOfMemory(
            f"cannot allocate an order-{order} folio ({PAGE_SIZE << order} bytes) on machine "
            f"{self.name!r}: {zone.nr_free} pages free, min watermark {zone.watermarks.nr_min} "
            f"pages, largest free block order {largest}; {why}",
            field="order",
            metadata={
                "order": str(order),
                "nr_free_pages": str(zone.nr_free),
                "nr_min_pages": str(zone.watermarks.nr_min),
                "largest_free_order": str(largest),
            },
        )

    def alloc_pagetable(self) -> Folio:
        """TableAllocator: one order-0 page-table page (pagetable_alloc)."""
        return self._alloc_folio(0, FolioKind.PAGETABLE)

    def free_pagetable(self, table: Folio) -> None:
        """TableAllocator: returns a page-table page (pagetable_free)."""
        self._free_folio(table)

    def _fault_anon(self, vpage: int, end: int, madvised: bool) -> tuple[int, int]:
        """Faults in one anon folio at vpage: the largest enabled order that fits aligned,
        falling back order by order to a single page (alloc_anon_folio). Returns its pfn
        and order."""
        self.events[_PGFAULT] += 1
        thp = self.thp
        for order in thp.allowable_orders(madvised):
            if vpage & ((1 << order) - 1) or vpage + (1 << order) > end:
                continue
            try:
                pfn = self._alloc_pfn(order)
            except OutOfMemory:
                thp.count(order, MthpStat.ANON_FAULT_FALLBACK)
                if order == HPAGE_PMD_ORDER:
                    self.events[VmEvent.THP_FAULT_FALLBACK] += 1
                continue
            self._count_large_fault(order)
            return pfn, order
        return self._alloc_pfn(0), 0

    def _count_large_fault(self, order: int, count: int = 1) -> None:
        """Counts large anon folios faulted in (anon_fault_alloc, thp_fault_alloc)."""
        if order:
            self.thp.stats[order][MthpStat.ANON_FAULT_ALLOC] += count
            if order == HPAGE_PMD_ORDER:
                self.events[VmEvent.THP_FAULT_ALLOC] += count

    def _validate_allocate(
        self,
        owner: str,
        kind: FolioKind,
        order: int | None,
        count: int,
        nr_bytes: int,
        *,
        madvised: bool,
    ) -> tuple[int | None, int]:
        """Checks an allocate request; returns (order or None for mTHP choice, pages)."""
        check_owner_name(owner)
        if not isinstance(kind, FolioKind) or kind not in VALID_ORDERS:
            raise InvalidArgument(
                "kind must be anon, file, slab, pagetable or hugetlb", field="kind"
            )
        if (count > 0) == (nr_bytes > 0) or count < 0 or nr_bytes < 0:
            raise InvalidArgument("set exactly one of count and bytes, positive", field="count")
        if order is not None and order not in VALID_ORDERS[kind]:
            orders = ", ".join(map(str, VALID_ORDERS[kind]))
            raise InvalidArgument(
                f"order {order} is not valid for {kind} folios (valid: {orders})", field="order"
            )
        if order is None and not (kind is FolioKind.ANON and nr_bytes):
            order = VALID_ORDERS[kind][0]
        unit = PAGE_SIZE << (order or 0)
        if nr_bytes:
            if nr_bytes % unit:
                raise InvalidArgument(
                    f"bytes ({nr_bytes}) must be a multiple of the folio size ({unit})",
                    field="bytes",
                )
            count = nr_bytes // unit
        nr_pages = count * (unit >> PAGE_SHIFT)
        if order is None and nr_pages <= self.nr_pages:
            # The folios the mTHP knobs make of the mapping when nothing falls back.
            count = predict_anon_folios(nr_pages, self.thp.allowable_orders(madvised))
        if count > MAX_FOLIOS_PER_CALL:
            raise InvalidArgument(
                f"at most {MAX_FOLIOS_PER_CALL} folios per call, not {count}", field="count"
            )
        if nr_pages > self.nr_pages:
            raise InvalidArgument(
                f"{nr_pages} pages asked for, machine {self.name!r} has {self.nr_pages}",
                field="bytes" if nr_bytes else "count",
            )
        return order, nr_pages

    def allocate(
        self,
        owner: str,
        kind: FolioKind,
        *,
        order: int | None = None,
        count: int = 0,
        nr_bytes: int = 0,
        madvise_hugepage: bool = False,
        hvo: bool = False,
        guest_ram: bool = False,
        pmd_align: bool = True,
    ) -> Allocation:
        """Allocates count folios of one order, or nr_bytes of memory, for an owner.

        Anon memory is one new mapping in the owner's address space, faulted in from its start;
        its folio orders follow the mTHP knobs unless an order is given. HugeTLB folios may have
        their vmemmap optimized (hvo). All or nothing. pmd_align=False places an anon mapping
        of 2 MiB or more as several small ones in a row would be: unaligned (a guest's host
        backing, granule by granule).
        """
        order, nr_pages = self._validate_allocate(
            owner, kind, order, count, nr_bytes, madvised=madvise_hugepage
        )
        self._check_guest_ram(owner, guest_ram)
        if madvise_hugepage and kind is not FolioKind.ANON:
            raise InvalidArgument(
                "madvise_hugepage applies to anon mappings only", field="madvise_hugepage"
            )
        if hvo and kind is not FolioKind.HUGETLB:
            raise InvalidArgument("hvo applies to hugetlb folios only", field="hvo")
        if nr_pages > self.zone.nr_free + self.nr_reclaimable - self.zone.watermarks.nr_min:
            raise self._out_of_memory(order or 0)
        holder = self.owners.get(owner)
        if holder is None:
            holder = Owner(owner, self.next_owner_id, self.table)
            holder.memcg = self.memcg(tenant_of_owner(owner))
        if holder.memcg is not None:
            self._try_charge(holder.memcg, nr_pages)
        mm_before = holder.mm
        next_vpage_before = mm_before.next_vpage if mm_before is not None else 0
        made = _Made()
        nr_tables = 0
        try:
            if kind is FolioKind.ANON:
                nr_tables = self._populate_anon(
                    holder, order, nr_pages, madvise_hugepage, made, pmd_align=pmd_align
                )
            else:
                assert order is not None
                self._populate(order, nr_pages >> order, made)
        except (AddressSpaceExhausted, HostCannotBack):
            self._unwind(holder, made, mm_before, next_vpage_before)
            raise
        except OutOfMemory as exc:
            self._unwind(holder, made, mm_before, next_vpage_before)
            # Describe the machine as the caller finds it: after the rollback.
            raise self._out_of_memory(int(exc.metadata["order"])) from None
        if holder.id == self.next_owner_id:
            self.next_owner_id += 1
            self.owners[owner] = holder
            self.owner_by_id[holder.id] = holder
        if holder.memcg is not None:
            holder.memcg.nr_owned += nr_pages
        if made.few():
            return self._record_few(holder, kind, made, nr_pages, nr_tables, hvo=hvo)
        pfns, orders, vaddrs, flags = made.columns()
        if hvo:
            assert order is not None
            flags |= HVO
            self.nr_hvo[order] = self.nr_hvo.get(order, 0) + len(pfns)
        first = self.table.append(
            pfns,
            orders,
            kind,
            holder.id,
            vaddr=vaddrs if kind is FolioKind.ANON else None,
            flags=flags,
        )
        holder.count_range(first, len(pfns))
        low, high = int(orders.min()), int(orders.max())
        if low == high:
            by_order = {low: len(orders)}
        else:
            by_order = {
                int(o): int(n) for o, n in zip(*np.unique(orders, return_counts=True), strict=True)
            }

        for folio_order, n in by_order.items():
            self._account(kind, folio_order, n)
        return Allocation(first, len(pfns), nr_pages, by_order, nr_tables)

    def _record_few(
        self,
        holder: Owner,
        kind: FolioKind,
        made: _Made,
        nr_pages: int,
        nr_tables: int,
        *,
        hvo: bool,
    ) -> Allocation:
        """allocate()'s records for a few folios, without arrays."""
        table = self.table
        first = table.next_handle
        by_order: dict[int, int] = {}
        for pfn, order, vaddr, flags in made.one:
            handle = table.append_one(
                pfn, order, kind, holder.id, vaddr=vaddr, flags=flags | (HVO if hvo else 0)
            )
            holder.count_one(handle, 1)
            by_order[order] = by_order.get(order, 0) + 1
        for order, n in by_order.items():
            self._account(kind, order, n)
            if hvo:
                self.nr_hvo[order] = self.nr_hvo.get(order, 0) + n
        return Allocation(first, len(made.one), nr_pages, by_order, nr_tables)

    def _populate(self, order: int, count: int, made: _Made) -> None:
        """Takes count blocks of order into made: in one go where _bulk_ok, else one by one."""
        pfns = self._alloc_bulk(order, count)
        if pfns is not None:
            made.add(pfns, order)
            return
        for _ in range(count):
            made.add_one(self._alloc_pfn(order), order)

    def _populate_anon(
        self,
        holder: Owner,
        order: int | None,
        nr_pages: int,
        madvised: bool,
        made: _Made,
        *,
        pmd_align: bool,
    ) -> int:
        """Faults in a new mapping of nr_pages from its start; returns page-table pages made.

        Where every fault in the rest of a PTE table would take one order (an order is given,
        or no mTHP order is enabled) the first fault goes as usual and the rest of the table
        in one bulk step, which takes the same frames as the faults would one by one."""
        if holder.mm is None:
            holder.mm = MmStruct(holder.name, deposit_pgtable=self.deposit_pgtable)
        mm = holder.mm
        vpage = mm.get_unmapped_area(nr_pages, 1 << (order or 0), pmd_align=pmd_align)
        end = vpage + nr_pages
        uniform = (
            order if order is not None else (0 if not self.thp.allowable_orders(madvised) else None)
        )
        nr_tables = 0
        while vpage < end:
            if order is None:
                pfn, folio_order = self._fault_anon(vpage, end, madvised)
            else:
                self.events[_PGFAULT] += 1
                pfn, folio_order = self._alloc_pfn(order), order
                self._count_large_fault(order)
            try:
                tables, pmd_mapped = mm.map_folio(folio_order, vpage, self)
            except OutOfMemory:
                self._free_pfns(np.array([pfn], np.int64), np.array([folio_order], np.int8))
                raise
            nr_tables += tables
            made.add_one(pfn, folio_order, vpage, PMD_MAPPED if pmd_mapped else 0)
            table_end = (vpage | (HPAGE_PMD_NR - 1)) + 1
            vpage += 1 << folio_order
            if uniform is None or folio_order != uniform or pmd_mapped:
                continue
            # The rest of this PTE table: no table to allocate, every fault alike.
            rest = (min(end, table_end) - vpage) >> uniform
            pfns = self._alloc_bulk(uniform, rest) if rest > 1 else None
            if pfns is None:
                continue
            self.events[_PGFAULT] += rest
            self._count_large_fault(uniform, rest)
            mm.map_entries(vpage, rest << uniform)
            made.add(pfns, uniform, vpage)
            vpage += rest << uniform
        return nr_tables

    def _unwind(
        self,
        holder: Owner,
        made: _Made,
        mm_before: MmStruct | None,
        next_vpage_before: int,
    ) -> None:
        """Frees the folios of a failed allocate call, leaving the machine as it was."""
        pfns, orders, vaddrs, flags = made.columns()
        if holder.mm is not None:
            self._unmap_and_free(holder.mm, pfns[::-1], orders[::-1], vaddrs[::-1], flags[::-1])
        else:
            self._free_pfns(pfns[::-1].copy(), orders[::-1].copy())
        if holder.mm is not None:
            if mm_before is None:
                holder.mm.release_pgd(self)
            holder.mm.next_vpage = next_vpage_before
        holder.mm = mm_before

    def _free_pfns(self, pfns: Int64Array, orders: npt.NDArray[np.int8]) -> None:
        """Returns blocks to the buddy allocator, in order, counting pgfree."""
        if self.bulk:
            self.zone.free_pages_bulk(pfns, orders)
        else:
            for pfn, order in zip(pfns.tolist(), orders.tolist(), strict=True):
                self._free_block(pfn, order)
        self.events[_PGFREE] += int((np.int64(1) << orders.astype(np.int64)).sum())

    def _unmap_and_free(
        self,
        mm: MmStruct,
        pfns: Int64Array,
        orders: npt.NDArray[np.int8],
        vaddrs: Int64Array,
        flags: npt.NDArray[np.uint8],
    ) -> int:
        """Unmaps (where mapped) and frees folios in turn, as one unmap and free each would,
        page tables freed at the point they empty; returns page-table pages freed.

        Runs of PTE-mapped folios in one table are unmapped together: only the last can
        empty the table, so its tables are freed just before that last folio is."""
        n = len(pfns)
        if not n:
            return 0
        mapped = vaddrs >= 0
        pmd = (flags & PMD_MAPPED) != 0
        table_of = np.where(pmd, -2, np.where(mapped, vaddrs >> 9, -1))
        # A run ends where the table changes, and after every PMD mapping.
        breaks = np.flatnonzero((table_of[1:] != table_of[:-1]) | pmd[:-1]) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = [*starts[1:], n]
        recorder = _TableFrees(self)
        # The free sequence, as Python lists: runs are short where folios are large.
        pfn_list, order_list = pfns.tolist(), orders.tolist()
        pages = (np.int64(1) << orders.astype(np.int64)).tolist()
        vaddr_list, pmd_list, mapped_list = vaddrs.tolist(), pmd.tolist(), mapped.tolist()
        seq_pfns: list[int] = []
        seq_orders: list[int] = []
        for start, stop in zip(starts, ends, strict=True):
            if not mapped_list[start]:
                seq_pfns += pfn_list[start:stop]
                seq_orders += order_list[start:stop]
                continue
            seq_pfns += pfn_list[start : stop - 1]
            seq_orders += order_list[start : stop - 1]
            is_pmd = pmd_list[start]
            entries = 1 if is_pmd else sum(pages[start:stop])
            mm.unmap_pages(vaddr_list[start], entries, is_pmd, recorder)
            if recorder.pfns:
                seq_pfns += recorder.pfns
                seq_orders += [0] * len(recorder.pfns)
                recorder.pfns.clear()
            seq_pfns.append(pfn_list[stop - 1])
            seq_orders.append(order_list[stop - 1])
        self._free_pfns(np.array(seq_pfns, np.int64), np.array(seq_orders, np.int8))
        return recorder.nr_freed

    # -- freeing ---------------------------------------------------------------------------

    def lookup(self, handle: int, field_name: str = "handle") -> OwnedFolio:
        owner_id = self.table.owner_id(handle)
        if owner_id != FREED:
            return folio_view(self.table, handle, self.owner_by_id[owner_id].name)
        raise self._no_folio(handle, field_name)

    def _no_folio(self, handle: int, field_name: str) -> FolioAlreadyFreed | UnknownFolio:
        if 0 < handle < self.next_handle:
            return FolioAlreadyFreed(
                f"folio {handle} on machine {self.name!r} was already freed", field=field_name
            )
        return UnknownFolio(f"no folio {handle} on machine {self.name!r}", field=field_name)

    def _check_guest_ram(self, owner: str, guest_ram: bool) -> None:
        if owner.startswith(GUEST_OWNER_PREFIX) and not guest_ram:
            raise FailedPrecondition(
                f"owner {owner!r} holds a guest's RAM: only the guest (its balloon, free page "
                "reporting, DestroyGuest) can change it",
                field="owner",
            )

    def free(self, handles: Sequence[int] | Int64Array, *, guest_ram: bool = False) -> Release:
        """Frees folios by handle; one bad handle rejects the whole request."""
        if not len(handles):
            raise InvalidArgument("name at least one handle", field="handles")
        if len(handles) > MAX_FOLIOS_PER_CALL:
            raise InvalidArgument(
                f"at most {MAX_FOLIOS_PER_CALL} handles per call, not {len(handles)}",
                field="handles",
            )
        if len(handles) <= _FEW:
            return self._free_few([int(h) for h in handles], guest_ram)
        wanted = np.asarray(handles)
        if wanted.dtype != np.int64:
            if len(wanted) and (int(wanted.min()) < 0 or int(wanted.max()) >= 1 << 62):
                bad = next(h for h in handles if not 0 <= h < 1 << 62)
                raise self._no_folio(int(bad), "handles")
            wanted = wanted.astype(np.int64)
        owner_ids = self.table.owner_ids(wanted)
        dead = np.flatnonzero(owner_ids == FREED)
        if len(dead):
            raise self._no_folio(int(wanted[dead[0]]), "handles")
        if len(np.unique(wanted)) != len(wanted):
            raise InvalidArgument("a handle is named twice", field="handles")
        ids, first_seen = np.unique(owner_ids, return_index=True)
        holders = [self.owner_by_id[int(i)] for i in ids[np.argsort(first_seen)]]
        for holder in holders:
            self._check_guest_ram(holder.name, guest_ram)
        recs = self.table.records(wanted)
        nr_tables = 0
        if len(holders) == 1 and holders[0].mm is not None:
            nr_tables = self._unmap_and_free(
                holders[0].mm, recs.pfn, recs.order, recs.vaddr, recs.flags
            )
        elif any(h.mm is not None for h in holders):
            nr_tables = self._release_mixed(holders, recs)
        else:
            self._free_pfns(recs.pfn, recs.order)
        self._forget(recs, holders)
        for holder in holders:
            if not holder.nr_folios and holder.mm is None:
                self._drop_owner(holder)
        return Release(len(recs), recs.nr_pages + nr_tables, nr_tables)

    def _free_few(self, handles: list[int], guest_ram: bool) -> Release:
        """free() of a few handles, one at a time and without arrays (the same steps)."""
        table = self.table
        owner_ids = []
        for handle in handles:
            owner_id = table.owner_id(handle)
            if owner_id == FREED:
                raise self._no_folio(handle, "handles")
            owner_ids.append(owner_id)
        if len(handles) > 1 and len(set(handles)) != len(handles):
            raise InvalidArgument("a handle is named twice", field="handles")
        by_id = self.owner_by_id
        holders = [by_id[i] for i in dict.fromkeys(owner_ids)]
        for holder in holders:
            if holder.name.startswith(GUEST_OWNER_PREFIX):
                self._check_guest_ram(holder.name, guest_ram)
        nr_pages = nr_tables = 0
        for handle in handles:
            pfn, vaddr, owner_id, order, kind_code, flags = table.record(handle)
            holder = by_id[owner_id]
            if vaddr >= 0 and holder.mm is not None:
                nr_tables += holder.mm.unmap_folio(vaddr, order, bool(flags & PMD_MAPPED), self)
            self._free_block(pfn, order)
            self.events[_PGFREE] += 1 << order
            nr_pages += 1 << order
            if holder.memcg is not None:
                holder.memcg.nr_owned -= 1 << order
            table.remove_one(handle)
            holder.count_one(handle, -1)
            if self.contents:
                self.contents.pop(handle, None)
            if flags & HVO:
                self.nr_hvo[order] -= 1
            self._account(KINDS[kind_code], order, -1)
        for holder in holders:
            if not holder.nr_folios and holder.mm is None:
                self._drop_owner(holder)
        return Release(len(handles), nr_pages + nr_tables, nr_tables)

    def _release_mixed(self, holders: list[Owner], recs: Records) -> int:
        """Frees folios of several owners, some with address spaces, in request order."""
        nr_tables = 0
        by_id = {h.id: h for h in holders}
        run_start = 0
        owner = recs.owner
        n = len(recs)
        while run_start < n:
            holder = by_id[int(owner[run_start])]
            stop = run_start + 1
            while stop < n and owner[stop] == owner[run_start]:
                stop += 1
            part = slice(run_start, stop)
            if holder.mm is not None:
                nr_tables += self._unmap_and_free(
                    holder.mm, recs.pfn[part], recs.order[part], recs.vaddr[part], recs.flags[part]
                )
            else:
                self._free_pfns(recs.pfn[part], recs.order[part])
            run_start = stop
        return nr_tables

    def _forget(self, recs: Records, holders: list[Owner]) -> None:
        """Takes freed folios out of the table, the counts and their owners."""
        self.table.remove(recs.handles)
        if self.contents:
            for handle in recs.handles[np.isin(recs.handles, list(self.contents))].tolist():
                del self.contents[handle]
        hvo = (recs.flags & HVO) != 0
        if hvo.any():
            for o, n in zip(*np.unique(recs.order[hvo], return_counts=True), strict=True):
                self.nr_hvo[int(o)] -= int(n)
        keys = recs.kind.astype(np.int16) * 64 + recs.order
        for key, n in zip(*np.unique(keys, return_counts=True), strict=True):
            self._account(KINDS[int(key) // 64], int(key) % 64, -int(n))
        for holder in holders:
            is_mine = recs.owner == holder.id
            holder.count(recs.handles[is_mine], -1)
            if holder.memcg is not None:
                orders = recs.order[is_mine].astype(np.int64)
                holder.memcg.nr_owned -= int(np.left_shift(1, orders).sum())

    def _drop_owner(self, holder: Owner) -> None:
        del self.owners[holder.name]
        del self.owner_by_id[holder.id]

    def release_owner(self, owner: str, *, guest_ram: bool = False) -> Release:
        """Frees everything an owner holds, its page tables included, and forgets it."""
        check_owner_name(owner)
        self._check_guest_ram(owner, guest_ram)
        holder = self.owners.get(owner)
        if holder is None:
            raise UnknownOwner(f"no owner {owner!r} on machine {self.name!r}", field="owner")
        recs = self.table.records(holder.handles())
        nr_tables = 0
        if holder.mm is not None:
            nr_tables = self._unmap_and_free(
                holder.mm, recs.pfn, recs.order, recs.vaddr, recs.flags
            )
            nr_tables += holder.mm.release_pgd(self)
        else:
            self._free_pfns(recs.pfn, recs.order)
        self._forget(recs, [holder])
        self._drop_owner(holder)
        return Release(len(recs) + nr_tables, recs.nr_pages + nr_tables, nr_tables)

    # -- contents --------------------------------------------------------------------------

    def folio_write(self, handle: int, offset: int, data: bytes) -> int:
        folio = self.lookup(handle)
        check_range(offset, len(data), "data")
        check_folio_range(handle, folio.size_bytes, offset, len(data), "offset")
        write_pages(self.contents.setdefault(handle, {}), offset, data)
        return len(data)

    def folio_read(self, handle: int, offset: int, length: int) -> bytes:
        folio = self.lookup(handle)
        check_range(offset, length, "length")
        check_folio_range(handle, folio.size_bytes, offset, length, "length")
        return read_pages(self.contents.get(handle), offset, length)

    # -- page cache ------------------------------------------------------------------------

    @property
    def files(self) -> PageCache:
        """The machine's page cache and files; FailedPrecondition when it has no store."""
        if self.page_cache is None:
            raise FailedPrecondition(
                f"machine {self.name!r} has no backing store for files", field="machine"
            )
        return self.page_cache

    def reclaim(self, nr_bytes: int) -> int:
        """Reclaims page cache on demand, like memory.reclaim; returns bytes freed."""
        if nr_bytes <= 0 or nr_bytes % PAGE_SIZE:
            raise InvalidArgument(
                f"bytes must be a positive multiple of {PAGE_SIZE}, not {nr_bytes}", field="bytes"
            )
        pages = nr_bytes >> PAGE_SHIFT
        return self.lru.shrink(pages, self.files, direct=False) << PAGE_SHIFT

    def drop_caches(self) -> int:
        """Frees clean page cache (echo 1 > /proc/sys/vm/drop_caches); returns bytes freed."""
        return self.files.drop_caches() << PAGE_SHIFT

    # -- reports ---------------------------------------------------------------------------

    def memmap(self) -> tuple[ModelCost, ...]:
        return memmap_report(
            self.nr_pages - self.nr_hole_pages,
            self.zone.nr_free,
            self.nr_folios,
            self.sizes,
            PAGE_SIZE,
            hvo_folios=self.nr_hvo,
        )

    # -- balloon (the guest side of virtio_balloon) -----------------------------------------

    def balloon_inflate(self, nr_pages: int) -> Int64Array:
        """Takes nr_pages base pages for the balloon (balloon_page_alloc); all or nothing:
        when free and reclaimable memory above the min watermark cannot cover them, nothing
        is reclaimed or taken. Returns their frames, for the host to drop their backing."""
        if nr_pages > self.zone.nr_free + self.nr_reclaimable - self.zone.watermarks.nr_min:
            raise self._out_of_memory(0)
        # The driver never writes its pages: taking them does not make the host back them.
        backing, self.backing = self.backing, None
        made = _Made()
        try:
            self._populate(0, nr_pages, made)
        except OutOfMemory:
            pfns = made.columns()[0]
            self._free_pfns(pfns[::-1].copy(), np.zeros(len(pfns), np.int8))
            raise self._out_of_memory(0) from None
        finally:
            self.backing = backing
        taken = made.columns()[0]
        self._account(FolioKind.BALLOON, 0, len(taken))
        self.balloon = np.concatenate((self.balloon, taken))
        self.events[VmEvent.BALLOON_INFLATE] += nr_pages
        return taken

    def balloon_deflate(self, nr_pages: int) -> list[int]:
        """Gives the nr_pages most recently ballooned pages back to the buddy allocator, the
        newest first; returns their frames."""
        if not 0 <= nr_pages <= len(self.balloon):
            raise InvalidArgument(
                f"the balloon holds {len(self.balloon)} pages, cannot deflate {nr_pages}",
                field="size_bytes",
            )
        keep = len(self.balloon) - nr_pages
        pfns = self.balloon[keep:][::-1].copy()
        self.balloon = self.balloon[:keep].copy()
        self._free_pfns(pfns, np.zeros(nr_pages, np.int8))
        self._account(FolioKind.BALLOON, 0, -nr_pages)
        self.events[VmEvent.BALLOON_DEFLATE] += nr_pages
        return cast(list[int], pfns.tolist())

    def meminfo(self) -> Meminfo:
        pmd_anon = self.nr_folios.get((FolioKind.ANON, HPAGE_PMD_ORDER), 0) << HPAGE_PMD_ORDER
        return Meminfo(
            mem_total_bytes=self.ram_bytes,
            mem_free_bytes=self.zone.nr_free << PAGE_SHIFT,
            anon_pages_bytes=self.nr_pages_of(FolioKind.ANON) << PAGE_SHIFT,
            anon_huge_pages_bytes=pmd_anon << PAGE_SHIFT,
            file_pages_bytes=self.nr_pages_of(FolioKind.FILE) << PAGE_SHIFT,
            slab_bytes=self.nr_pages_of(FolioKind.SLAB) << PAGE_SHIFT,
            page_tables_bytes=self.nr_pages_of(FolioKind.PAGETABLE) << PAGE_SHIFT,
            hugetlb_bytes=self.nr_pages_of(FolioKind.HUGETLB) << PAGE_SHIFT,
            memmap_bytes=(self.nr_pages - self.nr_hole_pages) * self.sizes.struct_page_bytes,
            cached_bytes=(self.page_cache.nr_pages if self.page_cache else 0) << PAGE_SHIFT,
            dirty_bytes=(self.page_cache.nr_dirty if self.page_cache else 0) << PAGE_SHIFT,
            active_file_bytes=self.lru.nr_active << PAGE_SHIFT,
            inactive_file_bytes=self.lru.nr_inactive << PAGE_SHIFT,
        )

    def vmstat(self) -> dict[str, int]:
        """State counters then event counters, by their kernel names."""
        state = {
            VmStat.NR_FREE_PAGES: self.zone.nr_free,
            VmStat.NR_ANON_PAGES: self.nr_pages_of(FolioKind.ANON),
            VmStat.NR_ANON_TRANSPARENT_HUGEPAGES: self.nr_folios.get(
                (FolioKind.ANON, HPAGE_PMD_ORDER), 0
            ),
            VmStat.NR_INACTIVE_FILE: self.lru.nr_inactive,
            VmStat.NR_ACTIVE_FILE: self.lru.nr_active,
            VmStat.NR_FILE_PAGES: self.nr_pages_of(FolioKind.FILE),
            VmStat.NR_DIRTY: self.page_cache.nr_dirty if self.page_cache else 0,
            VmStat.NR_WRITEBACK: 0,
            VmStat.NR_SLAB_UNRECLAIMABLE: self.nr_pages_of(FolioKind.SLAB),
            VmStat.NR_PAGE_TABLE_PAGES: self.nr_pages_of(FolioKind.PAGETABLE),
        }
        return {
            **{str(k): v for k, v in state.items()},
            **{str(k): v for k, v in self.events.items()},
        }

    def set_thp(self, enabled: ThpSetting | None, sizes: Mapping[int, ThpSetting]) -> None:
        self.thp.update(enabled, sizes)


def predict_anon_folios(nr_pages: int, orders: Sequence[int]) -> int:
    """Folios a new anon mapping of nr_pages is faulted in as when no allocation falls back:
    the largest enabled order (largest first in orders) that fits, from a start aligned to
    them all (mappings of HPAGE_PMD_NR pages or more are PMD-aligned; smaller ones make
    fewer folios than pages in any case)."""
    count, rest = 0, nr_pages
    for order in orders:
        count += rest >> order
        rest &= (1 << order) - 1
    return count + rest


# Calls on this many folios or fewer go without numpy: its per-call cost is larger.
_FEW = 16


class _Made:
    """The folios an allocate call has made so far, in order, as columns."""

    __slots__ = ("flags", "one", "orders", "pfns", "vaddrs")

    def __init__(self) -> None:
        self.pfns: list[Int64Array] = []
        self.orders: list[npt.NDArray[np.int8]] = []
        self.vaddrs: list[Int64Array] = []
        self.flags: list[npt.NDArray[np.uint8]] = []
        # Single folios not yet flushed into the lists: (pfn, order, vaddr, flags).
        self.one: list[tuple[int, int, int, int]] = []

    def few(self) -> bool:
        """Whether only a few single folios were made (recorded without arrays)."""
        return not self.pfns and len(self.one) <= _FEW

    def add_one(self, pfn: int, order: int, vaddr: int = -1, flags: int = 0) -> None:
        self.one.append((pfn, order, vaddr, flags))

    def _flush(self) -> None:
        if self.one:
            pfns, orders, vaddrs, flags = zip(*self.one, strict=True)
            self.pfns.append(np.array(pfns, np.int64))
            self.orders.append(np.array(orders, np.int8))
            self.vaddrs.append(np.array(vaddrs, np.int64))
            self.flags.append(np.array(flags, np.uint8))
            self.one.clear()

    def add(self, pfns: Int64Array, order: int, vpage: int | None = None) -> None:
        self._flush()
        n = len(pfns)
        self.pfns.append(pfns)
        self.orders.append(np.full(n, order, np.int8))
        if vpage is None:
            self.vaddrs.append(np.full(n, -1, np.int64))
        else:
            self.vaddrs.append(vpage + (np.arange(n, dtype=np.int64) << order))
        self.flags.append(np.zeros(n, np.uint8))

    def columns(
        self,
    ) -> tuple[Int64Array, npt.NDArray[np.int8], Int64Array, npt.NDArray[np.uint8]]:
        self._flush()
        if not self.pfns:
            return (
                np.empty(0, np.int64),
                np.empty(0, np.int8),
                np.empty(0, np.int64),
                np.empty(0, np.uint8),
            )
        if len(self.pfns) > 1:
            self.pfns = [np.concatenate(self.pfns)]
            self.orders = [np.concatenate(self.orders)]
            self.vaddrs = [np.concatenate(self.vaddrs)]
            self.flags = [np.concatenate(self.flags)]
        return self.pfns[0], self.orders[0], self.vaddrs[0], self.flags[0]


class _TableFrees:
    """A TableAllocator for unmapping in bulk: records the frames of freed page tables (the
    caller frees them in sequence) and accounts them."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.pfns: list[int] = []
        self.nr_freed = 0

    def alloc_pagetable(self) -> Folio:
        raise AssertionError("unmapping allocates no page table")

    def free_pagetable(self, table: Folio) -> None:
        self.pfns.append(table.pfn)
        self.nr_freed += 1
        self.machine.account(FolioKind.PAGETABLE, 0, -1)


def check_owner_name(owner: str) -> None:
    if not _OWNER_NAME.fullmatch(owner):
        raise InvalidArgument(
            f"owner must be 1-64 characters of [A-Za-z0-9._:-] (behind '<tenant>/' in a "
            f"tenant's namespace), not {owner[:80]!r}",
            field="owner",
        )


class Machines:
    """The machines one server simulates, by name; the empty name is the host."""

    def __init__(self, host: Machine) -> None:
        self.host = host
        self.by_name: dict[str, Machine] = {host.name: host}

    def set_tenant_limits(self, limits: Mapping[str, TenantLimits]) -> None:
        """Every tenant's limits, on every machine (Machine.set_tenant_limits)."""
        for machine in self:
            with machine.lock:
                machine.set_tenant_limits(limits)

    def get(self, name: str) -> Machine:
        machine = self.by_name.get(name or self.host.name)
        if machine is None:
            raise UnknownMachine(f"no machine named {name[:80]!r}", field="machine")
        return machine

    def __iter__(self) -> Iterator[Machine]:
        return iter(list(self.by_name.values()))
