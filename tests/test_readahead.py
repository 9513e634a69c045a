"""Readahead windows and folio orders, pinned against values worked out by hand from the kernel."""

from __future__ import annotations

import pytest

from foliod.mm.readahead import (
    NO_MISS_BEFORE_START,
    RaState,
    RaWindow,
    get_init_ra_size,
    get_next_ra_size,
    ra_folio_layout,
)


class Cached:
    """A page cache that holds exactly a set of indices."""

    def __init__(self, indices: set[int]) -> None:
        self.indices = indices

    def prev_miss(self, index: int, max_scan: int) -> int:
        for i in range(index, index - max_scan, -1):
            if i < 0:
                return NO_MISS_BEFORE_START
            if i not in self.indices:
                return i
        return index - max_scan

    def next_miss(self, index: int, max_scan: int) -> int:
        for i in range(index, index + max_scan):
            if i not in self.indices:
                return i
        return index + max_scan


@pytest.mark.parametrize(
    ("size", "max_pages", "expected"),
    [
        (1, 32, 4),  # 1 <= 32/32: x4
        (2, 32, 4),  # 2 <= 32/4: x2
        (4, 32, 8),
        (8, 32, 16),
        (9, 32, 32),  # rounds up to 16 > 32/4: the maximum
        (1, 128, 4),
        (4, 128, 16),  # 4 <= 128/32: x4
        (64, 32, 32),
    ],
)
def test_initial_window(size: int, max_pages: int, expected: int) -> None:
    """The first window is the request rounded up to a power of two, x4 or x2, or the maximum."""
    assert get_init_ra_size(size, max_pages) == expected


@pytest.mark.parametrize(
    ("cur", "max_pages", "expected"),
    [(1, 32, 4), (2, 32, 4), (4, 32, 8), (8, 32, 16), (16, 32, 32), (32, 32, 32), (4, 128, 16)],
)
def test_next_window(cur: int, max_pages: int, expected: int) -> None:
    """Windows grow x4 below max/16, x2 up to max/2, then stay at the maximum."""
    assert get_next_ra_size(cur, max_pages) == expected


def test_sequential_read_window_sequence() -> None:
    """16 KiB sequential reads of 100 pages (Linux 6.18, worked by hand): windows 8, 16, 24,
    16, 32, 32 pages at orders 0, 2, 4, 4, 5, 5. Each async window ends on a boundary of its
    order (or of ra_pages, whichever is finer), which trims 32 to 24 and then 32 to 16."""
    ra = RaState()  # 32 pages = 128 KiB
    cache = Cached(set())
    eof = 99

    def read_window(window: RaWindow) -> list[tuple[int, int]]:
        layout = ra_folio_layout(window, eof)
        for index, order in layout:
            cache.indices.update(range(index, index + (1 << order)))
        return layout

    # Read 0..3 misses: init window 4 -> x2 = 8, async tail 4, marker on page 4, base pages.
    first = ra.sync(0, 4, cache, max_order=9)
    assert first == RaWindow(start=0, size=8, mark=4, order=0)
    assert read_window(first) == [(i, 0) for i in range(8)]
    ra.note_read(4 * 4096)
    # Read 4..7 hits the marker on order-0 page 4: next window 16 at order 2, ending on 24 (a
    # multiple of 4 already).
    second = ra.async_(4, 4, folio_order=0, cache=cache, max_order=9)
    assert second == RaWindow(start=8, size=16, mark=8, order=2)
    assert read_window(second) == [(8, 2), (12, 2), (16, 2), (20, 2)]
    ra.note_read(8 * 4096)
    # Read 8..11 hits the marker on the order-2 folio at 8: window 32 at order 4 would end at
    # 56; rounded down to a multiple of 16 it ends at 48 (24 pages). Index 24 is only 8-aligned.
    third = ra.async_(8, 4, folio_order=2, cache=cache, max_order=9)
    assert third == RaWindow(start=24, size=24, mark=24, order=4)
    assert read_window(third) == [(24, 3), (32, 4)]
    # Reads of 12..23 hit without a marker; 24 carries the next one. Order 4 + 2 = 6, aligned to
    # ra_pages' 32 at most: 48 + 32 = 80 rounds down to 64, a window of 16 (ilog2: order 4).
    fourth = ra.async_(24, 4, folio_order=3, cache=cache, max_order=9)
    assert fourth == RaWindow(start=48, size=16, mark=48, order=4)
    assert read_window(fourth) == [(48, 4)]
    # 48 carries it on: 64 + 32 = 96 is aligned, order 8 capped by ilog2(32) to 5.
    fifth = ra.async_(48, 4, folio_order=4, cache=cache, max_order=9)
    assert fifth == RaWindow(start=64, size=32, mark=64, order=5)
    assert read_window(fifth) == [(64, 5)]
    # The last window is cut at EOF (page 99): 96..99 is one order-2 folio.
    sixth = ra.async_(64, 4, folio_order=5, cache=cache, max_order=9)
    assert sixth == RaWindow(start=96, size=32, mark=96, order=5)
    assert read_window(sixth) == [(96, 2)]


