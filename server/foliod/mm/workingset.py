"""Shadow entries: what an evicted folio leaves in its file's mapping for a refault to find
(mm/workingset.c's side of the xarray; the policies' own refault logic is theirs, in lru/).

A shadow entry holds the token the reclaim policy gave the folio at eviction (an eviction age,
or mglru's generation and tier), in the slot of its head index in the mapping's page-granular
leaves, as -(token & EVICTION_MASK) - 1: the kernel's value entries, in the same slots as the
folios. As in the kernel, an evicted large folio leaves one entry over its whole range (a
multi-index entry): its head is in shadow_orders with the folio's order, and
large_shadow_blocks counts those entries per block of MAX_PAGECACHE_ORDER's size. Entries never
overlap, nor cover a cached page; a folio coming in takes the entries under it, splitting a
larger one around it (xas_split).
"""

from __future__ import annotations

from array import array

from foliod.mm.folio_store import EMPTY_LEAF, EVICTION_MASK, MAX_PAGECACHE_ORDER, XA_MASK, XA_SHIFT


class ShadowEntries:
    """The shadow-entry half of a mapping (Inode): its page-granular leaves and leaf counts,
    the orders of multi-index entries and their count per block."""

    __slots__ = ()

    leaves: dict[int, array[int]]
    leaf_counts: dict[int, int]
    nr_by_order: list[int]
    shadow_orders: dict[int, int]
    large_shadow_blocks: dict[int, int]

    def shadow_at(self, index: int) -> int | None:
        """The token of the shadow entry whose head is at index, if one is."""
        leaf = self.leaves.get(index >> XA_SHIFT)
        if leaf is None:
            return None
        value = leaf[index & XA_MASK]
        return -value - 1 if value < 0 else None

    def _shadow_set(self, index: int, token: int) -> None:
        """Puts a shadow entry's token in the empty slot of its head."""
        number = index >> XA_SHIFT
        leaf = self.leaves.get(number)
        if leaf is None:
            leaf = self.leaves[number] = array("i", EMPTY_LEAF)
            self.leaf_counts[number] = 1
        else:
            self.leaf_counts[number] += 1
        leaf[index & XA_MASK] = -(token & EVICTION_MASK) - 1

    def _shadow_pop(self, index: int) -> int | None:
        """Removes the shadow entry whose head is at index; its token, if one was there."""
        number = index >> XA_SHIFT
        leaf = self.leaves.get(number)
        if leaf is None:
            return None
        value = leaf[index & XA_MASK]
        if value >= 0:
            return None
        count = self.leaf_counts[number] - 1
        if count:
            leaf[index & XA_MASK] = 0
            self.leaf_counts[number] = count
        else:
            del self.leaves[number], self.leaf_counts[number]
        return -value - 1

    def evict_base_page(self, index: int, token: int) -> None:
        """The base page at index leaves and its shadow entry takes its slot (xa_erase and
        add_shadow in one step: the slot stays in use)."""
        self.leaves[index >> XA_SHIFT][index & XA_MASK] = -(token & EVICTION_MASK) - 1
        self.nr_by_order[0] -= 1

    def shadow_heads_in(self, lo: int, hi: int) -> list[int]:
        """Heads of the shadow entries in [lo, hi), ascending."""
        found: list[int] = []
        start = lo
        while start < hi:
            number = start >> XA_SHIFT
            end = min(hi, (number + 1) << XA_SHIFT)
            leaf = self.leaves.get(number)
            if leaf is not None:
                a = start & XA_MASK
                part = leaf[a : a + end - start]
                if min(part) < 0:
                    found.extend(start + i for i, v in enumerate(part) if v < 0)
            start = end
        return found

    @property
    def shadows(self) -> dict[int, int]:
        """Every shadow entry as head index -> token, by index (for checks and tests)."""
        entries: dict[int, int] = {}
        for number in sorted(self.leaves):
            base = number << XA_SHIFT
            entries.update((base + i, -v - 1) for i, v in enumerate(self.leaves[number]) if v < 0)
        return entries

    def add_shadow(self, index: int, order: int, token: int) -> None:
        """The entry an evicted folio of order at index leaves (workingset_eviction)."""
        self._shadow_set(index, token)
        if order:
            self.shadow_orders[index] = order
            blocks, block = self.large_shadow_blocks, index >> MAX_PAGECACHE_ORDER
            blocks[block] = blocks.get(block, 0) + 1

    def take_shadows(self, index: int, nr_pages: int) -> int | None:
        """Removes the shadow entries over [index, index + nr_pages), where a new folio goes
        (__filemap_add_folio), and returns the token of the last, as the kernel keeps the last
        entry xas_for_each_conflict visits; a larger entry around the range is split and the
        rest of it stays, in pieces of the new folio's size (xas_split)."""
        # The range lies in one block of the largest folio's size: were no large entry in it,
        # only base-page entries can be there.
        large_here = index >> MAX_PAGECACHE_ORDER in self.large_shadow_blocks
        shadow = self._shadow_pop(index)
        start = index + 1  # index itself was just looked at
        if shadow is not None:
            order = self._drop_large(index) if large_here and index in self.shadow_orders else 0
            if 1 << order >= nr_pages:  # the entry covers the range: nothing else is inside
                if 1 << order > nr_pages:
                    self._split_shadow(index, order, shadow, index, nr_pages)
                return shadow
            start = index + (1 << order)
        elif large_here:
            # An entry from before index that covers it (entries are aligned to their order).
            orders = self.shadow_orders
            for order in range(nr_pages.bit_length(), MAX_PAGECACHE_ORDER + 1):
                head = index & ~((1 << order) - 1)
                if head != index and orders.get(head) == order:
                    self._drop_large(head)
                    token = self._shadow_pop(head)
                    assert token is not None
                    self._split_shadow(head, order, token, index, nr_pages)
                    return token
        end = index + nr_pages
        if start == end:
            return shadow
        # Entries inside the range, of base pages or smaller folios; the last one is kept.
        found = shadow
        for head in self.shadow_heads_in(start, end):
            if large_here and head in self.shadow_orders:
                self._drop_large(head)
            found = self._shadow_pop(head)
        return found

    def _drop_large(self, head: int) -> int:
        """Forgets the order of the large entry at head (its token is the caller's to pop)."""
        order = self.shadow_orders.pop(head)
        blocks, block = self.large_shadow_blocks, head >> MAX_PAGECACHE_ORDER
        if blocks[block] == 1:
            del blocks[block]
        else:
            blocks[block] -= 1
        return order

    def _split_shadow(self, head: int, order: int, token: int, index: int, nr_pages: int) -> None:
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
        # An entry reaching keep starts at most a largest folio's span before it.
        start = max(0, keep - (1 << MAX_PAGECACHE_ORDER))
        end = (max(self.leaves, default=-1) + 1) << XA_SHIFT
        for head in self.shadow_heads_in(start, end):
            if head + (1 << orders.get(head, 0)) > keep:
                self._shadow_pop(head)
                if head in orders:
                    self._drop_large(head)

    def drop_shadows_in(self, lo: int, hi: int) -> int:
        """Removes the shadow entries lying wholly in pages [lo, hi) (invalidation's
        clear_shadow_entry); returns how many."""
        orders = self.shadow_orders
        dropped = 0
        for head in self.shadow_heads_in(lo, hi):
            if head + (1 << orders.get(head, 0)) <= hi:
                self._shadow_pop(head)
                if head in orders:
                    self._drop_large(head)
                dropped += 1
        return dropped

    def shadow_span(self, head: int) -> int:
        """Pages the shadow entry at head covers."""
        return 1 << self.shadow_orders.get(head, 0)
