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
from dataclasses import dataclass, field
from typing import Protocol

from foliod.mm.backing_dev import BackingStore
from foliod.mm.errors import (
    AddressSpaceExhausted,
    FailedPrecondition,
    FolioAlreadyFreed,
    InvalidArgument,
    OutOfMemory,
    UnknownFolio,
    UnknownMachine,
    UnknownOwner,
)
from foliod.mm.filemap import MAX_PAGECACHE_ORDER, DirtyLimits, PageCache, check_range
from foliod.mm.huge_memory import ANON_ORDERS, HPAGE_PMD_ORDER, ThpPolicy, ThpSetting
from foliod.mm.lru import POLICIES
from foliod.mm.memmap import DescriptorSizes, ModelCost, memmap_report
from foliod.mm.memory import MmStruct
from foliod.mm.mm_types import Folio, FolioKind
from foliod.mm.page_alloc import MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, PUD_ORDER, Watermarks, Zone
from foliod.mm.readahead import DEFAULT_RA_PAGES
from foliod.mm.vmstat import MthpStat, VmEvent, VmStat, new_event_counters

HOST = "host"
MIN_RAM_BYTES = 1 << 20
MAX_RAM_BYTES = 16 << 40
MAX_FOLIOS_PER_CALL = 1 << 20
# Pages reclaim tries to free per attempt (SWAP_CLUSTER_MAX).
SWAP_CLUSTER_MAX = 32
_OWNER_NAME = re.compile(r"[A-Za-z0-9._:-]{1,64}")
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


