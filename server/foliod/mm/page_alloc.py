"""The buddy allocator of one zone: free lists, split and merge, watermarks (mm/page_alloc.c).

Free lists are insertion-ordered dicts used as the kernel uses its list heads: a block freed or
split off is added at the head and allocation takes the head (``popitem``), so the allocator is
deterministic and takes the lowest free blocks first after boot, as memblock_free_all leaves them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGE_ORDER = 10
NR_PAGE_ORDERS = MAX_PAGE_ORDER + 1
PAGE_ALLOC_COSTLY_ORDER = 3
# Gigantic (1 GiB) hugetlb pages exceed MAX_PAGE_ORDER and come from alloc_contig_pages.
PUD_ORDER = 18

_MIN_FREE_KBYTES_FLOOR = 128
_MIN_FREE_KBYTES_CEILING = 262_144
_WATERMARK_SCALE_FACTOR = 10


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
        self.__free_range(0, nr_pages)

    def __free_range(self, start: int, end: int) -> None:
        """Frees [start, end) in the largest aligned blocks, lowest block at each list's head.

        Precondition: the range is not free yet and touches no free block.
        """
        blocks: list[tuple[int, int]] = []
        pfn = start
        while pfn < end:
            order = (
                MAX_PAGE_ORDER if pfn == 0 else min(MAX_PAGE_ORDER, (pfn & -pfn).bit_length() - 1)
            )
            while pfn + (1 << order) > end:
                order -= 1
            blocks.append((pfn, order))
            pfn += 1 << order
        # Insert highest first so that popitem (the list head) yields the lowest block first.
        for pfn, order in reversed(blocks):
            self.free_area[order][pfn] = None
        self.nr_free += end - start

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
