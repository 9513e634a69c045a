"""Page cache folios as fixed-width columns by folio id: the fields of struct folio that the page
cache and the LRU use (include/linux/mm_types.h), its list_head as two id columns (list.h).

A folio id names one page cache folio for as long as it is cached; freed ids are reused. Each
column is an ``array.array`` (scalar reads and writes cost what a list's do, and nothing per
folio beyond the bytes): 24 bytes per folio whatever its order, where an object with its dict
and list entries cost about 350. The columns grow together, by an eighth at a time.

LRU lists are circular and doubly linked through the ``prev`` and ``next`` columns, each with a
head of its own (an id taken by the list, as a kernel list has a list_head of its own): adding,
moving and deleting allocate nothing. The first folio after a head is the list's oldest (the
eviction end), the last its youngest.

Written data (pages that differ from the backing file) and the time a folio was dirtied live in
dicts by id: only dirty or written folios have entries.

``CacheFolio`` reads one folio's columns as an object, for code off the hot paths and tests.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from typing import Any

from foliod.mm.mm_types import FolioKind
from foliod.mm.page_alloc import PAGE_SIZE

# Bits of the flags column (PG_dirty, PG_referenced, PG_active, PG_readahead).
PG_DIRTY = 1
PG_REFERENCED = 2
PG_ACTIVE = 4
PG_READAHEAD = 8
# No folio (an empty slot, the end of a scan).
NO_FOLIO = -1
# Shadow tokens keep this many bits in a mapping's slot (the kernel's EVICTION_BITS, whose
# EVICTION_MASK the refault distance is taken modulo).
EVICTION_BITS = 30
EVICTION_MASK = (1 << EVICTION_BITS) - 1

# The largest page cache folio (MAX_PAGECACHE_ORDER).
MAX_PAGECACHE_ORDER = 9
# A mapping's leaves: 2^XA_SHIFT slots each, holding folio id + 1 (0: empty) or a shadow entry.
XA_SHIFT = 8
XA_SLOTS = 1 << XA_SHIFT
XA_MASK = XA_SLOTS - 1
EMPTY_LEAF = bytes(4 * XA_SLOTS)

_GROW_MIN = 1024


class FolioStore:
    """The columns of every page cache folio of one machine, and the LRU links between them."""

    __slots__ = (
        "contents",
        "dirtied_at",
        "flags",
        "free_ids",
        "gen",
        "index",
        "mapping",
        "next",
        "nr_ids",
        "order",
        "pfn",
        "prev",
        "refs",
    )

    def __init__(self) -> None:
        self.pfn = array("I")
        # The file (an inode number; 0: none) and the page index of the head page.
        self.mapping = array("i")
        self.index = array("I")
        self.order = array("b")
        self.flags = array("B")
        # Multi-generational LRU: generation sequence number (its low 8 bits) and refs.
        self.gen = array("B")
        self.refs = array("B")
        self.prev = array("i")
        self.next = array("i")
        # Pages written and not yet written back: folio id -> page index in folio -> bytes.
        self.contents: dict[int, dict[int, bytearray]] = {}
        # When each dirty folio was dirtied (exactly the folios with PG_dirty).
        self.dirtied_at: dict[int, float] = {}
        self.free_ids = array("i")
        self.nr_ids = 0

    def _grow(self, need: int) -> None:
        """Makes room for need more ids past nr_ids."""
        size = len(self.pfn)
        if self.nr_ids + need <= size:
            return
        more = max(_GROW_MIN, size >> 3, self.nr_ids + need - size)
        for column in (self.pfn, self.mapping, self.index, self.prev, self.next):
            column.frombytes(bytes(more * column.itemsize))
        for column in (self.order, self.flags, self.gen, self.refs):
            column.frombytes(bytes(more))

    def new(self, pfn: int, order: int) -> int:
        """A folio id for a new folio of order at pfn, its flags clear and unlinked."""
        free = self.free_ids
        if free:
            f = free.pop()
        else:
            f = self.nr_ids
            if f == len(self.pfn):
                self._grow(1)
            self.nr_ids = f + 1
        self.pfn[f] = pfn
        self.order[f] = order
        self.flags[f] = 0
        self.gen[f] = 0
        self.refs[f] = 0
        self.mapping[f] = 0
        self.prev[f] = self.next[f] = f
        return f

    def new_many(self, pfns: list[int], order: int) -> list[int]:
        """Ids for new folios of one order at pfns (new() for each, in fewer steps)."""
        count = len(pfns)
        reused = min(count, len(self.free_ids))
        ids = [self.free_ids.pop() for _ in range(reused)]
        fresh = count - reused
        if fresh:
            self._grow(fresh)
            first = self.nr_ids
            self.nr_ids = first + fresh
            ids.extend(range(first, first + fresh))
            span = slice(first, first + fresh)
            self.pfn[span] = array("I", pfns[reused:])
            self.order[span] = array("b", bytes([order & 0xFF]) * fresh)
            zeros = bytes(fresh)
            for column in (self.flags, self.gen, self.refs):
                column[span] = array("B", zeros)
            self.mapping[span] = array("i", bytes(4 * fresh))
            links = array("i", range(first, first + fresh))
            self.prev[span] = links
            self.next[span] = links
        for f, pfn in zip(ids[:reused], pfns[:reused], strict=True):
            self.pfn[f] = pfn
            self.order[f] = order
            self.flags[f] = self.gen[f] = self.refs[f] = 0
            self.mapping[f] = 0
            self.prev[f] = self.next[f] = f
        return ids

    def release(self, f: int) -> None:
        """The folio is gone: its id may be reused. Its data and dirty time go with it."""
        self.mapping[f] = 0
        self.contents.pop(f, None)
        self.dirtied_at.pop(f, None)
        self.free_ids.append(f)

    @property
    def nr_live(self) -> int:
        return self.nr_ids - len(self.free_ids)

    # -- lists (include/linux/list.h) --------------------------------------------------------

    def new_list(self) -> int:
        """A new empty list: its head's id."""
        return self.new(0, 0)

    def list_add_tail(self, f: int, head: int) -> None:
        """f becomes the list's youngest."""
        prev, next_ = self.prev, self.next
        tail = prev[head]
        next_[tail] = f
        prev[f] = tail
        next_[f] = head
        prev[head] = f

    def list_add(self, f: int, head: int) -> None:
        """f becomes the list's oldest."""
        prev, next_ = self.prev, self.next
        first = next_[head]
        prev[first] = f
        next_[f] = first
        prev[f] = head
        next_[head] = f

    def list_del(self, f: int) -> None:
        prev, next_ = self.prev, self.next
        p, n = prev[f], next_[f]
        next_[p] = n
        prev[n] = p

    def list_move_tail(self, f: int, head: int) -> None:
        """f becomes the list's youngest (off whatever list it was on)."""
        self.list_del(f)
        self.list_add_tail(f, head)

    def mover_to_tail(self, head: int) -> Callable[[int], None]:
        """list_move_tail(f, head) as a function of f alone, with the columns bound: what the
        replay loop calls once per access."""
        prev, next_ = self.prev, self.next

        def move_tail(f: int) -> None:
            n = next_[f]
            if n == head:  # already the youngest
                return
            p = prev[f]
            next_[p] = n
            prev[n] = p
            tail = prev[head]
            next_[tail] = f
            prev[f] = tail
            next_[f] = head
            prev[head] = f

        return move_tail

    def list_first(self, head: int) -> int:
        """The list's oldest folio; NO_FOLIO when it is empty."""
        f = self.next[head]
        return NO_FOLIO if f == head else f

    def list_empty(self, head: int) -> bool:
        return self.next[head] == head

    def list_iter(self, head: int) -> Iterator[int]:
        """The list's folios, oldest first."""
        next_ = self.next
        f = next_[head]
        while f != head:
            yield f
            f = next_[f]


