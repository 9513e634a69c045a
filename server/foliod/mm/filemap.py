"""The page cache: files, their mappings, lookup, and the read and write paths (mm/filemap.c,
mm/readahead.c's callers). Its other halves: shadow entries in workingset.py, dirty accounting
and writeback in page_writeback.py, truncation in truncate.py; PageCache is all of them.

Each file (an Inode, with its address_space) indexes its folios by page offset; an order-k
folio covers 2^k indices from an index aligned to 2^k. Folios are ids in the machine's
FolioStore (their fields are columns there). A mapping holds them at their head index, as
an xarray of two levels: leaves of 256 slots (four of the kernel's 64-slot nodes to a leaf), a
slot per page for folios of order 0 and 1 and a slot per four pages for orders 2 to 7, and a
dict by head index for folios of order 8 and up (the kernel's multi-index entries high in the
tree). Evicted folios leave shadow entries that detect refaults. The backing file is the
truth for clean data: a folio keeps in memory only the pages that differ from it (written and
not yet written back), so the simulator's memory grows with dirty data, not with what is
cached.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from foliod.api import MAX_IO_BYTES as MAX_IO_BYTES  # noqa: PLC0414 -- re-exported
from foliod.mm.backing_dev import BackingStore, check_file_name
from foliod.mm.errors import (
    AlreadyExists,
    FileHandleClosed,
    InvalidArgument,
    OutOfMemory,
    TenantLimit,
    UnknownFile,
    UnknownFileHandle,
)
from foliod.mm.errseq import errseq_sample
from foliod.mm.folio_store import (
    EMPTY_LEAF,
    EVICTION_MASK,
    MAX_PAGECACHE_ORDER,
    NO_FOLIO,
    PG_DIRTY,
    PG_READAHEAD,
    XA_MASK,
    XA_SHIFT,
    CacheFolio,
    FolioStore,
)
from foliod.mm.huge_memory import HPAGE_PMD_ORDER
from foliod.mm.lru import ReclaimPolicy
from foliod.mm.memcontrol import MemCgroup
from foliod.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE
from foliod.mm.page_writeback import DirtyLimits, Writeback
from foliod.mm.readahead import (
    DEFAULT_RA_PAGES,
    NO_MISS_BEFORE_START,
    RaState,
    RaWindow,
    ra_folio_layout,
)
from foliod.mm.truncate import MAX_FILE_BYTES, Truncation
from foliod.mm.vmstat import VmEvent
from foliod.mm.workingset import ShadowEntries

MAX_RA_PAGES = 1 << 16
_KIB_PER_PAGE = PAGE_SIZE >> 10
# Orders with per-CPU free lists: up to PAGE_ALLOC_COSTLY_ORDER, and the PMD (THP) order.
_PCP_ORDERS = frozenset((0, 1, 2, 3, HPAGE_PMD_ORDER))
# Runs of slots this long or shorter are populated one folio at a time.
_BULK_MIN = 16
# Folios of order XA_MEDIUM_ORDER up to XA_BIG_ORDER - 1 go in leaves of their own, a slot per
# 2^XA_MEDIUM_ORDER pages (a quarter of the slots per page); those of XA_BIG_ORDER and up are
# kept by head index in a dict.
XA_MEDIUM_ORDER = 2
XA_BIG_ORDER = 8
_MEDIUM_LEAF_SHIFT = XA_SHIFT + XA_MEDIUM_ORDER
_MEDIUM_ALIGN = (1 << XA_MEDIUM_ORDER) - 1
# The kernel's xarray node (XA_CHUNK_SHIFT 6): a folio of a lower order takes sibling slots in a
# leaf node, one of this order or higher slots in a node above. Only next_miss's walk needs it.
XA_NODE_ORDER = 6
XA_CHUNK_SIZE = 1 << XA_NODE_ORDER


class CacheAllocator(Protocol):
    """Where page cache folios' frames come from (with reclaim); raises OutOfMemory."""

    def alloc_cache_folio(self, order: int) -> int:
        """The first pfn of a free block of order."""
        ...

    def alloc_cache_folios(self, order: int, count: int) -> list[int] | None:
        """count blocks of order in one step, the same ones count alloc_cache_folio calls in a
        row would give; None (nothing taken) when that would reclaim or fail."""
        ...

    def free_cache_folio(self, pfn: int, order: int) -> None: ...

    def free_cache_folios(self, pfns: list[int], orders: list[int]) -> None:
        """free_cache_folio of each in turn, in fewer steps."""
        ...

    def split_cache_folio(self, pfn: int, order: int, into: Sequence[int] = ()) -> None:
        """The folio of order at pfn becomes folios of the orders into (in address order;
        base pages when empty) over the same frames (accounting)."""
        ...

    def recycle_cache_frames(self, nr: int) -> None:
        """nr pages of frames went straight from evicted folios to new ones of the same order
        (the per-CPU lists' LIFO order): counted as freed and allocated, the buddy lists
        untouched."""
        ...


@dataclass(slots=True)
class IoStats:
    """What one read or write did: pages found, pages read in, device time it cost, and how
    long balance_dirty_pages paused the writer (simulated, like the device time)."""

    pages_hit: int = 0
    pages_missed: int = 0
    pages_readahead: int = 0
    device_seconds: float = 0.0
    throttle_seconds: float = 0.0

    def add(self, other: IoStats) -> None:
        """Adds another call's stats to these."""
        self.pages_hit += other.pages_hit
        self.pages_missed += other.pages_missed
        self.pages_readahead += other.pages_readahead
        self.device_seconds += other.device_seconds
        self.throttle_seconds += other.throttle_seconds


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


