"""Truncation and dropping clean page cache (mm/truncate.c): folios past a new end of file
go, a large folio straddling it is split, POSIX_FADV_DONTNEED invalidates a range
(mm/fadvise.c, mapping_try_invalidate) and drop_caches frees every clean folio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from foliod.mm.backing_dev import BackingStore
from foliod.mm.errors import InvalidArgument
from foliod.mm.folio_store import PG_DIRTY, PG_REFERENCED, FolioStore
from foliod.mm.lru import ReclaimPolicy
from foliod.mm.page_alloc import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from foliod.mm.filemap import CacheAllocator, Inode

# The largest file (16 TiB: page indices fit 32 bits).
MAX_FILE_BYTES = 1 << 44


def folio_split_pieces(head: int, order: int, at: int) -> list[tuple[int, int]]:
    """(first index, order) of the folios a non-uniform split of the folio of order at head
    leaves (folio_split, __split_unmapped_folio with split_at): each half not holding page at
    stays whole, the other is split again, down to page at alone. In address order."""
    pieces = []
    lo = head
    for piece_order in range(order - 1, -1, -1):
        mid = lo + (1 << piece_order)
        if at < mid:
            pieces.append((mid, piece_order))
        else:
            pieces.append((lo, piece_order))
            lo = mid
    pieces.append((lo, 0))
    return sorted(pieces)


class Truncation:
    """The truncation half of the page cache (PageCache)."""

    folio_store: FolioStore
    files: dict[str, Inode]
    store: BackingStore
    allocator: CacheAllocator
    lru: ReclaimPolicy
    busy: set[int]
    nr_pages: int

    if TYPE_CHECKING:

        def lookup(self, name: str) -> Inode: ...

        def _insert(self, inode: Inode, f: int, index: int) -> None: ...

        def _remove(self, inode: Inode, f: int, *, shadow: bool, free: bool = True) -> None: ...

        def _remove_many(self, inode: Inode, ids: list[int]) -> None: ...

        def folio_mark_dirty(
            self, inode: Inode, f: int, when: float, *, dirtied: bool = True
        ) -> None: ...

        def folio_clear_dirty(self, inode: Inode, f: int) -> None: ...

        def dirty_folios(self, inode: Inode | None = None) -> list[int]: ...

        def writeback(
            self, name: str | None = None, start: int = 0, end: int | None = None
        ) -> int: ...

    def truncate(self, name: str, size: int) -> None:
        """Sets the file's size: folios past the end go; a clean large folio straddling the new
        end is split (non-uniformly, see _split_tail) and the pieces past the end freed, a
        dirty one stays whole (its split fails); the last page's tail reads as zeros."""
        inode = self.lookup(name)
        if not 0 <= size <= MAX_FILE_BYTES:
            raise InvalidArgument(f"size must be 0..{MAX_FILE_BYTES}, not {size}", field="size")
        keep = -(-size // PAGE_SIZE)  # pages that remain
        store = self.folio_store
        try:
            for index, f in inode.heads():
                if index >= keep:
                    self._remove(inode, f, shadow=False)
                elif index + (1 << store.order[f]) > keep:
                    if store.flags[f] & PG_DIRTY:
                        # Its private data (the dirty blocks) cannot be released, so the
                        # split fails and the folio stays whole, past the new end too
                        # (truncate_inode_partial_folio: zeroed there, not split).
                        self._forget_past(f, keep - index)
                    else:
                        self._split_tail(inode, f, size >> PAGE_SHIFT, keep)
        finally:
            self.busy.clear()
        inode.drop_shadows_from(keep)
        if size % PAGE_SIZE:
            last = inode.get(size >> PAGE_SHIFT)
            contents = store.contents.get(last) if last >= 0 else None
            page = contents.get((size >> PAGE_SHIFT) - store.index[last]) if contents else None
            if page is not None:
                page[size % PAGE_SIZE :] = bytes(PAGE_SIZE - size % PAGE_SIZE)
        inode.size = size
        self.store.truncate(inode.name, size)

    def _forget_past(self, f: int, nr_kept: int) -> None:
        """The written pages of folio f from its page nr_kept on read as zeros now."""
        contents = self.folio_store.contents.get(f)
        if contents:
            for i in [i for i in contents if i >= nr_kept]:
                del contents[i]

    def _split_tail(self, inode: Inode, f: int, split_at: int, keep: int) -> None:
        """Splits a large folio straddling the new end in place, as truncate_inode_partial_folio
        does in Linux 6.18 (try_folio_split: a non-uniform split): the page split_at (the one
        holding the new end) becomes a base page and the rest buddy pieces as large as
        possible; pieces at or past page keep are freed, the others keep their data and
        flags. A 2 MiB folio cut at 1 MiB + 5000 bytes leaves an order-8 folio and pages 256
        and 257. Allocates nothing."""
        store = self.folio_store
        contents = store.contents.get(f) or {}
        bits = store.flags[f]
        dirty, referenced = bits & PG_DIRTY, bits & PG_REFERENCED
        when = store.dirtied_at.get(f, 0.0)
        index, order, pfn = store.index[f], store.order[f], store.pfn[f]
        nr = 1 << order
        self.lru.remove(f)
        inode.xa_erase(index, order)
        inode.nr_pages -= nr
        self.nr_pages -= nr
        if inode.memcg is not None:
            inode.memcg.nr_cache -= nr
        if dirty:
            self.folio_clear_dirty(inode, f)
        store.release(f)
        pieces = folio_split_pieces(index, order, split_at)
        self.allocator.split_cache_folio(pfn, order, [o for _, o in pieces])
        for start, piece_order in pieces:
            offset, size = start - index, 1 << piece_order
            if start >= keep:
                self.allocator.free_cache_folio(pfn + offset, piece_order)
                continue
            piece = store.new(pfn + offset, piece_order)
            self._insert(inode, piece, start)
            written = {i - offset: page for i, page in contents.items() if 0 <= i - offset < size}
            if written:
                store.contents[piece] = written
            if referenced:
                store.flags[piece] |= PG_REFERENCED
            if dirty:
                self.folio_mark_dirty(inode, piece, when, dirtied=False)

    def fadvise_dontneed(self, name: str, offset: int, length: int) -> int:
        """posix_fadvise(POSIX_FADV_DONTNEED) of a byte range (length 0: to the end of the
        file); returns pages freed. As mm/fadvise.c: dirty folios in the range are written back
        (and, being under writeback then, stay); the full pages of the range are invalidated
        (mapping_try_invalidate): clean folios lying wholly inside go, without leaving shadow
        entries, and the shadow entries there are cleared. A partial page at either end stays."""
        inode = self.lookup(name)
        if offset < 0 or length < 0:
            raise InvalidArgument(
                f"offset and length must be >= 0, not {offset} and {length}", field="offset"
            )
        end_byte = offset + length - 1 if length else MAX_FILE_BYTES
        store = self.folio_store
        # Dirty folios are written back, and so under writeback when invalidation comes: they
        # stay.
        under_writeback = set(self.dirty_folios(inode))
        self.writeback(name, offset, end_byte + 1)
        first = -(-offset // PAGE_SIZE)
        last = end_byte >> PAGE_SHIFT
        if (end_byte + 1) % PAGE_SIZE and end_byte != inode.size - 1:
            last -= 1  # the last page is partial: it stays
        if last < first:
            return 0
        freed = 0
        try:
            for index, f in inode.heads():
                nr = 1 << store.order[f]
                inside = first <= index and index + nr - 1 <= last
                if inside and f not in self.busy and f not in under_writeback:
                    self._remove(inode, f, shadow=False)
                    freed += nr
        finally:
            self.busy.clear()
        inode.drop_shadows_in(first, last + 1)
        return freed

    def drop_caches(self) -> int:
        """Frees every clean page cache folio (echo 1 > drop_caches); returns pages freed.
        Data kept only in a folio whose writeback failed goes with it, as in Linux."""
        freed = 0
        flags, order_of = self.folio_store.flags, self.folio_store.order
        for inode in self.files.values():
            clean = [f for _, f in inode.heads() if not flags[f] & PG_DIRTY]
            freed += sum(1 << order_of[f] for f in clean)
            self._remove_many(inode, clean)
        return freed
