"""The kernel's two-list policy: inactive and active file lists (mm/swap.c, mm/vmscan.c).

New folios start at the inactive head. folio_mark_accessed sets PG_referenced on the first
access and activates on the second (pgactivate). Reclaim takes the inactive tail (for unmapped
page cache PG_referenced does not save a folio); when the inactive list falls below its target
share, inactive * int_sqrt(10 * GiB of both lists) < active, the active tail is deactivated
(pgdeactivate, scanned as pgrefill). A refault whose distance is within the active list's
size is activated at once (workingset_activate_file). Each list's first folio is its tail.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.folio_store import EVICTION_MASK, NO_FOLIO, PG_ACTIVE, PG_REFERENCED, FolioStore
from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.page_alloc import PAGE_SHIFT
from foliod.mm.vmstat import VmEvent

_GIB_PAGES = 1 << (30 - PAGE_SHIFT)
# Deactivate at least this many pages at a time (SWAP_CLUSTER_MAX).
_REFILL_BATCH = 32
_NOT_ACTIVE_OR_REFERENCED = ~(PG_ACTIVE | PG_REFERENCED) & 0xFF


class TwoList(ReclaimPolicy):
    name: ClassVar[str] = "two_list"

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        self.inactive = self.store.new_list()
        self.active = self.store.new_list()
        self.nr_active_pages = 0
        self.nr_folios = {"inactive_file": 0, "active_file": 0}
        flags = self.store.flags
        activate = self.activate

        def touch(f: int) -> None:
            bits = flags[f]
            if not bits & PG_REFERENCED:
                flags[f] = bits | PG_REFERENCED
            elif not bits & PG_ACTIVE:
                activate(f)

        self.touch = touch

    @property
    def nr_active(self) -> int:
        return self.nr_active_pages

    def add(self, f: int) -> None:
        store = self.store
        store.flags[f] &= ~PG_ACTIVE
        store.list_add_tail(f, self.inactive)
        self.nr_pages += 1 << store.order[f]
        self.nr_folios["inactive_file"] += 1

    def add_many(self, ids: list[int]) -> None:
        """add() of each folio in turn, linked as one chain onto the inactive list."""
        if not ids:
            return
        store = self.store
        flags, order_of, prev, next_ = store.flags, store.order, store.prev, store.next
        head = self.inactive
        tail = prev[head]
        nr_pages = 0
        for f in ids:
            flags[f] &= ~PG_ACTIVE
            next_[tail] = f
            prev[f] = tail
            tail = f
            nr_pages += 1 << order_of[f]
        next_[tail] = head
        prev[head] = tail
        self.nr_pages += nr_pages
        self.nr_folios["inactive_file"] += len(ids)

    def remove(self, f: int) -> None:
        store = self.store
        store.list_del(f)
        nr = 1 << store.order[f]
        if store.flags[f] & PG_ACTIVE:
            self.nr_active_pages -= nr
            self.nr_folios["active_file"] -= 1
        else:
            self.nr_folios["inactive_file"] -= 1
        self.nr_pages -= nr

    def recycle(self, f: int) -> int:
        """ReclaimPolicy.recycle of an inactive base page: a move to the inactive head."""
        store = self.store
        if store.flags[f] & PG_ACTIVE or store.order[f]:
            return super().recycle(f)
        store.list_move_tail(f, self.inactive)
        store.flags[f] = 0
        self.nonresident_age += 1
        return self.nonresident_age

    def mark_accessed(self, f: int, *, fresh: bool = False) -> None:
        self.touch(f)

    def activate(self, f: int) -> None:
        store = self.store
        store.list_move_tail(f, self.active)
        store.flags[f] = (store.flags[f] | PG_ACTIVE) & ~PG_REFERENCED
        nr = 1 << store.order[f]
        self.nr_active_pages += nr
        self.nr_folios["inactive_file"] -= 1
        self.nr_folios["active_file"] += 1
        self.nonresident_age += nr
        self.events[VmEvent.PGACTIVATE] += nr

    def refault(self, f: int, shadow: int) -> None:
        super().refault(f, shadow)
        # The refault distance (evictions and activations since the folio left, modulo the
        # token's bits), against workingset_test_recent's bound for file folios without swap:
        # the active list's size.
        if (self.nonresident_age - shadow) & EVICTION_MASK <= self.nr_active_pages:
            self.activate(f)
            self.events[VmEvent.WORKINGSET_ACTIVATE_FILE] += 1 << self.store.order[f]

    def shrink_active(self, nr_to_scan: int) -> None:
        """Moves folios from the active tail to the inactive head (shrink_active_list)."""
        store = self.store
        flags, order = store.flags, store.order
        scanned = moved = 0
        while scanned < nr_to_scan:
            f = store.list_first(self.active)
            if f == NO_FOLIO:
                break
            nr = 1 << order[f]
            store.list_move_tail(f, self.inactive)
            self.nr_active_pages -= nr
            scanned += nr
            moved += 1
            flags[f] &= _NOT_ACTIVE_OR_REFERENCED
        self.nr_folios["active_file"] -= moved
        self.nr_folios["inactive_file"] += moved
        self.events[VmEvent.PGDEACTIVATE] += scanned
        self.events[VmEvent.PGREFILL] += scanned

    def victim(self) -> int:
        nr_pages, nr_active = self.nr_pages, self.nr_active_pages
        gib = nr_pages // _GIB_PAGES
        store = self.store
        # inactive_is_low: the inactive list under its target share of the two.
        low = (nr_pages - nr_active) * (math.isqrt(10 * gib) if gib else 1) < nr_active
        if low or store.list_empty(self.inactive):
            self.shrink_active(max(_REFILL_BATCH, nr_active - self.nr_inactive))
        f = store.list_first(self.inactive)
        if f != NO_FOLIO:
            store.flags[f] &= ~PG_REFERENCED
        return f

    def pass_over(self, f: int) -> None:
        self.store.list_move_tail(f, self.inactive)  # back to the head, as a failed trylock

    def folios(self) -> Iterator[int]:
        yield from self.store.list_iter(self.inactive)
        yield from self.store.list_iter(self.active)

    def lists(self) -> dict[str, int]:
        return dict(self.nr_folios)

    def list_pages(self) -> dict[str, int]:
        return {
            "inactive_file": self.nr_pages - self.nr_active_pages,
            "active_file": self.nr_active_pages,
        }

    def check(self) -> None:
        super().check()
        store = self.store
        flags, order = store.flags, store.order
        heads = {"inactive_file": self.inactive, "active_file": self.active}
        assert self.list_lengths(heads) == self.lists(), "two_list: folio counts off"
        assert all(flags[f] & PG_ACTIVE for f in store.list_iter(self.active)), (
            "an active-list folio is not PG_active"
        )
        assert not any(flags[f] & PG_ACTIVE for f in store.list_iter(self.inactive)), (
            "an inactive-list folio is PG_active"
        )
        active_pages = sum(1 << order[f] for f in store.list_iter(self.active))
        assert self.nr_active_pages == active_pages, "nr_active is off"
