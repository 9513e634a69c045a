"""The page cache: files, their folios, the read and write paths and writeback
(mm/filemap.c, mm/readahead.c callers, mm/page-writeback.c, mm/truncate.c).

Each file (an Inode, with its address_space) indexes its folios by page offset; an order-k
folio covers 2^k indices from an index aligned to 2^k. Evicted folios leave shadow entries that
detect refaults. The backing file is the truth for clean data: a folio keeps in memory only the
pages that differ from it (written and not yet written back), so the simulator's memory grows
with dirty data, not with what is cached.

Writeback errors follow the kernel: the folio is marked clean and the error is recorded in the
file's errseq for fsync to report, once per open handle; the written data stays in the cached
folio (reads still see it) until the folio is evicted, when it is lost, as in Linux.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import Protocol

from foliod.mm.backing_dev import BackingStore, check_file_name
from foliod.mm.errors import (
    AlreadyExists,
    FileHandleClosed,
    InvalidArgument,
    OutOfMemory,
    TenantLimit,
    UnknownFile,
    UnknownFileHandle,
    WritebackFailed,
)
from foliod.mm.errseq import errseq_check_and_advance, errseq_sample, errseq_set
from foliod.mm.huge_memory import HPAGE_PMD_ORDER
from foliod.mm.lru import ReclaimPolicy
from foliod.mm.memcontrol import MemCgroup
from foliod.mm.mm_types import Folio, FolioKind
from foliod.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE
from foliod.mm.readahead import (
    DEFAULT_RA_PAGES,
    NO_MISS_BEFORE_START,
    RaState,
    RaWindow,
    ra_folio_layout,
)
from foliod.mm.vmstat import VmEvent

MAX_PAGECACHE_ORDER = 9
MAX_RA_PAGES = 1 << 16
MAX_FILE_BYTES = 1 << 44  # 16 TiB
# Largest read or write of one call.
MAX_IO_BYTES = 2 << 20
_KIB_PER_PAGE = PAGE_SIZE >> 10
# Orders with per-CPU free lists: up to PAGE_ALLOC_COSTLY_ORDER, and the PMD (THP) order.
_PCP_ORDERS = frozenset((0, 1, 2, 3, HPAGE_PMD_ORDER))
# Runs of slots this long or shorter are populated one folio at a time.
_BULK_MIN = 16
# The longest a writer is paused (MAX_PAUSE, HZ / 5).
MAX_PAUSE_SECONDS = 0.2


class CacheAllocator(Protocol):
    """Where page cache folios come from (with reclaim); raises OutOfMemory."""

    def alloc_cache_folio(self, order: int) -> Folio: ...

    def alloc_cache_folios(self, order: int, count: int) -> list[Folio] | None:
        """count folios of order in one step, the same ones count alloc_cache_folio calls in a
        row would give; None (nothing taken) when that would reclaim or fail."""
        ...

    def free_cache_folio(self, folio: Folio) -> None: ...

    def split_cache_folio(self, folio: Folio) -> list[Folio]: ...

    def recycle_cache_frames(self, nr: int) -> None:
        """nr pages of frames went straight from evicted folios to new ones of the same order
        (the per-CPU lists' LIFO order): counted as freed and allocated, the buddy lists
        untouched."""
        ...


@dataclass(frozen=True, slots=True)
class DirtyLimits:
    """vm.dirty_background_ratio, vm.dirty_ratio (percent of dirtyable memory) and
    vm.dirty_expire_centisecs, in seconds."""

    background_ratio: int = 10
    ratio: int = 20
    expire_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.background_ratio < self.ratio <= 100:
            raise InvalidArgument(
                "dirty ratios must satisfy 0 < background < ratio <= 100", field="dirty_ratio"
            )
        if self.expire_seconds < 0:
            raise InvalidArgument("dirty expiry must not be negative", field="dirty_expire")


@dataclass(slots=True)
class IoStats:
    """What one read or write did: pages found, pages read in, device time it cost, and how
    long balance_dirty_pages paused the writer (simulated, like the device time)."""

    pages_hit: int = 0
    pages_missed: int = 0
    pages_readahead: int = 0
    device_seconds: float = 0.0
    throttle_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class FileStat:
    name: str
    size_bytes: int
    nr_cached: int
    nr_dirty: int
    folios_by_order: dict[int, int]
    max_order: int
    ra_pages: int
    open_handles: int


class Inode:
    """One file and its page cache mapping (struct inode + struct address_space)."""

    __slots__ = (
        "folios",
        "handles",
        "large_blocks",
        "large_shadow_blocks",
        "last_found",
        "max_order",
        "memcg",
        "name",
        "nr_dirty",
        "nr_pages",
        "ra",
        "shadow_orders",
        "shadows",
        "size",
        "top_order",
        "wb_err",
    )

    def __init__(self, name: str, size: int, max_order: int, ra_pages: int) -> None:
        self.name = name
        self.size = size
        self.max_order = max_order
        # The readahead state of reads by name, which share one open file description per file;
        # its ra_pages is the file's, copied into each handle at open.
        self.ra = RaState(ra_pages)
        # Head index -> folio; head index -> the shadow token a folio that left was evicted
        # with (the policy's: an eviction age, or mglru's generation and tier). As in the
        # kernel's xarray, an evicted large folio leaves one entry over its whole range (a
        # multi-index entry): its head is in shadow_orders with the folio's order, and
        # large_shadow_blocks counts those entries per block of MAX_PAGECACHE_ORDER's size.
        # Entries never overlap, nor cover a cached page.
        self.folios: dict[int, Folio] = {}
        self.shadows: dict[int, int] = {}
        self.shadow_orders: dict[int, int] = {}
        self.large_shadow_blocks: dict[int, int] = {}
        self.nr_pages = 0
        self.nr_dirty = 0
        # No folio in the mapping is of a higher order (a high-water mark that bounds find).
        self.top_order = 0
        # Large folios in the mapping per block of MAX_PAGECACHE_ORDER's size (one holds each
        # whole): find() misses at once in a block without any.
        self.large_blocks: dict[int, int] = {}
        # The large folio find() found last (a hint, checked before use).
        self.last_found: Folio | None = None
        self.wb_err = 0
        self.handles: set[int] = set()
        # The tenant its page cache is charged to (memcontrol.tenant_of_file), if any.
        self.memcg: MemCgroup | None = None

    def find(self, index: int) -> Folio | None:
        """The folio that covers a page index (filemap_get_entry)."""
        folios = self.folios
        folio = folios.get(index)
        if folio is not None or index >> MAX_PAGECACHE_ORDER not in self.large_blocks:
            return folio
        # The large folio found last, if it is still in the mapping at its index and covers
        # this one: reads tend to stay in one folio.
        last = self.last_found
        if (
            last is not None
            and last.index < index < last.index + last.nr_pages
            and folios.get(last.index) is last
        ):
            return last
        for order in range(1, self.top_order + 1):
            folio = folios.get(index & ~((1 << order) - 1))
            if folio is not None and folio.order >= order:
                self.last_found = folio
                return folio
        return None

    def count_large(self, index: int, delta: int) -> None:
        """A large folio at index enters (+1) or leaves (-1) the mapping."""
        blocks, block = self.large_blocks, index >> MAX_PAGECACHE_ORDER
        count = blocks.get(block, 0) + delta
        if count:
            blocks[block] = count
        else:
            del blocks[block]

    def add_shadow(self, index: int, order: int, token: int) -> None:
        """The entry an evicted folio of order at index leaves (workingset_eviction)."""
        self.shadows[index] = token
        if order:
            self.shadow_orders[index] = order
            blocks, block = self.large_shadow_blocks, index >> MAX_PAGECACHE_ORDER
            blocks[block] = blocks.get(block, 0) + 1

    def take_shadows(self, index: int, nr_pages: int) -> int | None:
        """Removes the shadow entries over [index, index + nr_pages), where a new folio goes
        (__filemap_add_folio), and returns the token of the last, as the kernel keeps the last
        entry xas_for_each_conflict visits; a larger entry around the range is split and the
        rest of it stays, in pieces of the new folio's size (xas_split)."""
        shadows = self.shadows
        # The range lies in one block of the largest folio's size: were no large entry in it,
        # only base-page entries can be there.
        large_here = index >> MAX_PAGECACHE_ORDER in self.large_shadow_blocks
        shadow = shadows.pop(index, None)
        start = index
        if shadow is not None:
            order = self.__drop_large(index) if large_here and index in self.shadow_orders else 0
            if 1 << order >= nr_pages:  # the entry covers the range: nothing else is inside
                if 1 << order > nr_pages:
                    self.__split_shadow(index, order, shadow, index, nr_pages)
                return shadow
            start = index + (1 << order)
        elif large_here:
            # An entry from before index that covers it (entries are aligned to their order).
            orders = self.shadow_orders
            for order in range(nr_pages.bit_length(), MAX_PAGECACHE_ORDER + 1):
                head = index & ~((1 << order) - 1)
                if head != index and orders.get(head) == order:
                    self.__drop_large(head)
                    token = shadows.pop(head)
                    self.__split_shadow(head, order, token, index, nr_pages)
                    return token
        end = index + nr_pages
        if start == end:
            return shadow
        if large_here:
            # Entries inside the range, of base pages or smaller folios.
            heads = [i for i in range(start, end) if i in shadows]
            for head in heads:
                if head in self.shadow_orders:
                    self.__drop_large(head)
            found = deque(map(shadows.pop, heads), maxlen=1)
        else:
            # Base-page entries, popped page by page; the last one found is kept. Shadow
            # tokens are never 0 (ReclaimPolicy.shadow).
            found = deque(filter(None, map(shadows.pop, range(start, end), repeat(None))), 1)
        return found[0] if found else shadow

    def __drop_large(self, head: int) -> int:
        """Forgets the order of the large entry at head (its token is the caller's to pop)."""
        order = self.shadow_orders.pop(head)
        blocks, block = self.large_shadow_blocks, head >> MAX_PAGECACHE_ORDER
        if blocks[block] == 1:
            del blocks[block]
        else:
            blocks[block] -= 1
        return order

    def __split_shadow(self, head: int, order: int, token: int, index: int, nr_pages: int) -> None:
        """Puts back the entry of order at head, less [index, index + nr_pages), as entries
        of nr_pages' size (all aligned: index and nr_pages are, inside the entry)."""
        piece_order = nr_pages.bit_length() - 1
        for piece in range(head, head + (1 << order), nr_pages):
            if piece != index:
                self.add_shadow(piece, piece_order, token)

    def drop_shadows_from(self, keep: int) -> None:
        """Removes the shadow entries that reach page keep or beyond (truncation clears a
        multi-index entry whole)."""
        orders = self.shadow_orders
        for head in [h for h in self.shadows if h + (1 << orders.get(h, 0)) > keep]:
            del self.shadows[head]
            if head in orders:
                self.__drop_large(head)

    def shadow_span(self, head: int) -> int:
        """Pages the shadow entry at head covers."""
        return 1 << self.shadow_orders.get(head, 0)

    # CacheView for readahead.
    def prev_miss(self, index: int, max_scan: int) -> int:
        for i in range(index, index - max_scan, -1):
            if i < 0:
                return NO_MISS_BEFORE_START
            if self.find(i) is None:
                return i
        return index - max_scan

    def next_miss(self, index: int, max_scan: int) -> int:
        i = index
        while i < index + max_scan:
            folio = self.find(i)
            if folio is None:
                return i
            i = folio.index + folio.nr_pages
        return index + max_scan


@dataclass(slots=True)
class FileHandle:
    """An open file description (struct file): its writeback-error sample and its own
    readahead state (f_ra), which reads through the handle use, so readers through separate
    handles keep separate windows. The state starts from the file's ra_pages at open
    (file_ra_state_init); a later change to the file's ra_pages leaves handles already open
    with the value they started with, as in the kernel."""

    number: int
    inode: Inode
    wb_err_since: int
    ra: RaState
    closed: bool = False


@dataclass
class PageCache:
    """The files of one machine and their cached folios."""

    store: BackingStore
    allocator: CacheAllocator
    lru: ReclaimPolicy
    events: dict[VmEvent, int]
    clock: Callable[[], float]
    default_max_order: int = MAX_PAGECACHE_ORDER
    default_ra_pages: int = DEFAULT_RA_PAGES
    files: dict[str, Inode] = field(default_factory=dict)
    handles: dict[int, FileHandle] = field(default_factory=dict)
    next_handle: int = 1
    nr_pages: int = 0
    nr_dirty: int = 0
    # Most pages the cache may hold (a cgroup-style limit); None: only RAM limits it.
    capacity_pages: int | None = None
    # Folios the current call works on; reclaim passes them by (they are locked, in the kernel).
    busy: set[Folio] = field(default_factory=set)
    limits: DirtyLimits = field(default_factory=DirtyLimits)
    # Pages the machine could hold dirty: free memory plus the file LRU (global_dirtyable_memory),
    # supplied by the machine.
    dirtyable: Callable[[], int] = lambda: 0
    # Writes that had to write back first because dirty memory was over the limit.
    nr_throttled: int = 0
    # Writes balance_dirty_pages paused, and the simulated time it paused them for.
    nr_paused: int = 0
    pause_seconds: float = 0.0
    # Pages reads (read() and replay()) found cached, read in, and read ahead: since boot.
    nr_read_hits: int = 0
    nr_read_misses: int = 0
    nr_read_ahead: int = 0
    # The tenant a file name is charged to (None: no tenant), supplied by the machine.
    memcg_of: Callable[[str], MemCgroup | None] = lambda name: None

    def __post_init__(self) -> None:
        # Limit reclaim making room for a folio of a per-CPU-list order keeps the last frame
        # of that order it frees (see __make_room).
        self.__recycling: int | None = None
        self.__recycled: Folio | None = None
        settings = self.store.settings()
        for name, size in self.store.names().items():
            saved = settings.get(name, {})
            max_order = saved.get("max_order", self.default_max_order)
            ra_pages = saved.get("ra_pages", self.default_ra_pages)
            if not 0 <= max_order <= MAX_PAGECACHE_ORDER:
                max_order = self.default_max_order
            if not 0 <= ra_pages <= MAX_RA_PAGES:
                ra_pages = self.default_ra_pages
            inode = self.files[name] = Inode(name, size, max_order, ra_pages)
            inode.memcg = memcg = self.memcg_of(name)
            if memcg is not None:
                memcg.nr_files += 1

    # -- namespace -------------------------------------------------------------------------

    def lookup(self, name: str) -> Inode:
        inode = self.files.get(name)
        if inode is None:
            # Names in files were checked when created: only a miss needs the check.
            check_file_name(name)
            raise UnknownFile(f"no file {name[:80]!r}", field="name")
        return inode

    def create(
        self, name: str, *, max_order: int | None = None, ra_pages: int | None = None
    ) -> Inode:
        check_file_name(name)
        if name in self.files:
            raise AlreadyExists(f"file {name[:80]!r} exists", field="name")
        # A name is a file or a directory, never both.
        parts = name.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self.files:
                raise InvalidArgument(
                    f"{'/'.join(parts[:depth])[:80]!r} is a file, not a directory", field="name"
                )
        if any(other.startswith(name + "/") for other in self.files):
            raise AlreadyExists(f"{name[:80]!r} is a directory of files", field="name")
        if max_order is not None and not 0 <= max_order <= MAX_PAGECACHE_ORDER:
            raise InvalidArgument(
                f"max_order must be 0..{MAX_PAGECACHE_ORDER}, not {max_order}", field="max_order"
            )
        if ra_pages is not None and not 0 <= ra_pages <= MAX_RA_PAGES:
            raise InvalidArgument(
                f"ra_pages must be 0..{MAX_RA_PAGES}, not {ra_pages}", field="ra_pages"
            )
        memcg = self.memcg_of(name)
        if memcg is not None and memcg.nr_files >= memcg.limits.max_files:
            raise TenantLimit(
                f"tenant {memcg.name!r} has {memcg.nr_files} files, the most it may",
                field="name",
                metadata={"tenant": memcg.name, "max_files": str(memcg.limits.max_files)},
            )
        self.store.create(name)
        chosen = {"max_order": max_order, "ra_pages": ra_pages}
        self.store.set_settings(name, {k: v for k, v in chosen.items() if v is not None})
        inode = Inode(
            name,
            0,
            self.default_max_order if max_order is None else max_order,
            self.default_ra_pages if ra_pages is None else ra_pages,
        )
        inode.memcg = memcg
        if memcg is not None:
            memcg.nr_files += 1
        self.files[name] = inode
        return inode

    def open(self, name: str) -> FileHandle:
        inode = self.lookup(name)
        memcg = inode.memcg
        if memcg is not None:
            if memcg.nr_open_files >= memcg.limits.max_open_files:
                raise TenantLimit(
                    f"tenant {memcg.name!r} has {memcg.nr_open_files} files open, the most it may",
                    field="name",
                    metadata={
                        "tenant": memcg.name,
                        "max_open_files": str(memcg.limits.max_open_files),
                    },
                )
            memcg.nr_open_files += 1
        handle = FileHandle(
            self.next_handle, inode, errseq_sample(inode.wb_err), RaState(inode.ra.ra_pages)
        )
        self.handles[handle.number] = handle
        inode.handles.add(handle.number)
        self.next_handle += 1
        return handle

    def handle(self, number: int) -> FileHandle:
        handle = self.handles.get(number)
        if handle is None:
            if 0 < number < self.next_handle:
                raise FileHandleClosed(f"file handle {number} is closed", field="handle")
            raise UnknownFileHandle(f"no file handle {number}", field="handle")
        return handle

    def close(self, number: int) -> None:
        handle = self.handle(number)
        handle.inode.handles.discard(number)
        del self.handles[number]
        if handle.inode.memcg is not None:
            handle.inode.memcg.nr_open_files -= 1

    def stat(self, name: str) -> FileStat:
        inode = self.lookup(name)
        by_order: dict[int, int] = {}
        for folio in inode.folios.values():
            by_order[folio.order] = by_order.get(folio.order, 0) + 1
        return FileStat(
            inode.name,
            inode.size,
            inode.nr_pages,
            inode.nr_dirty,
            dict(sorted(by_order.items())),
            inode.max_order,
            inode.ra.ra_pages,
            len(inode.handles),
        )

    def delete(self, name: str) -> None:
        inode = self.lookup(name)
        for folio in list(inode.folios.values()):
            self.__remove(inode, folio, shadow=False)
        for number in list(inode.handles):
            del self.handles[number]
        self.store.delete(name)
        self.store.set_settings(name, None)
        del self.files[name]
        if inode.memcg is not None:
            inode.memcg.nr_files -= 1
            inode.memcg.nr_open_files -= len(inode.handles)

    # -- folios in the mapping -------------------------------------------------------------

    def __insert(self, inode: Inode, folio: Folio, index: int) -> None:
        """filemap_add_folio: into the mapping and onto the inactive LRU; a refault of a
        recently evicted folio is activated (workingset_refault)."""
        folio.mapping = inode
        folio.index = index
        self.busy.add(folio)
        inode.folios[index] = folio
        if folio.order:  # Inode.count_large(index, 1), written out: every insert comes here
            blocks, block = inode.large_blocks, index >> MAX_PAGECACHE_ORDER
            blocks[block] = blocks.get(block, 0) + 1
            inode.top_order = max(inode.top_order, folio.order)
        inode.nr_pages += folio.nr_pages
        self.nr_pages += folio.nr_pages
        if inode.memcg is not None:
            inode.memcg.nr_cache += folio.nr_pages
        self.lru.add(folio)
        if folio.order or index >> MAX_PAGECACHE_ORDER in inode.large_shadow_blocks:
            shadow = inode.take_shadows(index, folio.nr_pages)
        else:  # take_shadows' shortest case, written out
            shadow = inode.shadows.pop(index, None)
        if shadow is not None:
            self.lru.refault(folio, shadow)

    def __remove(self, inode: Inode, folio: Folio, *, shadow: bool, free: bool = True) -> None:
        """Takes a folio out of its mapping and the LRU and frees it (unless its frame is
        to be recycled)."""
        self.lru.remove(folio)
        del inode.folios[folio.index]
        if folio.order:
            inode.count_large(folio.index, -1)
        inode.nr_pages -= folio.nr_pages
        self.nr_pages -= folio.nr_pages
        if inode.memcg is not None:
            inode.memcg.nr_cache -= folio.nr_pages
        if folio.dirty:
            inode.nr_dirty -= folio.nr_pages
            self.nr_dirty -= folio.nr_pages
            folio.dirty = False
        if shadow:
            inode.add_shadow(folio.index, folio.order, self.lru.shadow(folio))
        folio.mapping = None
        if free:
            self.allocator.free_cache_folio(folio)

    def __make_room(self, order: int) -> Folio | None:
        """Evicts what the policy chooses until a folio of order fits under the capacity
        (memcg-style limit reclaim). For the orders the kernel keeps per-CPU free lists of
        (0..PAGE_ALLOC_COSTLY_ORDER, and the PMD order), the frame of the last evicted folio
        of that order is returned for reuse, as the per-CPU list hands back the block freed
        last (rmqueue_pcplist); None when there is none."""
        assert self.capacity_pages is not None
        over = self.nr_pages + (1 << order) - self.capacity_pages
        if over <= 0:
            return None
        self.__recycling = order if order in _PCP_ORDERS else None
        self.__recycled = None
        try:
            freed = self.lru.shrink(over, self, True)
        finally:
            self.__recycling = None
        recycled, self.__recycled = self.__recycled, None
        if freed < over:
            if recycled is not None:
                self.allocator.free_cache_folio(recycled)
            raise OutOfMemory(
                f"page cache capacity of {self.capacity_pages} pages is full and nothing in "
                "it can be reclaimed",
                metadata={"capacity_pages": str(self.capacity_pages)},
            )
        if recycled is not None:
            self.allocator.recycle_cache_frames(1 << order)
            return Folio(recycled.pfn, order, FolioKind.FILE)
        return None

    def evict_folio(self, folio: Folio) -> None:
        """Evictor: reclaim frees a clean folio, leaving shadow entries."""
        assert isinstance(folio.mapping, Inode)
        keep = folio.order == self.__recycling
        self.__remove(folio.mapping, folio, shadow=True, free=not keep)
        if keep:
            if self.__recycled is not None:  # freed earlier: not the one handed back
                self.allocator.free_cache_folio(self.__recycled)
            self.__recycled = folio

    def shrink_memcg(self, memcg: MemCgroup, nr_to_reclaim: int) -> int:
        """Reclaims up to nr_to_reclaim pages of one tenant's page cache, oldest first in the
        policy's eviction order, dirty folios written back first (try_to_free_mem_cgroup_pages);
        returns pages freed. Other tenants' folios are neither evicted nor aged: the kernel
        keeps one LRU per memory cgroup, this walks the machine's one LRU for the tenant's."""
        freed = 0
        busy = self.busy
        mine = [f for f in self.lru.folios() if getattr(f.mapping, "memcg", None) is memcg]
        scanned = 0
        for folio in mine:
            if freed >= nr_to_reclaim:
                break
            scanned += folio.nr_pages
            if folio in busy:
                continue
            if folio.dirty:
                self.writeback_folio(folio)
                self.events[VmEvent.PGROTATED] += folio.nr_pages
            self.evict_folio(folio)
            freed += folio.nr_pages
        self.events[VmEvent.PGSCAN_DIRECT] += scanned
        self.events[VmEvent.PGSTEAL_DIRECT] += freed
        return freed

    def __alloc(self, order: int) -> Folio:
        """A cache folio of order, falling back to base pages when large ones cannot be had."""
        if self.capacity_pages is not None:
            recycled = self.__make_room(order)
            if recycled is not None:
                return recycled
        try:
            return self.allocator.alloc_cache_folio(order)
        except OutOfMemory:
            if order == 0:
                raise
        return self.allocator.alloc_cache_folio(0)

    def __populate(
        self, inode: Inode, layout: list[tuple[int, int]], made: list[Folio]
    ) -> list[Folio]:
        """Allocates and inserts folios for (index, order) slots not cached yet; a slot that is
        partly cached becomes base pages. Appends the new folios to made as it goes (so a caller
        can undo them when an allocation fails) and returns it."""
        if not layout:
            return made
        folios = inode.folios
        # Nothing cached anywhere in the layout's span (the common case): no slot needs a look.
        # Allocating only evicts, and the folios made here are not reclaimed (busy).
        lo, (last, last_order) = layout[0][0], layout[-1]
        span_empty = inode.find(lo) is None and folios.keys().isdisjoint(
            range(lo + 1, last + (1 << last_order))
        )
        if span_empty and self.capacity_pages is None and len(layout) > _BULK_MIN:
            self.__populate_bulk(inode, layout, made)
            return made
        for index, order in layout:
            slots = [(index, order)]
            # Cached in part: a folio covers index, or one starts inside the slot.
            if not span_empty and (
                inode.find(index)
                or not folios.keys().isdisjoint(range(index + 1, index + (1 << order)))
            ):
                slots = [(i, 0) for i in range(index, index + (1 << order)) if not inode.find(i)]
            for slot_index, slot_order in slots:
                self.__populate_slot(inode, slot_index, slot_order, made)
        return made

    def __populate_slot(self, inode: Inode, index: int, order: int, made: list[Folio]) -> None:
        """Allocates and inserts the folio of one empty slot (base pages if a large folio
        cannot be had)."""
        folio = self.__alloc(order)
        self.__insert(inode, folio, index)
        made.append(folio)
        if folio.order < order:
            # Fallen back to a base page: the rest of the slot as base pages too.
            for i in range(index + 1, index + (1 << order)):
                extra = self.__alloc(0)
                self.__insert(inode, extra, i)
                made.append(extra)

    def __populate_bulk(
        self, inode: Inode, layout: list[tuple[int, int]], made: list[Folio]
    ) -> None:
        """__populate of an empty span with no capacity limit: each run of slots of one order
        takes its folios in one step where no reclaim is needed (inserting takes no memory,
        so the frames are those one allocation per slot would take)."""
        start = 0
        while start < len(layout):
            order = layout[start][1]
            stop = start + 1
            while stop < len(layout) and layout[stop][1] == order:
                stop += 1
            bulk = (
                self.allocator.alloc_cache_folios(order, stop - start)
                if stop - start > _BULK_MIN
                else None
            )
            if bulk is None:
                for index, _ in layout[start:stop]:
                    self.__populate_slot(inode, index, order, made)
            else:
                insert = self.__insert
                for (index, _), folio in zip(layout[start:stop], bulk, strict=True):
                    insert(inode, folio, index)
                made.extend(bulk)
            start = stop

    # -- read ------------------------------------------------------------------------------

    def read(
        self,
        name: str,
        offset: int,
        length: int,
        handle: int | None = None,
        *,
        short_path: bool = True,
    ) -> tuple[bytes, IoStats]:
        """filemap_read: the bytes of [offset, offset + length) up to EOF, through the cache.

        Pages of the request that this call had to read in are misses, the others hits; pages
        read in beyond the request are read ahead. Each readahead window is one device read.

        With a handle number the read goes through that open file and its readahead state;
        name may be empty (the handle's file) or must name the handle's file. Without one, the
        read uses the file's own state: reads by name share one open file description per file.

        A read that falls inside one cached folio without PG_readahead takes a short path with
        the same effect; short_path=False sends it down the general one (tests/test_replay.py
        holds the two equal).
        """
        if handle is None:
            inode = self.lookup(name)
            ra = inode.ra
        else:
            inode, ra = self.__through(name, handle)
        check_range(offset, length)
        end = min(offset + length, inode.size)
        if offset >= end:
            return b"", IoStats()
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        if short_path:
            folio = inode.find(first)
            if folio is not None and not folio.readahead:
                head = folio.index
                if last < head + folio.nr_pages:
                    return self.__read_in_folio(inode, folio, ra, offset, end)
        stats = IoStats()
        fresh: set[Folio] = set()
        try:
            self.__read_folios(inode, first, last, fresh, stats, ra=ra)
            return self.__read_bytes(inode, offset, end - offset), stats
        finally:
            self.busy.clear()
            self.__count_reads(stats)

    def __read_in_folio(
        self, inode: Inode, folio: Folio, ra: RaState, offset: int, end: int
    ) -> tuple[bytes, IoStats]:
        """read() of [offset, end) inside one cached folio without PG_readahead: all hits, the
        folio accessed unless the previous read ended in it, one page straight from memory."""
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        nr_pages = last - first + 1
        head = folio.index
        if not head <= ra.prev_index < head + folio.nr_pages:
            self.lru.mark_accessed(folio, False)
        ra.prev_index = last  # note_read
        stats = IoStats(pages_hit=nr_pages)
        self.events[VmEvent.PGFAULT] += nr_pages
        self.nr_read_hits += nr_pages
        contents = folio.contents
        if contents and nr_pages == 1:
            page = contents.get(first - head)
            if page is not None:
                skip = offset - (first << PAGE_SHIFT)
                return bytes(page[skip : skip + end - offset]), stats
        return self.__read_bytes(inode, offset, end - offset), stats

    def __through(self, name: str, number: int) -> tuple[Inode, RaState]:
        """The file and readahead state of a read through an open handle; the handle must be
        open and name empty or naming its file."""
        handle = self.handle(number)
        inode = handle.inode
        if name and self.lookup(name) is not inode:
            raise InvalidArgument(
                f"file handle {number} is open on {inode.name[:80]!r}, not {name[:80]!r}",
                field="handle",
            )
        return inode, handle.ra

    def __count_reads(self, stats: IoStats) -> None:
        self.nr_read_hits += stats.pages_hit
        self.nr_read_misses += stats.pages_missed
        self.nr_read_ahead += stats.pages_readahead

    def replay(self, name: str, indices: Iterable[int], *, short_path: bool = True) -> IoStats:
        """Reads one page at each index in turn, as read() would (readahead, reclaim, LRU),
        without copying bytes: for replaying page-access traces. Every access counts as one,
        even a repeat of the page just read (which read() would not count again), as trace
        simulators do. Returns the summed stats; a trace with an index outside the file is
        refused whole.

        Two common cases take a short path with the same effect as read()'s: a hit on a folio
        without PG_readahead, and a miss read alone (no readahead window) into a full
        capacity-limited cache whose victim is a clean base page, whose frame the new folio
        takes (see __make_room). short_path=False sends every access down read()'s path;
        tests/test_replay.py holds the two equal."""
        inode = self.lookup(name)
        keys = indices if isinstance(indices, list) else list(indices)
        eof_index = (inode.size - 1) >> PAGE_SHIFT
        if keys and (min(keys) < 0 or max(keys) > eof_index):
            bad = next(i for i in keys if not 0 <= i <= eof_index)
            raise InvalidArgument(
                f"page {bad} is outside {name!r} (pages 0..{eof_index})", field="indices"
            )
        stats = IoStats()
        try:
            if short_path:
                self.__replay(inode, keys, stats)
            else:
                fresh: set[Folio] = set()
                for index in keys:
                    self.__read_folios(
                        inode, index, index, fresh, stats, ra=inode.ra, every_access=True
                    )
                    fresh.clear()
                    self.busy.clear()
        finally:
            self.busy.clear()
            self.__count_reads(stats)
        return stats

    def __replay(self, inode: Inode, keys: list[int], stats: IoStats) -> None:
        """replay()'s loop. Written for speed: the state it touches is held in locals, and what
        the short path counts is added up once at the end (counts only add up, so read()'s
        path, taken for some accesses, may count its own in between)."""
        lru, ra = self.lru, inode.ra
        folios, shadows, find, max_order = inode.folios, inode.shadows, inode.find, inode.max_order
        # Blocks with large folios' shadow entries (read()'s path leaves them).
        large_shadow_blocks = inode.large_shadow_blocks
        touch, requeue, victim_of, refault = lru.touch, lru.requeue, lru.victim, lru.refault
        queue, stamp = lru.queue, lru.shadow
        # A policy that only counts refaults has them counted here, in one go; one that stamps
        # shadow entries with the nonresident age has them stamped here.
        count_refaults = type(lru).refault is ReclaimPolicy.refault
        age_tokens = type(lru).shadow is ReclaimPolicy.shadow
        capacity = self.capacity_pages if self.capacity_pages is not None else -1
        ra_pages = ra.ra_pages
        read_seconds = self.store.device.read_seconds(PAGE_SIZE)
        fresh: set[Folio] = set()
        hits = recycled = allocated = refaults = 0
        prev = ra.prev_index
        last: Folio | None = None  # the folio of the last hit
        try:
            for index in keys:
                folio = folios.get(index)
                if folio is None and max_order:
                    if (
                        last is not None
                        and last.mapping is inode
                        and last.index < index < last.index + last.nr_pages
                    ):
                        folio = last
                    else:
                        folio = find(index)
                if folio is not None:
                    if not folio.readahead:
                        touch(folio)
                        hits += 1
                        last = folio
                        prev = index
                        continue
                elif not ra_pages or self.__reads_alone(ra, prev, index, inode):
                    nr_pages = self.nr_pages
                    if nr_pages == capacity:
                        victim = next(iter(queue), None) if queue is not None else victim_of()
                    else:
                        victim = None
                    if victim is not None and not victim.order and not victim.dirty:
                        # Limit reclaim evicts the victim (a shadow entry stays) and its
                        # frame is read in at index: the object is reused, reset as new.
                        if requeue is None:
                            lru.remove(victim)
                        if age_tokens:  # ReclaimPolicy.shadow of a base page
                            token = lru.nonresident_age = lru.nonresident_age + 1
                        else:
                            token = stamp(victim)
                        if requeue is None:
                            # Policy state (requeue's policies, lru and fifo, keep none).
                            victim.referenced = victim.active = False
                            victim.gen = victim.refs = 0
                        if victim.mapping is inode:
                            victim_index = victim.index
                            del folios[victim_index]
                            shadows[victim_index] = token
                        else:
                            self.__move_recycled(victim, inode, token)
                        victim.index = index
                        victim.contents = None
                        victim.readahead = False
                        victim.dirtied_at = 0.0
                        folios[index] = victim
                        if requeue is None:
                            lru.add(victim)
                        else:
                            requeue(victim)
                        shadow = (
                            shadows.pop(index, None)
                            if not large_shadow_blocks
                            or index >> MAX_PAGECACHE_ORDER not in large_shadow_blocks
                            else inode.take_shadows(index, 1)
                        )
                        if shadow is not None:
                            if count_refaults:
                                refaults += 1
                            else:
                                refault(victim, shadow)
                        if requeue is None:
                            lru.mark_accessed(victim, True)
                        recycled += 1
                        prev = index
                        continue
                    if nr_pages < capacity or capacity < 0:
                        # Room for a new folio: allocated and read in alone.
                        try:
                            folio = self.allocator.alloc_cache_folio(0)
                        except OutOfMemory:  # read()'s readahead tries the page twice
                            folio = self.allocator.alloc_cache_folio(0)
                        self.__insert(inode, folio, index)
                        self.busy.clear()
                        lru.mark_accessed(folio, True)
                        allocated += 1
                        prev = index
                        continue
                # Anything else takes read()'s path.
                ra.prev_index = prev
                self.__read_folios(inode, index, index, fresh, stats, ra=ra, every_access=True)
                fresh.clear()
                self.busy.clear()
                prev = ra.prev_index
        finally:
            ra.prev_index = prev
            self.__count_replayed(
                stats,
                hits=hits,
                recycled=recycled,
                allocated=allocated,
                refaults=refaults,
                # Each miss on the short path is one page read alone.
                device_seconds=(recycled + allocated) * read_seconds,
            )

    @staticmethod
    def __reads_alone(ra: RaState, prev: int, index: int, inode: Inode) -> bool:
        """A one-page miss at index is read alone (readahead brings nothing around it); first
        brings ra.prev_index up to date, which the answer depends on."""
        ra.prev_index = prev
        return ra.reads_alone(index, 1, inode)

    @staticmethod
    def __move_recycled(folio: Folio, inode: Inode, shadow: int) -> None:
        """A recycled frame leaves another file for inode: its shadow entry and counts."""
        old = folio.mapping
        assert isinstance(old, Inode)
        del old.folios[folio.index]
        old.shadows[folio.index] = shadow
        old.nr_pages -= 1
        inode.nr_pages += 1
        if old.memcg is not inode.memcg:
            if old.memcg is not None:
                old.memcg.nr_cache -= 1
            if inode.memcg is not None:
                inode.memcg.nr_cache += 1
        folio.mapping = inode

    def __count_replayed(
        self,
        stats: IoStats,
        *,
        hits: int,
        recycled: int,
        allocated: int,
        refaults: int,
        device_seconds: float,
    ) -> None:
        """Counts what replay()'s short path did (read() counts as it goes): hits, misses
        read into recycled and into newly allocated frames, refaults left to it."""
        misses = recycled + allocated
        stats.pages_hit += hits
        stats.pages_missed += misses
        stats.device_seconds += device_seconds
        events = self.events
        events[VmEvent.PGFAULT] += hits + misses
        events[VmEvent.PGMAJFAULT] += misses
        events[VmEvent.PGPGIN] += misses * _KIB_PER_PAGE
        events[VmEvent.PGSCAN_DIRECT] += recycled
        events[VmEvent.PGSTEAL_DIRECT] += recycled
        events[VmEvent.WORKINGSET_REFAULT_FILE] += refaults
        self.allocator.recycle_cache_frames(recycled)

    def __read_folios(
        self,
        inode: Inode,
        first: int,
        last: int,
        fresh: set[Folio],
        stats: IoStats,
        *,
        ra: RaState,
        every_access: bool = False,
    ) -> None:
        """Reads pages [first, last] through the cache, taking readahead decisions with ra (the
        state of the open file description read through)."""
        missed_before = stats.pages_missed
        index = first
        while index <= last:
            folio = inode.find(index)
            if folio is None:
                window = ra.sync(index, last - index + 1, inode, inode.max_order)
                self.__readahead(inode, window, fresh, stats, required=True)
                folio = inode.find(index)
                assert folio is not None
            elif folio.readahead:
                folio.readahead = False
                self.busy.add(folio)  # held while the async window may reclaim
                window_or_none = ra.async_(
                    index, last - index + 1, folio.order, inode, inode.max_order
                )
                if window_or_none is not None:
                    self.__readahead(inode, window_or_none, fresh, stats, required=False)
            end = folio.index + (1 << folio.order)
            pages = (end if end <= last else last + 1) - index
            is_fresh = folio in fresh
            if is_fresh:
                stats.pages_missed += pages
            else:
                stats.pages_hit += pages
            # A read that starts in the folio where the previous one ended does not count as
            # another access to it (filemap_read's pos_same_folio check).
            if every_access or not (index == first and folio.index <= ra.prev_index < end):
                self.lru.mark_accessed(folio, is_fresh)
            # Counted: reclaim may take it now (its data is in the file or written there first).
            self.busy.discard(folio)
            index = end
        # __readahead counted every page it read in as read ahead; those the request asked
        # for were missed instead (each fresh folio's pages in the request, counted above).
        stats.pages_readahead -= stats.pages_missed - missed_before
        self.events[VmEvent.PGFAULT] += last - first + 1
        self.events[VmEvent.PGMAJFAULT] += stats.pages_missed - missed_before
        ra.note_read(last)

    def __readahead(
        self,
        inode: Inode,
        window: RaWindow,
        fresh: set[Folio],
        stats: IoStats,
        *,
        required: bool,
    ) -> None:
        """Reads one window in (page_cache_ra_order) and marks its PG_readahead folio.
        Readahead is best effort: when memory runs out the window stops short, and only the
        page the reader is waiting for (a sync window's first) must be had."""
        eof_index = (inode.size - 1) >> PAGE_SHIFT
        made: list[Folio] = []
        try:
            self.__populate(inode, ra_folio_layout(window, eof_index), made)
        except OutOfMemory:
            if required and inode.find(window.start) is None:
                self.__populate(inode, [(window.start, 0)], made)
        if window.mark is not None:
            marked = inode.find(window.mark)
            if marked is not None and marked in made:
                marked.readahead = True
        nr_read = sum(f.nr_pages for f in made)
        if nr_read:
            stats.pages_readahead += nr_read  # less the requested pages, in __read_folios
            stats.device_seconds += self.store.device.read_seconds(nr_read * PAGE_SIZE)
            self.events[VmEvent.PGPGIN] += nr_read * _KIB_PER_PAGE
        fresh.update(made)

    def __read_bytes(self, inode: Inode, offset: int, length: int) -> bytes:
        """The file's bytes: the backing file overlaid with pages not yet written back."""
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        nr_pages = last - first + 1
        in_memory = list(self.__memory_pages(inode, first, last))
        data = (
            bytearray(nr_pages * PAGE_SIZE)  # every page is in memory: no device read
            if len(in_memory) == nr_pages
            else bytearray(self.store.read_pages(inode.name, first, nr_pages))
        )
        for index, page in in_memory:
            start = (index - first) * PAGE_SIZE
            data[start : start + PAGE_SIZE] = page
        skip = offset - first * PAGE_SIZE
        return bytes(data[skip : skip + length])

    def __memory_pages(
        self, inode: Inode, first: int, last: int
    ) -> Iterator[tuple[int, bytearray]]:
        index = first
        while index <= last:
            folio = inode.find(index)
            if folio is None:
                index += 1
                continue
            contents = folio.contents
            end = folio.index + folio.nr_pages
            if contents:
                lo, hi = max(first, folio.index), min(last, end - 1)
                if len(contents) <= hi - lo + 1:
                    for i, page in contents.items():
                        if lo <= folio.index + i <= hi:
                            yield folio.index + i, page
                else:
                    for page_index in range(lo, hi + 1):
                        written = contents.get(page_index - folio.index)
                        if written is not None:
                            yield page_index, written
            index = end

    # -- write -----------------------------------------------------------------------------

    def write(self, name: str, offset: int, data: bytes) -> IoStats:
        """generic_perform_write: copies data into folios (allocating aligned ones of up to the
        file's max order), marks them dirty and grows the file. All or nothing."""
        inode = self.lookup(name)
        check_range(offset, len(data), "data")
        end = offset + len(data)
        if end > MAX_FILE_BYTES:
            raise InvalidArgument(f"files end at {MAX_FILE_BYTES} bytes", field="offset")
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        index = first
        while index <= last:
            cached = inode.find(index)
            if cached is not None:
                self.busy.add(cached)
            index = cached.index + cached.nr_pages if cached is not None else index + 1
        made: list[Folio] = []
        try:
            self.__populate(inode, self.__write_layout(inode, first, last), made)
        except OutOfMemory:
            # Nothing was written yet: take the empty new folios back out.
            for folio in made:
                self.__remove(inode, folio, shadow=False)
            self.busy.clear()
            raise
        dirty_before = self.nr_dirty
        try:
            stats = self.__write_folios(inode, offset, data, set(made))
        finally:
            self.busy.clear()
        self.balance_dirty_pages(stats, self.nr_dirty - dirty_before)
        return stats

    def dirty_thresholds(self) -> tuple[int, int]:
        """(background, limit) in pages: the ratios of dirtyable memory (domain_dirty_limits)."""
        dirtyable = self.dirtyable()
        limits = self.limits
        return dirtyable * limits.background_ratio // 100, dirtyable * limits.ratio // 100

    def balance_dirty_pages(self, stats: IoStats, nr_dirtied: int) -> None:
        """Throttles a writer that just dirtied nr_dirtied pages.

        Above the freerun ceiling, halfway between the background threshold and the limit, the
        writer is paused for dirty_pause_seconds(); the pause is simulated, never slept: it is
        charged to stats.throttle_seconds. A writer that took dirty memory over the limit also
        writes back, oldest first, until it is under the background threshold; the device time
        is charged to its call. The kernel checks only every `ratelimit` pages a task dirties
        (balance_dirty_pages_ratelimited); here every write is checked.
        """
        background, limit = self.dirty_thresholds()
        pause = self.dirty_pause_seconds(nr_dirtied, background, limit)
        if pause > 0:
            self.nr_paused += 1
            self.pause_seconds += pause
            stats.throttle_seconds += pause
        if self.nr_dirty <= limit:
            return
        self.nr_throttled += 1
        written = self.__writeback_oldest(lambda folio: self.nr_dirty > background)
        stats.device_seconds += self.store.device.write_seconds(written * PAGE_SIZE)

    def dirty_pause_seconds(self, nr_dirtied: int, background: int, limit: int) -> float:
        """How long to pause a writer that dirtied nr_dirtied pages (balance_dirty_pages with
        wb_position_ratio's pos_ratio_polynom): none at or below the freerun ceiling
        (background + limit) // 2; above it, nr_dirtied pages at the device's write bandwidth
        scaled by pos_ratio = 1 + x**3, x = (setpoint - dirty) / (limit - setpoint + 1),
        setpoint = (freerun + limit) / 2, clamped to 0..2; at most MAX_PAUSE_SECONDS, which is
        also the pause at or over the limit (a ratelimit of 0). A write that dirtied nothing
        is not paused: the kernel balances only after pages are dirtied."""
        dirty = self.nr_dirty
        freerun = (background + limit) // 2
        if nr_dirtied <= 0 or dirty <= freerun:
            return 0.0
        if dirty >= limit:
            return MAX_PAUSE_SECONDS
        setpoint = (freerun + limit) / 2
        x = (setpoint - dirty) / (limit - setpoint + 1)
        pos_ratio = min(max(1 + x**3, 0.0), 2.0)
        # Positive: dirty < limit keeps x above -1.
        task_ratelimit = self.store.device.write_bytes_per_s / PAGE_SIZE * pos_ratio
        return min(nr_dirtied / task_ratelimit, MAX_PAUSE_SECONDS)

    def flush(self) -> int:
        """One pass of the flusher (wb_workfn): writes back folios dirty for longer than
        dirty_expire, then more, oldest first, while dirty memory is over the background
        threshold. Returns pages written."""
        background, _ = self.dirty_thresholds()
        expired_before = self.clock() - self.limits.expire_seconds
        return self.__writeback_oldest(
            lambda folio: folio.dirtied_at <= expired_before or self.nr_dirty > background
        )

    def __writeback_oldest(self, more: Callable[[Folio], bool]) -> int:
        """Writes dirty folios back, oldest first, while more(folio) holds; returns pages
        written successfully."""
        written = 0
        for folio in sorted(self.dirty_folios(), key=lambda f: f.dirtied_at):
            if not more(folio):
                break
            written += self.writeback_folio(folio)
        return written

    def __write_folios(self, inode: Inode, offset: int, data: bytes, fresh: set[Folio]) -> IoStats:
        stats = IoStats()
        end = offset + len(data)
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        now = self.clock()
        index = first
        while index <= last:
            folio = inode.find(index)
            assert folio is not None
            stop = min(folio.index + folio.nr_pages, last + 1)
            if folio in fresh:
                stats.pages_missed += stop - index
            else:
                stats.pages_hit += stop - index
            self.__copy_in(
                inode, folio=folio, offset=offset, data=data, index=index, stop=stop, stats=stats
            )
            if not folio.dirty:
                folio.dirty = True
                folio.dirtied_at = now
                inode.nr_dirty += folio.nr_pages
                self.nr_dirty += folio.nr_pages
                self.events[VmEvent.NR_DIRTIED] += folio.nr_pages
            self.lru.mark_accessed(folio, folio in fresh)
            index = stop
        inode.size = max(inode.size, end)
        return stats

    def __write_layout(self, inode: Inode, first: int, last: int) -> list[tuple[int, int]]:
        """Folios for the uncached pages of a write: the largest aligned order up to the file's
        maximum that fits inside the written range (base pages where the range is cached)."""
        layout = []
        index = first
        while index <= last:
            folio = inode.find(index)
            if folio is not None:
                index = folio.index + folio.nr_pages
                continue
            order = min(inode.max_order, (index & -index).bit_length() - 1 if index else 63)
            while order and index + (1 << order) - 1 > last:
                order -= 1
            layout.append((index, order))
            index += 1 << order
        return layout

    def __copy_in(
        self,
        inode: Inode,
        *,
        folio: Folio,
        offset: int,
        data: bytes,
        index: int,
        stop: int,
        stats: IoStats,
    ) -> None:
        """Copies the part of data that falls in pages [index, stop) of a folio; a partly
        written page not yet in memory is read in first (its bytes come from the file)."""
        if folio.contents is None:
            folio.contents = {}
        end = offset + len(data)
        for page_index in range(index, stop):
            page_start = page_index << PAGE_SHIFT
            lo, hi = max(offset, page_start), min(end, page_start + PAGE_SIZE)
            page = folio.contents.get(page_index - folio.index)
            if page is None:
                whole = lo == page_start and hi == page_start + PAGE_SIZE
                if whole or page_start >= inode.size:
                    page = bytearray(PAGE_SIZE)
                else:
                    page = bytearray(self.store.read_pages(inode.name, page_index, 1))
                    stats.device_seconds += self.store.device.read_seconds(PAGE_SIZE)
                    self.events[VmEvent.PGPGIN] += _KIB_PER_PAGE
                folio.contents[page_index - folio.index] = page
            page[lo - page_start : hi - page_start] = data[lo - offset : hi - offset]

    # -- writeback -------------------------------------------------------------------------

    def writeback_folio(self, folio: Folio) -> int:
        """Writes a dirty folio's in-memory pages to the backing file and marks it clean; an
        error is recorded in the file's errseq and the folio is marked clean all the same.
        Returns the pages written successfully."""
        inode = folio.mapping
        assert isinstance(inode, Inode)
        if not folio.dirty:
            return 0
        written = 0
        try:
            for i, page in sorted((folio.contents or {}).items()):
                self.store.write(
                    inode.name, (folio.index + i) << PAGE_SHIFT, bytes(page), inode.size
                )
            if not folio.contents:
                self.store.write(inode.name, 0, b"", inode.size)
        except OSError as exc:
            inode.wb_err = errseq_set(inode.wb_err, exc.errno or 5)
        else:
            folio.contents = None
            written = folio.nr_pages
            self.events[VmEvent.NR_WRITTEN] += written
            self.events[VmEvent.PGPGOUT] += written * _KIB_PER_PAGE
        folio.dirty = False
        inode.nr_dirty -= folio.nr_pages
        self.nr_dirty -= folio.nr_pages
        return written

    def dirty_folios(self, inode: Inode | None = None) -> list[Folio]:
        inodes = [inode] if inode is not None else list(self.files.values())
        return [f for i in inodes for f in i.folios.values() if f.dirty]

    def writeback(self, name: str | None = None, start: int = 0, end: int | None = None) -> int:
        """Writes back dirty folios of one file's byte range, of one file, or of all files;
        returns pages written successfully."""
        inode = self.lookup(name) if name is not None else None
        written = 0
        for folio in self.dirty_folios(inode):
            folio_start = folio.index << PAGE_SHIFT
            if folio_start + folio.size_bytes <= start or (end is not None and folio_start >= end):
                continue
            written += self.writeback_folio(folio)
        return written

    def sync(self) -> int:
        """Writes back every dirty file and makes it durable (sync(2)); returns pages written.
        Errors stay recorded for the files' handles to see."""
        written = 0
        for inode in {id(f.mapping): f.mapping for f in self.dirty_folios()}.values():
            assert isinstance(inode, Inode)
            written += self.writeback(inode.name)
            try:
                self.store.fsync(inode.name)
            except OSError as exc:
                inode.wb_err = errseq_set(inode.wb_err, exc.errno or errno.EIO)
        return written

    def fsync(self, number: int) -> int:
        """Writes the file back and makes it durable; reports a writeback error that happened
        since this handle last looked, once. Returns pages written."""
        handle = self.handle(number)
        inode = handle.inode
        written = self.writeback(inode.name)
        try:
            self.store.fsync(inode.name)
        except OSError as exc:
            inode.wb_err = errseq_set(inode.wb_err, exc.errno or 5)
        err, handle.wb_err_since, inode.wb_err = errseq_check_and_advance(
            inode.wb_err, handle.wb_err_since
        )
        if err:
            raise WritebackFailed(
                f"writeback of {inode.name!r} failed since this handle last checked: "
                f"{errno.errorcode.get(err, str(err))}",
                field="handle",
                metadata={"errno": str(err), "name": inode.name},
            )
        return written

    # -- truncate and drop -----------------------------------------------------------------

    def truncate(self, name: str, size: int) -> None:
        """Sets the file's size: folios past the end go; a large folio straddling the new end
        is split and its pages past the end freed; the last page's tail reads as zeros."""
        inode = self.lookup(name)
        if not 0 <= size <= MAX_FILE_BYTES:
            raise InvalidArgument(f"size must be 0..{MAX_FILE_BYTES}, not {size}", field="size")
        keep = -(-size // PAGE_SIZE)  # pages that remain
        try:
            for folio in list(inode.folios.values()):
                if folio.index >= keep:
                    self.__remove(inode, folio, shadow=False)
                elif folio.index + folio.nr_pages > keep:
                    self.__split_tail(inode, folio, keep)
        finally:
            self.busy.clear()
        inode.drop_shadows_from(keep)
        if size % PAGE_SIZE:
            last = inode.find(size >> PAGE_SHIFT)
            page = (
                last.contents.get((size >> PAGE_SHIFT) - last.index)
                if last and last.contents
                else None
            )
            if page is not None:
                page[size % PAGE_SIZE :] = bytes(PAGE_SIZE - size % PAGE_SIZE)
        inode.size = size
        self.store.truncate(inode.name, size)

    def __split_tail(self, inode: Inode, folio: Folio, keep: int) -> None:
        """Splits a large folio in place into base pages and frees those at or past page keep;
        the kept pages keep their data and flags. Allocates nothing."""
        contents = folio.contents or {}
        dirty, referenced, when = folio.dirty, folio.referenced, folio.dirtied_at
        index = folio.index
        self.lru.remove(folio)
        del inode.folios[index]
        inode.count_large(index, -1)
        inode.nr_pages -= folio.nr_pages
        self.nr_pages -= folio.nr_pages
        if inode.memcg is not None:
            inode.memcg.nr_cache -= folio.nr_pages
        if dirty:
            inode.nr_dirty -= folio.nr_pages
            self.nr_dirty -= folio.nr_pages
        folio.mapping = None
        for i, page in enumerate(self.allocator.split_cache_folio(folio)):
            if index + i >= keep:
                self.allocator.free_cache_folio(page)
                continue
            self.__insert(inode, page, index + i)
            if i in contents:
                page.contents = {0: contents[i]}
            page.referenced = referenced
            if dirty:
                page.dirty, page.dirtied_at = True, when
                inode.nr_dirty += 1
                self.nr_dirty += 1

    def drop_caches(self) -> int:
        """Frees every clean page cache folio (echo 1 > drop_caches); returns pages freed.
        Data kept only in a folio whose writeback failed goes with it, as in Linux."""
        freed = 0
        for inode in self.files.values():
            for folio in list(inode.folios.values()):
                if not folio.dirty:
                    freed += folio.nr_pages
                    self.__remove(inode, folio, shadow=False)
        return freed


def check_range(offset: int, length: int, field: str = "length") -> None:
    """offset >= 0 and 1 <= length <= MAX_IO_BYTES, else InvalidArgument naming the field."""
    if offset < 0:
        raise InvalidArgument(f"offset must not be negative, not {offset}", field="offset")
    if not 0 < length <= MAX_IO_BYTES:
        raise InvalidArgument(
            f"length must be 1 to {MAX_IO_BYTES} bytes, not {length}", field=field
        )
