"""Textbook CLOCK: one reference bit per page, clear when the page comes in and set by a hit.
The hand sweeps from the oldest page: a set bit is cleared and the page passed by (second
chance), the first clear one is evicted. The list below is the clock face read from the hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from foliod.mm.folio_store import NO_FOLIO, PG_REFERENCED, FolioStore
from foliod.mm.lru.base import ReclaimPolicy
from foliod.mm.vmstat import VmEvent


class Clock(ReclaimPolicy):
    name: ClassVar[str] = "clock"

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        # From the hand onwards; a new page goes just behind the hand (the end).
        self.face = self.store.new_list()
        self.nr_folios = 0
        flags = self.store.flags

        def touch(f: int) -> None:
            flags[f] |= PG_REFERENCED

        self.touch = touch

    def add(self, f: int) -> None:
        store = self.store
        store.flags[f] &= ~PG_REFERENCED
        store.list_add_tail(f, self.face)
        self.nr_pages += 1 << store.order[f]
        self.nr_folios += 1

    def remove(self, f: int) -> None:
        self.store.list_del(f)
        self.nr_pages -= 1 << self.store.order[f]
        self.nr_folios -= 1

    def mark_accessed(self, f: int, fresh: bool = False) -> None:
        if not fresh:
            self.store.flags[f] |= PG_REFERENCED

    def victim(self) -> int:
        store, face = self.store, self.face
        flags, next_ = store.flags, store.next
        while True:
            f = next_[face]
            if f == face:
                return NO_FOLIO
            if not flags[f] & PG_REFERENCED:
                return f
            flags[f] &= ~PG_REFERENCED
            store.list_move_tail(f, face)

    def pass_over(self, f: int) -> None:
        self.store.list_move_tail(f, self.face)

    def folios(self) -> Iterator[int]:
        return self.store.list_iter(self.face)

    def lists(self) -> dict[str, int]:
        return {"clock": self.nr_folios}

    def list_pages(self) -> dict[str, int]:
        return {"clock": self.nr_pages}

    def check(self) -> None:
        super().check()
        assert self.list_lengths({"clock": self.face}) == self.lists(), "clock: count off"