def test_sequential_reads_follow_the_end_of_the_last_read() -> None:
    """prev_pos is the byte after the last one read: a read starting in that page or the next
    is sequential (index - prev_index <= 1, unsigned), so skipping one page after a read that
    ended on a page boundary still counts, and re-reading the last page does not."""
    cache = Cached(set(range(8)))
    ra = RaState()
    ra.note_read(8 * 4096)  # read pages ..7, ended on a boundary: prev_index 8
    assert ra.sequential(8) and ra.sequential(9)
    assert not ra.sequential(7) and not ra.sequential(10)
    ra.note_read(8 * 4096 + 100)  # ended inside page 8
    assert ra.sequential(8) and ra.sequential(9) and not ra.sequential(10)
    # A sequential miss starts an initial window there instead of reading alone.
    assert ra.sync(9, 1, cache, max_order=9) == RaWindow(start=9, size=4, mark=10, order=0)
    assert not RaState().sequential(0)  # nothing read yet


def test_mapping_max_order_caps_the_folio_order() -> None:
    """A mapping limited to order 0 gets base pages in every window."""
    ra = RaState()
    cache = Cached(set(range(8)))
    ra.sync(0, 4, cache, max_order=0)
    window = ra.async_(4, 4, folio_order=0, cache=cache, max_order=0)
    assert window is not None and window.order == 0
    assert ra_folio_layout(window, 1000) == [(i, 0) for i in range(8, 24)]


def test_small_random_read_leaves_the_state_alone() -> None:
    """A one-page read far from the stream reads one page and keeps the stream's window."""
    ra = RaState()
    cache = Cached(set(range(8)))
    ra.sync(0, 4, cache, max_order=9)
    ra.note_read(4 * 4096)
    before = (ra.start, ra.size, ra.async_size, ra.order)
    assert ra.sync(50, 1, cache, max_order=9) == RaWindow(start=50, size=1, mark=None, order=0)
    assert (ra.start, ra.size, ra.async_size, ra.order) == before


def test_file_cached_from_its_start_doubles_the_history() -> None:
    """A new reader at page 16 of a file cached from page 0 takes a full window at once."""
    ra = RaState()
    window = ra.sync(16, 4, Cached(set(range(16))), max_order=9)
    # contig 16, doubled to 32 because the cache reaches the start; min(32 + 4, 32) = 32.
    assert window == RaWindow(start=16, size=32, mark=47, order=0)


def test_interleaved_marker_without_state_sizes_up_from_the_cache() -> None:
    """A marker hit that the state did not expect sizes the window from the cached run ahead."""
    ra = RaState()
    cache = Cached(set(range(100, 108)))
    # The state describes another stream; index 100 is not where it expects a marker.
    window = ra.async_(100, 4, folio_order=0, cache=cache, max_order=9)
    # next miss after 100 is 108: size = next(108 - 100 + 4 = 12) = 24 (12 <= 16: x2).
    assert window == RaWindow(start=108, size=24, mark=108, order=2)


def test_readahead_off_reads_only_the_request() -> None:
    """With ra_pages 0 a miss reads just the request and no marker is set."""
    ra = RaState(ra_pages=0)
    assert ra.sync(0, 4, Cached(set()), max_order=9) == RaWindow(0, 4, None, 0)
    assert ra.async_(4, 4, 0, Cached(set()), max_order=9) is None
