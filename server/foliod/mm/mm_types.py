"""Folios and their kinds: what an allocation is and what it holds (include/linux/mm_types.h)."""

from __future__ import annotations

from foliod.api import FolioKind as FolioKind  # noqa: PLC0414 -- re-exported
from foliod.mm.errors import OutOfRange
from foliod.mm.page_alloc import PAGE_SIZE


class Folio:
    """A power-of-two group of 2^order pages allocated as one unit, as an object: page cache
    folios and page-table pages. (Folios an Allocate call makes are rows of a FolioTable.)

    Page cache folios keep in ``contents`` only the pages that differ from the backing file
    (written and not yet written back): page index in the folio -> page.
    """

    __slots__ = (
        "active",
        "contents",
        "dirtied_at",
        "dirty",
        "gen",
        "index",
        "kind",
        "nr_pages",
        "order",
        "pfn",
        "readahead",
        "referenced",
        "refs",
    )

    def __init__(self, pfn: int, order: int, kind: FolioKind) -> None:
        self.pfn = pfn
        self.order = order
        self.nr_pages = 1 << order
        self.kind = kind
        self.contents: dict[int, bytearray] | None = None
        # The page index of the head page (folios of files).
        self.index = 0
        # Page flags of page cache folios (PG_dirty, PG_referenced, PG_active, PG_readahead).
        self.dirty = False
        self.referenced = False
        self.active = False
        self.readahead = False
        self.dirtied_at = 0.0
        # Multi-generational LRU: generation sequence number and access count.
        self.gen = 0
        self.refs = 0

    @property
    def size_bytes(self) -> int:
        return PAGE_SIZE << self.order


def check_folio_range(handle: int, size_bytes: int, offset: int, length: int, field: str) -> None:
    """OutOfRange unless [offset, offset + length) lies inside a folio of size_bytes."""
    if offset + length > size_bytes:
        raise OutOfRange(
            f"offset {offset} + {length} bytes passes the end of folio {handle} "
            f"({size_bytes} bytes)",
            field=field,
        )


def write_pages(contents: dict[int, bytearray], offset: int, data: bytes) -> None:
    """Copies data into a folio's written pages (page index -> page) at a byte offset."""
    pos = 0
    while pos < len(data):
        index, start = divmod(offset + pos, PAGE_SIZE)
        chunk = min(PAGE_SIZE - start, len(data) - pos)
        page = contents.get(index)
        if page is None:
            page = contents[index] = bytearray(PAGE_SIZE)
        page[start : start + chunk] = data[pos : pos + chunk]
        pos += chunk


def read_pages(contents: dict[int, bytearray] | None, offset: int, length: int) -> bytes:
    """length bytes of a folio from a byte offset; pages never written read as zeros."""
    if not contents:
        return bytes(length)
    out = bytearray(length)
    pos = 0
    while pos < length:
        index, start = divmod(offset + pos, PAGE_SIZE)
        chunk = min(PAGE_SIZE - start, length - pos)
        page = contents.get(index)
        if page is not None:
            out[pos : pos + chunk] = page[start : start + chunk]
        pos += chunk
    return bytes(out)