class Inode(ShadowEntries):
    """One file and its page cache mapping (struct inode + struct address_space)."""

    __slots__ = (
        "big",
        "handles",
        "large_blocks",
        "large_shadow_blocks",
        "last_found",
        "leaf_counts",
        "leaves",
        "max_order",
        "medium",
        "medium_counts",
        "memcg",
        "name",
        "nr_by_order",
        "nr_dirty",
        "nr_pages",
        "number",
        "ra",
        "registry",
        "shadow_orders",
        "size",
        "store",
        "top_order",
        "wb_err",
    )

    def __init__(
        self,
        name: str,
        size: int,
        max_order: int,
        ra_pages: int,
        *,
        store: FolioStore | None = None,
        number: int = 1,
        registry: Mapping[int, Inode] | None = None,
    ) -> None:
        self.name = name
        self.size = size
        self.max_order = max_order
        # The folio columns, this inode's number in their mapping column, and the inodes by
        # number (what a CacheFolio's mapping answers).
        self.store = store if store is not None else FolioStore()
        self.number = number
        self.registry = registry
        # The readahead state of reads by name, which share one open file description per file;
        # its ra_pages is the file's, copied into each handle at open.
        self.ra = RaState(ra_pages)
        # The mapping: leaf number -> leaf (folio id + 1 at each folio's head, 0 where none
        # starts) and folios per leaf, for orders below XA_MEDIUM_ORDER (a slot a page) and
        # below XA_BIG_ORDER (medium: a slot per 2^XA_MEDIUM_ORDER pages); bigger folios by
        # head index.
        self.leaves: dict[int, array[int]] = {}
        self.leaf_counts: dict[int, int] = {}
        self.medium: dict[int, array[int]] = {}
        self.medium_counts: dict[int, int] = {}
        self.big: dict[int, int] = {}
        # Shadow entries: the token a folio that left was evicted with (the policy's: an
        # eviction age, or mglru's generation and tier), in the slot of its head index in the
        # page-granular leaves, as -(token & EVICTION_MASK) - 1 (the kernel's value entries).
        # As in the kernel's xarray, an evicted large folio leaves one entry over its whole
        # range (a multi-index entry): its head is in shadow_orders with the folio's order, and
        # large_shadow_blocks counts those entries per block of MAX_PAGECACHE_ORDER's size.
        # Entries never overlap, nor cover a cached page.
        self.shadow_orders: dict[int, int] = {}
        self.large_shadow_blocks: dict[int, int] = {}
        self.nr_pages = 0
        self.nr_dirty = 0
        self.nr_by_order = [0] * (MAX_PAGECACHE_ORDER + 1)
        # No folio in the mapping is of a higher order (a high-water mark that bounds find).
        self.top_order = 0
        # Large folios in the mapping per block of MAX_PAGECACHE_ORDER's size (one holds each
        # whole): get() misses at once in a block without any.
        self.large_blocks: dict[int, int] = {}
        # The large folio get() found last (a hint, checked before use).
        self.last_found = NO_FOLIO
        self.wb_err = 0
        self.handles: set[int] = set()
        # The tenant its page cache is charged to (memcontrol.tenant_of_file), if any.
        self.memcg: MemCgroup | None = None

    # -- the mapping (xarray) -----------------------------------------------------------------

    def get(self, index: int) -> int:
        """The folio that covers a page index (filemap_get_entry); NO_FOLIO if none does."""
        leaf = self.leaves.get(index >> XA_SHIFT)
        if leaf is not None:
            f = leaf[index & XA_MASK] - 1
            if f >= 0:
                return f
        if index >> MAX_PAGECACHE_ORDER not in self.large_blocks:
            return NO_FOLIO
        store = self.store
        order_of = store.order
        # The large folio found last, if it is still in the mapping at its index and covers
        # this one: reads tend to stay in one folio.
        last = self.last_found
        if last >= 0 and store.mapping[last] == self.number:
            head = store.index[last]
            if head < index < head + (1 << order_of[last]) and self.head_at(head) == last:
                return last
        top = self.top_order
        if leaf is not None:
            f = leaf[index & XA_MASK & ~1] - 1
            if f >= 0 and order_of[f]:
                self.last_found = f
                return f
        if top >= XA_MEDIUM_ORDER:
            medium = self.medium.get(index >> _MEDIUM_LEAF_SHIFT)
            if medium is not None:
                for order in range(XA_MEDIUM_ORDER, min(top, XA_BIG_ORDER - 1) + 1):
                    f = medium[(index >> order << order >> XA_MEDIUM_ORDER) & XA_MASK] - 1
                    if f >= 0 and order_of[f] >= order:
                        self.last_found = f
                        return f
        big = self.big
        for order in range(XA_BIG_ORDER, top + 1):
            f = big.get(index & ~((1 << order) - 1), NO_FOLIO)
            if f >= 0 and order_of[f] >= order:
                self.last_found = f
                return f
        return NO_FOLIO

    def head_at(self, index: int) -> int:
        """The folio whose head is at index; NO_FOLIO if none starts there."""
        leaf = self.leaves.get(index >> XA_SHIFT)
        if leaf is not None:
            f = leaf[index & XA_MASK] - 1
            if f >= 0:
                return f
        if index & _MEDIUM_ALIGN or (not self.medium and not self.big):
            return NO_FOLIO
        medium = self.medium.get(index >> _MEDIUM_LEAF_SHIFT)
        if medium is not None:
            f = medium[(index >> XA_MEDIUM_ORDER) & XA_MASK] - 1
            if f >= 0:
                return f
        return self.big.get(index, NO_FOLIO)

    def find(self, index: int) -> CacheFolio | None:
        """The folio that covers a page index, as an object (get() for code off hot paths)."""
        f = self.get(index)
        return None if f < 0 else CacheFolio(self.store, f, self.registry)

    def _level(self, order: int) -> tuple[dict[int, array[int]], dict[int, int], int]:
        """(leaves, counts, shift) of the leaves that keep folios of order (below big)."""
        if order >= XA_MEDIUM_ORDER:
            return self.medium, self.medium_counts, XA_MEDIUM_ORDER
        return self.leaves, self.leaf_counts, 0

    def xa_store(self, index: int, f: int, order: int) -> None:
        """The folio f of order goes in at head index."""
        if order >= XA_BIG_ORDER:
            self.big[index] = f
        else:
            leaves, counts, shift = self._level(order)
            number = index >> (XA_SHIFT + shift)
            leaf = leaves.get(number)
            if leaf is None:
                leaf = leaves[number] = array("i", EMPTY_LEAF)
                counts[number] = 1
            else:
                counts[number] += 1
            leaf[(index >> shift) & XA_MASK] = f + 1
        self.nr_by_order[order] += 1
        if order:  # count_large(index, 1), written out
            blocks, block = self.large_blocks, index >> MAX_PAGECACHE_ORDER
            blocks[block] = blocks.get(block, 0) + 1
            self.top_order = max(self.top_order, order)

    def xa_store_run(self, index: int, ids: list[int], order: int) -> None:
        """xa_store of folios of one order at consecutive slots from index."""
        nr = 1 << order
        if order >= XA_BIG_ORDER:
            self.big.update(zip(range(index, index + len(ids) * nr, nr), ids, strict=True))
        else:
            leaves, counts, shift = self._level(order)
            # In slots of the level: a folio of order takes 2^(order - shift) of them.
            step, at_slot = nr >> shift, index >> shift
            done = 0
            while done < len(ids):
                slot_index = at_slot + done * step
                number = slot_index >> XA_SHIFT
                take = min(len(ids) - done, (((number + 1) << XA_SHIFT) - slot_index) // step)
                leaf = leaves.get(number)
                if leaf is None:
                    leaf = leaves[number] = array("i", EMPTY_LEAF)
                    counts[number] = 0
                slot = slot_index & XA_MASK
                leaf[slot : slot + take * step : step] = array(
                    "i", [f + 1 for f in ids[done : done + take]]
                )
                counts[number] += take
                done += take
        self.nr_by_order[order] += len(ids)
        if order:
            blocks = self.large_blocks
            for head in range(index, index + len(ids) * nr, nr):
                block = head >> MAX_PAGECACHE_ORDER
                blocks[block] = blocks.get(block, 0) + 1
            self.top_order = max(self.top_order, order)

    def any_shadow_in(self, lo: int, hi: int) -> bool:
        """Whether a shadow entry covers a page of [lo, hi)."""
        large = self.large_shadow_blocks
        if large and any(
            block in large
            for block in range(lo >> MAX_PAGECACHE_ORDER, ((hi - 1) >> MAX_PAGECACHE_ORDER) + 1)
        ):
            return True
        return bool(self.shadow_heads_in(lo, hi))

    def xa_erase(self, index: int, order: int) -> None:
        """The folio of order at head index leaves."""
        if order >= XA_BIG_ORDER:
            del self.big[index]
        else:
            leaves, counts, shift = self._level(order)
            number = index >> (XA_SHIFT + shift)
            count = counts[number] - 1
            if count:
                leaves[number][(index >> shift) & XA_MASK] = 0
                counts[number] = count
            else:
                del leaves[number], counts[number]
        self.nr_by_order[order] -= 1
        if order:
            self.count_large(index, -1)

    def any_head_in(self, lo: int, hi: int) -> bool:
        """Whether a folio starts in [lo, hi)."""
        for leaves, shift in ((self.leaves, 0), (self.medium, XA_MEDIUM_ORDER)):
            if not leaves:
                continue
            # The level's slots whose pages start in [lo, hi).
            start, stop = -(-lo >> shift), -(-hi >> shift)
            while start < stop:
                number = start >> XA_SHIFT
                end = min(stop, (number + 1) << XA_SHIFT)
                leaf = leaves.get(number)
                if leaf is not None:
                    a = start & XA_MASK
                    b = a + end - start
                    if max(leaf[a:b]) > 0:  # a folio; shadow entries are negative
                        return True
                start = end
        big = self.big
        if big:
            # Big folios' heads are aligned to their order, XA_BIG_ORDER at least.
            step = 1 << XA_BIG_ORDER
            first = (lo + step - 1) & ~(step - 1)
            return any(head in big for head in range(first, hi, step))
        return False

    def heads(self) -> list[tuple[int, int]]:
        """(head index, folio id) of every folio in the mapping, by index."""
        found: list[tuple[int, int]] = []
        for leaves, shift in ((self.leaves, 0), (self.medium, XA_MEDIUM_ORDER)):
            for number, leaf in leaves.items():
                base = number << XA_SHIFT
                found.extend(((base + i) << shift, v - 1) for i, v in enumerate(leaf) if v > 0)
        found.extend(self.big.items())
        found.sort()
        return found

    @property
    def folios(self) -> FolioMap:
        """The mapping as head index -> CacheFolio (for code off hot paths, and tests)."""
        return FolioMap(self)

    def count_large(self, index: int, delta: int) -> None:
        """A large folio at index enters (+1) or leaves (-1) the mapping."""
        blocks, block = self.large_blocks, index >> MAX_PAGECACHE_ORDER
        count = blocks.get(block, 0) + delta
        if count:
            blocks[block] = count
        else:
            del blocks[block]

    # CacheView for readahead.
    def prev_miss(self, index: int, max_scan: int) -> int:
        get = self.get
        for i in range(index, index - max_scan, -1):
            if i < 0:
                return NO_MISS_BEFORE_START
            if get(i) < 0:
                return i
        return index - max_scan

    def next_miss(self, index: int, max_scan: int) -> int:
        """page_cache_next_miss as the kernel's walk answers it. xas_next moves a slot offset
        in a node of XA_CHUNK_SIZE slots along with the index; a walk that starts inside a
        folio below XA_NODE_ORDER (its pages are sibling slots of one leaf node) is left by the
        first load at the folio's head slot, the index where it was. Up to the end of that
        node each index is then judged by the slot ``lag`` pages before it, and the miss found
        is ``lag`` pages past the real one; at the node's end the walk is in step again.
        (Measured on Linux 6.18: two interleaved readers on one file.)"""
        get, store = self.get, self.store
        f = get(index)
        if f < 0:
            return index
        head = store.index[f]
        if store.order[f] >= XA_NODE_ORDER or head == index:
            return self._next_hole(index + 1, index + max_scan)
        lag = index - head
        node_end = (head | (XA_CHUNK_SIZE - 1)) + 1
        # Slots head + 1 .. node_end - 1, judged for the indices lag pages after them.
        limit = min(node_end, head + max_scan)
        hole = self._next_hole(head + 1, limit)
        if hole < limit:
            return hole + lag
        if limit < node_end:  # max_scan ran out first
            return index + max_scan
        # In step again at index node_end + lag, with what is left of max_scan.
        return self._next_hole(node_end + lag, index + max_scan)

    def _next_hole(self, i: int, stop: int) -> int:
        """The first uncached index in [i, stop); stop if there is none."""
        get, store = self.get, self.store
        while i < stop:
            f = get(i)
            if f < 0:
                return i
            i = store.index[f] + (1 << store.order[f])
        return stop


class FolioMap(Mapping[int, CacheFolio]):
    """A mapping's folios as head index -> CacheFolio, by index."""

    __slots__ = ("inode",)

    def __init__(self, inode: Inode) -> None:
        self.inode = inode

    def __getitem__(self, index: int) -> CacheFolio:
        f = self.inode.head_at(index)
        if f < 0:
            raise KeyError(index)
        return CacheFolio(self.inode.store, f, self.inode.registry)

    def __iter__(self) -> Iterator[int]:
        return iter([index for index, _ in self.inode.heads()])

    def __len__(self) -> int:
        return sum(self.inode.nr_by_order)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.inode.head_at(index) >= 0


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
class PageCache(Writeback, Truncation):
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
    busy: set[int] = field(default_factory=set)
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
        # The folio columns, shared with the reclaim policy.
        self.folio_store: FolioStore = self.lru.store
        # Inodes by number (the folio columns' mapping); numbers are never reused.
        self.inodes: dict[int, Inode] = {}
        self._next_ino = 1
        # Limit reclaim making room for a folio of a per-CPU-list order keeps the frame of the
        # last folio of that order it frees (see _make_room).
        self._recycling: int | None = None
        self._recycled: int | None = None
        settings = self.store.settings()
        for name, size in self.store.names().items():
            saved = settings.get(name, {})
            max_order = saved.get("max_order", self.default_max_order)
            ra_pages = saved.get("ra_pages", self.default_ra_pages)
            if not 0 <= max_order <= MAX_PAGECACHE_ORDER:
                max_order = self.default_max_order
            if not 0 <= ra_pages <= MAX_RA_PAGES:
                ra_pages = self.default_ra_pages
            inode = self.files[name] = self._new_inode(name, size, max_order, ra_pages)
            inode.memcg = memcg = self.memcg_of(name)
            if memcg is not None:
                memcg.nr_files += 1

    def _new_inode(self, name: str, size: int, max_order: int, ra_pages: int) -> Inode:
        number = self._next_ino
        self._next_ino += 1
        inode = Inode(
            name,
            size,
            max_order,
            ra_pages,
            store=self.folio_store,
            number=number,
            registry=self.inodes,
        )
        self.inodes[number] = inode
        return inode

    def folio(self, f: int) -> CacheFolio:
        """A folio id read as an object."""
        return CacheFolio(self.folio_store, f, self.inodes)

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
        inode = self._new_inode(
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
        by_order = {order: n for order, n in enumerate(inode.nr_by_order) if n}
        return FileStat(
            inode.name,
            inode.size,
            inode.nr_pages,
            inode.nr_dirty,
            by_order,
            inode.max_order,
            inode.ra.ra_pages,
            len(inode.handles),
        )

    def delete(self, name: str) -> None:
        inode = self.lookup(name)
        self._remove_many(inode, [f for _, f in inode.heads()])
        for number in list(inode.handles):
            del self.handles[number]
        self.store.delete(name)
        self.store.set_settings(name, None)
        del self.files[name]
        del self.inodes[inode.number]
        if inode.memcg is not None:
            inode.memcg.nr_files -= 1
            inode.memcg.nr_open_files -= len(inode.handles)

    # -- folios in the mapping -------------------------------------------------------------

    def _insert(self, inode: Inode, f: int, index: int) -> None:
        """filemap_add_folio: into the mapping and onto the inactive LRU; a refault of a
        recently evicted folio is activated (workingset_refault)."""
        store = self.folio_store
        store.mapping[f] = inode.number
        store.index[f] = index
        order = store.order[f]
        self.busy.add(f)
        nr = 1 << order
        # The shadow entries go first: the folio takes their slots.
        shadow = inode.take_shadows(index, nr)
        inode.xa_store(index, f, order)
        inode.nr_pages += nr
        self.nr_pages += nr
        if inode.memcg is not None:
            inode.memcg.nr_cache += nr
        self.lru.add(f)
        if shadow is not None:
            self.lru.refault(f, shadow)

    def _remove(self, inode: Inode, f: int, *, shadow: bool, free: bool = True) -> None:
        """Takes a folio out of its mapping and the LRU and releases its id; frees its frames
        too unless they are to be recycled."""
        store = self.folio_store
        self.lru.remove(f)
        index, order = store.index[f], store.order[f]
        inode.xa_erase(index, order)
        nr = 1 << order
        inode.nr_pages -= nr
        self.nr_pages -= nr
        if inode.memcg is not None:
            inode.memcg.nr_cache -= nr
        if store.flags[f] & PG_DIRTY:
            self.folio_clear_dirty(inode, f)
        if shadow:
            inode.add_shadow(index, order, self.lru.shadow(f))
        pfn = store.pfn[f]
        store.release(f)
        if free:
            self.allocator.free_cache_folio(pfn, order)

    def _remove_many(self, inode: Inode, ids: list[int]) -> None:
        """_remove of each folio in turn (no shadow entries), frames freed in that order,
        in fewer steps."""
        if not ids:
            return
        store = self.folio_store
        order_of, index_of, flags, pfn_of = store.order, store.index, store.flags, store.pfn
        self.lru.remove_many(ids)
        pfns: list[int] = []
        orders: list[int] = []
        nr_pages = 0
        erase, release = inode.xa_erase, store.release
        for f in ids:
            order = order_of[f]
            erase(index_of[f], order)
            nr_pages += 1 << order
            if flags[f] & PG_DIRTY:
                self.folio_clear_dirty(inode, f)
            pfns.append(pfn_of[f])
            orders.append(order)
            release(f)
        inode.nr_pages -= nr_pages
        self.nr_pages -= nr_pages
        if inode.memcg is not None:
            inode.memcg.nr_cache -= nr_pages
        self.allocator.free_cache_folios(pfns, orders)

    def _make_room(self, order: int) -> int | None:
        """Evicts what the policy chooses until a folio of order fits under the capacity
        (memcg-style limit reclaim). For the orders the kernel keeps per-CPU free lists of
        (0..PAGE_ALLOC_COSTLY_ORDER, and the PMD order), the frames of the last evicted folio
        of that order are returned for reuse (their pfn), as the per-CPU list hands back the
        block freed last (rmqueue_pcplist); None when there is none."""
        assert self.capacity_pages is not None
        over = self.nr_pages + (1 << order) - self.capacity_pages
        if over <= 0:
            return None
        self._recycling = order if order in _PCP_ORDERS else None
        self._recycled = None
        try:
            freed = self.lru.shrink(over, self, direct=True)
        finally:
            self._recycling = None
        recycled, self._recycled = self._recycled, None
        if freed < over:
            if recycled is not None:
                self.allocator.free_cache_folio(recycled, order)
            raise OutOfMemory(
                f"page cache capacity of {self.capacity_pages} pages is full and nothing in "
                "it can be reclaimed",
                metadata={"capacity_pages": str(self.capacity_pages)},
            )
        if recycled is not None:
            self.allocator.recycle_cache_frames(1 << order)
        return recycled

    def evict_folio(self, f: int) -> None:
        """Evictor: reclaim frees a clean folio, leaving shadow entries."""
        store = self.folio_store
        inode = self.inodes[store.mapping[f]]
        order = store.order[f]
        keep = order == self._recycling
        pfn = store.pfn[f]
        self._remove(inode, f, shadow=True, free=not keep)
        if keep:
            if self._recycled is not None:  # freed earlier: not the one handed back
                self.allocator.free_cache_folio(self._recycled, order)
            self._recycled = pfn

    def shrink_memcg(self, memcg: MemCgroup, nr_to_reclaim: int) -> int:
        """Reclaims up to nr_to_reclaim pages of one tenant's page cache, oldest first in the
        policy's eviction order, dirty folios written back first (try_to_free_mem_cgroup_pages);
        returns pages freed. Other tenants' folios are neither evicted nor aged: the kernel
        keeps one LRU per memory cgroup, this walks the machine's one LRU for the tenant's."""
        freed = 0
        busy = self.busy
        store, inodes = self.folio_store, self.inodes
        numbers = {number for number, inode in inodes.items() if inode.memcg is memcg}
        mine = [f for f in self.lru.folios() if store.mapping[f] in numbers]
        scanned = 0
        for f in mine:
            if freed >= nr_to_reclaim:
                break
            nr = 1 << store.order[f]
            scanned += nr
            if f in busy:
                continue
            if store.flags[f] & PG_DIRTY:
                self.writeback_folio(f)
                self.events[VmEvent.PGROTATED] += nr
            self.evict_folio(f)
            freed += nr
        self.events[VmEvent.PGSCAN_DIRECT] += scanned
        self.events[VmEvent.PGSTEAL_DIRECT] += freed
        return freed

    def _alloc(self, order: int) -> int:
        """A new cache folio of order (its id), falling back to a base page when large ones
        cannot be had."""
        if self.capacity_pages is not None:
            recycled = self._make_room(order)
            if recycled is not None:
                return self.folio_store.new(recycled, order)
        try:
            return self.folio_store.new(self.allocator.alloc_cache_folio(order), order)
        except OutOfMemory:
            if order == 0:
                raise
        return self.folio_store.new(self.allocator.alloc_cache_folio(0), 0)

    def _populate(self, inode: Inode, layout: list[tuple[int, int]], made: list[int]) -> list[int]:
        """Allocates and inserts folios for (index, order) slots not cached yet; a slot that is
        partly cached becomes base pages. Appends the new folios to made as it goes (so a caller
        can undo them when an allocation fails) and returns it."""
        if not layout:
            return made
        get = inode.get
        # Nothing cached anywhere in the layout's span (the common case): no slot needs a look.
        # Allocating only evicts, and the folios made here are not reclaimed (busy).
        lo, (last, last_order) = layout[0][0], layout[-1]
        span_empty = get(lo) < 0 and not inode.any_head_in(lo + 1, last + (1 << last_order))
        if span_empty and self.capacity_pages is None and len(layout) > _BULK_MIN:
            self._populate_bulk(inode, layout, made)
            return made
        for index, order in layout:
            slots = [(index, order)]
            # Cached in part: a folio covers a page of the slot.
            if not span_empty and (
                get(index) >= 0 or inode.any_head_in(index + 1, index + (1 << order))
            ):
                slots = [(i, 0) for i in range(index, index + (1 << order)) if get(i) < 0]
            for slot_index, slot_order in slots:
                self._populate_slot(inode, slot_index, slot_order, made)
        return made

    def _populate_window(
        self, inode: Inode, layout: list[tuple[int, int]], last: int, made: list[int]
    ) -> None:
        """Reads a window in as page_cache_ra_order does: the layout's folios in order, until one
        meets a cached page (filemap_add_folio's -EEXIST) or cannot be had at its order; from
        there to the window's last page, base pages wherever nothing is cached (the fallback to
        do_page_cache_ra). Appends the new folios to made."""
        if not layout:
            return
        get = inode.get
        lo, (hi, hi_order) = layout[0][0], layout[-1]
        span_empty = get(lo) < 0 and not inode.any_head_in(lo + 1, hi + (1 << hi_order))
        if span_empty and self.capacity_pages is None and len(layout) > _BULK_MIN:
            self._populate_bulk(inode, layout, made)
            return
        order_of = self.folio_store.order
        fallback = last + 1  # where base pages take over
        for index, order in layout:
            if not span_empty and (
                get(index) >= 0 or (order and inode.any_head_in(index + 1, index + (1 << order)))
            ):
                fallback = index
                break
            f = self._alloc(order)
            self._insert(inode, f, index)
            made.append(f)
            if order_of[f] < order:  # a base page: no folio of the order to be had
                fallback = index + 1
                break
        for i in range(fallback, last + 1):
            if get(i) < 0:
                f = self._alloc(0)
                self._insert(inode, f, i)
                made.append(f)

    def _populate_slot(self, inode: Inode, index: int, order: int, made: list[int]) -> None:
        """Allocates and inserts the folio of one empty slot (base pages if a large folio
        cannot be had)."""
        f = self._alloc(order)
        self._insert(inode, f, index)
        made.append(f)
        if self.folio_store.order[f] < order:
            # Fallen back to a base page: the rest of the slot as base pages too.
            for i in range(index + 1, index + (1 << order)):
                extra = self._alloc(0)
                self._insert(inode, extra, i)
                made.append(extra)

    def _populate_bulk(self, inode: Inode, layout: list[tuple[int, int]], made: list[int]) -> None:
        """_populate of an empty span with no capacity limit: each run of slots of one order
        takes its folios in one step where no reclaim is needed (inserting takes no memory,
        so the frames are those one allocation per slot would take)."""
        start = 0
        while start < len(layout):
            order = layout[start][1]
            stop = start + 1
            while stop < len(layout) and layout[stop][1] == order:
                stop += 1
            pfns = (
                self.allocator.alloc_cache_folios(order, stop - start)
                if stop - start > _BULK_MIN
                else None
            )
            if pfns is None:
                for index, _ in layout[start:stop]:
                    self._populate_slot(inode, index, order, made)
            else:
                ids = self.folio_store.new_many(pfns, order)
                first = layout[start][0]
                end = first + ((stop - start) << order)
                if layout[stop - 1][0] == end - (1 << order) and not inode.any_shadow_in(
                    first, end
                ):
                    self._insert_run(inode, ids, first, order)
                else:
                    insert = self._insert
                    for (index, _), f in zip(layout[start:stop], ids, strict=True):
                        insert(inode, f, index)
                made.extend(ids)
            start = stop

    def _insert_run(self, inode: Inode, ids: list[int], index: int, order: int) -> None:
        """_insert of folios of one order at consecutive slots from index, where no shadow
        entry lies (so none refaults): in fewer, larger steps."""
        store = self.folio_store
        mapping_of, index_of = store.mapping, store.index
        number, nr = inode.number, 1 << order
        at = index
        for f in ids:
            mapping_of[f] = number
            index_of[f] = at
            at += nr
        self.busy.update(ids)
        inode.xa_store_run(index, ids, order)
        total = len(ids) << order
        inode.nr_pages += total
        self.nr_pages += total
        if inode.memcg is not None:
            inode.memcg.nr_cache += total
        self.lru.add_many(ids)

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
            inode, ra = self._through(name, handle)
        check_range(offset, length)
        end = min(offset + length, inode.size)
        if offset >= end:
            return b"", IoStats()
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        if short_path:
            f = inode.get(first)
            store = self.folio_store
            if f >= 0 and not store.flags[f] & PG_READAHEAD:
                head = store.index[f]
                if last < head + (1 << store.order[f]):
                    return self._read_in_folio(inode, f, ra, offset, end)
        stats = IoStats()
        fresh: set[int] = set()
        try:
            self._read_folios(inode, first, last, fresh, stats, ra=ra, end_pos=end)
            return self._read_bytes(inode, offset, end - offset), stats
        finally:
            self.busy.clear()
            self._count_reads(stats)

    def _read_in_folio(
        self, inode: Inode, f: int, ra: RaState, offset: int, end: int
    ) -> tuple[bytes, IoStats]:
        """read() of [offset, end) inside one cached folio without PG_readahead: all hits, the
        folio accessed unless the previous read ended in it (under the kernel's policies), one
        page straight from memory."""
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        nr_pages = last - first + 1
        store = self.folio_store
        head = store.index[f]
        if self.lru.textbook or not ra.read_last_in(head, head + (1 << store.order[f])):
            self.lru.mark_accessed(f)
        ra.prev_pos = end  # note_read
        stats = IoStats(pages_hit=nr_pages)
        self.events[VmEvent.PGFAULT] += nr_pages
        self.nr_read_hits += nr_pages
        contents = store.contents.get(f)
        if contents and nr_pages == 1:
            page = contents.get(first - head)
            if page is not None:
                skip = offset - (first << PAGE_SHIFT)
                return bytes(page[skip : skip + end - offset]), stats
        return self._read_bytes(inode, offset, end - offset), stats

    def _through(self, name: str, number: int) -> tuple[Inode, RaState]:
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

    def _count_reads(self, stats: IoStats) -> None:
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
        takes (see _make_room). short_path=False sends every access down read()'s path;
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
                self._replay(inode, keys, stats)
            else:
                fresh: set[int] = set()
                for index in keys:
                    self._read_page(inode, index, fresh, stats, inode.ra)
        finally:
            self.busy.clear()
            self._count_reads(stats)
        return stats

    def _replay(self, inode: Inode, keys: list[int], stats: IoStats) -> None:
        """replay()'s loop. Written for speed: the state it touches is held in locals, and what
        the short path counts is added up once at the end (counts only add up, so read()'s
        path, taken for some accesses, may count its own in between)."""
        lru, ra = self.lru, inode.ra
        store = self.folio_store
        flags, order_of, index_of, mapping_of = store.flags, store.order, store.index, store.mapping
        next_of = store.next
        leaves, get, max_order = inode.leaves, inode.get, inode.max_order
        eviction_mask = EVICTION_MASK
        ino = inode.number
        # Blocks with large folios' shadow entries (read()'s path leaves them).
        large_shadow_blocks = inode.large_shadow_blocks
        touch, requeue, victim_of, refault = lru.touch, lru.requeue, lru.victim, lru.refault
        queue, ordered, stamp = lru.queue, lru.ordered, lru.shadow
        leaf_counts, by_order, large_blocks = (
            inode.leaf_counts,
            inode.nr_by_order,
            inode.large_blocks,
        )
        recycle = lru.recycle
        xa_shift, xa_mask, readahead_bit, dirty_bit = XA_SHIFT, XA_MASK, PG_READAHEAD, PG_DIRTY
        # A policy that only counts refaults has them counted here, in one go; one that stamps
        # shadow entries with the nonresident age has them stamped here.
        count_refaults = type(lru).refault is ReclaimPolicy.refault
        age_tokens = type(lru).shadow is ReclaimPolicy.shadow
        # lru and fifo: requeue, age tokens, refaults only counted (the shortest path).
        plain = requeue is not None and age_tokens and count_refaults
        capacity = self.capacity_pages if self.capacity_pages is not None else -1
        ra_pages = ra.ra_pages
        read_seconds = self.store.device.read_seconds(PAGE_SIZE)
        written = store.contents
        fresh: set[int] = set()
        hits = recycled = allocated = refaults = 0
        # Kept in locals while the loop runs: whether the cache is at its capacity (only a
        # new folio or read()'s path changes that here), and for the plain policies, whose
        # age tokens only this loop hands out, the nonresident age (written back before
        # anything else may evict: a new frame, read()'s path, and at the end).
        full = self.nr_pages == capacity
        age = lru.nonresident_age
        # The last page accessed here; NO_FOLIO until the first (ra.prev_pos is the byte after
        # it, written back at the end and before read()'s path).
        prev = NO_FOLIO
        last = NO_FOLIO  # the folio of the last hit
        try:
            for index in keys:
                leaf = leaves.get(index >> xa_shift)
                f = leaf[index & xa_mask] - 1 if leaf is not None else -1
                if f < 0 and max_order:
                    if (
                        last >= 0
                        and mapping_of[last] == ino
                        and index_of[last] < index < index_of[last] + (1 << order_of[last])
                    ):
                        f = last
                    elif index >> MAX_PAGECACHE_ORDER in large_blocks:
                        f = get(index)
                if f >= 0:
                    if not flags[f] & readahead_bit:
                        touch(f)
                        hits += 1
                        last = f
                        prev = index
                        continue
                elif not ra_pages or self._reads_alone(ra, prev, index, inode):
                    if full:
                        if ordered is not None:
                            victim = next(iter(ordered), -1)
                        elif queue >= 0:
                            victim = next_of[queue]
                            if victim == queue:
                                victim = -1
                        else:
                            victim = victim_of()
                    else:
                        victim = -1
                    bits = flags[victim] if victim >= 0 else dirty_bit
                    if not bits & dirty_bit and not order_of[victim]:
                        # Limit reclaim evicts the victim (a shadow entry stays) and its
                        # frame is read in at index: the id is reused, reset as new.
                        if requeue is None:
                            token = recycle(victim)
                        else:
                            # Policies with requeue (lru, fifo) keep no state in the folio;
                            # ReclaimPolicy.shadow of a base page, where theirs is that one.
                            if plain:
                                age += 1
                                token = age
                            elif age_tokens:
                                token = lru.nonresident_age = lru.nonresident_age + 1
                            else:
                                token = stamp(victim)
                            if bits & readahead_bit:
                                flags[victim] = bits & ~readahead_bit
                            requeue(victim)
                        if mapping_of[victim] == ino:
                            # inode.evict_base_page(victim_index, token), written out; the
                            # page's count by order comes back below
                            victim_index = index_of[victim]
                            leaves[victim_index >> xa_shift][victim_index & xa_mask] = (
                                -(token & eviction_mask) - 1
                            )
                        else:
                            self._move_recycled(victim, inode, token)
                            by_order[0] += 1
                        index_of[victim] = index
                        if written and victim in written:
                            del written[victim]
                        # The page takes the slot at index, empty or a shadow entry's
                        # (xa_store(index, victim, 0), written out).
                        number = index >> xa_shift
                        if (
                            large_shadow_blocks
                            and index >> MAX_PAGECACHE_ORDER in large_shadow_blocks
                        ):
                            shadow = inode.take_shadows(index, 1)
                            leaf = leaves.get(number)
                            value = 0
                        else:
                            value = leaf[index & xa_mask] if leaf is not None else 0
                            shadow = -value - 1 if value < 0 else None
                        if leaf is None:
                            leaf = leaves[number] = array("i", EMPTY_LEAF)
                            leaf_counts[number] = 1
                        elif not value:
                            leaf_counts[number] += 1
                        leaf[index & xa_mask] = victim + 1
                        if plain:
                            if shadow is not None:
                                refaults += 1
                        else:
                            if shadow is not None:
                                if count_refaults:
                                    refaults += 1
                                else:
                                    refault(victim, shadow)
                            if requeue is None:
                                lru.mark_accessed(victim, fresh=True)
                        recycled += 1
                        prev = index
                        continue
                    if self.nr_pages < capacity or capacity < 0:
                        # Room for a new folio: allocated and read in alone.
                        if plain:
                            lru.nonresident_age = age
                        try:
                            pfn = self.allocator.alloc_cache_folio(0)
                        except OutOfMemory:  # read()'s readahead tries the page twice
                            pfn = self.allocator.alloc_cache_folio(0)
                        f = store.new(pfn, 0)
                        self._insert(inode, f, index)
                        self.busy.clear()
                        lru.mark_accessed(f, fresh=True)
                        allocated += 1
                        prev = index
                        full = self.nr_pages == capacity
                        age = lru.nonresident_age
                        continue
                # Anything else takes read()'s path.
                if plain:
                    lru.nonresident_age = age
                if prev >= 0:
                    ra.prev_pos = (prev + 1) << PAGE_SHIFT
                self._read_page(inode, index, fresh, stats, ra)
                prev = index
                full = self.nr_pages == capacity
                age = lru.nonresident_age
        finally:
            if plain:
                lru.nonresident_age = age
            if prev >= 0:
                ra.prev_pos = (prev + 1) << PAGE_SHIFT
            self._count_replayed(
                stats,
                hits=hits,
                recycled=recycled,
                allocated=allocated,
                refaults=refaults,
                # Each miss on the short path is one page read alone.
                device_seconds=(recycled + allocated) * read_seconds,
            )

    def _read_page(
        self, inode: Inode, index: int, fresh: set[int], stats: IoStats, ra: RaState
    ) -> None:
        """One access of a replay through read()'s path: the page at index, counted as an
        access even where read() would not count it again."""
        end_pos = (index + 1) << PAGE_SHIFT
        self._read_folios(
            inode, index, index, fresh, stats, ra=ra, end_pos=end_pos, every_access=True
        )
        fresh.clear()
        self.busy.clear()

    @staticmethod
    def _reads_alone(ra: RaState, prev: int, index: int, inode: Inode) -> bool:
        """A one-page miss at index is read alone (readahead brings nothing around it); first
        brings ra.prev_pos up to date (prev is the last page accessed, NO_FOLIO for none since
        ra.prev_pos was last written), which the answer depends on."""
        if prev >= 0:
            ra.prev_pos = (prev + 1) << PAGE_SHIFT
        return ra.reads_alone(index, 1, inode)

    def _move_recycled(self, f: int, inode: Inode, shadow: int) -> None:
        """A recycled frame leaves another file for inode: its shadow entry and counts."""
        store = self.folio_store
        old = self.inodes[store.mapping[f]]
        old_index = store.index[f]
        old.evict_base_page(old_index, shadow)
        old.nr_pages -= 1
        inode.nr_pages += 1
        if old.memcg is not inode.memcg:
            if old.memcg is not None:
                old.memcg.nr_cache -= 1
            if inode.memcg is not None:
                inode.memcg.nr_cache += 1
        store.mapping[f] = inode.number

    def _count_replayed(
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

    def _read_folios(
        self,
        inode: Inode,
        first: int,
        last: int,
        fresh: set[int],
        stats: IoStats,
        *,
        ra: RaState,
        end_pos: int,
        every_access: bool = False,
    ) -> None:
        """Reads pages [first, last] through the cache, taking readahead decisions with ra (the
        state of the open file description read through); end_pos is the byte after the read's
        last, which ra keeps as prev_pos."""
        store = self.folio_store
        flags, order_of, index_of = store.flags, store.order, store.index
        textbook = self.lru.textbook
        missed_before = stats.pages_missed
        index = first
        while index <= last:
            f = inode.get(index)
            if f < 0:
                window = ra.sync(index, last - index + 1, inode, inode.max_order)
                self._readahead(inode, window, fresh, stats, required=True)
                f = inode.get(index)
                assert f >= 0
            elif flags[f] & PG_READAHEAD:
                flags[f] &= ~PG_READAHEAD
                self.busy.add(f)  # held while the async window may reclaim
                window_or_none = ra.async_(
                    index, last - index + 1, order_of[f], inode, inode.max_order
                )
                if window_or_none is not None:
                    self._readahead(inode, window_or_none, fresh, stats, required=False)
            head = index_of[f]
            end = head + (1 << order_of[f])
            pages = (end if end <= last else last + 1) - index
            is_fresh = f in fresh
            if is_fresh:
                stats.pages_missed += pages
            else:
                stats.pages_hit += pages
            # A read that starts in the folio where the previous one ended does not count as
            # another access to it (filemap_read's pos_same_folio check), under the kernel's
            # policies; the textbook ones count every access.
            if every_access or textbook or not (index == first and ra.read_last_in(head, end)):
                self.lru.mark_accessed(f, fresh=is_fresh)
            # Counted: reclaim may take it now (its data is in the file or written there first).
            self.busy.discard(f)
            index = end
        # _readahead counted every page it read in as read ahead; those the request asked
        # for were missed instead (each fresh folio's pages in the request, counted above).
        stats.pages_readahead -= stats.pages_missed - missed_before
        self.events[VmEvent.PGFAULT] += last - first + 1
        self.events[VmEvent.PGMAJFAULT] += stats.pages_missed - missed_before
        ra.note_read(end_pos)

    def _readahead(
        self,
        inode: Inode,
        window: RaWindow,
        fresh: set[int],
        stats: IoStats,
        *,
        required: bool,
    ) -> None:
        """Reads one window in (page_cache_ra_order) and marks its PG_readahead folio.
        Readahead is best effort: when memory runs out the window stops short, and only the
        page the reader is waiting for (a sync window's first) must be had."""
        eof_index = (inode.size - 1) >> PAGE_SHIFT
        made: list[int] = []
        last = min(eof_index, window.start + window.size - 1)
        try:
            self._populate_window(inode, ra_folio_layout(window, eof_index), last, made)
        except OutOfMemory:
            if required and inode.get(window.start) < 0:
                self._populate(inode, [(window.start, 0)], made)
        store = self.folio_store
        if window.mark is not None:
            marked = inode.get(window.mark)
            if marked >= 0 and marked in made:
                store.flags[marked] |= PG_READAHEAD
        order_of = store.order
        nr_read = sum(1 << order_of[f] for f in made)
        if nr_read:
            stats.pages_readahead += nr_read  # less the requested pages, in _read_folios
            stats.device_seconds += self.store.device.read_seconds(nr_read * PAGE_SIZE)
            self.events[VmEvent.PGPGIN] += nr_read * _KIB_PER_PAGE
        fresh.update(made)

    def _read_bytes(self, inode: Inode, offset: int, length: int) -> bytes:
        """The file's bytes: the backing file overlaid with pages not yet written back."""
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        nr_pages = last - first + 1
        in_memory = list(self._memory_pages(inode, first, last))
        skip = offset - first * PAGE_SIZE
        if not in_memory:
            # All of it from the backing file, handed on without copies where it lines up.
            raw = self.store.read_pages(inode.name, first, nr_pages)
            return raw if skip == 0 and len(raw) == length else raw[skip : skip + length]
        data = (
            bytearray(nr_pages * PAGE_SIZE)  # every page is in memory: no device read
            if len(in_memory) == nr_pages
            else bytearray(self.store.read_pages(inode.name, first, nr_pages))
        )
        for index, page in in_memory:
            start = (index - first) * PAGE_SIZE
            data[start : start + PAGE_SIZE] = page
        return bytes(data[skip : skip + length])

    def _memory_pages(self, inode: Inode, first: int, last: int) -> Iterator[tuple[int, bytearray]]:
        store = self.folio_store
        written = store.contents
        if not written:
            return
        index = first
        while index <= last:
            f = inode.get(index)
            if f < 0:
                index += 1
                continue
            head = store.index[f]
            end = head + (1 << store.order[f])
            contents = written.get(f)
            if contents:
                lo, hi = max(first, head), min(last, end - 1)
                if len(contents) <= hi - lo + 1:
                    for i, page in contents.items():
                        if lo <= head + i <= hi:
                            yield head + i, page
                else:
                    for page_index in range(lo, hi + 1):
                        written_page = contents.get(page_index - head)
                        if written_page is not None:
                            yield page_index, written_page
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
        store = self.folio_store
        index = first
        while index <= last:
            cached = inode.get(index)
            if cached >= 0:
                self.busy.add(cached)
                index = store.index[cached] + (1 << store.order[cached])
            else:
                index += 1
        made: list[int] = []
        try:
            self._populate(inode, self._write_layout(inode, offset, end), made)
        except OutOfMemory:
            # Nothing was written yet: take the empty new folios back out.
            for f in made:
                self._remove(inode, f, shadow=False)
            self.busy.clear()
            raise
        dirty_before = self.nr_dirty
        try:
            stats = self._write_folios(inode, offset, data, set(made))
        finally:
            self.busy.clear()
        self.balance_dirty_pages(stats, self.nr_dirty - dirty_before)
        return stats

    def _write_folios(self, inode: Inode, offset: int, data: bytes, fresh: set[int]) -> IoStats:
        stats = IoStats()
        end = offset + len(data)
        first, last = offset >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        now = self.clock()
        store = self.folio_store
        flags = store.flags
        index = first
        while index <= last:
            f = inode.get(index)
            assert f >= 0
            head = store.index[f]
            nr = 1 << store.order[f]
            stop = min(head + nr, last + 1)
            if f in fresh:
                stats.pages_missed += stop - index
            else:
                stats.pages_hit += stop - index
            self._copy_in(inode, f, offset=offset, data=data, index=index, stop=stop, stats=stats)
            if not flags[f] & PG_DIRTY:
                self.folio_mark_dirty(inode, f, now)
            self.lru.mark_accessed(f, fresh=f in fresh)
            index = stop
        inode.size = max(inode.size, end)
        return stats

    def _write_layout(self, inode: Inode, offset: int, end: int) -> list[tuple[int, int]]:
        """Folios for the uncached pages of a write of [offset, end), as generic_perform_write
        asks for them: each step writes up to the next boundary of the largest folio
        (mapping_max_folio_size), and write_begin asks __filemap_get_folio for the order of that
        many bytes (fgf_set_order: ilog2(bytes) - PAGE_SHIFT), lowered to the index's alignment
        and then by one while a page of its range is cached (filemap_add_folio's -EEXIST). The
        write goes on at the end of the folio; a cached folio is written through as it is."""
        store = self.folio_store
        max_order = inode.max_order
        chunk = PAGE_SIZE << max_order
        layout = []
        pos = offset
        while pos < end:
            index = pos >> PAGE_SHIFT
            f = inode.get(index)
            if f >= 0:
                pos = min(end, (store.index[f] + (1 << store.order[f])) << PAGE_SHIFT)
                continue
            nbytes = min(chunk - (pos & (chunk - 1)), end - pos)
            order = min(max(nbytes.bit_length() - 1 - PAGE_SHIFT, 0), max_order)
            if index & ((1 << order) - 1):
                order = (index & -index).bit_length() - 1
            while order and inode.any_head_in(index + 1, index + (1 << order)):
                order -= 1
            layout.append((index, order))
            pos = min(pos + nbytes, (index + (1 << order)) << PAGE_SHIFT)
        return layout

    def _copy_in(
        self,
        inode: Inode,
        f: int,
        *,
        offset: int,
        data: bytes,
        index: int,
        stop: int,
        stats: IoStats,
    ) -> None:
        """Copies the part of data that falls in pages [index, stop) of a folio; a partly
        written page not yet in memory is read in first (its bytes come from the file)."""
        store = self.folio_store
        contents = store.contents.get(f)
        if contents is None:
            contents = store.contents[f] = {}
        head = store.index[f]
        end = offset + len(data)
        for page_index in range(index, stop):
            page_start = page_index << PAGE_SHIFT
            lo, hi = max(offset, page_start), min(end, page_start + PAGE_SIZE)
            page = contents.get(page_index - head)
            if page is None:
                whole = lo == page_start and hi == page_start + PAGE_SIZE
                if whole or page_start >= inode.size:
                    page = bytearray(PAGE_SIZE)
                else:
                    page = bytearray(self.store.read_pages(inode.name, page_index, 1))
                    stats.device_seconds += self.store.device.read_seconds(PAGE_SIZE)
                    self.events[VmEvent.PGPGIN] += _KIB_PER_PAGE
                contents[page_index - head] = page
            page[lo - page_start : hi - page_start] = data[lo - offset : hi - offset]


def check_range(offset: int, length: int, field: str = "length") -> None:
    """offset >= 0 and 1 <= length <= MAX_IO_BYTES, else InvalidArgument naming the field."""
    if offset < 0:
        raise InvalidArgument(f"offset must not be negative, not {offset}", field="offset")
    if not 0 < length <= MAX_IO_BYTES:
        raise InvalidArgument(
            f"length must be 1 to {MAX_IO_BYTES} bytes, not {length}", field=field
        )