@dataclass
class Owner:
    """A named holder of folios; anon memory lives in its address space."""

    name: str
    folios: dict[int, Folio] = field(default_factory=dict)
    mm: MmStruct | None = None


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
        self.folios: dict[int, Folio] = {}
        self.owners: dict[str, Owner] = {}
        self.next_handle = 1
        # Allocated folios per (kind, order), page tables and page cache included.
        self.nr_folios: dict[tuple[FolioKind, int], int] = {}
        # HugeTLB folios with an optimized vmemmap, by order.
        self.nr_hvo: dict[int, int] = {}
        # A guest's frames are backed by its host (None: real RAM, always there).
        self.backing: FrameBacking | None = None
        # Pages the balloon driver holds (a guest's, handed back to its host), oldest first.
        self.balloon: list[Folio] = []
        self.clock = clock
        policy = POLICIES.get(reclaim_policy)
        if policy is None:
            raise InvalidArgument(
                f"no reclaim policy {reclaim_policy!r} ({', '.join(POLICIES)})",
                field="reclaim_policy",
            )
        self.lru = policy(self.events)
        self.page_cache: PageCache | None = None
        if store is not None:
            self.page_cache = PageCache(
                store, self, self.lru, self.events, clock, max_file_order, ra_pages
            )
            self.page_cache.dirtyable = lambda: self.zone.nr_free + self.nr_reclaimable
            self.page_cache.limits = dirty_limits or DirtyLimits()
            self.page_cache.capacity_pages = cache_capacity_pages

    # -- accounting ------------------------------------------------------------------------

    @property
    def ram_bytes(self) -> int:
        return self.nr_pages << PAGE_SHIFT

    @property
    def watermarks(self) -> Watermarks:
        return self.zone.watermarks

    def __account(self, kind: FolioKind, order: int, delta: int) -> None:
        key = (kind, order)
        count = self.nr_folios.get(key, 0) + delta
        if count:
            self.nr_folios[key] = count
        else:
            del self.nr_folios[key]
        if kind is FolioKind.ANON and order in self.thp.nr_anon:
            self.thp.nr_anon[order] += delta

    def nr_pages_of(self, kind: FolioKind) -> int:
        return sum(n << order for (k, order), n in self.nr_folios.items() if k is kind)

    # -- folio allocation ------------------------------------------------------------------

    def __rmqueue(self, order: int) -> int | None:
        zone = self.zone
        if not zone.watermark_ok(order):
            return None
        pfn = zone.rmqueue(order) if order <= MAX_PAGE_ORDER else zone.alloc_contig(order)
        if pfn is not None and self.backing is not None:
            try:
                self.backing.touch(pfn, 1 << order)
            except OutOfMemory:
                self.__free_block(pfn, order)
                raise
        return pfn

    def __free_block(self, pfn: int, order: int) -> None:
        if order <= MAX_PAGE_ORDER:
            self.zone.free_one_page(pfn, order)
        else:
            self.zone.free_contig(pfn, order)

    def __alloc_folio(self, order: int, kind: FolioKind, owner: str) -> Folio:
        """Takes a 2^order block above the min watermark, reclaiming page cache directly when
        there is none (__alloc_pages_slowpath); wakes kswapd below the low watermark.
        Raises OutOfMemory when reclaim can free nothing more."""
        pfn = self.__rmqueue(order)
        while pfn is None:
            if self.page_cache is None or not self.lru.nr_pages:
                raise self.__out_of_memory(order)
            self.events[VmEvent.ALLOCSTALL] += 1
            if not self.lru.shrink(max(SWAP_CLUSTER_MAX, 1 << order), self.page_cache, True):
                raise self.__out_of_memory(order)
            pfn = self.__rmqueue(order)
        self.__account(kind, order, 1)
        self.events[_PGALLOC] += 1 << order
        zone = self.zone
        if zone.nr_free < zone.watermarks.nr_low and self.page_cache is not None:
            # kswapd, run in line: reclaim until free memory is back above high.
            self.lru.shrink(zone.watermarks.nr_high - zone.nr_free, self.page_cache, False)
        return Folio(0, pfn, order, kind, owner)

    def alloc_cache_folio(self, order: int) -> Folio:
        """CacheAllocator: a page cache folio (filemap_alloc_folio). A large one is tried
        with one round of reclaim at most (__GFP_NORETRY): the caller falls back to smaller
        folios rather than emptying the cache for one large block."""
        if order:
            pfn = self.__rmqueue(order)
            if pfn is None and self.page_cache is not None and self.lru.nr_pages:
                self.events[VmEvent.ALLOCSTALL] += 1
                self.lru.shrink(max(SWAP_CLUSTER_MAX, 1 << order), self.page_cache, True)
                pfn = self.__rmqueue(order)
            if pfn is None:
                raise self.__out_of_memory(order)
            self.__account(FolioKind.FILE, order, 1)
            self.events[_PGALLOC] += 1 << order
            return Folio(0, pfn, order, FolioKind.FILE, "")
        return self.__alloc_folio(order, FolioKind.FILE, "")

    def split_cache_folio(self, folio: Folio) -> list[Folio]:
        """CacheAllocator: splits a large page cache folio into base-page folios over the same
        frames, allocating nothing (split_huge_page); the caller places or frees each one."""
        self.__account(folio.kind, folio.order, -1)
        pages = [Folio(0, folio.pfn + i, 0, folio.kind, folio.owner) for i in range(folio.nr_pages)]
        self.__account(folio.kind, 0, len(pages))
        if folio.order == HPAGE_PMD_ORDER:
            self.events[VmEvent.THP_SPLIT_PAGE] += 1
        return pages

    def free_cache_folio(self, folio: Folio) -> None:
        """CacheAllocator: returns an evicted or truncated page cache folio."""
        self.__free_folio(folio)

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

    def __free_folio(self, folio: Folio) -> None:
        self.__free_block(folio.pfn, folio.order)
        if folio.hvo:
            self.nr_hvo[folio.order] -= 1
            folio.hvo = False
        self.__account(folio.kind, folio.order, -1)
        self.events[_PGFREE] += folio.nr_pages
        folio.contents = None

    def __out_of_memory(self, order: int) -> OutOfMemory:
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

    def alloc_pagetable(self, owner: str) -> Folio:
        """TableAllocator: one order-0 page-table page (pagetable_alloc)."""
        return self.__alloc_folio(0, FolioKind.PAGETABLE, owner)

    def free_pagetable(self, table: Folio) -> None:
        """TableAllocator: returns a page-table page (pagetable_free)."""
        self.__free_folio(table)

    def __fault_anon(self, mm: MmStruct, vpage: int, end: int, madvised: bool) -> Folio:
        """Faults in one anon folio at vpage: the largest enabled order that fits aligned,
        falling back order by order to a single page (alloc_anon_folio)."""
        self.events[_PGFAULT] += 1
        thp = self.thp
        for order in thp.allowable_orders(madvised):
            if vpage & ((1 << order) - 1) or vpage + (1 << order) > end:
                continue
            try:
                folio = self.__alloc_folio(order, FolioKind.ANON, mm.name)
            except OutOfMemory:
                thp.count(order, MthpStat.ANON_FAULT_FALLBACK)
                if order == HPAGE_PMD_ORDER:
                    self.events[VmEvent.THP_FAULT_FALLBACK] += 1
                continue
            self.__count_large_fault(order)
            return folio
        return self.__alloc_folio(0, FolioKind.ANON, mm.name)

    def __count_large_fault(self, order: int) -> None:
        """Counts a large anon folio faulted in (anon_fault_alloc, thp_fault_alloc)."""
        if order:
            self.thp.count(order, MthpStat.ANON_FAULT_ALLOC)
            if order == HPAGE_PMD_ORDER:
                self.events[VmEvent.THP_FAULT_ALLOC] += 1

    def __validate_allocate(
        self, owner: str, kind: FolioKind, order: int | None, count: int, nr_bytes: int
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
        if count > MAX_FOLIOS_PER_CALL:
            raise InvalidArgument(
                f"at most {MAX_FOLIOS_PER_CALL} folios per call, not {count}", field="count"
            )
        nr_pages = count * (unit >> PAGE_SHIFT)
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
    ) -> Allocation:
        """Allocates count folios of one order, or nr_bytes of memory, for an owner.

        Anon memory is one new mapping in the owner's address space, faulted in from its start;
        its folio orders follow the mTHP knobs unless an order is given. HugeTLB folios may have
        their vmemmap optimized (hvo). All or nothing.
        """
        order, nr_pages = self.__validate_allocate(owner, kind, order, count, nr_bytes)
        self.__check_guest_ram(owner, guest_ram)
        if madvise_hugepage and kind is not FolioKind.ANON:
            raise InvalidArgument(
                "madvise_hugepage applies to anon mappings only", field="madvise_hugepage"
            )
        if hvo and kind is not FolioKind.HUGETLB:
            raise InvalidArgument("hvo applies to hugetlb folios only", field="hvo")
        if nr_pages > self.zone.nr_free + self.nr_reclaimable - self.zone.watermarks.nr_min:
            raise self.__out_of_memory(order or 0)
        holder = self.owners.get(owner) or Owner(owner)
        mm_before = holder.mm
        next_vpage_before = mm_before.next_vpage if mm_before is not None else 0
        made: list[Folio] = []
        nr_tables = 0
        try:
            if kind is FolioKind.ANON:
                nr_tables = self.__populate_anon(holder, order, nr_pages, madvise_hugepage, made)
            else:
                assert order is not None
                for _ in range(nr_pages >> order):
                    made.append(self.__alloc_folio(order, kind, owner))
        except AddressSpaceExhausted:
            self.__unwind(holder, made, mm_before, next_vpage_before)
            raise
        except OutOfMemory as exc:
            self.__unwind(holder, made, mm_before, next_vpage_before)
            if "host" in exc.metadata:  # the host could not back a guest's frames
                raise
            # Describe the machine as the caller finds it: after the rollback.
            raise self.__out_of_memory(int(exc.metadata["order"])) from None
        self.owners[owner] = holder
        first = self.next_handle
        by_order: dict[int, int] = {}
        if hvo:
            assert order is not None
            for folio in made:
                folio.hvo = True
            self.nr_hvo[order] = self.nr_hvo.get(order, 0) + len(made)
        for handle, folio in enumerate(made, first):
            folio.handle = handle
            self.folios[handle] = folio
            holder.folios[handle] = folio
            by_order[folio.order] = by_order.get(folio.order, 0) + 1
        self.next_handle = first + len(made)
        return Allocation(first, len(made), nr_pages, by_order, nr_tables)

    def __populate_anon(
        self, holder: Owner, order: int | None, nr_pages: int, madvised: bool, made: list[Folio]
    ) -> int:
        if holder.mm is None:
            holder.mm = MmStruct(holder.name, deposit_pgtable=self.deposit_pgtable)
        mm = holder.mm
        vpage = mm.get_unmapped_area(nr_pages, 1 << (order or 0))
        end = vpage + nr_pages
        nr_tables = 0
        while vpage < end:
            if order is None:
                folio = self.__fault_anon(mm, vpage, end, madvised)
            else:
                self.events[_PGFAULT] += 1
                folio = self.__alloc_folio(order, FolioKind.ANON, holder.name)
                self.__count_large_fault(order)
            try:
                nr_tables += mm.map_folio(folio, vpage, self)
            except OutOfMemory:
                self.__free_folio(folio)
                raise
            made.append(folio)
            vpage += folio.nr_pages
        return nr_tables

    def __unwind(
        self,
        holder: Owner,
        made: list[Folio],
        mm_before: MmStruct | None,
        next_vpage_before: int,
    ) -> None:
        """Frees the folios of a failed allocate call, leaving the machine as it was."""
        for folio in reversed(made):
            if holder.mm is not None and folio.vaddr >= 0:
                holder.mm.unmap_folio(folio, self)
            self.__free_folio(folio)
        if holder.mm is not None:
            if mm_before is None:
                holder.mm.release_pgd(self)
            holder.mm.next_vpage = next_vpage_before
        holder.mm = mm_before

    # -- freeing ---------------------------------------------------------------------------

    def lookup(self, handle: int, field_name: str = "handle") -> Folio:
        folio = self.folios.get(handle)
        if folio is not None:
            return folio
        if 0 < handle < self.next_handle:
            raise FolioAlreadyFreed(
                f"folio {handle} on machine {self.name!r} was already freed", field=field_name
            )
        raise UnknownFolio(f"no folio {handle} on machine {self.name!r}", field=field_name)

    def __check_guest_ram(self, owner: str, guest_ram: bool) -> None:
        if owner.startswith(GUEST_OWNER_PREFIX) and not guest_ram:
            raise FailedPrecondition(
                f"owner {owner!r} holds a guest's RAM: only the guest (its balloon, free page "
                "reporting, DestroyGuest) can change it",
                field="owner",
            )

    def free(self, handles: Sequence[int], *, guest_ram: bool = False) -> Release:
        """Frees folios by handle; one bad handle rejects the whole request."""
        if not handles:
            raise InvalidArgument("name at least one handle", field="handles")
        if len(handles) > MAX_FOLIOS_PER_CALL:
            raise InvalidArgument(
                f"at most {MAX_FOLIOS_PER_CALL} handles per call, not {len(handles)}",
                field="handles",
            )
        folios = [self.lookup(handle, "handles") for handle in handles]
        if len(set(handles)) != len(handles):
            raise InvalidArgument("a handle is named twice", field="handles")
        for folio in folios:
            self.__check_guest_ram(folio.owner, guest_ram)
        nr_pages = nr_tables = 0
        for folio in folios:
            holder = self.owners[folio.owner]
            nr_pages += folio.nr_pages
            nr_tables += self.__release_folio(holder, folio)
        for folio in folios:
            emptied = self.owners.get(folio.owner)
            if emptied is not None and not emptied.folios and emptied.mm is None:
                del self.owners[folio.owner]
        return Release(len(folios), nr_pages + nr_tables, nr_tables)

    def __release_folio(self, holder: Owner, folio: Folio) -> int:
        """Unmaps (anon) and frees one owned folio; returns page-table pages freed."""
        nr_tables = 0
        if holder.mm is not None and folio.vaddr >= 0:
            nr_tables = holder.mm.unmap_folio(folio, self)
        del holder.folios[folio.handle]
        del self.folios[folio.handle]
        self.__free_folio(folio)
        return nr_tables

    def release_owner(self, owner: str, *, guest_ram: bool = False) -> Release:
        """Frees everything an owner holds, its page tables included, and forgets it."""
        check_owner_name(owner)
        self.__check_guest_ram(owner, guest_ram)
        holder = self.owners.get(owner)
        if holder is None:
            raise UnknownOwner(f"no owner {owner!r} on machine {self.name!r}", field="owner")
        folios = list(holder.folios.values())
        nr_pages = sum(folio.nr_pages for folio in folios)
        nr_tables = sum(self.__release_folio(holder, folio) for folio in folios)
        if holder.mm is not None:
            nr_tables += holder.mm.release_pgd(self)
        del self.owners[owner]
        return Release(len(folios) + nr_tables, nr_pages + nr_tables, nr_tables)

    # -- contents --------------------------------------------------------------------------

    def folio_write(self, handle: int, offset: int, data: bytes) -> int:
        folio = self.lookup(handle)
        check_range(offset, len(data), "data")
        folio.write(offset, data)
        return len(data)

    def folio_read(self, handle: int, offset: int, length: int) -> bytes:
        folio = self.lookup(handle)
        check_range(offset, length, "length")
        return folio.read(offset, length)

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
        return self.lru.shrink(pages, self.files, False) << PAGE_SHIFT

    def drop_caches(self) -> int:
        """Frees clean page cache (echo 1 > /proc/sys/vm/drop_caches); returns bytes freed."""
        return self.files.drop_caches() << PAGE_SHIFT

    # -- reports ---------------------------------------------------------------------------

    def memmap(self) -> tuple[ModelCost, ...]:
        return memmap_report(
            self.nr_pages,
            self.zone.nr_free,
            self.nr_folios,
            self.sizes,
            PAGE_SIZE,
            hvo_folios=self.nr_hvo,
        )

    # -- balloon (the guest side of virtio_balloon) -----------------------------------------

    def balloon_inflate(self, nr_pages: int) -> list[Folio]:
        """Takes nr_pages base pages for the balloon (balloon_page_alloc); all or nothing.
        Returns them, for the host to drop their backing."""
        taken: list[Folio] = []
        # The driver never writes its pages: taking them does not make the host back them.
        backing, self.backing = self.backing, None
        try:
            for _ in range(nr_pages):
                taken.append(self.__alloc_folio(0, FolioKind.BALLOON, ""))
        except OutOfMemory:
            for folio in taken:
                self.__free_folio(folio)
            raise self.__out_of_memory(0) from None
        finally:
            self.backing = backing
        self.balloon.extend(taken)
        self.events[VmEvent.BALLOON_INFLATE] += nr_pages
        return taken

    def balloon_deflate(self, nr_pages: int) -> list[int]:
        """Gives the nr_pages most recently ballooned pages back to the buddy allocator;
        returns their frames."""
        if not 0 <= nr_pages <= len(self.balloon):
            raise InvalidArgument(
                f"the balloon holds {len(self.balloon)} pages, cannot deflate {nr_pages}",
                field="size_bytes",
            )
        pfns: list[int] = []
        for _ in range(nr_pages):
            folio = self.balloon.pop()
            pfns.append(folio.pfn)
            self.__free_folio(folio)
        self.events[VmEvent.BALLOON_DEFLATE] += nr_pages
        return pfns

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
            memmap_bytes=self.nr_pages * self.sizes.struct_page_bytes,
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


def check_owner_name(owner: str) -> None:
    if not _OWNER_NAME.fullmatch(owner):
        raise InvalidArgument(
            f"owner must be 1-64 characters of [A-Za-z0-9._:-], not {owner[:80]!r}", field="owner"
        )


class Machines:
    """The machines one server simulates, by name; the empty name is the host."""

    def __init__(self, host: Machine) -> None:
        self.host = host
        self.by_name: dict[str, Machine] = {host.name: host}

    def get(self, name: str) -> Machine:
        machine = self.by_name.get(name or self.host.name)
        if machine is None:
            raise UnknownMachine(f"no machine named {name[:80]!r}", field="machine")
        return machine

    def __iter__(self) -> Iterator[Machine]:
        return iter(list(self.by_name.values()))
