"""Textbook CLOCK: one reference bit per page, clear when the page comes in and set by a hit.
The hand sweeps from the oldest page: a set bit is cleared and the page passed by (second
chance), the first clear one is evicted. The list below is the clock face read from the hand;
a new page goes just behind the hand (the end).
"""

from __future__ import annotations

from typing import ClassVar

from foliod.mm.folio_store import NO_FOLIO, PG_REFERENCED, FolioStore
from foliod.mm.lru.base import OneList
from foliod.mm.vmstat import VmEvent


class Clock(OneList):
    name: ClassVar[str] = "clock"
    textbook: ClassVar[bool] = True

    def __init__(self, events: dict[VmEvent, int], store: FolioStore | None = None) -> None:
        super().__init__(events, store)
        flags = self.store.flags

        def touch(f: int) -> None:
            flags[f] |= PG_REFERENCED

        self.touch = touch

    def add(self, f: int) -> None:
        self.store.flags[f] &= ~PG_REFERENCED
        super().add(f)

    def mark_accessed(self, f: int, *, fresh: bool = False) -> None:
        if not fresh:
            self.store.flags[f] |= PG_REFERENCED

    def victim(self) -> int:
        store, face = self.store, self.head
        flags, next_ = store.flags, store.next
        while True:
            f = next_[face]
            if f == face:
                return NO_FOLIO
            if not flags[f] & PG_REFERENCED:
                return f
            flags[f] &= ~PG_REFERENCED
            store.list_move_tail(f, face)
