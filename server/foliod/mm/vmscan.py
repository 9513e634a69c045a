"""File LRU lists and reclaim: the two-list policy of mm/swap.c and mm/vmscan.c.

New page cache folios start on the inactive list; folio_mark_accessed sets PG_referenced on the
first access and activates on the second. Reclaim scans the inactive tail and evicts clean
folios (for unmapped page cache PG_referenced does not save a folio from reclaim). Dirty ones
are written back first and counted as pgrotated: in the kernel they rotate to the tail and are
freed once writeback ends; here writeback ends within the call. When the inactive list falls
below its target share (inactive * int_sqrt(10 * GiB of the lists) < active) the active tail
is deactivated. Lists are ordered dicts whose first item is the tail.
"""

from __future__ import annotations

import math
from typing import Protocol

from foliod.mm.mm_types import Folio
from foliod.mm.page_alloc import PAGE_SHIFT
from foliod.mm.vmstat import VmEvent

_GIB_PAGES = 1 << (30 - PAGE_SHIFT)


class Evictor(Protocol):
    """What reclaim asks of the page cache."""

    def writeback_folio(self, folio: Folio) -> None: ...

    def evict_folio(self, folio: Folio) -> None:
        """Takes the folio off its list and out of its file, and frees it."""
        ...

    def is_busy(self, folio: Folio) -> bool:
        """The folio is in use by the call that is reclaiming (locked, in kernel terms)."""
        ...


class FileLru:
    """The inactive and active file lists of one node (two_list policy)."""

    __slots__ = ("active", "events", "inactive", "nr_active", "nr_inactive")

    def __init__(self, events: dict[VmEvent, int]) -> None:
        self.inactive: dict[Folio, None] = {}
        self.active: dict[Folio, None] = {}
        self.nr_inactive = 0
        self.nr_active = 0
        self.events = events

    def add(self, folio: Folio) -> None:
        """A new page cache folio enters at the inactive head (folio_add_lru)."""
        self.inactive[folio] = None
        self.nr_inactive += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        if folio.active:
            del self.active[folio]
            self.nr_active -= folio.nr_pages
        else:
            del self.inactive[folio]
            self.nr_inactive -= folio.nr_pages

    def mark_accessed(self, folio: Folio) -> None:
        """folio_mark_accessed: inactive,unreferenced -> referenced -> active."""
        if not folio.referenced:
            folio.referenced = True
        elif not folio.active:
            self.activate(folio)

    def activate(self, folio: Folio) -> None:
        del self.inactive[folio]
        self.nr_inactive -= folio.nr_pages
        folio.active = True
        folio.referenced = False
        self.active[folio] = None
        self.nr_active += folio.nr_pages
        self.events[VmEvent.PGACTIVATE] += folio.nr_pages

    def inactive_is_low(self) -> bool:
        """inactive_is_low for file pages: the target ratio is int_sqrt(10 * GiB), at least 1."""
        gib = (self.nr_inactive + self.nr_active) // _GIB_PAGES
        ratio = math.isqrt(10 * gib) if gib else 1
        return self.nr_inactive * ratio < self.nr_active

    def shrink_active(self, nr_to_scan: int) -> None:
        """Moves folios from the active tail to the inactive head (shrink_active_list)."""
        scanned = 0
        while self.active and scanned < nr_to_scan:
            folio = next(iter(self.active))
            del self.active[folio]
            self.nr_active -= folio.nr_pages
            scanned += folio.nr_pages
            folio.active = False
            folio.referenced = False
            self.inactive[folio] = None
            self.nr_inactive += folio.nr_pages
            self.events[VmEvent.PGDEACTIVATE] += folio.nr_pages
        self.events[VmEvent.PGREFILL] += scanned

    def shrink(self, nr_to_reclaim: int, evictor: Evictor, direct: bool) -> int:
        """Reclaims up to nr_to_reclaim pages from the inactive tail; returns pages freed.

        Scans at most the pages on both lists, so it ends even when nothing can be freed.
        """
        scan_event = VmEvent.PGSCAN_DIRECT if direct else VmEvent.PGSCAN_KSWAPD
        steal_event = VmEvent.PGSTEAL_DIRECT if direct else VmEvent.PGSTEAL_KSWAPD
        freed = 0
        budget = self.nr_inactive + self.nr_active + 1
        while freed < nr_to_reclaim and budget > 0:
            if self.inactive_is_low():
                self.shrink_active(max(32, self.nr_active - self.nr_inactive))
            if not self.inactive:
                break
            folio = next(iter(self.inactive))
            budget -= folio.nr_pages
            self.events[scan_event] += folio.nr_pages
            if evictor.is_busy(folio):
                del self.inactive[folio]
                self.inactive[folio] = None  # back to the head, as a failed trylock leaves it
                continue
            folio.referenced = False
            if folio.dirty:
                # Writeback completes within the call (the machine lock is held), so the
                # folio_rotate_reclaimable step that follows it happens at once: count it, free it.
                evictor.writeback_folio(folio)
                self.events[VmEvent.PGROTATED] += folio.nr_pages
            evictor.evict_folio(folio)
            freed += folio.nr_pages
            self.events[steal_event] += folio.nr_pages
        return freed
