"""The buddy allocator of one zone: free lists, split and merge, watermarks (mm/page_alloc.c).

Free lists are insertion-ordered dicts used as the kernel uses its list heads: a block freed or
split off is added at the head and allocation takes the head (``popitem``), so the allocator is
deterministic and takes the lowest free blocks first after boot, as memblock_free_all leaves them.

``rmqueue_bulk`` and ``free_pages_bulk`` do what many rmqueue or free_one_page calls in a row do,
to the same free lists in the same list order, with numpy arrays instead of a Python step per
block (the kernel batches the same way: alloc_pages_bulk, free_pages_bulk).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from foliod.api import PAGE_SHIFT as PAGE_SHIFT  # noqa: PLC0414 -- re-exported
from foliod.api import PAGE_SIZE as PAGE_SIZE  # noqa: PLC0414 -- re-exported

PfnArray = npt.NDArray[np.int64]

MAX_PAGE_ORDER = 10
NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1
PAGE_ALLOC_COSTLY_ORDER = 3
# Gigantic (1 GiB) hugetlb pages exceed MAX_PAGE_ORDER and come from alloc_contig_pages.
PUD_ORDER = 18

_MIN_FREE_KBYTES_FLOOR = 128
_MIN_FREE_KBYTES_CEILING = 262_144
_WATERMARK_SCALE_FACTOR = 10


def aligned_blocks(start: int, end: int, max_order: int) -> Iterator[tuple[int, int]]:
    """[start, end) as the largest naturally aligned blocks of at most 2^max_order pages,
    (first, order) in address order: how free ranges enter the buddy lists, how a readahead
    window is laid out in folios (page_cache_ra_order), how a snapshot's runs are cut."""
    first = start
    while first < end:
        order = max_order if first == 0 else min(max_order, (first & -first).bit_length() - 1)
        while first + (1 << order) > end:
            order -= 1
        yield first, order
        first += 1 << order


@dataclass(frozen=True, slots=True)
class Watermarks:
    """Zone watermarks in pages and the vm.min_free_kbytes they derive from."""

    nr_min: int
    nr_low: int
    nr_high: int
    min_free_kbytes: int


