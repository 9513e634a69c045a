"""The kernel's two-list policy: inactive and active file lists (mm/swap.c, mm/vmscan.c).

New folios start at the inactive head. folio_mark_accessed sets PG_referenced on the first
access and activates on the second (pgactivate). Reclaim takes the inactive tail (for unmapped
page cache PG_referenced does not save a folio); when the inactive list falls below its target
share, inactive * int_sqrt(10 * GiB of both lists) < active, the active tail is deactivated
(pgdeactivate, scanned as pgrefill). A refault whose distance is within the active list's
size is activated at once (workingset_activate_file). Lists are ordered dicts: first = tail.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.mm_types import Folio
from foliod.mm.page_alloc import PAGE_SHIFT
from foliod.mm.vmstat import VmEvent

_GIB_PAGES = 1 << (30 - PAGE_SHIFT)
# Deactivate at least this many pages at a time (SWAP_CLUSTER_MAX).
_REFILL_BATCH = 32


class TwoList(ReclaimPolicy):
    name: ClassVar[str] = "two_list"

    def __init__(self, events: dict[VmEvent, int]) -> None:
        super().__init__(events)
        self.inactive: OrderedDict[Folio, None] = OrderedDict()
        self.active: OrderedDict[Folio, None] = OrderedDict()
        self.__nr_active = 0

    @property
    def nr_active(self) -> int:
        return self.__nr_active

    def add(self, folio: Folio) -> None:
        folio.active = False
        self.inactive[folio] = None
        self.nr_pages += folio.nr_pages

    def remove(self, folio: Folio) -> None:
        if folio.active:
            del self.active[folio]
            self.__nr_active -= folio.nr_pages
        else:
            del self.inactive[folio]
        self.nr_pages -= folio.nr_pages

    def mark_accessed(self, folio: Folio, fresh: bool = False) -> None:
        if not folio.referenced:
            folio.referenced = True
        elif not folio.active:
            self.activate(folio)

    def activate(self, folio: Folio) -> None:
        del self.inactive[folio]
        folio.active = True
        folio.referenced = False
        self.active[folio] = None
        self.__nr_active += folio.nr_pages
        self.nonresident_age += folio.nr_pages
        self.events[VmEvent.PGACTIVATE] += folio.nr_pages

    def refault(self, folio: Folio, shadow: int) -> None:
        super().refault(folio, shadow)
        # The refault distance (evictions and activations since the folio left), against
        # workingset_test_recent's bound for file folios without swap: the active list's size.
        if self.nonresident_age - shadow <= self.__nr_active:
            self.activate(folio)
            self.events[VmEvent.WORKINGSET_ACTIVATE_FILE] += folio.nr_pages

    def shrink_active(self, nr_to_scan: int) -> None:
        """Moves folios from the active tail to the inactive head (shrink_active_list)."""
        scanned = 0
        while self.active and scanned < nr_to_scan:
            folio = next(iter(self.active))
            del self.active[folio]
            self.__nr_active -= folio.nr_pages
            scanned += folio.nr_pages
            folio.active = False
            folio.referenced = False
            self.inactive[folio] = None
            self.events[VmEvent.PGDEACTIVATE] += folio.nr_pages
        self.events[VmEvent.PGREFILL] += scanned

    def victim(self) -> Folio | None:
        nr_pages, nr_active = self.nr_pages, self.__nr_active
        gib = nr_pages // _GIB_PAGES
        # inactive_is_low: the inactive list under its target share of the two.
        low = (nr_pages - nr_active) * (math.isqrt(10 * gib) if gib else 1) < nr_active
        if low or not self.inactive:
            self.shrink_active(max(_REFILL_BATCH, self.__nr_active - self.nr_inactive))
        if not self.inactive:
            return None
        folio = next(iter(self.inactive))
        folio.referenced = False
        return folio

    def pass_over(self, folio: Folio) -> None:
        self.inactive.move_to_end(folio)  # back to the head, as a failed trylock leaves it

    def folios(self) -> Iterator[Folio]:
        yield from self.inactive
        yield from self.active

    def lists(self) -> dict[str, int]:
        return {"inactive_file": len(self.inactive), "active_file": len(self.active)}

    def list_pages(self) -> dict[str, int]:
        return {"inactive_file": self.nr_pages - self.__nr_active, "active_file": self.__nr_active}

    def check(self) -> None:
        super().check()
        assert all(f.active for f in self.active), "an active-list folio is not PG_active"
        assert not any(f.active for f in self.inactive), "an inactive-list folio is PG_active"
        assert self.__nr_active == sum(f.nr_pages for f in self.active), "nr_active is off"
