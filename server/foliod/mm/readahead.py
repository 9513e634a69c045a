"""On-demand readahead: the window algorithm and folio orders of mm/readahead.c.

An open file's RaState (struct file_ra_state, file->f_ra: one per open handle, and one per file
shared by reads by name) holds the current window: ``start``, ``size`` pages and
``async_size``, the tail of the window whose first folio carries PG_readahead; reading that folio
starts the next window asynchronously. The window grows 4x while small and 2x up to the maximum
(``ra_pages``, 32 pages = 128 KiB by default). A sync miss starts a window sized from the request
and resets the folio order to 0 (page_cache_sync_ra); each async round raises it by 2 and ends
the window on a boundary of that order (page_cache_async_ra, so windows of 4 KiB reads go 4, 20,
80, 320, 768 pages, not 4, 20, 84, 340, 852). page_cache_ra_order caps the order by the
mapping's largest and by ilog2(window) and lowers it per folio to keep the index aligned and
inside EOF. A small random read is read as is and leaves the state alone. ``prev_pos`` is the
byte after the last one read (filemap_read's ra->prev_pos): a read is sequential when it starts
in that page or the next, as the kernel's unsigned ``index - prev_index <= 1`` has it.

This follows Linux 6.18 (mm/readahead.c, the folio order kept in file_ra_state since 6.16);
``foliod-calibrate`` checks it against the live kernel page for page.

The page cache answers two questions through CacheView (page_cache_prev_miss and
page_cache_next_miss); everything else here is arithmetic, so the sequences can be pinned by
hand. This module is the first slice of the page cache: the filemap wiring comes with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from foliod.mm.page_alloc import PAGE_SHIFT, aligned_blocks

DEFAULT_RA_PAGES = 32
# page_cache_prev_miss wrapped below index 0: the file is cached from its start (ULONG_MAX).
NO_MISS_BEFORE_START = -1


class CacheView(Protocol):
    """What readahead asks the page cache."""

    def prev_miss(self, index: int, max_scan: int) -> int:
        """Highest uncached index in [index - max_scan + 1, index]; index - max_scan if none is,
        or NO_MISS_BEFORE_START when the scan reached below index 0 with everything cached."""
        ...

    def next_miss(self, index: int, max_scan: int) -> int:
        """Lowest uncached index in [index, index + max_scan - 1]; index + max_scan if none is."""
        ...


def roundup_pow_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def get_init_ra_size(size: int, max_pages: int) -> int:
    """The first window for a request of size pages (mm/readahead.c get_init_ra_size)."""
    newsize = roundup_pow_of_two(size)
    if newsize <= max_pages // 32:
        return newsize * 4
    if newsize <= max_pages // 4:
        return newsize * 2
    return max_pages


def get_next_ra_size(cur: int, max_pages: int) -> int:
    """The window after one of cur pages (get_next_ra_size)."""
    if cur < max_pages // 16:
        return 4 * cur
    if cur <= max_pages // 2:
        return 2 * cur
    return max_pages


@dataclass(frozen=True, slots=True)
class RaWindow:
    """Pages to read: [start, start + size); the folio holding ``mark`` gets PG_readahead
    (no mark when mark is None); ``order`` is the folio order to try first."""

    start: int
    size: int
    mark: int | None
    order: int


class RaState:
    """The readahead state of one open file description (struct file_ra_state)."""

    __slots__ = ("async_size", "order", "prev_pos", "ra_pages", "size", "start")

    def __init__(self, ra_pages: int = DEFAULT_RA_PAGES) -> None:
        self.ra_pages = ra_pages
        self.start = 0
        self.size = 0
        self.async_size = 0
        self.order = 0
        # The byte after the last one read; -1 before the first read.
        self.prev_pos = -1

    def sequential(self, index: int) -> bool:
        """Whether a read at page index follows the last one: it starts in the page the last
        read ended in or in the next (an unaligned or an aligned sequential read)."""
        return self.prev_pos >= 0 and 0 <= index - (self.prev_pos >> PAGE_SHIFT) <= 1

    def _window(self, max_order: int) -> RaWindow:
        """The current window with its folio order capped (page_cache_ra_order)."""
        self.order = min(self.order, max_order, self.size.bit_length() - 1)
        mark = self.start + self.size - self.async_size
        return RaWindow(self.start, self.size, mark if self.async_size else None, self.order)

    def reads_alone(self, index: int, req_count: int, cache: CacheView) -> bool:
        """Whether a miss of req_count pages at index is read as is, leaving the state alone:
        readahead is off, or this is a standalone small random read."""
        if not self.ra_pages:
            return True
        max_pages = max(self.ra_pages, req_count)
        if not index or req_count > max_pages or self.sequential(index):
            return False
        return index - cache.prev_miss(index - 1, max_pages) - 1 <= req_count

    def sync(self, index: int, req_count: int, cache: CacheView, max_order: int) -> RaWindow:
        """A read of req_count pages at index missed the cache (page_cache_sync_ra)."""
        if self.reads_alone(index, req_count, cache):
            return RaWindow(index, req_count, None, 0)
        # ractl_max_pages, as if the device's io_pages allowed any oversized request.
        max_pages = max(self.ra_pages, req_count)
        if not index or req_count > max_pages or self.sequential(index):
            self.start = index
            self.size = get_init_ra_size(req_count, max_pages)
            self.async_size = self.size - req_count if self.size > req_count else self.size >> 1
            self.order = 0
            return self._window(max_order)
        miss = cache.prev_miss(index - 1, max_pages)
        contig_count = index - miss - 1
        if miss == NO_MISS_BEFORE_START:
            contig_count *= 2
        self.start = index
        self.size = min(contig_count + req_count, max_pages)
        self.async_size = 1
        self.order = 0
        return self._window(max_order)

    def async_(
        self, index: int, req_count: int, folio_order: int, cache: CacheView, max_order: int
    ) -> RaWindow | None:
        """A read reached a PG_readahead folio of folio_order at index (page_cache_async_ra);
        None when no window follows."""
        if not self.ra_pages:
            return None
        max_pages = max(self.ra_pages, req_count)
        expected = (self.start + self.size - self.async_size) & ~((1 << folio_order) - 1)
        if index == expected:
            self.start += self.size
            self.size = max(self.size, get_next_ra_size(self.size, max_pages))
            self.async_size = self.size
        else:
            # A marker without matching state (interleaved streams): size up from the cache.
            start = cache.next_miss(index + 1, max_pages)
            if not start or start - index > max_pages:
                return None
            self.start = start
            self.size = get_next_ra_size(start - index + req_count, max_pages)
            self.async_size = self.size
        self.order += 2
        # End the window on a boundary of the new order (or of max_pages, whichever is finer)
        # unless that would leave nothing.
        align = 1 << min(self.order, (max_pages & -max_pages).bit_length() - 1)
        end = self.start + self.size
        aligned_end = end & ~(align - 1)
        if aligned_end > self.start:
            self.size -= end - aligned_end
        self.async_size = self.size
        return self._window(max_order)

    def note_read(self, end_pos: int) -> None:
        """Records where a read ended: the byte after its last (filemap_read's ra->prev_pos)."""
        self.prev_pos = end_pos

    def read_last_in(self, head: int, end: int) -> bool:
        """Whether the last read's last byte lies in pages [head, end): a read starting in
        that folio does not mark it accessed again (filemap_read's pos_same_folio)."""
        return head <= (self.prev_pos - 1) >> PAGE_SHIFT < end if self.prev_pos > 0 else False


def ra_folio_layout(window: RaWindow, eof_index: int) -> list[tuple[int, int]]:
    """(index, order) of each folio to allocate for a window, as page_cache_ra_order lays them
    out: the window's order where the index is aligned, the index's alignment where it is not,
    and smaller orders at the end of the window or the file. Pages past eof_index (the last
    page) are not read."""
    limit = min(eof_index, window.start + window.size - 1)
    return list(aligned_blocks(window.start, limit + 1, window.order))