def calculate_watermarks(nr_managed_pages: int) -> Watermarks:
    """Computes min/low/high as calculate_min_free_kbytes and __setup_per_zone_wmarks do."""
    lowmem_kbytes = nr_managed_pages * (PAGE_SIZE >> 10)
    min_free_kbytes = math.isqrt(lowmem_kbytes * 16)
    min_free_kbytes = max(_MIN_FREE_KBYTES_FLOOR, min(min_free_kbytes, _MIN_FREE_KBYTES_CEILING))
    nr_min = min_free_kbytes >> (PAGE_SHIFT - 10)
    delta = max(nr_min >> 2, nr_managed_pages * _WATERMARK_SCALE_FACTOR // 10_000)
    return Watermarks(nr_min, nr_min + delta, nr_min + 2 * delta, min_free_kbytes)


class Zone:
    """One zone's free lists and watermarks over frames [0, nr_pages)."""

    __slots__ = ("free_area", "nr_free", "nr_pages", "watermarks")

    def __init__(self, nr_pages: int) -> None:
        self.nr_pages = nr_pages
        self.free_area: list[dict[int, None]] = [{} for _ in range(NR_PAGE_ORDERS)]
        self.nr_free = 0
        self.watermarks = calculate_watermarks(nr_pages)
        self._free_range(0, nr_pages)

    def _free_range(self, start: int, end: int) -> None:
        """Frees [start, end) in the largest aligned blocks, lowest block at each list's head.

        Precondition: the range is not free yet and touches no free block.
        """
        # Each list gets its blocks highest first, so that popitem (the list head) yields the
        # lowest block first. The max-order blocks in the middle go in as one range, without a
        # Python object per block beyond its key (a 1 TiB zone has 262,144 of them).
        max_size = 1 << MAX_PAGE_ORDER
        middle_start = min(end, -(-start // max_size) * max_size)
        middle_end = max(middle_start, end // max_size * max_size)
        edges: list[tuple[int, int]] = []
        for lo, hi in ((start, middle_start), (middle_end, end)):
            edges.extend(aligned_blocks(lo, hi, MAX_PAGE_ORDER))
        for pfn, order in reversed(edges):
            if pfn >= middle_end:
                self.free_area[order][pfn] = None
        self.free_area[MAX_PAGE_ORDER].update(
            dict.fromkeys(range(middle_end - max_size, middle_start - 1, -max_size))
        )
        for pfn, order in reversed(edges):
            if pfn < middle_start:
                self.free_area[order][pfn] = None
        self.nr_free += end - start

    def load_free_lists(self, lists: list[list[int]]) -> None:
        """Replaces the free lists: lists[order] holds its blocks from the list's tail to its
        head (the last is allocated first), as a snapshot recorded them. The caller checked
        they are aligned, disjoint and unmerged."""
        self.free_area = [dict.fromkeys(blocks) for blocks in lists]
        self.nr_free = sum(len(blocks) << order for order, blocks in enumerate(lists))

    def watermark_ok(self, order: int) -> bool:
        """Whether a 2^order allocation leaves free memory above the min watermark."""
        return self.nr_free - (1 << order) + 1 > self.watermarks.nr_min

    def rmqueue(self, order: int) -> int | None:
        """Allocates a 2^order block (__rmqueue_smallest + expand); None when none is free."""
        free_area = self.free_area
        for current in range(order, NR_PAGE_ORDERS):
            area = free_area[current]
            if area:
                pfn = area.popitem()[0]
                break
        else:
            return None
        while current > order:
            current -= 1
            free_area[current][pfn + (1 << current)] = None
        self.nr_free -= 1 << order
        return pfn

    def free_one_page(self, pfn: int, order: int) -> None:
        """Frees a 2^order block, merging with free buddies (__free_one_page)."""
        self.nr_free += 1 << order
        free_area = self.free_area
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            area = free_area[order]
            if buddy not in area:
                break
            del area[buddy]
            pfn &= ~(1 << order)
            order += 1
        free_area[order][pfn] = None

    def nr_obtainable(self, order: int) -> int:
        """How many 2^order blocks the free lists can yield by splitting, watermarks aside."""
        return sum(len(area) << (o - order) for o, area in enumerate(self.free_area) if o >= order)

    def rmqueue_bulk(self, order: int, count: int) -> PfnArray:
        """The frames count rmqueue(order) calls in a row return, in that order, leaving the
        free lists as they would. Precondition: nr_obtainable(order) >= count.

        rmqueue takes the head of the smallest non-empty list at or above order; a block of
        order j taken so yields its 2^(j - order) pieces in ascending order before the next
        block is touched (the split-off upper halves are the only entries below j), so whole
        blocks are handed out as ranges and only the last, partly used one is split step by step.
        """
        out: list[PfnArray] = []
        free_area = self.free_area
        remaining = count
        while remaining:
            current = next(o for o in range(order, NR_PAGE_ORDERS) if free_area[o])
            per_block = 1 << (current - order)
            if remaining < per_block:
                out.append(self._take_partial(current, order, remaining))
                break
            area = free_area[current]
            nr_blocks = min(len(area), remaining // per_block)
            heads = np.array([area.popitem()[0] for _ in range(nr_blocks)], np.int64)
            if per_block == 1:
                out.append(heads)
            else:
                pieces = np.arange(per_block, dtype=np.int64) << order
                out.append((heads[:, None] + pieces[None, :]).ravel())
            remaining -= nr_blocks * per_block
            self.nr_free -= (nr_blocks * per_block) << order
        if not out:
            return np.empty(0, np.int64)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _take_partial(self, current: int, order: int, count: int) -> PfnArray:
        """rmqueue(order) count times from the head block of list current (the smallest
        non-empty list at or above order), count < 2^(current - order): the block's first
        count pieces, ascending; what is left of it lies on the lists below current, at most
        one block on each (they were empty), so their order in the lists cannot differ."""
        head = self.free_area[current].popitem()[0]
        unit = 1 << order
        pos = count  # in pieces of 2^order from head
        for level in range(order, current):
            if pos & (1 << (level - order)):
                self.free_area[level][head + pos * unit] = None
                pos += 1 << (level - order)
        self.nr_free -= count << order
        return head + np.arange(count, dtype=np.int64) * unit

    def free_pages_bulk(self, pfns: PfnArray, orders: npt.NDArray[np.int8]) -> None:
        """Frees blocks as free_one_page(pfns[i], orders[i]) for i in turn would: the same
        merged blocks on the same lists in the same list order.

        Merging is greedy, so the blocks that end up free are the maximal aligned free ones;
        a block freed or merged here enters its list when its last piece was freed, so the
        new blocks of each list follow the old ones in the order their last pieces were freed.
        """
        if len(pfns) < 64 or int(orders.max()) > MAX_PAGE_ORDER:
            for pfn, order in zip(pfns.tolist(), orders.tolist(), strict=True):
                if order <= MAX_PAGE_ORDER:
                    self.free_one_page(pfn, order)
                else:
                    self.free_contig(pfn, order)
            return
        steps = np.arange(len(pfns), dtype=np.int64)
        low, high = int(orders.min()), int(orders.max())
        by_order: dict[int, tuple[PfnArray, PfnArray]] = {}
        if low == high:
            by_order[low] = (pfns, steps)
            self.nr_free += len(pfns) << low
        else:
            self.nr_free += int((np.int64(1) << orders.astype(np.int64)).sum())
            for order in range(low, high + 1):
                mine = orders == order
                by_order[order] = (pfns[mine], steps[mine])
        empty = np.empty(0, np.int64)
        carry_pfn, carry_step = empty, empty
        for order in range(low, NR_PAGE_ORDERS):
            new_pfn, new_step = by_order.get(order, (empty, empty))
            if not len(carry_pfn):
                pfn, step = new_pfn, new_step
            elif not len(new_pfn):
                pfn, step = carry_pfn, carry_step
            else:
                pfn = np.concatenate((new_pfn, carry_pfn))
                step = np.concatenate((new_step, carry_step))
            if not len(pfn):
                continue
            area = self.free_area[order]
            if order == MAX_PAGE_ORDER:
                self._append_blocks(area, pfn, step)
                break
            size = 1 << order
            sort = np.argsort(pfn, kind="stable")
            pfn, step = pfn[sort], step[sort]
            # Pairs of new blocks that are buddies: a lower half followed by its upper half.
            lower = (pfn[:-1] & size) == 0
            paired = lower & (pfn[1:] == pfn[:-1] + size)
            first = np.flatnonzero(paired)
            merged = np.zeros(len(pfn), bool)
            merged[first] = merged[first + 1] = True
            parent_pfn = [pfn[first]]
            parent_step = [np.maximum(step[first], step[first + 1])]
            # New blocks whose buddy was already free: merge with it.
            alone = np.flatnonzero(~merged)
            if len(area) and len(alone):
                buddies = pfn[alone] ^ size
                if len(area) < len(alone):
                    has_buddy = np.isin(buddies, np.fromiter(area, np.int64, len(area)))
                else:
                    has_buddy = np.fromiter(
                        (b in area for b in buddies.tolist()), bool, len(buddies)
                    )
                with_old = alone[has_buddy]
                for buddy in buddies[has_buddy].tolist():
                    del area[buddy]
                merged[with_old] = True
                parent_pfn.append(pfn[with_old] & ~size)
                parent_step.append(step[with_old])
            stay = ~merged
            self._append_blocks(area, pfn[stay], step[stay])
            carry_pfn = np.concatenate(parent_pfn)
            carry_step = np.concatenate(parent_step)

    @staticmethod
    def _append_blocks(area: dict[int, None], pfn: PfnArray, step: PfnArray) -> None:
        """Adds blocks at the list head in the order of their last freed piece."""
        order = np.argsort(step, kind="stable")
        area.update(dict.fromkeys(pfn[order].tolist()))

    def alloc_contig(self, order: int) -> int | None:
        """Takes a naturally aligned free range of 2^order pages, order > MAX_PAGE_ORDER.

        Like alloc_contig_pages for gigantic hugetlb pages, but only from wholly free max-order
        blocks (foliod does not migrate pages to make room). Returns the lowest such range.
        """
        top = self.free_area[MAX_PAGE_ORDER]
        step = 1 << MAX_PAGE_ORDER
        span = 1 << order
        for start in range(0, self.nr_pages - span + 1, span):
            if start in top and all(pfn in top for pfn in range(start, start + span, step)):
                for pfn in range(start, start + span, step):
                    del top[pfn]
                self.nr_free -= span
                return start
        return None

    def free_contig(self, pfn: int, order: int) -> None:
        """Returns a range taken by alloc_contig as max-order blocks."""
        for block in range(pfn, pfn + (1 << order), 1 << MAX_PAGE_ORDER):
            self.free_one_page(block, MAX_PAGE_ORDER)

    def buddyinfo(self) -> list[int]:
        """Free blocks (not pages) per order 0..MAX_PAGE_ORDER, as /proc/buddyinfo."""
        return [len(area) for area in self.free_area]