class FlagBit:
    """A CacheFolio attribute that reads and sets one bit of the flags column."""

    def __init__(self, bit: int) -> None:
        self.bit = bit

    def __get__(self, folio: CacheFolio, owner: type | None = None) -> bool:
        return bool(folio.store.flags[folio.id] & self.bit)

    def __set__(self, folio: CacheFolio, value: bool) -> None:
        if value:
            folio.store.flags[folio.id] |= self.bit
        else:
            folio.store.flags[folio.id] &= ~self.bit


class ColumnField:
    """A CacheFolio attribute that reads and sets one column."""

    def __init__(self, column: str) -> None:
        self.column = column

    def __get__(self, folio: CacheFolio, owner: type | None = None) -> int:
        column: array[int] = getattr(folio.store, self.column)
        return column[folio.id]

    def __set__(self, folio: CacheFolio, value: int) -> None:
        column: array[int] = getattr(folio.store, self.column)
        column[folio.id] = value


class CacheFolio:
    """One page cache folio's columns read as an object (off the hot paths, and in tests).
    Equal to another view of the same id."""

    __slots__ = ("id", "inodes", "store")

    kind = FolioKind.FILE

    def __init__(self, store: FolioStore, f: int, inodes: Any = None) -> None:
        self.store = store
        self.id = f
        # Inode number -> inode, to answer mapping (None: mapping answers the number).
        self.inodes = inodes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheFolio) and other.id == self.id and other.store is self.store

    def __hash__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        return (
            f"CacheFolio(id={self.id}, pfn={self.pfn}, order={self.order}, index={self.index}, "
            f"flags={self.store.flags[self.id]:#x})"
        )

    @property
    def pfn(self) -> int:
        return self.store.pfn[self.id]

    @property
    def order(self) -> int:
        return self.store.order[self.id]

    @property
    def nr_pages(self) -> int:
        return 1 << self.store.order[self.id]

    @property
    def size_bytes(self) -> int:
        return PAGE_SIZE << self.store.order[self.id]

    @property
    def index(self) -> int:
        return self.store.index[self.id]

    @property
    def mapping(self) -> Any:
        number = self.store.mapping[self.id]
        if self.inodes is None or not number:
            return number or None
        return self.inodes.get(number)

    # PG_* flags, read and set by name (the kernel's folio_test_*/folio_set_*).
    dirty = FlagBit(PG_DIRTY)
    referenced = FlagBit(PG_REFERENCED)
    active = FlagBit(PG_ACTIVE)
    readahead = FlagBit(PG_READAHEAD)

    # Multi-generational LRU state, read and set.
    gen = ColumnField("gen")
    refs = ColumnField("refs")

    @property
    def contents(self) -> dict[int, bytearray] | None:
        return self.store.contents.get(self.id)

    @property
    def dirtied_at(self) -> float:
        return self.store.dirtied_at.get(self.id, 0.0)
